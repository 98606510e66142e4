"""Training progress on the terminal while a notebook runs headless: one line per logged step.

Notable here:
- `follow_metrics(run_dir)` is a context manager for the process that started the
  notebook (`lablib run`): a thread tails the run folder's `metrics.jsonl` and prints
  each new training row as `step 120/400  loss 3.214  val 3.301  12,345 tok/s  ETA 1m20s`.
  It reads only files, so it works for any kernel and costs the training nothing.
- The step total comes from `params.json` (`steps`) once the notebook has written it;
  the ETA is the remaining steps at the pace measured since the newest row of the
  first read (so a resumed run's ETA ignores the steps done before the crash).
- A resume rewrites `metrics.jsonl` from its checkpoint: steps already printed are
  not printed again. Lines go through `tqdm.write`, so they do not break papermill's
  cell counter.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(row: dict[str, Any], total: int | None, eta_s: float | None) -> str:
    """`step 120/400  loss 3.214  val 3.301  12,345 tok/s  ETA 1m20s` (parts shown where known)."""
    parts = [f"step {row['step']}" + (f"/{total}" if total else "")]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4g}")
    if "val_loss" in row:
        parts.append(f"val {row['val_loss']:.4g}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


class MetricsFollower:
    """Prints the training rows of `run_dir/metrics.jsonl` as they appear (see the module docstring)."""

    def __init__(self, run_dir: str | Path, write=None, poll_interval: float = 1.0):
        self.run_dir = Path(run_dir)
        self.poll_interval = poll_interval
        self.write = write or _write
        self.last_step = -1
        self.first: tuple[int, float] | None = None  # (step, time) of the first row printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lablib-progress", daemon=True)

    def total_steps(self) -> int | None:
        try:
            steps = json.loads((self.run_dir / "params.json").read_text()).get("steps")
        except (OSError, ValueError):
            return None
        return steps if isinstance(steps, int) else None

    def rows(self) -> list[dict[str, Any]]:
        try:
            text = (self.run_dir / "metrics.jsonl").read_text(encoding="utf-8")
        except OSError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # the line being written
                continue
        return out

    def poll(self) -> None:
        fresh = [row for row in self.rows()
                 if isinstance(row.get("step"), int) and row["step"] > self.last_step and "loss" in row]
        if not fresh:
            return
        now, total = time.monotonic(), self.total_steps()
        if self.first is None:  # the pace is measured from here: rows already there (a resumed run's) don't count
            self.first = (fresh[-1]["step"], now)
        for row in fresh:
            step = row["step"]
            eta = None
            done_since, elapsed = step - self.first[0], now - self.first[1]
            if total and done_since > 0 and elapsed > 0:
                eta = (total - step) * elapsed / done_since
            self.write(progress_line(row, total, eta))
            self.last_step = step

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            self.poll()

    def start(self) -> "MetricsFollower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the rows written since the last poll


def _write(line: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"lablib: {line}", file=sys.stderr)


@contextlib.contextmanager
def follow_metrics(run_dir: str | Path, enabled: bool = True, poll_interval: float = 1.0) -> Iterator[None]:
    """Print progress lines from run_dir's metrics.jsonl for the duration of the block."""
    if not enabled:
        yield
        return
    follower = MetricsFollower(run_dir, poll_interval=poll_interval).start()
    try:
        yield
    finally:
        follower.stop()
