"""Loggers: forward each metrics row that training logs to TensorBoard, trackio or a function of your own.

Notable here:
- `metrics.jsonl` in the run folder stays the record; a logger receives the very
  same rows (`{"step": ..., "loss": ..., ...}`) as they are appended, on rank 0 only.
- A logger is anything with `log(row)` (and optionally `close()`), or a plain
  function `fn(row)`: `train(..., loggers=[print])` works.
- `TensorBoardLogger` writes event files with `torch.utils.tensorboard.SummaryWriter`
  into `<run>/tensorboard/` (`tensorboard --logdir runs/`), one scalar per numeric
  entry, at the row's step. `TrackioLogger` writes a local trackio project named
  after the experiment, one trackio run per run folder (`trackio show`).
- `make_loggers(names, run)` builds them from the `loggers` knob, so
  `lablib run NOTEBOOK -p loggers tensorboard` needs no code. The packages come with
  the `loggers` extra and are imported only when a logger is made.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Protocol

from lablib.config import ConfigError


class Logger(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's finite numbers other than its step (what dashboards can plot)."""
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLogger:
    """Rows as TensorBoard scalars in `log_dir`, flushed with every row so a live TensorBoard sees them."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class TrackioLogger:
    """Rows into a local trackio project (trackio's own folder: $TRACKIO_DIR, else ~/.cache/huggingface/trackio).

    A resumed run continues the same trackio run (its name is the run folder's id).
    """

    def __init__(self, project: str, name: str, config: dict[str, Any] | None = None):
        import trackio

        self.trackio = trackio
        self.project, self.name = project, name
        self.run = trackio.init(project=project, name=name, config=config, resume="allow",
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


LOGGERS: dict[str, Callable[[Any], Logger]] = {
    "tensorboard": lambda run: TensorBoardLogger(run.path / "tensorboard"),
    "trackio": lambda run: TrackioLogger(project=run.experiment, name=run.id,
                                         config={k: v for k, v in run.params.items() if not isinstance(v, dict)}),
}


def make_loggers(names: list[str], run) -> list[Logger]:
    """The named loggers for a `lablib.runs.Run` (names from the `loggers` knob)."""
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"parameter 'loggers': expected names from {', '.join(LOGGERS)}, got {unknown[0]!r}")
    if names and run is None:
        raise ConfigError("parameter 'loggers': loggers forward a run's metrics; train with a run folder")
    return [LOGGERS[name](run) for name in names]


def send(loggers: list, row: dict[str, Any]) -> None:
    for logger in loggers:
        (logger.log if hasattr(logger, "log") else logger)(row)


def close(loggers: list) -> None:
    for logger in loggers:
        if hasattr(logger, "close"):
            logger.close()
