import math

import pytest
import torch

from lablib.config import ModelConfig, TrainConfig
from lablib.data import TokenBlocks
from lablib.models import Transformer
from lablib.objectives import CausalLM, MaskedLM
from lablib.runs import create_run
from lablib.train import TrainingDiverged, grad_accum_steps, learning_rate, resolve_hardware, train

BLOCKS = TokenBlocks(torch.randint(4, 30, (64, 17), generator=torch.Generator().manual_seed(0)))


def tiny(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16, dropout=dropout))


def cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=16, warmup_steps=2, log_every=1, eval_every=4, checkpoint_every=4,
                learning_rate=3e-3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(run):
    return run.metrics().dropna(subset=["loss"])[["step", "loss"]].values.tolist()


def test_schedules():
    c = cfg(steps=100, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, learning_rate=1.0)
    assert learning_rate(0, c) == pytest.approx(0.1) and learning_rate(9, c) == pytest.approx(1.0)
    assert learning_rate(99, c) == pytest.approx(0.1, abs=1e-3)
    w = cfg(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, learning_rate=1.0)
    assert learning_rate(50, w) == 1.0 and learning_rate(79, w) == 1.0
    assert learning_rate(89, w) == pytest.approx(0.5) and learning_rate(99, w) == pytest.approx(0.0)
    assert learning_rate(60, cfg(steps=100, schedule="constant", learning_rate=0.3)) == 0.3


def test_grad_accumulation_reaches_the_token_target():
    assert grad_accum_steps(cfg(batch_size=4, seq_len=16, batch_tokens=256)) == 4
    assert grad_accum_steps(cfg(batch_size=4, seq_len=16, batch_tokens=256), world_size=2) == 2
    assert grad_accum_steps(cfg(batch_size=4, seq_len=16)) == 1


def test_hardware_policy_on_cpu_records_reasons():
    policy = resolve_hardware(cfg(device="auto"))
    if not torch.cuda.is_available():
        assert (policy.device, policy.dtype, policy.compile) == ("cpu", "float32", False)
    assert set(policy.reasons) >= {"device", "dtype", "compile", "fused_adamw", "tf32", "num_threads"}
    assert resolve_hardware(cfg(compile="on")).compile is True


def test_training_reduces_loss_and_logs_metrics(tmp_path):
    run = create_run("t", {}, tmp_path / "run")
    result = train(tiny(), CausalLM(), BLOCKS, cfg(steps=30, learning_rate=1e-2), run, val=BLOCKS.eval_batches(2, 4),
                   progress=False)
    m = run.metrics()
    assert m["loss"].dropna().iloc[-1] < m["loss"].dropna().iloc[0]
    assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "val_loss"} <= set(m.columns)
    assert result.tokens == 30 * 4 * 16
    assert run.checkpoints() == [1, 2, 4, 8, 12, 16, 20, 24, 28, 30]


def test_training_is_deterministic_on_cpu(tmp_path):
    a, b = (create_run("t", {}, tmp_path / n) for n in "ab")
    for r in (a, b):
        train(tiny(dropout=0.1), MaskedLM(mask_id=2, vocab_size=30), BLOCKS, cfg(), r, progress=False)
    assert losses(a) == losses(b)


def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path):
    full = create_run("t", {}, tmp_path / "full")
    train(tiny(dropout=0.1), MaskedLM(mask_id=2, vocab_size=30), BLOCKS, cfg(), full,
          val=BLOCKS.eval_batches(1, 4), progress=False)
    part = create_run("t", {}, tmp_path / "part")
    # a crash after step 10 (past the step-8 checkpoint); the process-level SIGKILL case is in test_cli.py
    with pytest.raises(KeyboardInterrupt):
        train(tiny(dropout=0.1), MaskedLM(mask_id=2, vocab_size=30), BLOCKS, cfg(), part,
              val=BLOCKS.eval_batches(1, 4), progress=False, callbacks=[(1, _crash_after(10))])
    assert part.checkpoints()[-1] == 8 and max(r["step"] for r in part.log.rows()) >= 9
    result = train(tiny(seed=123, dropout=0.1), MaskedLM(mask_id=2, vocab_size=30), BLOCKS, cfg(), part,
                   val=BLOCKS.eval_batches(1, 4), progress=False)
    assert result.resumed_from == 8
    assert losses(part) == losses(full)
    assert part.metrics()["val_loss"].dropna().tolist() == full.metrics()["val_loss"].dropna().tolist()


def _crash_after(step_limit):
    def callback(step, model):
        if step >= step_limit:
            raise KeyboardInterrupt
    return callback


class ExplodingObjective:
    name = "explode"

    def __call__(self, model, batch, generator):
        loss, metrics = CausalLM()(model, batch, generator)
        return (loss * math.nan if self.step >= 6 else loss), metrics


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    run = create_run("t", {}, tmp_path / "run")
    objective = ExplodingObjective()
    objective.step = 0

    def count(step, model):
        objective.step = step

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 7; the newest checkpoint with finite weights is step 4"):
        train(tiny(), objective, BLOCKS, cfg(), run, progress=False, callbacks=[(1, count)])
    assert run.checkpoints() == [1, 2, 4]


def test_weights_that_stop_being_finite_are_never_saved_and_the_message_names_the_newest_finite_one(tmp_path):
    run = create_run("t", {}, tmp_path / "run")

    def poison(step, model):  # the loss of step 8 was still finite: only the weights after its update are not
        if step == 8:
            with torch.no_grad():
                model.blocks[0].mlp.c_fc.weight[0, 0] = math.inf

    with pytest.raises(TrainingDiverged, match=r"became NaN or inf \(e.g. blocks.0.mlp.c_fc.weight\) at step 8; "
                                               r"the newest checkpoint with finite weights is step 4"):
        train(tiny(), CausalLM(), BLOCKS, cfg(), run, progress=False, callbacks=[(1, poison)])
    assert run.checkpoints() == [1, 2, 4]


def test_optimizer_state_is_kept_only_in_the_newest_checkpoints(tmp_path):
    run = create_run("t", {}, tmp_path / "run")
    train(tiny(), CausalLM(), BLOCKS, cfg(), run, progress=False)
    with_optimizer = [s for s in run.checkpoints() if (run.path / f"checkpoints/step-{s:06d}/optimizer.safetensors").is_file()]
    assert run.checkpoints() == [1, 2, 4, 8, 12] and with_optimizer == [12]
    every = create_run("t", {}, tmp_path / "every")
    train(tiny(), CausalLM(), BLOCKS, cfg(keep_optimizer=None), every, progress=False)
    assert all((every.path / f"checkpoints/step-{s:06d}/optimizer.safetensors").is_file() for s in every.checkpoints())


def test_a_run_folder_written_before_checksums_and_the_registry_still_resumes(tmp_path):
    import json

    full = create_run("t", {}, tmp_path / "full")
    train(tiny(), CausalLM(), BLOCKS, cfg(), full, progress=False)
    old = create_run("t", {}, tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):  # a crash after step 9, past the step-8 checkpoint
        train(tiny(), CausalLM(), BLOCKS, cfg(keep_optimizer=None), old, progress=False, callbacks=[(1, _crash_after(9))])
    for state in (old.path / "checkpoints").glob("step-*/state.json"):  # the format of earlier versions
        data = json.loads(state.read_text())
        data.pop("files")
        state.write_text(json.dumps(data))
    spec = json.loads((old.path / "model.json").read_text())
    (old.path / "model.json").write_text(json.dumps({"class": "lablib.models:Transformer",
                                                     "config_class": "lablib.config:ModelConfig", "config": spec["config"]}))
    (old.path / "checkpoints" / "step-000008" / "model.safetensors").write_bytes(b"\x10\x00")  # torn, undetectable by size
    result = train(tiny(seed=7), CausalLM(), BLOCKS, cfg(), old, progress=False)
    assert result.resumed_from == 4
    assert losses(old) == losses(full)
    old.load_model()
