"""One module per notebook: its config class, presets, and the `train_*` / `evaluate_*` drivers it composes.

`lablib/experiments/<name>.py` belongs to `notebooks/NN_<name>.ipynb`. Experiment modules may import
any core, `tasks` and `interp` module; nothing in the core imports them.
"""
