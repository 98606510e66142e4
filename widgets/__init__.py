"""Jupyter UI over lablib: the checkpoint explorer (`CheckpointExplorer`, `RunComparison`) and its figures."""

from widgets.explorer import CheckpointExplorer, RunComparison

__all__ = ["CheckpointExplorer", "RunComparison"]
