"""Time per checkpoint switch in the checkpoint explorer, for a model of a few million parameters.

A switch is everything the explorer does when the step slider moves to a step it has
not shown before (no memoised analysis): swap the checkpoint's weights into the
model, run the prompt through it with the attention and residual-stream hooks, and
rebuild every view (curves marker, per-token loss and top-k table, attention
heatmap, logit lens). The widgets run headless, so this is the kernel's share of a
redraw; the browser's drawing of the figures comes on top.

"switch CPU time" is the CPU time this process spent per switch: on a shared machine
the wall-clock time also contains waiting for a core, which the load average shows.

Peer: what a notebook without the explorer does for the same look, rebuilding the
model from the run folder (`open_run(path).load_model(step)`) and calling
`analyze_prompt`, without drawing anything. Both are timed in alternating order.

    .venv/bin/python benchmarks/checkpoint_switch.py [--repeats 12] [--threads N] [--no-readme]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, machine_line, markdown_table, median, update_readme, write_results  # noqa: E402

from lablib.interp.analysis import analyze_prompt  # noqa: E402
from lablib.checkpoints import save_checkpoint  # noqa: E402
from lablib.config import ModelConfig  # noqa: E402
from lablib.data import char_tokenizer  # noqa: E402
from lablib.models import Transformer  # noqa: E402
from lablib.runs import create_run, open_run  # noqa: E402
from widgets.explorer import CheckpointExplorer  # noqa: E402

MODEL = dict(vocab_size=2048, n_layer=6, n_head=8, d_model=256, max_seq_len=256)  # ~5.3M parameters
PROMPT = 'def read_config(path):\n    """Return the settings stored at path."""\n    with open(path) as f:\n'
N_CHECKPOINTS = 6


def make_run(folder: Path):
    """A run folder with N_CHECKPOINTS checkpoints of one model (weights differ per step; no training needed)."""
    run = create_run("bench", {"model": MODEL}, folder)
    char_tokenizer([PROMPT + "abcdefghijklmnopqrstuvwxyz0123456789"]).save(run.path / "tokenizer.json")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    run.save_model_spec(model)
    for i in range(N_CHECKPOINTS):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        save_checkpoint(run.path, 100 * (i + 1), model)
        run.log.append({"step": 100 * (i + 1), "tokens": 12_800 * (i + 1), "loss": 5.0 - 0.3 * i, "lr": 1e-3})
    return run, model.num_params()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite this section of benchmarks/README.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        run, n_params = make_run(Path(tmp) / "run")
        explorer = CheckpointExplorer(run.path, PROMPT, live=False)
        steps = explorer.steps
        tokens = len(explorer.analysis.tokens)
        cycle = itertools.cycle(steps)
        reopened = open_run(run.path)

        def explorer_switch() -> None:
            explorer._memo.clear()  # time a step never shown before, not the memoised revisit
            explorer.show_step(next(s for s in cycle if s != explorer.step))

        def rebuild_and_analyse() -> None:
            model, tokenizer = reopened.load_model(steps[len(steps) // 2])
            analyze_prompt(model, tokenizer, PROMPT)

        def memoised_revisit() -> None:
            explorer.show_step(next(s for s in cycle if s != explorer.step))

        interleaved({"explorer": explorer_switch, "rebuild": rebuild_and_analyse}, 2)  # warm-up
        times = interleaved({"explorer": explorer_switch, "rebuild": rebuild_and_analyse}, args.repeats)
        cpu_times = []  # CPU seconds of this process per switch: the work itself, less sensitive to other jobs
        for _ in range(args.repeats):
            t0 = time.process_time()
            explorer_switch()
            cpu_times.append(time.process_time() - t0)
        for step in steps:  # fill the memo, then time revisits
            explorer.show_step(step)
        revisit = interleaved({"revisit": memoised_revisit}, args.repeats)["revisit"]
        t0 = time.perf_counter()
        explorer.checkpoint.step = None
        explorer.checkpoint.at(steps[0])
        load_only = time.perf_counter() - t0
        explorer.close()
    info["load_average_at_end"] = os.getloadavg()
    row = {"model": f"{n_params / 1e6:.1f}M params, {MODEL['n_layer']} layers", "prompt tokens": tokens,
           "switch (ms)": f"{median(times['explorer']) * 1e3:.0f}",
           "switch CPU time (ms)": f"{median(cpu_times) * 1e3:.0f}",
           "revisit (ms)": f"{median(revisit) * 1e3:.0f}",
           "peer: rebuild + analyse (ms)": f"{median(times['rebuild']) * 1e3:.0f}",
           "peer / switch": f"{median(times['rebuild']) / median(times['explorer']):.2f}",
           "weights only (ms)": f"{load_only * 1e3:.0f}"}
    columns = list(row)
    table = markdown_table([row], columns)
    print(table)
    print(machine_line(info), f"; torch threads {torch.get_num_threads()}")
    write_results("checkpoint_switch", {"machine": info, "row": row, "times_s": times, "revisit_s": revisit,
                                        "switch_cpu_s": cpu_times,
                                        "threads": torch.get_num_threads()})
    if not args.no_readme:
        update_readme("checkpoint_switch", "## Checkpoint explorer: time per checkpoint switch\n\n"
                      "`python benchmarks/checkpoint_switch.py`: see the script's docstring for what a switch "
                      f"includes. Medians over {args.repeats} switches.\n\n{table}\n\n"
                      f"{machine_line(info)}; torch threads {torch.get_num_threads()}.")


if __name__ == "__main__":
    main()
