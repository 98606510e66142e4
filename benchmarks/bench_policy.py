"""The hardware policy's choices, measured: each default against its alternative on this machine.

For one model size (the lab's Transformer, GPT-2 shaped, seq 256) each row times
a training step with the policy's choice and with the alternative, interleaved
(A B B A ...), and reports medians and the ratio. These are the numbers written
next to the defaults in `lablib.train.resolve_hardware`.

Rows (CPU): compile off vs on (and the seconds compilation costs), foreach vs
fused AdamW, float32 vs bfloat16 autocast, all cores vs one thread, and SDPA's
default kernel choice vs the plain math kernel. On a CUDA machine the same rows
run on the GPU (bf16 vs float32, fused vs foreach, compile, flash vs math).

    python benchmarks/bench_policy.py [--size 10M] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_train_step import build
from common import RESULTS, interleaved, machine, markdown_table, median, stamp, update_readme, write_results

CPU_THREADS = os.cpu_count() or 1


def variants(device: str) -> dict[str, tuple[tuple[str, dict], tuple[str, dict]]]:
    """knob -> ((label A, spec A), (label B, spec B)); a spec holds TrainConfig knobs, threads, an SDPA kernel."""
    eager = {"compile": "off"}  # every row but 'compile' times eager steps, so compilation does not blur them
    rows = {
        "compile": (("off", {"knobs": {"compile": "off"}}), ("on", {"knobs": {"compile": "on"}})),
        "fused_adamw": (("foreach", {"knobs": {**eager, "fused_adamw": "off"}}),
                        ("fused", {"knobs": {**eager, "fused_adamw": "on"}})),
        "dtype": (("float32", {"knobs": {**eager, "dtype": "float32"}}),
                  ("bfloat16", {"knobs": {**eager, "dtype": "bfloat16"}})),
        "sdpa": (("default", {"knobs": eager}), ("math", {"knobs": eager, "sdpa": SDPBackend.MATH})),
    }
    if device == "cpu":
        rows["num_threads"] = ((str(CPU_THREADS), {"knobs": eager, "threads": CPU_THREADS}),
                               ("1", {"knobs": eager, "threads": 1}))
    return rows


def make_step(spec: dict, device: str, size: str, batch: int, seq: int):
    mode = "cpu-eager" if device == "cpu" else "cuda-bf16-compiled"
    bench = build("lab", size, mode, batch, seq, **spec["knobs"])
    threads = spec.get("threads")
    kernel = spec.get("sdpa")

    def step():
        base = torch.get_num_threads()
        torch.set_num_threads(threads or base)
        with sdpa_kernel(kernel) if kernel is not None else contextlib.nullcontext():
            bench.step()
        torch.set_num_threads(base)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--knobs", default=None, help="comma-separated subset of the rows")
    parser.add_argument("--name", default=None, help="results/<name>.json and README section (default: policy_<device>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every row but num_threads (default: torch's, one per core)")
    parser.add_argument("--report", action="store_true", help="only rewrite the README section from the results")
    args = parser.parse_args()
    if args.report:
        print(report(args.name or f"policy_{args.device}"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    rows = []
    table = variants(args.device)
    for knob in (args.knobs.split(",") if args.knobs else table):
        (a_label, a_spec), (b_label, b_spec) = table[knob]
        steps, warmup_s = {}, {}
        for label, spec in ((a_label, a_spec), (b_label, b_spec)):
            steps[label] = make_step(spec, args.device, args.size, args.batch, args.seq)
            t0 = time.perf_counter()
            for _ in range(args.warmup):
                steps[label]()
            warmup_s[label] = time.perf_counter() - t0
        times = interleaved(steps, args.repeats, args.device)
        tokens = args.batch * args.seq
        row = {"knob": knob, "a": a_label, "b": b_label, "a_tok_s": tokens / median(times[a_label]),
               "b_tok_s": tokens / median(times[b_label]), "warmup_s": warmup_s, "step_s": times}
        row["b_over_a"] = row["b_tok_s"] / row["a_tok_s"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_s"}, default=str), flush=True)
    info["load_average_at_end"] = os.getloadavg()
    name = args.name or f"policy_{args.device}"
    write_results(name, {"machine": info, "args": vars(args), "threads": torch.get_num_threads(), "rows": rows})
    print(report(name))


def report(name: str) -> str:
    """Rewrite the README section of results/<name>.json; returns the table."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    args = data["args"]
    shown = []
    for r in data["rows"]:
        a, b = r["step_s"][r["a"]], r["step_s"][r["b"]]
        shown.append({"knob": r["knob"], "A": r["a"], "B": r["b"], "A tok/s": f"{r['a_tok_s']:,.0f}",
                      "B tok/s": f"{r['b_tok_s']:,.0f}", "B / A": f"{r['b_over_a']:.2f}x",
                      "paired B / A": f"{median([x / y for x, y in zip(a, b)]):.2f}x",
                      "paired range": f"{min(x / y for x, y in zip(a, b)):.2f}-{max(x / y for x, y in zip(a, b)):.2f}",
                      "warm-up s A / B": f"{r['warmup_s'][r['a']]:.0f} / {r['warmup_s'][r['b']]:.0f}"})
    text = markdown_table(shown, list(shown[0]))
    update_readme(name, f"{text}\n\n{stamp(data['machine'], data['date'])} {data.get('threads', args.get('threads'))} "
                        f"torch thread(s) unless the row says otherwise; lab model {args['size']}, batch {args['batch']} x "
                        f"seq {args['seq']}; tok/s are medians of {args['repeats']} alternating steps, 'paired' the median "
                        f"(and range) of the step-by-step speed ratios; raw numbers: `results/{name}.json`.")
    return text


if __name__ == "__main__":
    main()
