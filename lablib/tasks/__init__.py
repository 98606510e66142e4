"""Task data generators (vectorized or fast, seeded) and their scoring; no config classes and no training (those live in `lablib.experiments`)."""
