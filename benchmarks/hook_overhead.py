"""Cost of the hook points when nothing is attached.

Peer: the same model, same weights, with `HookPoint.__call__` replaced by a bare
`return x` (no nn.Module dispatch at all), i.e. what a model without hook points
would cost. Prints medians of forward+backward time over repeats, interleaving the
two variants so machine load hits both alike, and the ratio hooks / no hooks.

    .venv/bin/python benchmarks/hook_overhead.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lablib.config import ModelConfig
from lablib.models import HookPoint, Transformer

SIZES = {"0.9M": dict(n_layer=4, n_head=4, d_model=128), "6M": dict(n_layer=6, n_head=8, d_model=256)}


def step_time(model: Transformer, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(x[:, :-1]).float().logsumexp(-1).mean().backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(Path(__file__).with_name("results") / "hook_overhead.json"))
    args = parser.parse_args()
    rows = []
    original_call = HookPoint.__call__
    for name, size in SIZES.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=2048, max_seq_len=256, **size))
        x = torch.randint(0, 2048, (8, 257))
        times = {"hooks": [], "bare": []}
        for variant in ("hooks", "bare") * 2:  # warm-up
            step_time(model, x)
        for _ in range(args.repeats):
            for variant in ("hooks", "bare"):
                HookPoint.__call__ = original_call if variant == "hooks" else (lambda self, t: t)
                times[variant].append(step_time(model, x))
        HookPoint.__call__ = original_call
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "hook_points": len(model.hook_points()), "hooks_ms": med["hooks"] * 1e3,
                     "bare_ms": med["bare"] * 1e3, "ratio": med["hooks"] / med["bare"]})
    print(f"{'model':>6} {'hook points':>11} {'with hooks (ms)':>16} {'bare (ms)':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['model']:>6} {r['hook_points']:>11} {r['hooks_ms']:>16.2f} {r['bare_ms']:>10.2f} {r['ratio']:>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
