"""Training-step throughput and memory: the lab's Transformer vs transformers' GPT2LMHeadModel.

Both models have the same architecture and the very same weights (the GPT-2 model is
`lablib.gpt2.to_gpt2(lab_model)`), the same AdamW (the lab's `make_optimizer` under
the lab's hardware policy) and the same batch; each is driven the way its users
drive it: the lab's model through `lablib.objectives.CausalLM`, GPT-2 through
`model(input_ids, labels=...)`. A step is forward + loss + backward + AdamW step.

Timing: after warm-up (which includes compilation), steps of the two models are
timed in alternating order (lab, gpt2, gpt2, lab, ...) so that other processes on a
shared machine slow both alike; the table shows median tokens/s and, as lab / gpt2,
the median of the step-by-step speed ratios (robust to load that shifts mid-run).

Memory: on CPU, the peak resident memory (VmHWM) of a fresh process while it
builds one model and trains it for two eager steps, above its resident memory
before (model, gradients, AdamW state, activations); on CUDA, the peak allocated memory of a step
above what stays allocated between steps.

    python benchmarks/bench_train_step.py                         # CPU: 1M, 10M, 30M x eager, compiled
    python benchmarks/bench_train_step.py --sizes gpt2-small --modes cuda-bf16-compiled --seq 1024 --batch 16
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common import RESULTS, interleaved, machine, markdown_table, median, stamp, update_readme, write_results

from lablib.config import ModelConfig, TrainConfig
from lablib.gpt2 import to_gpt2
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.train import PEAK_FLOPS, make_optimizer, resolve_hardware

# GPT-2-shaped models; the small vocabulary keeps the embedding from dominating the small sizes
SIZES = {
    "1M": dict(n_layer=4, n_head=4, d_model=128, vocab_size=2048),
    "10M": dict(n_layer=6, n_head=6, d_model=384, vocab_size=2048),
    "30M": dict(n_layer=9, n_head=8, d_model=512, vocab_size=2048),
    "gpt2-small": dict(n_layer=12, n_head=12, d_model=768, vocab_size=50257),  # 124M
}
MODES = {
    "cpu-eager": dict(device="cpu", dtype="float32", compile="off"),
    "cpu-compiled": dict(device="cpu", dtype="float32", compile="on"),
    "cuda-bf16-compiled": dict(device="cuda", dtype="bfloat16", compile="on"),
}
MODELS = ("lab", "gpt2")


@dataclass
class Bench:
    step: Callable[[], None]
    params: int
    flops_per_token: float
    policy: object


def build(model_name: str, size: str, mode: str, batch: int, seq: int, seed: int = 0, **policy_knobs) -> Bench:
    """A ready-to-call training step of `model_name` ('lab' or 'gpt2') at `size` under `mode`.

    policy_knobs: TrainConfig hardware fields (fused_adamw, dtype, ...) overriding the mode's.
    """
    cfg = TrainConfig(**{**MODES[mode], **policy_knobs})
    policy = resolve_hardware(cfg)
    if policy.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    lab = Transformer(ModelConfig(max_seq_len=seq, activation="gelu_tanh", dropout=0.0, **SIZES[size]))
    flops = lab.flops_per_token(seq)
    model = lab if model_name == "lab" else to_gpt2(lab)
    if model_name == "gpt2":
        model.config.use_cache = False  # training: no key/value cache
    model.to(policy.device).train()
    optimizer = make_optimizer(model, cfg, policy)
    net = torch.compile(model) if policy.compile else model
    tokens = torch.randint(0, SIZES[size]["vocab_size"], (batch, seq + 1),
                           generator=torch.Generator().manual_seed(seed)).to(policy.device)
    objective, gen = CausalLM(), torch.Generator()

    def lab_loss():
        return objective(net, {"tokens": tokens}, gen)[0]

    def gpt2_loss():
        return net(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss

    loss_fn = lab_loss if model_name == "lab" else gpt2_loss

    def step():
        with policy.autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Bench(step, sum(p.numel() for p in lab.parameters()), flops, policy)


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(field + r":\s+(\d+)", status).group(1))


def probe_cpu_memory(model_name: str, size: str, batch: int, seq: int, steps: int = 2) -> float:
    """MB: peak RSS while building and training `model_name` for `steps` eager CPU steps, above the RSS before."""
    build(model_name, "1M", "cpu-eager", 1, 8).step()  # lazy imports and one-off caches are not the model's memory
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = rss_kib("VmRSS")
    bench = build(model_name, size, "cpu-eager", batch, seq)
    for _ in range(steps):
        bench.step()
    return (rss_kib("VmHWM") - before) / 1024


def cpu_peak_memory_mb(model_name: str, size: str, batch: int, seq: int) -> float:
    """probe_cpu_memory in a fresh process, so neither model's memory hides the other's."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_train_step as b; "
            f"print(b.probe_cpu_memory({model_name!r}, {size!r}, {batch}, {seq}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cuda_step_peak_mb(step: Callable[[], None]) -> float:
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - resident) / 2**20


def measure(size: str, mode: str, batch: int, seq: int, warmup: int, repeats: int, memory: bool) -> dict:
    load_at_start = os.getloadavg()[0]
    benches = {name: build(name, size, mode, batch, seq) for name in MODELS}
    device = MODES[mode]["device"]
    warmup_s = {}
    for name, bench in benches.items():  # the first steps compile (when compiled) and fill caches
        t0 = time.perf_counter()
        for _ in range(warmup):
            bench.step()
        if device == "cuda":
            torch.cuda.synchronize()
        warmup_s[name] = time.perf_counter() - t0
    times = interleaved({name: b.step for name, b in benches.items()}, repeats, device)
    tokens = batch * seq
    row = {"size": size, "mode": mode, "params": benches["lab"].params, "batch": batch, "seq": seq,
           "threads": torch.get_num_threads(), "repeats": repeats, "load_average": [load_at_start, os.getloadavg()[0]],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "warmup_s": warmup_s, "step_s": times}
    for name in MODELS:
        row[f"{name}_tok_s"] = tokens / median(times[name])
    row["ratio"] = row["lab_tok_s"] / row["gpt2_tok_s"]
    row["paired_ratios"] = [g / l for l, g in zip(times["lab"], times["gpt2"])]  # lab speed-up, step by step
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        if peak:
            for m in MODELS:
                row[f"{m}_mfu"] = benches["lab"].flops_per_token * row[f"{m}_tok_s"] / peak
        if memory:
            for m in MODELS:
                row[f"{m}_mem_mb"] = cuda_step_peak_mb(benches[m].step)
    elif memory and mode == "cpu-eager":
        del benches
        for m in MODELS:
            row[f"{m}_mem_mb"] = cpu_peak_memory_mb(m, size, batch, seq)
    return row


def table_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        line = {"size": f"{r['size']} ({r['params'] / 1e6:.1f}M)", "mode": r["mode"],
                "lab tok/s": f"{r['lab_tok_s']:,.0f}", "gpt2 tok/s": f"{r['gpt2_tok_s']:,.0f}",
                "lab / gpt2": f"{median(r['paired_ratios']):.2f}x",
                "lab faster in": f"{sum(x > 1 for x in r['paired_ratios'])}/{len(r['paired_ratios'])} steps",
                "ratio of medians": f"{r['ratio']:.2f}x"}
        if "lab_mem_mb" in r:
            line["memory lab / gpt2 (MB)"] = f"{r['lab_mem_mb']:,.0f} / {r['gpt2_mem_mb']:,.0f}"
        if "lab_mfu" in r:
            line["MFU lab / gpt2"] = f"{r['lab_mfu']:.1%} / {r['gpt2_mfu']:.1%}"
        line["warm-up s lab / gpt2"] = f"{r['warmup_s']['lab']:.0f} / {r['warmup_s']['gpt2']:.0f}"
        if "load_average" in r:
            line["load avg"] = f"{r['load_average'][0]:.0f}-{r['load_average'][1]:.0f}"
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,30M")
    parser.add_argument("--modes", default=None, help="default: the CPU modes, plus CUDA when a GPU is present")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per model (alternating)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core); 1 is steadier on a busy shared machine")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--name", default="train_step", help="results/<name>.json and the README section")
    parser.add_argument("--merge", action="store_true", help="keep the earlier rows of other sizes / modes")
    parser.add_argument("--report", action="store_true", help="only rewrite the README section from the results")
    args = parser.parse_args()
    if args.report:
        print(report(args.name))
        return
    modes = args.modes.split(",") if args.modes else (
        ["cpu-eager", "cpu-compiled"] + (["cuda-bf16-compiled"] if torch.cuda.is_available() else []))
    unknown = [m for m in modes if m not in MODES] + [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        parser.error(f"unknown size or mode {unknown}; sizes: {', '.join(SIZES)}; modes: {', '.join(MODES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    rows = []
    for size in args.sizes.split(","):
        for mode in modes:
            row = measure(size, mode, args.batch, args.seq, args.warmup, args.repeats, not args.no_memory)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("step_s", "paired_ratios")}, default=str),
                  flush=True)
    info["load_average_at_end"] = os.getloadavg()
    if args.merge and (RESULTS / f"{args.name}.json").is_file():  # keep earlier rows of other sizes / modes
        done = {(r["size"], r["mode"]) for r in rows}
        earlier = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
        rows = [r for r in earlier if (r["size"], r["mode"]) not in done] + rows
    write_results(args.name, {"machine": info, "args": vars(args), "rows": rows})
    print(report(args.name))


def report(name: str) -> str:
    """Rewrite the README section of results/<name>.json; returns the table."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    order = {key: i for i, key in enumerate((size, mode) for size in SIZES for mode in MODES)}
    rows = table_rows(sorted(data["rows"], key=lambda r: order[(r["size"], r["mode"])]))
    table = markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r)))
    first = data["rows"][0]
    update_readme(name, f"{table}\n\n{stamp(data['machine'], data['date'])} {first.get('threads', data['args'].get('threads'))} torch thread(s), "
                        f"batch {first['batch']} x seq {first['seq']}; tok/s are medians of alternating steps; 'lab / gpt2' is the "
                        "median of the step-by-step speed ratios (each lab step against the gpt2 step next to it), "
                        "which stays put when the machine's load shifts mid-row, unlike the ratio of medians; "
                        "'load avg' is the machine's 1-minute load average before and after the row (2 cores); "
                        f"raw numbers: `results/{name}.json`.")
    return table


if __name__ == "__main__":
    main()
