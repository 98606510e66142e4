"""`lablib sweep --backend ray`: a two-point smoke grid on a local Ray instance (skipped only without ray)."""

import json
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")

from conftest import REPO  # noqa: E402
from lablib.sweep import run_sweep  # noqa: E402

QUICKSTART = REPO / "notebooks" / "00_quickstart.ipynb"


@pytest.fixture
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_point_smoke_grid_runs_as_ray_tasks_and_is_skipped_when_done(local_ray, isolated_runs):
    table = run_sweep(QUICKSTART, {"seed": [0, 1]}, preset="smoke", jobs=2, root=isolated_runs, progress=False,
                      backend="ray")
    assert table["status"].tolist() == ["done", "done"] and table["error"].isna().all()
    assert table["skipped"].tolist() == [False, False]
    for run_dir in table["run_dir"]:
        results = json.loads((REPO / run_dir / "results.json").read_text())
        assert results["final_val_loss"] < results["initial_val_loss"]
    seeds = [json.loads((REPO / d / "params.json").read_text())["seed"] for d in table["run_dir"]]
    assert seeds == [0, 1]
    again = run_sweep(QUICKSTART, {"seed": [0, 1]}, preset="smoke", jobs=2, root=isolated_runs, progress=False,
                      backend="ray")
    assert again["skipped"].tolist() == [True, True] and again["run_dir"].tolist() == table["run_dir"].tolist()


def test_unknown_backend_is_refused_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "lablib.cli", "sweep", str(QUICKSTART), "--grid", "seed=0,1",
                           "--backend", "dask"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--backend" in proc.stderr and "'dask'" in proc.stderr
