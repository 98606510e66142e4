"""The run folder: one per execution, holding everything needed to inspect, compare or resume it.

Notable here:
- Layout (DESIGN.md): params.json, notebook.ipynb, metrics.jsonl, tokenizer.json,
  model.json (how to rebuild the model), checkpoints/, results.json, figures/, and
  status.json (running / done / failed, with the error).
- `metrics.jsonl` is appended and flushed line by line; `Run.metrics()` reads it
  while it is being written and skips a torn last line.
- `open_run(path)` gives params, metrics (a pandas DataFrame), checkpoint steps and
  `load_model(step)` -> (model, tokenizer).
- The runs root is $LABLIB_RUNS, else `runs/` at the project root (the folder with
  pyproject.toml above the working directory), else `./runs`.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from lablib.checkpoints import atomic_write_json, atomic_write_text, list_checkpoints, load_checkpoint
from lablib.provenance import provenance

MODEL_MODULES = ("lablib.",)  # model classes are only ever imported from the lab's own code


def project_root(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and 'name = "lablib"' in pyproject.read_text(errors="ignore"):
            return folder
    return None


def runs_root() -> Path:
    if os.environ.get("LABLIB_RUNS"):
        return Path(os.environ["LABLIB_RUNS"]).expanduser()
    root = project_root()
    return (root / "runs") if root else Path.cwd() / "runs"


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


class MetricsLog:
    """Append-only JSON lines; each line is flushed as it is written so readers see it live."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()

    def rows(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line still being written
                continue
        return out

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (used when resuming from that step's checkpoint)."""
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, default=float) + "\n" for r in keep))


class Run:
    """A run folder on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
        self.log = MetricsLog(self.path / "metrics.jsonl")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status.get('status')!r}, checkpoints={self.checkpoints()})"

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def experiment(self) -> str:
        return self.params.get("experiment") or self.path.parent.name

    def _json(self, name: str) -> dict[str, Any]:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else {}

    @property
    def params(self) -> dict[str, Any]:
        return self._json("params.json")

    @property
    def status(self) -> dict[str, Any]:
        return self._json("status.json")

    @property
    def results(self) -> dict[str, Any]:
        return self._json("results.json")

    @property
    def figures_dir(self) -> Path:
        d = self.path / "figures"
        d.mkdir(exist_ok=True)
        return d

    def save_figure(self, fig, name: str) -> Path:
        """Save a plotly figure as figures/<name>.html (plotly.js written once beside it, no CDN)."""
        path = self.figures_dir / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="directory")
        return path

    def metrics(self):
        """metrics.jsonl as a pandas DataFrame (readable while the run is writing it)."""
        import pandas as pd

        return pd.DataFrame(self.log.rows())

    def checkpoints(self) -> list[int]:
        return list_checkpoints(self.path)

    def set_status(self, status: str, **extra: Any) -> None:
        data = {**self.status, "status": status, "updated": now(), **extra}
        atomic_write_json(self.path / "status.json", data)

    def write_results(self, results: dict[str, Any]) -> Path:
        """Write results.json (atomically) and mark the run done: results are an experiment's last step."""
        atomic_write_json(self.path / "results.json", results)
        self.set_status("done", ended=now())
        return self.path / "results.json"

    def state(self) -> str:
        """running / done / failed, or 'stopped' when the process that ran it is gone."""
        status = self.status
        if status.get("status") == "running" and status.get("pid") and not _pid_alive(status["pid"]):
            return "stopped"
        return status.get("status", "?")

    def save_model_spec(self, model: torch.nn.Module) -> None:
        """Record how to rebuild the model (class and config) in model.json."""
        import dataclasses

        from lablib.checkpoints import unwrap

        model = unwrap(model)
        cls = type(model)
        spec = {"class": f"{cls.__module__}:{cls.__qualname__}", "config_class":
                f"{type(model.cfg).__module__}:{type(model.cfg).__qualname__}",
                "config": dataclasses.asdict(model.cfg)}
        atomic_write_json(self.path / "model.json", spec)

    def build_model(self) -> torch.nn.Module:
        spec = self._json("model.json")
        if not spec:
            raise FileNotFoundError(f"{self.path} has no model.json; was a model trained in this run?")
        cls, cfg_cls = (_import_lab_object(spec[k]) for k in ("class", "config_class"))
        return cls(cfg_cls(**spec["config"]))

    def tokenizer(self):
        from lablib.data import Tokenizer

        p = self.path / "tokenizer.json"
        if not p.is_file():
            return None
        if self.params.get("tokenizer") == "hf":  # an imported checkpoint's own BPE (lablib.hf_import)
            from lablib.gpt2 import load_gpt2_tokenizer

            return load_gpt2_tokenizer(self.path)
        return Tokenizer.load(p)

    def load_model(self, step: int | None = None, device: str = "cpu"):
        """(model, tokenizer) at checkpoint `step` (default: the latest), in eval mode."""
        steps = self.checkpoints()
        if not steps:
            raise FileNotFoundError(f"{self.path} has no checkpoints yet")
        step = steps[-1] if step is None else step
        model = self.build_model().to(device)
        load_checkpoint(self.path, step, model, device=device)
        return model.eval(), self.tokenizer()


def _import_lab_object(path: str):
    module, _, name = path.partition(":")
    if not module.startswith(MODEL_MODULES):
        raise ValueError(f"refusing to import {path!r}: models are rebuilt only from lablib modules")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def open_run(path: str | Path) -> Run:
    return Run(path)


def create_run(experiment: str, params: dict[str, Any], run_dir: str | Path | None = None) -> Run:
    """Make (or reopen, when resuming) a run folder and record params and status."""
    path = Path(run_dir) if run_dir else runs_root() / experiment / new_run_id()
    path.mkdir(parents=True, exist_ok=True)
    run = Run(path)
    atomic_write_json(path / "params.json", {"experiment": experiment, **params, "provenance": provenance()})
    run.set_status("running", started=run.status.get("started") or now(), pid=os.getpid())
    return run


def start_run(experiment: str, cfg, run_dir: str | Path | None = None, **extra: Any) -> Run:
    """The run folder for a notebook: a new one, or `run_dir` (resumed when it has checkpoints).

    params.json gets the resolved config (`cfg.to_dict()`), the hardware policy it resolves
    to (`hardware`, for a config with the training knobs) and `extra`. Reopening a folder made
    with different parameters is refused before any work, so a resume can never silently mix
    two settings.
    """
    from lablib.config import ConfigError, TrainConfig

    if isinstance(cfg, TrainConfig) and "hardware" not in extra:
        from lablib.train import policy_record, resolve_hardware

        extra = {"hardware": policy_record(resolve_hardware(cfg.project(TrainConfig))), **extra}
    params = {**cfg.to_dict(), **extra}
    if run_dir is not None and (Path(run_dir) / "params.json").is_file():
        before = json.loads((Path(run_dir) / "params.json").read_text())
        changed = {k: (before.get(k), v) for k, v in cfg.to_dict().items() if k in before and before[k] != v}
        if changed:
            diff = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in sorted(changed.items()))
            raise ConfigError(f"run folder {run_dir} was made with other parameters: {diff}; "
                              "resume with the same parameters or start a new run")
    return create_run(experiment, json.loads(json.dumps(params, default=str)), run_dir)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_runs(experiment: str | None = None, root: Path | None = None) -> list[Run]:
    root = Path(root) if root else runs_root()
    if not root.is_dir():
        return []
    folders = [root / experiment] if experiment else sorted(p for p in root.iterdir() if p.is_dir())
    runs = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("params.json")):
            runs.append(Run(p.parent))
    return runs


KEY_PARAMS = ("steps", "seed")  # always shown where a run has them
HEADLINE_METRICS = ("loss", "val_loss")  # the last logged value of each, beside results.json's numbers


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def runs_table(experiment: str | None = None, root: Path | None = None):
    """One row per run: id, status, preset, key params and the headline results.

    Key params are `steps`, `seed` and every parameter whose value differs between the
    listed runs of one experiment (what tells them apart); headline results are the
    numbers of results.json (`result.*`) and the last logged loss and val_loss.
    """
    import pandas as pd

    runs = list_runs(experiment, root)
    params = {run.path: {k: v for k, v in run.params.items() if _scalar(v)} for run in runs}
    varying: dict[str, set[str]] = {}
    for experiment in {run.experiment for run in runs}:
        same = [params[r.path] for r in runs if r.experiment == experiment]
        names = set().union(*same) - {"experiment", "preset", "run_dir"}
        varying[experiment] = {k for k in names if len({json.dumps(p.get(k)) for p in same}) > 1}
    rows = []
    for run in runs:
        p, results = params[run.path], run.results
        row = {"experiment": run.experiment, "run": str(run.path.relative_to(run.path.parents[1])),
               "status": run.state(), "preset": p.get("preset"), "checkpoints": len(run.checkpoints())}
        row.update({k: p[k] for k in KEY_PARAMS if k in p})
        row.update({k: p.get(k) for k in sorted(varying[run.experiment]) if k not in KEY_PARAMS})
        last = {}
        for logged in run.log.rows():
            last.update({k: logged[k] for k in HEADLINE_METRICS if k in logged})
        row.update(last)
        row.update({f"result.{k}": v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
    return pd.DataFrame(rows)
