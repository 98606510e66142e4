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


def test_a_missing_corpus_is_refused_before_the_kernel_starts(isolated_runs):
    proc = lablib("run", QUICKSTART, "--preset", "smoke", "--quiet", "-p", "corpus", "/nonexistent/corpus")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("lablib: error: corpus '/nonexistent/corpus': expected 'stdlib', 'hf:NAME' or an "
                                   "existing file or folder")
    assert not isolated_runs.exists()


def test_a_failing_cell_is_reported_in_one_line_and_a_divergence_names_a_finite_checkpoint(isolated_runs):
    import re

    import torch
    from safetensors.torch import load_file

    proc = lablib("run", QUICKSTART, "--preset", "smoke", "--quiet", "-p", "learning_rate", "1e6")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lablib: cell ") and "TrainingDiverged" in last
    step = int(re.search(r"the newest checkpoint with finite weights is step (\d+)", last).group(1))
    run_dir = next((isolated_runs / "quickstart").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert open_run(run_dir).checkpoints()[-1] == step  # nothing after it was saved
    weights = load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


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
    folder = _labelled_sweep(isolated_runs / "quickstart", "s")
    table = (folder / "sweep.csv").read_text()
    assert table.count(",done,") == 2 and table.count(",failed,") == 2
    done_runs = [p for p in folder.iterdir() if "corpus=stdlib" in p.name]
    stamps = {p: (p / "results.json").stat().st_mtime for p in done_runs}
    second = lablib(*args)
    assert second.returncode == 1
    assert all((p / "results.json").stat().st_mtime == t for p, t in stamps.items())  # not re-run
    assert "skipped" in (folder / "sweep.csv").read_text().splitlines()[0]


def test_a_sweep_restarted_after_its_preset_changed_starts_afresh(isolated_runs, monkeypatch):
    """Finished points are only reused when the preset still resolves to the same values."""
    from lablib import sweep
    from lablib.notebooks import inspect

    started = []
    monkeypatch.setattr(sweep, "_run_point", lambda notebook, folder, *a: started.append(folder) or {"error": None})
    grid = {"seed": [0]}
    sweep.run_sweep(QUICKSTART, grid, preset="smoke", progress=False)
    sweep.run_sweep(QUICKSTART, grid, preset="smoke", progress=False)
    assert started[0] == started[1]  # same preset values: the same sweep folder
    presets = inspect(QUICKSTART).config_cls.presets
    monkeypatch.setitem(presets, "smoke", {**presets["smoke"], "steps": presets["smoke"].get("steps", 20) + 1})
    sweep.run_sweep(QUICKSTART, grid, preset="smoke", progress=False)
    assert started[2].parent != started[0].parent
    assert started[2].name == started[0].name  # the point keeps its name inside the new sweep folder
    # a named sweep (as notebook drivers pass) is protected the same way: the name is only a label
    sweep.run_sweep(QUICKSTART, grid, preset="smoke", progress=False, name="decoder-smoke")
    monkeypatch.setitem(presets, "smoke", {**presets["smoke"], "steps": presets["smoke"]["steps"] + 1})
    sweep.run_sweep(QUICKSTART, grid, preset="smoke", progress=False, name="decoder-smoke")
    assert started[3].parent.name.startswith("decoder-smoke-") and started[4].parent.name.startswith("decoder-smoke-")
    assert started[4].parent != started[3].parent


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state  # a zombie has already exited


def _labelled_sweep(experiment, label, seconds=60):
    """The one sweep folder `<label>-<hash>` under `experiment`, once it exists."""
    deadline = time.time() + seconds
    while time.time() < deadline and not list(experiment.glob(f"{label}-*")):
        time.sleep(0.2)
    [folder] = experiment.glob(f"{label}-*")
    return folder


def _wait_for_checkpoints(folders, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and not all((p / "checkpoints").is_dir() and open_run(p).checkpoints()
                                              for p in folders):
        time.sleep(0.2)


def _assert_points_stopped(points, kernels, seconds=30):
    """Every point's kernel has exited (within `seconds`) and its run is marked stopped."""
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(pid) for pid in kernels):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in kernels)
    assert [open_run(p).status["status"] for p in points] == ["stopped"] * len(points)


def test_interrupting_a_sweep_stops_its_running_points_and_starts_no_more(isolated_runs):
    code = ("import sys; from lablib.sweep import run_sweep; run_sweep(sys.argv[1], {'seed': [0, 1, 2]}, "
            "preset='smoke', params={'steps': 5000, 'checkpoint_every': 20, 'sample_tokens': 5}, jobs=2, "
            "name='s', progress=False)")
    sweep = subprocess.Popen([sys.executable, "-c", code, QUICKSTART], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    folder = _labelled_sweep(isolated_runs / "quickstart", "s")
    started = [folder / "seed=0", folder / "seed=1"]
    _wait_for_checkpoints(started)
    kernels = [json.loads((p / "status.json").read_text())["pid"] for p in started]
    assert all(_alive(pid) for pid in kernels)
    sweep.send_signal(signal.SIGTERM)  # the sweep process alone, as a plain `kill` would
    assert sweep.wait(timeout=60) != 0
    _assert_points_stopped(started, kernels)
    assert not (folder / "seed=2" / "params.json").exists()  # the queued point never started


def _sweep_driver_notebook(path):
    """A notebook that sweeps the quickstart from inside its kernel (as a driver notebook does), two points
    at a time, each training long enough to be alive when the signal comes."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["lablib"] = {"config": "lablib.experiments.quickstart:LMConfig", "experiment": "sweep_driver"}
    nb.metadata["kernelspec"] = {"name": "lablib", "display_name": "Python (lablib)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("preset = None\nrun_dir = None", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "from lablib.config import notebook_config\nfrom lablib.experiments.quickstart import LMConfig\n"
                    "from lablib.runs import start_run\nfrom lablib.sweep import run_sweep\n"
                    "run = start_run('sweep_driver', notebook_config(LMConfig, globals()), run_dir)\n"
                    f"run_sweep({QUICKSTART!r}, {{'seed': [0, 1]}}, preset='smoke', params={{'steps': 5000, "
                    "'checkpoint_every': 20, 'sample_tokens': 5}, jobs=2, name='s', progress=False)")]
    nbformat.write(nb, path)
    return str(path)


def test_sigterm_to_lablib_run_of_a_sweep_notebook_stops_every_point_and_says_how_to_resume(isolated_runs, tmp_path):
    notebook = _sweep_driver_notebook(tmp_path / "sweep_driver.ipynb")
    proc = subprocess.Popen([sys.executable, "-m", "lablib.cli", "run", notebook, "--preset", "smoke"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folder = _labelled_sweep(isolated_runs / "quickstart", "s", seconds=120)
    points = [folder / "seed=0", folder / "seed=1"]
    _wait_for_checkpoints(points)
    kernels = [json.loads((p / "status.json").read_text())["pid"] for p in points]
    proc.send_signal(signal.SIGTERM)  # the CLI alone: its kernel and the points' processes are in other groups
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "--resume" in stderr.strip().splitlines()[-1]
    _assert_points_stopped(points, kernels)
    driver = next(isolated_runs.glob("sweep_driver/*/status.json"))
    assert json.loads(driver.read_text())["status"] == "stopped"


def test_ctrl_c_to_lablib_sweep_stops_its_points_and_says_how_to_resume(isolated_runs):
    args = [sys.executable, "-m", "lablib.cli", "sweep", QUICKSTART, "--preset", "smoke", "--grid", "seed=0,1",
            "-p", "steps", "5000", "-p", "checkpoint_every", "20", "-p", "sample_tokens", "5", "--jobs", "2",
            "--name", "s"]
    # a shell without job control starts background jobs with SIGINT ignored; the CLI must see it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    folder = _labelled_sweep(isolated_runs / "quickstart", "s")
    points = [folder / f"seed={seed}" for seed in (0, 1)]
    _wait_for_checkpoints(points)
    kernels = [json.loads((p / "status.json").read_text())["pid"] for p in points]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGINT
    assert "the same command resumes them" in stderr.strip().splitlines()[-1]
    _assert_points_stopped(points, kernels)


def test_the_kernel_spec_survives_runs_that_start_together(tmp_path):
    """Two `lablib run`s started at once, from interpreters named differently, each rewrite the
    kernel spec the other is reading; neither may ever read a half-written file."""
    code = ("import sys; sys.prefix = sys.argv[1]; sys.executable = sys.argv[2]\n"
            "from lablib.notebooks import ensure_kernel\n"
            "for _ in range(300): ensure_kernel()")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), name], stderr=subprocess.PIPE, text=True)
             for name in ("/venv/bin/python", "/venv/bin/python3")]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    folder = tmp_path / "share" / "jupyter" / "kernels" / "lablib"
    assert [p.name for p in folder.iterdir()] == ["kernel.json"]  # no temporary files left behind
    assert json.loads((folder / "kernel.json").read_text())["argv"][0] in ("/venv/bin/python", "/venv/bin/python3")


def test_an_unreadable_kernel_spec_is_rewritten(tmp_path, monkeypatch):
    from lablib import notebooks

    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    path = tmp_path / "share" / "jupyter" / "kernels" / notebooks.KERNEL_NAME / "kernel.json"
    path.parent.mkdir(parents=True)
    path.write_text("")  # what an interrupted non-atomic write leaves
    assert notebooks.ensure_kernel() == notebooks.KERNEL_NAME
    assert json.loads(path.read_text())["argv"][0] == sys.executable
