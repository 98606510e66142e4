#!/usr/bin/env bash
# Causal axioms at the paper's shape and recipe (Vashishtha et al. 2024): the `paper` preset of
# lablib.experiments.causal_axioms — 12 layers x 512 x 8 heads, constant learning rate 1e-4, no
# warm-up, ~175k single-question training instances (2,734 steps x 64), loss on the answer token,
# BOS on — for every positional encoding (none, learned, sinusoidal, rope) and seeds 0-2, through
# notebooks/03_causal_axioms.ipynb (recipe fixed at the paper's, so the dev search has one point).
#
# Needs a CUDA GPU (a few minutes per run on an H100-class GPU, 12 runs). Writes one run folder
# under runs/causal_axioms/ (results.json, the executed notebook, each model's folder); then
#     lablib report --collect runs/causal_axioms/<run-id>   # only to replace the committed cpu result
# Run from anywhere:   bash benchmarks/causal_axioms_paper.sh   (PYTHON=... to pick the interpreter;
# ENCODINGS='["none","rope"]' or SEEDS='[0]' to run fewer)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
ENCODINGS=${ENCODINGS:-'["none", "learned", "sinusoidal", "rope"]'}
SEEDS=${SEEDS:-'[0, 1, 2]'}

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"causal_axioms_paper: torch {torch.__version__} sees no CUDA GPU; the paper preset is for a GPU")
print(f"causal_axioms_paper: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY

"$PYTHON" -m lablib.cli run notebooks/03_causal_axioms.ipynb --preset paper \
    -p encodings "$ENCODINGS" -p seeds "$SEEDS" -p overrides '{"device": "cuda"}'
