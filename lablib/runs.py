"""The run folder: one per execution, holding everything needed to inspect, compare or resume it.

Notable here:
- Layout (the README's "The run folder"): params.json, notebook.ipynb, metrics.jsonl, tokenizer.json,
  model.json (how to rebuild the model), checkpoints/, results.json, figures/, and
  status.json (running / done / failed, with the error).
- `metrics.jsonl` is appended and flushed line by line; `Run.metrics()` reads it
  while it is being written and skips a torn last line.
- `open_run(path)` gives params, metrics (a pandas DataFrame), checkpoint steps and
  `load_model(step)` -> (model, tokenizer), from the newest checkpoint whose files match
  their checksums unless a step is asked for.
- A run folder is data, never code: model.json names a class of the model registry
  (`lablib.models.MODELS`) and its config values, which are checked against that class's
  config fields before anything is built. Folders written before the registry name the
  class as `module:Class`; `LEGACY_MODEL_CLASSES` maps those names, and only the model
  config's fields are read from their (wider, experiment) config.
- A finished run is never downgraded: reopening a `done` run for another attempt keeps
  its params.json and status (the attempt is recorded beside them) until the attempt
  itself finishes.
- The runs root is $LABLIB_RUNS, else `runs/` at the project root (the folder with
  pyproject.toml above the working directory), else `./runs`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

import torch

from lablib.checkpoints import list_checkpoints, load_checkpoint, newest_loadable
from lablib.io import atomic_write_json, atomic_write_text, read_json_object
from lablib.provenance import provenance

MODEL_JSON_MAX_BYTES = 1 << 20  # a model.json is a class name and a few dozen numbers
# model.json of folders written before the registry: `module:qualname` -> registered name
LEGACY_MODEL_CLASSES = {
    "lablib.models:Transformer": "Transformer",
    "lablib.models:EncoderDecoder": "EncoderDecoder",
    "lablib.models:MultiTokenTransformer": "MultiTokenTransformer",
    "lablib.models:FutureTokenTransformer": "FutureTokenTransformer",
    "lablib.tabular:TabularPFN": "TabularPFN",
}
# config classes those folders named (model configs, or the experiment config the model was built from)
LEGACY_CONFIG_CLASSES = frozenset({
    "lablib.config:ModelConfig", "lablib.models:EncoderDecoderConfig", "lablib.models:MultiTokenConfig",
    "lablib.models:FutureTokenConfig", "lablib.tabular:TabularPFNConfig", "lablib.tabular:TabularICLConfig",
    "lablib.lm:LMConfig", "lablib.knowledge:KnowledgeConfig", "lablib.downstream:ObjectivesRunConfig",
    "lablib.tasks.facts:ReversalConfig", "lablib.tasks.causal_axioms:CausalAxiomsConfig",
    "lablib.tasks.causal_axioms:CausalAxiomsStudyConfig",
})


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
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # a line still being written, or garbage
                continue
            if isinstance(row, dict):  # anything but an object is not a metrics row
                out.append(row)
        return out

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (used when resuming from that step's checkpoint)."""
        keep = [r for r in self.rows() if not isinstance(r.get("step", 0), (int, float)) or r.get("step", 0) <= step]
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
        """A JSON object file of the folder ({} when absent); unreadable or malformed: a one-line ValueError."""
        try:
            return read_json_object(self.path / name)
        except FileNotFoundError:
            return {}

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
        if status != "done" or "attempt" not in extra:
            data.pop("attempt", None)  # an attempt at a finished run ends with its results (or its failure)
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
        """Record how to rebuild the model in model.json: its registry name and config values."""
        from lablib.checkpoints import unwrap
        from lablib.models import model_config_values, registered_name

        model = unwrap(model)
        name = registered_name(model)
        if name is None:  # a model class of the user's own: the folder keeps its weights, not a rebuild recipe
            return
        atomic_write_json(self.path / "model.json", {"model": name, "config": model_config_values(model)})

    def build_model(self) -> torch.nn.Module:
        """The model model.json describes (fresh weights); anything but a registered class and valid config is refused."""
        from lablib.config import ConfigError
        from lablib.models import build_registered

        path = self.path / "model.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} has no model.json; was a model trained in this run?")
        if path.stat().st_size > MODEL_JSON_MAX_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes; a model.json holds a class name and its config")
        try:
            spec = read_json_object(path, "model.json")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if "model" in spec:
            name, config = spec["model"], spec.get("config")
        elif "class" in spec:  # written before the registry
            name = LEGACY_MODEL_CLASSES.get(spec["class"]) if isinstance(spec["class"], str) else None
            if name is None:
                raise ConfigError(f"{path}: class {repr(spec['class'])[:80]} is not a lab model class; expected one "
                                  f"of {', '.join(LEGACY_MODEL_CLASSES)}")
            if spec.get("config_class") not in LEGACY_CONFIG_CLASSES:
                raise ConfigError(f"{path}: config_class {repr(spec.get('config_class'))[:80]} is not a lab config class")
            config = spec.get("config")
            if isinstance(config, dict):  # an experiment config: only the model's own fields build the model
                from lablib.models import MODELS

                cls = MODELS.get(name)
                fields = cls.config_class.fields_by_name() if cls is not None else {}
                config = {k: v for k, v in config.items() if k in fields}
        else:
            raise ConfigError(f"{path}: expected a 'model' naming a registered lab model class")
        return build_registered(name, config, str(path))

    def load_model(self, step: int | None = None, device: str = "cpu"):
        """(model, tokenizer) at checkpoint `step` (default: the newest intact one), in eval mode."""
        if not self.checkpoints():
            raise FileNotFoundError(f"{self.path} has no checkpoints yet")
        if step is None:
            step = newest_loadable(self.path)
        self._check_against_weights(step)
        model = self.build_model().to(device)
        load_checkpoint(self.path, step, model, device=device)
        return model.eval(), self.tokenizer()

    def _check_against_weights(self, step: int) -> None:
        """Refuse (one line) a model.json whose model would not fit the checkpoint's tensors.

        The model is first built on the meta device (no memory) and its shapes compared with
        the safetensors header, so a config edited to other sizes neither allocates a huge
        model nor ends in load_state_dict's many-line error.
        """
        from safetensors import SafetensorError, safe_open

        from lablib.checkpoints import step_dir_name
        from lablib.config import ConfigError

        path = self.path / "checkpoints" / step_dir_name(step) / "model.safetensors"
        try:
            with safe_open(str(path), "pt") as f:
                stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except (SafetensorError, OSError):
            return  # load_checkpoint reports an unreadable file
        with torch.device("meta"):
            skeleton = self.build_model()
        shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
        for name, shape in stored.items():
            if shapes.get(name) != shape:
                got = "absent" if name not in shapes else str(shapes[name])
                raise ConfigError(f"{self.path / 'model.json'}: its config does not fit the weights of step {step} "
                                  f"({name}: {shape} in the checkpoint, {got} from model.json)")
        if sum(p.numel() for p in skeleton.parameters()) > sum(math.prod(s) for s in stored.values()):
            raise ConfigError(f"{self.path / 'model.json'}: its config describes a larger model than the weights "
                              f"of step {step}")

    def tokenizer(self):
        from lablib.data import Tokenizer

        p = self.path / "tokenizer.json"
        if not p.is_file():
            return None
        if self.params.get("tokenizer") == "hf":  # an imported checkpoint's own BPE (lablib.hf_import)
            from lablib.gpt2 import load_gpt2_tokenizer

            return load_gpt2_tokenizer(self.path)
        return Tokenizer.load(p)


def open_run(path: str | Path) -> Run:
    return Run(path)


def create_run(experiment: str, params: dict[str, Any], run_dir: str | Path | None = None) -> Run:
    """Make (or reopen, when resuming) a run folder and record params and status."""
    path = Path(run_dir) if run_dir else runs_root() / experiment / new_run_id()
    path.mkdir(parents=True, exist_ok=True)
    run = Run(path)
    if run.status.get("status") == "done":  # another attempt at a finished run: its record stays until it finishes
        run.set_status("done", attempt={"pid": os.getpid(), "started": now()})
        return run
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
        if diff := parameter_changes(Run(run_dir).params, cfg):
            raise ConfigError(f"run folder {run_dir} was made with other parameters: {diff}; "
                              "resume with the same parameters or start a new run")
    return create_run(experiment, json.loads(json.dumps(params, default=str)), run_dir)


def parameter_changes(before: dict[str, Any], cfg) -> str | None:
    """'steps=30 (now 31), ...' for the config values that differ from a run's params.json; None when none do."""
    now_values = json.loads(json.dumps(cfg.to_dict(), default=str))
    changed = {k: (before.get(k), v) for k, v in now_values.items() if k in before and before[k] != v}
    if not changed:
        return None
    return ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in sorted(changed.items()))


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
    params, unreadable = {}, {}
    for run in runs:
        try:
            run.results, run.state()
            params[run.path] = {k: v for k, v in run.params.items() if _scalar(v)}
        except (OSError, ValueError) as e:
            unreadable[run.path] = str(e)
    varying: dict[str, set[str]] = {}
    for experiment in {run.experiment for run in runs if run.path in params}:
        same = [params[r.path] for r in runs if r.experiment == experiment and r.path in params]
        names = set().union(*same) - {"experiment", "preset", "run_dir"}
        varying[experiment] = {k for k in names if len({json.dumps(p.get(k)) for p in same}) > 1}
    rows = []
    for run in runs:
        if run.path not in params:  # a damaged folder is listed as such, not a traceback
            rows.append({"experiment": run.path.parent.name, "run": str(run.path.relative_to(run.path.parents[1])),
                         "status": "unreadable", "error": unreadable[run.path]})
            continue
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
