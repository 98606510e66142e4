"""Executing experiment notebooks: parameter checks, the Jupyter kernel, papermill.

Notable here:
- A notebook names its experiment and config class in its metadata
  (`"lablib": {"experiment": ..., "config": "module:Class"}`). `check_params` validates
  `-p` values against that class and the notebook's parameters cell before anything
  runs; names the cell does not list travel in the `overrides` dict.
- `ensure_kernel()` registers a `lablib` kernel in this environment's prefix that
  starts this very Python, so papermill never hits "No such kernel" or runs in
  another environment; `ensure_kernel(user=True)` puts the same kernel in the user's
  Jupyter data folder, where every JupyterLab of that user finds it.
- `execute(...)` runs the notebook into its run folder and turns a failed cell (or a
  kernel that died) into one line: which cell, which exception, what it said. When the
  folder already holds an executed notebook, the attempt is written beside it
  (`notebook.attempt-N.ipynb`) and replaces it only once it has run to the end, so a
  failed or killed attempt never costs the run its record.
  Its kernel draws plotly figures with `HEADLESS_PLOTLY_RENDERER` (unless
  $PLOTLY_RENDERER says otherwise): the interactive figure for JupyterLab plus an HTML
  copy that loads plotly.js from its CDN, so the executed notebook shows its figures in
  nbconvert's HTML and on nbviewer.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lablib.config import Config, ConfigError, default_preset

KERNEL_NAME = "lablib"
HEADLESS_PLOTLY_RENDERER = "plotly_mimetype+notebook_connected"
RESERVED = ("preset", "run_dir", "overrides")


@dataclass
class NotebookInfo:
    path: Path
    experiment: str
    config_cls: type[Config]
    cell_params: dict[str, Any]  # name -> papermill's inspection (default, inferred type)


def experiment_name(path: Path) -> str:
    """'00_quickstart.ipynb' -> 'quickstart'."""
    stem = path.stem
    head, _, tail = stem.partition("_")
    return tail if head.isdigit() and tail else stem


def inspect(path: str | Path) -> NotebookInfo:
    import nbformat
    import papermill

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"notebook {str(path)!r} not found; expected a path to an .ipynb file")
    if path.suffix != ".ipynb":
        raise ConfigError(f"{str(path)!r} is not a notebook; expected a path to an .ipynb file")
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:  # nbformat raises its own JSON and validation errors
        raise ConfigError(f"notebook {str(path)!r} cannot be read ({type(e).__name__}); expected an .ipynb file") from None
    meta = nb.metadata.get("lablib", {})
    if not isinstance(meta, dict) or "config" not in meta:
        raise ConfigError(f"notebook {path.name}: expected metadata 'lablib.config' naming its config class")
    module, _, name = meta["config"].partition(":")
    config_cls = getattr(importlib.import_module(module), name)
    cell_params = papermill.inspect_notebook(str(path))
    return NotebookInfo(path, meta.get("experiment") or experiment_name(path), config_cls, cell_params)


def check_params(info: NotebookInfo, preset: str | None, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate params before any work. Returns (parameters-cell values, overrides)."""
    known = set(info.config_cls.fields_by_name()) | set(info.cell_params)
    cell, overrides = {}, {}
    for name, value in params.items():
        if name in RESERVED:
            raise ConfigError(f"parameter {name!r} is set by lablib run itself; use --preset / --run-dir / -p NAME VALUE")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown parameter {name!r} for {info.path.name}{hint}")
        if name in info.config_cls.fields_by_name():
            value = info.config_cls.check(name, value)
        (cell if name in info.cell_params else overrides)[name] = value
    config_values = {k: v for k, v in params.items() if k in info.config_cls.fields_by_name()}
    info.config_cls.resolve(preset or default_preset(), **config_values)  # cross-field checks, before any work
    return cell, overrides


def kernel_folder(user: bool = False) -> Path:
    """Where the 'lablib' kernelspec lives: this environment's prefix, or the user's Jupyter data folder."""
    if user:
        from jupyter_core.paths import jupyter_data_dir

        return Path(jupyter_data_dir()) / "kernels" / KERNEL_NAME
    return Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def ensure_kernel(user: bool = False) -> str:
    """Register (once) a Jupyter kernel named 'lablib' that runs this environment's Python.

    user: write it into the user's Jupyter data folder ($JUPYTER_DATA_DIR, else e.g.
    ~/.local/share/jupyter) instead of this environment, so a JupyterLab installed
    anywhere else offers it too.
    """
    folder = kernel_folder(user)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python (lablib)", "language": "python", "metadata": {"debugger": True}}
    path = folder / "kernel.json"
    try:
        current = json.loads(path.read_text()).get("argv")
    except (OSError, ValueError):  # missing, or left unreadable by an older, non-atomic write
        current = None
    if current != spec["argv"]:
        # atomically: runs started together (by hand, or from interpreters named differently,
        # python vs python3) may rewrite it while another reads it. Imported here because
        # lablib.checkpoints imports torch, which this module otherwise never needs.
        from lablib.checkpoints import atomic_write_text

        atomic_write_text(path, json.dumps(spec, indent=1))
    return KERNEL_NAME


class NotebookFailed(RuntimeError):
    """A cell raised; the message is one line saying which cell and why."""


def attempt_path(run_dir: Path) -> Path:
    """Where this execution writes its notebook: notebook.ipynb, or notebook.attempt-N.ipynb beside an earlier one."""
    if not (run_dir / "notebook.ipynb").exists():
        return run_dir / "notebook.ipynb"
    n = 2
    while (run_dir / f"notebook.attempt-{n}.ipynb").exists():
        n += 1
    return run_dir / f"notebook.attempt-{n}.ipynb"


def execute(info: NotebookInfo, run_dir: Path, preset: str, cell: dict[str, Any], overrides: dict[str, Any],
            progress: bool = True) -> Path:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    run_dir.mkdir(parents=True, exist_ok=True)
    output = attempt_path(run_dir)
    parameters = {"preset": preset, "run_dir": str(run_dir), **cell}
    if overrides:
        parameters["overrides"] = overrides
    try:
        with _environment(PLOTLY_RENDERER=os.environ.get("PLOTLY_RENDERER") or HEADLESS_PLOTLY_RENDERER):
            papermill.execute_notebook(str(info.path), str(output), parameters=parameters,
                                       kernel_name=ensure_kernel(), cwd=os.getcwd(), progress_bar=progress,
                                       log_output=False)
    except PapermillExecutionError as e:
        message = str(e.evalue).strip().splitlines()[-1] if str(e.evalue).strip() else ""
        raise NotebookFailed(f"cell {e.exec_count} of {info.path.name} failed: {e.ename}: {message} "
                             f"(executed notebook: {output})") from None
    except (KeyboardInterrupt, ConfigError):
        raise
    except Exception as e:  # the kernel died (killed, out of memory) or could not start
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise NotebookFailed(f"{info.path.name} did not finish: {type(e).__name__}: {message} "
                             f"(executed notebook: {output})") from None
    final = run_dir / "notebook.ipynb"
    if output != final:
        os.replace(output, final)  # the attempt ran to the end: it is now the run's executed notebook
    return final


@contextlib.contextmanager
def _environment(**values: str):
    """These environment variables for the kernels started inside the block (they inherit ours)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the lab's kernel in notebook files ---------------------------------------------------------
# Every notebook names the `lablib` kernelspec and starts with this one-line guard, so a notebook
# opened with another kernel (a JupyterLab's own `python3`) stops at once saying which to select.
KERNELSPEC = {"name": KERNEL_NAME, "display_name": "Python (lablib)", "language": "python"}
KERNEL_GUARD = ('import importlib.util, sys; importlib.util.find_spec("lablib") or sys.exit("This kernel cannot import '
                'lablib: select the kernel \'Python (lablib)\' (Kernel > Change Kernel; `lablib kernel --user` installs it)")')


def _first_code_source(nb: dict) -> str:
    cell = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
    if cell is None:
        return ""
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def kernel_problems(nb: dict) -> list[str]:
    """What a notebook (as JSON) lacks of the lab kernel: its kernelspec, its guard cell ([] when neither)."""
    out = []
    if nb.get("metadata", {}).get("kernelspec", {}).get("name") != KERNEL_NAME:
        out.append(f"kernelspec is not {KERNEL_NAME!r}")
    if _first_code_source(nb).strip() != KERNEL_GUARD:
        out.append("first code cell is not the kernel guard")
    return out


def with_lab_kernel(nb: dict) -> dict:
    """The notebook with the lab's kernelspec and the guard as its first code cell (nothing else touched)."""
    nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    if _first_code_source(nb).strip() != KERNEL_GUARD:
        index = next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"), len(nb["cells"]))
        nb["cells"].insert(index, {"cell_type": "code", "execution_count": None, "id": "lablib-kernel-guard",
                                   "metadata": {"tags": ["kernel-guard"]}, "outputs": [], "source": KERNEL_GUARD})
    return nb


def set_lab_kernel(paths: list[Path], check: bool = False) -> list[tuple[str, list[str]]]:
    """Give these notebooks the lab's kernel (or, with check, only list what each lacks); returns (name, problems)."""
    import nbformat

    found = []
    for path in paths:
        nb = json.loads(path.read_text())
        if problems := kernel_problems(nb):
            found.append((path.name, problems))
            if not check:
                nbformat.write(nbformat.from_dict(with_lab_kernel(nb)), str(path))  # the layout Jupyter writes
    return found
