"""Loggers get exactly the rows of metrics.jsonl: TensorBoard events and a trackio project read back equal."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig
from lablib.data import TokenBlocks
from lablib.loggers import make_loggers
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.runs import create_run
from lablib.train import train

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = TokenBlocks(torch.randint(4, 30, (64, 17), generator=torch.Generator().manual_seed(0)))


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16))


def cfg(**kw):
    return TrainConfig(**{**dict(steps=9, batch_size=4, seq_len=16, warmup_steps=2, log_every=2, eval_every=3,
                                 checkpoint_every=100, device="cpu"), **kw})


def jsonl_series(run_dir, name):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in rows if name in r}


def test_every_logged_row_goes_to_each_logger_and_to_callbacks_with_a_row(tmp_path):
    run = create_run("t", {}, tmp_path / "run")
    seen_a, seen_b, callback_rows = [], [], []

    class Collect:
        closed = False

        def log(self, row):
            seen_b.append(dict(row))

        def close(self):
            Collect.closed = True

    def callback(step, model, row):
        callback_rows.append(dict(row))
        return {"probe": float(step)}

    train(tiny(), CausalLM(), BLOCKS, cfg(), run, val=BLOCKS.eval_batches(1, 4), progress=False,
          loggers=[seen_a.append, Collect()], callbacks=[(3, callback), (3, lambda step, model: {"plain": 1.0})])
    assert seen_a == seen_b == run.log.rows() and Collect.closed
    assert [r["step"] for r in callback_rows] == [0, 3, 6, 9]
    assert "val_loss" in callback_rows[1] and "loss" in callback_rows[-1]  # the row so far at that step
    assert all("probe" in r and "plain" in r for r in seen_a if r["step"] % 3 == 0)


def test_tensorboard_events_hold_the_losses_of_metrics_jsonl(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = create_run("t", {}, tmp_path / "run")
    train(tiny(), CausalLM(), BLOCKS, cfg(loggers=["tensorboard"]), run, val=BLOCKS.eval_batches(1, 4), progress=False)
    events = event_accumulator.EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    for name in ("loss", "val_loss", "tokens_per_s"):
        read_back = {e.step: e.value for e in events.Scalars(name)}
        expected = jsonl_series(run.path, name)
        assert read_back.keys() == expected.keys() and len(expected) >= 3
        assert read_back == pytest.approx(expected, rel=1e-6)  # TensorBoard stores float32


def test_trackio_project_holds_the_losses_of_metrics_jsonl(tmp_path):
    pytest.importorskip("trackio")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from test_loggers import BLOCKS, cfg, tiny
        from lablib.objectives import CausalLM
        from lablib.runs import create_run
        from lablib.train import train
        run = create_run("loggers-test", {{"preset": "smoke"}}, {str(tmp_path / 'run')!r})
        train(tiny(), CausalLM(), BLOCKS, cfg(loggers=["trackio"]), run, val=BLOCKS.eval_batches(1, 4), progress=False)
        from trackio.sqlite_storage import SQLiteStorage
        print("LOGS=" + json.dumps(SQLiteStorage.get_logs("loggers-test", run.id)))
    """)
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOGS="))[5:])
    assert (tmp_path / "trackio").is_dir()
    for name in ("loss", "val_loss"):
        read_back = {r["step"]: r[name] for r in logs if name in r}
        assert read_back == jsonl_series(tmp_path / "run", name) and len(read_back) >= 3


def test_unknown_logger_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="parameter 'loggers'"):
        make_loggers(["wandb"], create_run("t", {}, tmp_path / "run"))
    with pytest.raises(ConfigError, match="expected a list of one of 'tensorboard', 'trackio'"):
        TrainConfig.check("loggers", TrainConfig.parse("loggers", "wandb"))
    assert TrainConfig.parse("loggers", "tensorboard") == ["tensorboard"]
