"""Synthetic task generators (vectorized or fast, seeded) and their evaluators."""
