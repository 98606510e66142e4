"""The command line, end to end, on the quickstart notebook at the smoke preset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from lablib.runs import open_run

QUICKSTART = str(REPO / "notebooks" / "00_quickstart.ipynb")


def lablib(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lablib.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.parametrize("args, message", [
    (["-p", "learning_rate", "-1"], "lablib: error: parameter 'learning_rate': expected a value > 0.0, got -1"),
    (["-p", "learnin_rate", "0.1"], "lablib: error: unknown parameter 'learnin_rate' for 00_quickstart.ipynb; "
                                    "did you mean 'learning_rate'?"),
    (["-p", "n_layer", "two"], "lablib: error: parameter 'n_layer': expected an integer, got 'two'"),
])
def test_bad_parameters_fail_at_once_with_one_line_and_status_2(args, message, isolated_runs):
    proc = lablib("run", QUICKSTART, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == message
    assert not isolated_runs.exists()  # no run folder: nothing was started


def test_run_leaves_a_complete_run_folder(isolated_runs):
    proc = lablib("run", QUICKSTART, "--preset", "smoke", "--quiet")
    assert proc.returncode == 0, proc.stderr
    run = open_run(proc.stdout.strip().splitlines()[-1])
    assert run.path.parent == isolated_runs / "quickstart"
    for name in ("notebook.ipynb", "params.json", "metrics.jsonl", "tokenizer.json", "results.json", "model.json"):
        assert (run.path / name).is_file(), name
    assert len(run.checkpoints()) >= 2
    assert run.params["preset"] == "smoke" and run.params["hardware"]["device"] in ("cpu", "cuda", "mps")
    assert run.results["final_val_loss"] < run.results["initial_val_loss"]
    assert run.results["reload_matches"] is True
    assert run.status["status"] == "done"
    listing = lablib("runs", "quickstart")
    assert run.id in listing.stdout and "done" in listing.stdout


def test_a_failing_cell_is_reported_in_one_line(isolated_runs):
    proc = lablib("run", QUICKSTART, "--preset", "smoke", "--quiet", "-p", "corpus", "/nonexistent/corpus")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lablib: cell ") and "FileNotFoundError" in last and "/nonexistent/corpus" in last
    run_dir = next((isolated_runs / "quickstart").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"


def test_sigkill_during_training_then_resume_matches_the_uninterrupted_run(isolated_runs):
    params = ["--preset", "smoke", "--quiet", "-p", "steps", "240", "-p", "checkpoint_every", "40",
              "-p", "sample_tokens", "5"]
    victim = isolated_runs / "quickstart" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lablib.cli", "run", QUICKSTART, *params, "--run-dir", str(victim)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (victim / "checkpoints" / "step-000080" / "state.json").is_file():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, papermill and the kernel, mid-training
    proc.wait()
    killed = open_run(victim)
    assert 80 <= killed.checkpoints()[-1] < 240 and killed.state() in ("stopped", "running")

    assert lablib("run", QUICKSTART, "--resume", str(victim), "--quiet").returncode == 0
    straight = isolated_runs / "quickstart" / "straight"
    assert lablib("run", QUICKSTART, *params, "--run-dir", str(straight)).returncode == 0
    a, b = open_run(victim).metrics(), open_run(straight).metrics()
    assert a["step"].tolist() == b["step"].tolist()
    assert a["loss"].fillna(-1).tolist() == b["loss"].fillna(-1).tolist()
    assert a["val_loss"].fillna(-1).tolist() == b["val_loss"].fillna(-1).tolist()


def test_sweep_keeps_going_past_a_failure_and_skips_finished_runs_when_restarted(isolated_runs):
    args = ["sweep", QUICKSTART, "--preset", "smoke", "--grid", "seed=0,1", "--grid", "corpus=stdlib,/missing",
            "-p", "steps", "10", "-p", "sample_tokens", "5", "--jobs", "2", "--name", "s"]
    first = lablib(*args)
    assert first.returncode == 1  # two points failed
    folder = isolated_runs / "quickstart" / "s"
    table = (folder / "sweep.csv").read_text()
    assert table.count(",done,") == 2 and table.count(",failed,") == 2
    done_runs = [p for p in folder.iterdir() if "corpus=stdlib" in p.name]
    stamps = {p: (p / "results.json").stat().st_mtime for p in done_runs}
    second = lablib(*args)
    assert second.returncode == 1
    assert all((p / "results.json").stat().st_mtime == t for p, t in stamps.items())  # not re-run
    assert "skipped" in (folder / "sweep.csv").read_text().splitlines()[0]
