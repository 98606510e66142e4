"""Sweeps: one notebook over a grid of parameters, in parallel processes or on a Ray cluster.

Notable here:
- Each grid point runs `lablib run` in its own process into a folder named after the
  point (`runs/<experiment>/<sweep>/<name=value,...>`), so restarting a sweep finds
  the finished points and skips them, and resumes the interrupted ones from their
  checkpoints.
- A failing point is recorded (status.json, and the `error` column) and the sweep
  goes on.
- Each point runs in its own process group: interrupting the sweep stops the running
  points (their kernels included) and starts no more; they resume on the next run.
- CPU threads are split between the parallel jobs so they do not fight.
- `backend="ray"` hands each point to Ray (an existing cluster at `address` or
  $RAY_ADDRESS, else a local Ray instance) as a task that reserves as many CPUs as
  it runs threads and runs the same `lablib run` there. On a cluster the runs root
  must be a folder every node sees (a shared filesystem), as for any sweep that
  resumes. Ray is optional (the `ray` extra) and imported only for this backend.
- The result is a table (pandas DataFrame, also written as `sweep.csv`) of every
  point's parameters, status and numeric `results.json` entries.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lablib.checkpoints import atomic_write_json
from lablib.config import ConfigError, default_preset
from lablib.interrupts import sigterm_as_interrupt
from lablib.notebooks import check_params, inspect
from lablib.runs import Run, runs_root


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    for name, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"grid {name!r}: expected a non-empty list of values, got {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def point_name(point: dict[str, Any]) -> str:
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9=,._-]", "_", text) or "default"


def sweep_name(grid: dict[str, list[Any]], preset: str, params: dict[str, Any], resolved: dict[str, Any],
               label: str | None = None) -> str:
    """A stable name for the same sweep, so a restart finds its earlier points: `label`
    (default `sweep-<preset>`) and a hash of what the points would run.

    `resolved` (the preset's values with `params` applied) is part of the key, so editing a
    preset starts a new sweep instead of reusing runs made with the old values, whatever the label.
    """
    key = json.dumps({"grid": grid, "preset": preset, "params": params, "resolved": resolved},
                     sort_keys=True, default=str)
    return f"{label or f'sweep-{preset}'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class _Points:
    """The sweep's running points. Each is a `lablib run` in its own process group, so stopping
    the sweep (Ctrl-C, a kernel interrupt, SIGTERM) stops every point with the kernel it
    started, and no new point starts. Stopped points keep their checkpoints and resume when
    the sweep is run again."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen | None:
        with self.lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
            self.running.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.running.discard(proc)

    def stop(self, grace: float = 10.0) -> None:
        with self.lock:
            self.stopping = True
            procs = list(self.running)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            for proc in procs:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            procs = [proc for proc in procs if proc.poll() is None]
            if not procs:
                return


def _mark(folder: Path, status: str, error: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "params.json").is_file():
        Run(folder).set_status(status, error=error)
    else:
        atomic_write_json(folder / "status.json", {"status": status, "error": error})


def _run_point(notebook: Path, folder: Path, preset: str, params: dict[str, Any], threads: int,
               points: _Points) -> dict[str, Any]:
    run_exists = (folder / "params.json").is_file()
    cmd = [sys.executable, "-m", "lablib.cli", "run", str(notebook), "--preset", preset, "--quiet"]
    if run_exists:
        cmd += ["--resume", str(folder)]
    else:
        cmd += ["--run-dir", str(folder)]
        for name, value in params.items():
            cmd += ["-p", name, json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LABLIB_NUM_THREADS": str(threads)}
    proc = points.start(cmd, env)
    if proc is None:
        return {"error": "the sweep was stopped before this point started"}
    try:
        stdout, stderr = proc.communicate()
    finally:
        points.finished(proc)
    if proc.returncode == 0:
        return {"error": None}
    if points.stopping:
        error = "stopped with the sweep; running the sweep again resumes it from its last checkpoint"
        _mark(folder, "stopped", error)
        return {"error": error}
    lines = [line for line in (stderr or stdout).strip().splitlines() if line.strip()]
    error = lines[-1] if lines else f"exit status {proc.returncode}"
    _mark(folder, "failed", error)
    return {"error": error}


def _ray_point(notebook: Path, folder: Path, preset: str, params: dict[str, Any], threads: int) -> dict[str, Any]:
    """One point as a Ray task: `_run_point`, whose `lablib run` is stopped if Ray cancels the task."""
    points = _Points()
    try:
        return _run_point(notebook, folder, preset, params, threads, points)
    except BaseException:
        points.stop()
        raise


def _run_on_ray(todo: list[tuple[dict[str, Any], Path]], notebook: Path, preset: str, params: dict[str, Any],
                threads: int, address: str | None, progress: bool) -> dict[str, dict[str, Any]]:
    """{point name: outcome} for the points in `todo`, each run as a Ray task."""
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False)
    threads = max(1, min(threads, int(ray.cluster_resources().get("CPU", threads))))  # a task must fit a node
    task = ray.remote(_ray_point).options(num_cpus=threads, max_retries=0)
    refs = {task.remote(notebook, folder, preset, {**params, **point}, threads): point_name(point)
            for point, folder in todo}
    outcomes: dict[str, dict[str, Any]] = {}
    pending = list(refs)
    try:
        with tqdm(total=len(refs), desc="sweep (ray)", disable=not progress) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                outcomes[refs[ready[0]]] = ray.get(ready[0])
                bar.update(1)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)  # a KeyboardInterrupt inside the task, which stops its `lablib run`
        raise
    return outcomes


def run_sweep(notebook: str | Path, grid: dict[str, list[Any]], *, preset: str | None = None,
              params: dict[str, Any] | None = None, jobs: int | None = None, name: str | None = None,
              root: Path | None = None, progress: bool = True, backend: str = "local",
              address: str | None = None):
    """Run `notebook` at every point of `grid` (with fixed `params`); returns the table of runs.

    backend: "local" (parallel processes here) or "ray" (tasks on the Ray cluster at `address`,
    default $RAY_ADDRESS or a local Ray instance).

    Interrupting it (Ctrl-C, the kernel's interrupt, SIGTERM) stops the running points and
    starts no others; running it again skips the finished points and resumes the rest.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend: expected 'local' or 'ray', got {backend!r}")
    notebook = Path(notebook).resolve()
    info = inspect(notebook)
    preset = preset or default_preset()
    params = dict(params or {})
    points = grid_points(grid)
    for point in points:  # every point is checked before the first one starts
        check_params(info, preset, {**params, **point})
    fields = info.config_cls.fields_by_name()
    first = {k: v for k, v in {**params, **points[0]}.items() if k in fields}  # a valid whole config
    resolved = {k: v for k, v in info.config_cls.resolve(preset, **first).to_dict().items() if k not in grid}
    name = sweep_name(grid, preset, params, resolved, label=name)
    folder = Path(root or runs_root()) / info.experiment / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "sweep.json", {"notebook": str(notebook), "grid": grid, "preset": preset,
                                              "params": params, "points": [point_name(p) for p in points]})
    jobs = jobs or max(1, min(len(points), (os.cpu_count() or 1) // 2))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running = _Points()

    def work(point: dict[str, Any]) -> dict[str, Any]:
        run_folder = folder / point_name(point)
        done = _finished(run_folder)
        outcome = {"error": None, "skipped": True} if done else {
            **_run_point(notebook, run_folder, preset, {**params, **point}, threads, running), "skipped": False}
        return {"point": point_name(point), **point, **outcome, "run_dir": str(run_folder)}

    if backend == "ray":
        return _ray_sweep(folder, points, notebook, preset, params, threads, address, progress)
    pool = ThreadPoolExecutor(jobs)
    rows = []
    try:
        with sigterm_as_interrupt():
            for row in tqdm(pool.map(work, points), total=len(points), desc=f"sweep {info.experiment}",
                            disable=not progress):
                rows.append(row)
    except BaseException:
        running.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    table = sweep_table(folder, rows)
    table.to_csv(folder / "sweep.csv", index=False)
    return table


def _finished(run_folder: Path) -> bool:
    return (run_folder / "results.json").is_file() and Run(run_folder).status.get("status") == "done"


def _ray_sweep(folder: Path, points: list[dict[str, Any]], notebook: Path, preset: str, params: dict[str, Any],
               threads: int, address: str | None, progress: bool):
    todo = [(point, folder / point_name(point)) for point in points if not _finished(folder / point_name(point))]
    with sigterm_as_interrupt():
        outcomes = _run_on_ray(todo, notebook, preset, params, threads, address, progress) if todo else {}
    rows = [{"point": point_name(point), **point, **outcomes.get(point_name(point), {"error": None}),
             "skipped": point_name(point) not in outcomes, "run_dir": str(folder / point_name(point))}
            for point in points]
    table = sweep_table(folder, rows)
    table.to_csv(folder / "sweep.csv", index=False)
    return table


def sweep_table(folder: Path, rows: list[dict[str, Any]]):
    import pandas as pd

    out = []
    for row in rows:
        run_folder = Path(row["run_dir"])
        status = json.loads((run_folder / "status.json").read_text()) if (run_folder / "status.json").is_file() else {}
        results = json.loads((run_folder / "results.json").read_text()) if (run_folder / "results.json").is_file() else {}
        flat = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        out.append({**row, "status": status.get("status", "?"), "error": row.get("error") or status.get("error"), **flat})
    return pd.DataFrame(out)


def load_sweep(folder: str | Path):
    """The table of an existing sweep folder (for aggregation without re-running)."""
    folder = Path(folder)
    meta = json.loads((folder / "sweep.json").read_text())
    rows = [{"point": p, "run_dir": str(folder / p)} for p in meta["points"]]
    return sweep_table(folder, rows)
