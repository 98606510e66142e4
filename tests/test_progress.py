"""Headless progress: `lablib run` prints a line per logged step; `lablib runs` shows key params and results."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from lablib.progress import MetricsFollower, format_duration, progress_line
from lablib.runs import create_run, runs_table

QUICKSTART = str(REPO / "notebooks" / "00_quickstart.ipynb")
LINE = re.compile(r"^lablib: step (\d+)/(\d+)  loss [0-9.]+(  val [0-9.]+)?  [0-9,]+ tok/s(  ETA \S+)?$")


def test_progress_line_reads_like_a_training_log():
    row = {"step": 120, "loss": 3.21449, "val_loss": 3.3012, "tokens_per_s": 12345.6}
    assert progress_line(row, 400, 80) == "step 120/400  loss 3.214  val 3.301  12,346 tok/s  ETA 1m20s"
    assert progress_line({"step": 3, "loss": 1.0}, None, None) == "step 3  loss 1"
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_follower_prints_each_training_row_once_also_across_a_resume(tmp_path):
    run = create_run("t", {"steps": 40}, tmp_path / "run")
    lines = []
    follower = MetricsFollower(run.path, write=lines.append)
    run.log.append({"step": 0, "tokens": 0, "val_loss": 4.0})  # no training loss yet: not a progress line
    for step in (10, 20):
        run.log.append({"step": step, "loss": 3.0, "tokens_per_s": 100.0})
    follower.poll()
    assert [line.split("  ")[0] for line in lines] == ["step 10/40", "step 20/40"]
    run.log.truncate_after(10)  # a resume from step 10 rewrites the file
    run.log.append({"step": 20, "loss": 2.9, "tokens_per_s": 100.0})
    run.log.append({"step": 30, "loss": 2.8, "tokens_per_s": 100.0})
    follower.poll()
    assert [line.split("  ")[0] for line in lines] == ["step 10/40", "step 20/40", "step 30/40"]
    assert "ETA" in lines[-1]


def test_lablib_run_streams_progress_and_forwards_to_tensorboard(isolated_runs):
    proc = subprocess.run([sys.executable, "-m", "lablib.cli", "run", QUICKSTART, "--preset", "smoke",
                           "-p", "loggers", "tensorboard"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = proc.stdout.strip().splitlines()[-1]
    lines = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("lablib: step")]
    assert lines and all(LINE.match(line) for line in lines), lines
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]
    assert [int(LINE.match(line).group(1)) for line in lines] == [r["step"] for r in rows if "loss" in r]
    assert list((REPO / run_dir / "tensorboard").glob("events.out.tfevents.*"))
    listing = subprocess.run([sys.executable, "-m", "lablib.cli", "runs", "quickstart"], capture_output=True,
                             text=True).stdout
    header = listing.splitlines()[0].split()
    assert {"steps", "seed", "loss", "val_loss"} <= set(header)


def test_runs_table_shows_what_tells_runs_apart_and_their_results(tmp_path):
    for i, lr in enumerate((1e-3, 3e-3)):
        run = create_run("demo", {"preset": "smoke", "steps": 50, "seed": 0, "learning_rate": lr, "d_model": 64,
                                  "hardware": {"device": "cpu"}}, tmp_path / "runs" / "demo" / f"r{i}")
        run.log.append({"step": 50, "loss": 2.0 + i, "val_loss": 2.5 + i})
        run.write_results({"accuracy": 0.5 + i / 10})
    table = runs_table(root=tmp_path / "runs")
    assert table[["steps", "seed", "learning_rate"]].values.tolist() == [[50, 0, 1e-3], [50, 0, 3e-3]]
    assert "d_model" not in table and "hardware" not in table  # the same in both: no column
    assert table["loss"].tolist() == [2.0, 3.0] and table["result.accuracy"].tolist() == [0.5, pytest.approx(0.6)]
