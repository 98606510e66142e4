"""Live runs: train in a background thread, and follow a run folder while something writes it.

Notable here:
- `train_in_background(fn, ...)` runs a training call (`lablib.experiments.quickstart.pretrain`,
  `lablib.train.train`, ...) in a daemon thread so a notebook stays usable while it
  trains; `stop()` ends it cleanly after the current step through the loop's
  callbacks (when the call accepts `callbacks`), `wait()` returns its result or
  re-raises its error.
- `RunWatcher(path).poll()` reports what changed since the last poll: new rows of
  `metrics.jsonl` (read from the last offset, complete lines only), the list of
  complete checkpoints (`list_checkpoints` never lists one still being written) and
  the run's status. It works the same whether the writer is a thread of this
  process or another process (`lablib run`).
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lablib.checkpoints import list_checkpoints


class TrainingStopped(Exception):
    """Raised inside the training loop by `BackgroundTraining.stop()`."""


class BackgroundTraining:
    """A training call running in a daemon thread."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "lablib-training", **kwargs: Any):
        self._stop = threading.Event()
        self.stoppable = "callbacks" in inspect.signature(fn).parameters
        if self.stoppable:
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), (1, self._check_stop)]
        self.result: Any = None
        self.error: BaseException | None = None
        self.stopped = False
        self._thread = threading.Thread(target=self._main, args=(fn, args, kwargs), name=name, daemon=True)
        self._thread.start()

    def _check_stop(self, step: int, model) -> None:
        if self._stop.is_set():
            raise TrainingStopped(f"stopped at step {step}")

    def _main(self, fn, args, kwargs) -> None:
        try:
            self.result = fn(*args, **kwargs)
        except TrainingStopped:
            self.stopped = True
        except BaseException as e:  # kept and re-raised by wait(), so it is never lost in the thread
            self.error = e

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until training ends; return its result, or raise the error it raised."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"training still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self, timeout: float | None = 60.0) -> None:
        """Ask the loop to stop after its current step and wait for it."""
        if not self.stoppable:
            raise RuntimeError("stop(): this training call takes no `callbacks`, so it cannot be stopped early; "
                               "use wait()")
        self._stop.set()
        self._thread.join(timeout)

    def __repr__(self) -> str:
        state = ("running" if self.running else "stopped" if self.stopped
                 else "failed" if self.error is not None else "finished")
        return f"BackgroundTraining({state})"


def train_in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BackgroundTraining:
    """Start `fn(*args, **kwargs)` (a training call that writes a run folder) in a background thread."""
    if "progress" in inspect.signature(fn).parameters:
        kwargs.setdefault("progress", False)  # a bar from a thread would print into whichever cell runs next
    return BackgroundTraining(fn, *args, **kwargs)


@dataclass
class RunUpdate:
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics rows new since the last poll
    reset: bool = False  # metrics.jsonl was rewritten (a resume truncated it): rows is the whole log
    checkpoints: list[int] = field(default_factory=list)  # all complete checkpoints now
    new_checkpoints: list[int] = field(default_factory=list)
    status: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.rows or self.reset or self.new_checkpoints)


class RunWatcher:
    """Follows a run folder: each `poll()` returns what appeared since the previous one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._offset = 0
        self._inode: int | None = None
        self._checkpoints: list[int] = []

    def _read_rows(self) -> tuple[list[dict[str, Any]], bool]:
        try:
            stat = os.stat(self.metrics_path)
        except FileNotFoundError:
            return [], False
        reset = self._inode is not None and (stat.st_ino != self._inode or stat.st_size < self._offset)
        if reset:
            self._offset = 0
        self._inode = stat.st_ino
        if stat.st_size == self._offset:
            return [], reset
        with open(self.metrics_path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(stat.st_size - self._offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self._offset += len(complete)
        rows = []
        for line in complete.decode("utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows, reset

    def poll(self) -> RunUpdate:
        rows, reset = self._read_rows()
        steps = list_checkpoints(self.path)
        new = sorted(set(steps) - set(self._checkpoints))
        self._checkpoints = steps
        status_path = self.path / "status.json"
        try:
            status = json.loads(status_path.read_text()).get("status")
        except (FileNotFoundError, json.JSONDecodeError):
            status = None
        return RunUpdate(rows, reset, steps, new, status)
