"""Sweeps: one notebook over a grid of parameters, in parallel processes.

Notable here:
- Each grid point runs `lablib run` in its own process into a folder named after the
  point (`runs/<experiment>/<sweep>/<name=value,...>`), so restarting a sweep finds
  the finished points and skips them, and resumes the interrupted ones from their
  checkpoints.
- A failing point is recorded (status.json, and the `error` column) and the sweep
  goes on.
- CPU threads are split between the parallel jobs so they do not fight.
- The result is a table (pandas DataFrame, also written as `sweep.csv`) of every
  point's parameters, status and numeric `results.json` entries.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lablib.checkpoints import atomic_write_json
from lablib.config import ConfigError, default_preset
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


def sweep_name(grid: dict[str, list[Any]], preset: str, params: dict[str, Any]) -> str:
    """A stable name for the same sweep, so a restart finds its earlier points."""
    key = json.dumps({"grid": grid, "preset": preset, "params": params}, sort_keys=True, default=str)
    return f"sweep-{preset}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _run_point(notebook: Path, folder: Path, preset: str, params: dict[str, Any], threads: int) -> dict[str, Any]:
    run_exists = (folder / "params.json").is_file()
    cmd = [sys.executable, "-m", "lablib.cli", "run", str(notebook), "--preset", preset, "--quiet"]
    if run_exists:
        cmd += ["--resume", str(folder)]
    else:
        cmd += ["--run-dir", str(folder)]
        for name, value in params.items():
            cmd += ["-p", name, json.dumps(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LABLIB_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    error = None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if line.strip()]
        error = lines[-1] if lines else f"exit status {proc.returncode}"
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "params.json").is_file():
            Run(folder).set_status("failed", error=error)
        else:
            atomic_write_json(folder / "status.json", {"status": "failed", "error": error})
    return {"error": error}


def run_sweep(notebook: str | Path, grid: dict[str, list[Any]], *, preset: str | None = None,
              params: dict[str, Any] | None = None, jobs: int | None = None, name: str | None = None,
              root: Path | None = None, progress: bool = True):
    """Run `notebook` at every point of `grid` (with fixed `params`); returns the table of runs."""
    import pandas as pd
    from tqdm.auto import tqdm

    notebook = Path(notebook).resolve()
    info = inspect(notebook)
    preset = preset or default_preset()
    params = dict(params or {})
    points = grid_points(grid)
    for point in points:  # every point is checked before the first one starts
        check_params(info, preset, {**params, **point})
    name = name or sweep_name(grid, preset, params)
    folder = Path(root or runs_root()) / info.experiment / name
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "sweep.json", {"notebook": str(notebook), "grid": grid, "preset": preset,
                                              "params": params, "points": [point_name(p) for p in points]})
    jobs = jobs or max(1, min(len(points), (os.cpu_count() or 1) // 2))
    threads = max(1, (os.cpu_count() or 1) // jobs)

    def work(point: dict[str, Any]) -> dict[str, Any]:
        run_folder = folder / point_name(point)
        done = (run_folder / "results.json").is_file() and Run(run_folder).status.get("status") == "done"
        outcome = {"error": None, "skipped": True} if done else {**_run_point(notebook, run_folder, preset,
                                                                              {**params, **point}, threads), "skipped": False}
        return {"point": point_name(point), **point, **outcome, "run_dir": str(run_folder)}

    rows = []
    with ThreadPoolExecutor(jobs) as pool:
        for row in tqdm(pool.map(work, points), total=len(points), desc=f"sweep {info.experiment}", disable=not progress):
            rows.append(row)
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
