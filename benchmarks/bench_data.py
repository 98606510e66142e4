"""Data pipeline throughput against what the training loop consumes.

Three numbers in tokens per second, measured in this process:
- tokenize: `Tokenizer.encode_batch` (the `tokenizers` library) over the offline
  stdlib corpus, char-level and byte-level BPE; runs once per corpus (then cached).
- batches: `TokenBlocks.batch(index, ...)`, the per-step work inside the training
  loop, for corpora of 10^3 to 10^6 blocks (a zero-copy block table stands in for
  the big ones: the cost is in choosing rows, not in their contents).
- consume: training steps of the `cpu` preset's model (`lablib.experiments.quickstart.LMConfig`), the
  rate the pipeline has to keep up with on this machine.
Headroom = pipeline rate / consumption; above 1 the data never waits.

    python benchmarks/bench_data.py [--chars 2000000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from common import machine, markdown_table, median, stamp, update_readme, write_results

from lablib.data import TokenBlocks, load_corpus, train_tokenizer
from lablib.experiments.quickstart import LMConfig, build_model
from lablib.objectives import CausalLM
from lablib.train import make_optimizer, resolve_hardware


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def tokenize_rates(chars: int, repeats: int) -> list[dict]:
    texts = [row["text"] for row in load_corpus("stdlib", chars)]
    rows = []
    for kind in ("char", "bpe"):
        t0 = time.perf_counter()
        tok = train_tokenizer(kind, texts, 2048)
        trained_s = time.perf_counter() - t0
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        seconds = timed(lambda: tok.encode_batch(texts), repeats)
        rows.append({"stage": f"tokenize ({kind})", "tokens_per_s": n_tokens / seconds,
                     "detail": f"{sum(map(len, texts)) / 1e6:.1f}M chars -> {n_tokens / 1e6:.2f}M tokens; "
                               f"training the tokenizer took {trained_s:.1f} s"})
    return rows


def batch_rates(batch_size: int, seq_len: int, repeats: int) -> list[dict]:
    rows = []
    for n_blocks in (10**3, 10**5, 10**6):
        blocks = TokenBlocks(torch.zeros(1, seq_len + 1, dtype=torch.long).expand(n_blocks, seq_len + 1))
        index = iter(range(10**9))
        seconds = timed(lambda: blocks.batch(next(index), batch_size, 0), repeats)
        rows.append({"stage": f"batches ({n_blocks:.0e} blocks)", "tokens_per_s": batch_size * seq_len / seconds,
                     "detail": f"{seconds * 1e3:.2f} ms per micro-batch of {batch_size} x {seq_len}"})
    return rows


def consumption(device: str, repeats: int) -> dict:
    cfg = LMConfig.resolve("gpu" if device == "cuda" else "cpu", device=device)
    policy = resolve_hardware(cfg)
    model = build_model(cfg, cfg.bpe_vocab_size).to(policy.device)
    optimizer = make_optimizer(model, cfg, policy)
    net = torch.compile(model) if policy.compile else model
    tokens = torch.randint(0, cfg.bpe_vocab_size, (cfg.batch_size, cfg.seq_len + 1)).to(policy.device)

    def step():
        with policy.autocast():
            loss, _ = CausalLM()(net, {"tokens": tokens}, torch.Generator())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step(), step()
    seconds = timed(step, repeats)
    return {"stage": f"consume (training, {cfg.preset} preset model)", "tokens_per_s": cfg.batch_size * cfg.seq_len / seconds,
            "detail": f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, batch {cfg.batch_size} x "
                      f"{cfg.seq_len}, {seconds * 1e3:.0f} ms per step"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chars", type=int, default=2_000_000, help="corpus characters to tokenize")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    consume = consumption(args.device, args.repeats)
    cfg = LMConfig.resolve("gpu" if args.device == "cuda" else "cpu")
    rows = tokenize_rates(args.chars, args.repeats) + batch_rates(cfg.batch_size, cfg.seq_len, 50) + [consume]
    for row in rows:
        row["headroom"] = row["tokens_per_s"] / consume["tokens_per_s"]
        print(json.dumps(row), flush=True)
    info["load_average_at_end"] = os.getloadavg()
    name = f"data_{args.device}"
    path = write_results(name, {"machine": info, "args": vars(args), "rows": rows})
    shown = [{"stage": r["stage"], "tokens/s": f"{r['tokens_per_s']:,.0f}", "headroom vs training": f"{r['headroom']:,.1f}x",
              "detail": r["detail"]} for r in rows]
    text = markdown_table(shown, list(shown[0]))
    update_readme(name, f"{text}\n\n{stamp(info)} {torch.get_num_threads()} torch thread(s); raw numbers: `{path.relative_to(path.parents[1])}`.")
    print(text)


if __name__ == "__main__":
    main()
