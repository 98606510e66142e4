#!/usr/bin/env bash
# GPU check: GPT-2 small (124M parameters), sequence 1024, bf16 autocast, torch.compile.
#
# Measures, on whatever CUDA GPU is present, in a few minutes:
#   1. training-step tokens/s, MFU (6N + 12*L*H*Q*T FLOPs per token over the GPU's dense
#      bf16 peak, lablib.train.PEAK_FLOPS: 989 TFLOP/s for an H100) and step memory of the
#      lab's Transformer vs transformers' GPT2LMHeadModel, same weights, same AdamW;
#   2. the GPU rows of the hardware policy (fused vs foreach AdamW, bf16 vs fp32+TF32,
#      SDPA's default kernel vs math), eager;
#   3. data pipeline throughput vs the `gpu` preset's consumption.
# Each writes benchmarks/results/<name>.json and its table into benchmarks/README.md
# (sections gpu_gpt2_small, policy_cuda, data_cuda), with the GPU's name and the date.
#
# Run from anywhere, with a CUDA build of torch and `pip install -e '.[dev]'` done:
#     bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
# Knobs (environment): BATCH (default 16 sequences of 1024), REPEATS (10), SKIP_POLICY=1, SKIP_DATA=1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
BATCH=${BATCH:-16}
REPEATS=${REPEATS:-10}

"$PYTHON" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch first")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

start=$(date +%s)
"$PYTHON" benchmarks/bench_train_step.py --sizes gpt2-small --modes cuda-bf16-compiled --seq 1024 \
    --batch "$BATCH" --warmup 3 --repeats "$REPEATS" --name gpu_gpt2_small
if [ -z "${SKIP_POLICY:-}" ]; then
    "$PYTHON" benchmarks/bench_policy.py --device cuda --size gpt2-small --seq 1024 --batch "$BATCH" \
        --knobs fused_adamw,dtype,sdpa --warmup 2 --repeats 5
fi
if [ -z "${SKIP_DATA:-}" ]; then
    "$PYTHON" benchmarks/bench_data.py --device cuda --chars 1000000
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; tables in benchmarks/README.md, raw numbers in benchmarks/results/"
