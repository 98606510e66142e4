#!/usr/bin/env bash
# How long notebook 02's whole grid takes: `lablib run notebooks/02_objectives.ipynb` at a preset
# (default cpu: six objectives x seeds 0-2, minimal pairs, probes, fine-tuning, retrieval and the
# induction check), on one torch thread unless THREADS says otherwise. Prints the wall time, the load
# average before and after, and the run folder; the grid's own `wall_seconds` is in its results.json.
#
# Run from anywhere:   bash benchmarks/objectives_grid.sh   (PRESET=smoke for the plumbing only;
# PYTHON=... to pick the interpreter; THREADS=2 to let torch use two threads)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
PRESET=${PRESET:-cpu}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
RUN_DIR=${RUN_DIR:-runs/objectives/benchmark-$PRESET-$(date +%Y%m%d-%H%M%S)}

echo "objectives_grid: preset $PRESET, $OMP_NUM_THREADS thread(s), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
"$PYTHON" -m lablib.cli run notebooks/02_objectives.ipynb --preset "$PRESET" --run-dir "$RUN_DIR"
end=$(date +%s)
echo "objectives_grid: wall time $((end - start)) s ($(( (end - start) / 60 )) min $(( (end - start) % 60 )) s)," \
     "load after: $(cut -d' ' -f1-3 /proc/loadavg); run folder $RUN_DIR"
