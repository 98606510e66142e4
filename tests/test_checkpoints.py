import json
import os

import pytest
import torch

from lablib.checkpoints import (atomic_write_json, atomic_write_text, checkpoint_schedule, list_checkpoints,
                                load_checkpoint, save_checkpoint)
from lablib.config import ModelConfig
from lablib.models import Transformer


def tiny():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, max_seq_len=8))


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(path, "half")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_pythia_like_schedule():
    assert checkpoint_schedule(1000, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1000]
    assert checkpoint_schedule(3, 10) == [1, 2, 3]


def test_save_and_load_restore_model_and_optimizer_exactly(tmp_path):
    model = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 20, (2, 8))
    model(x).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 5, model, opt, {"tokens": 80})
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "step-000005").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "state.json"]

    fresh = tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    state = load_checkpoint(tmp_path, 5, fresh, fresh_opt)
    assert state["step"] == 5 and state["tokens"] == 80
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[pa], fresh_opt.state[pb]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert fresh.unembed.weight is fresh.embed.weight  # tying survives loading


def test_incomplete_checkpoints_are_invisible_and_keep_last_prunes(tmp_path):
    model = tiny()
    for step in (1, 2, 4, 8):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    (tmp_path / "checkpoints" / "step-000016").mkdir()  # a folder without state.json: half written
    (tmp_path / "checkpoints" / ".step-000032.tmp").mkdir()
    assert list_checkpoints(tmp_path) == [4, 8]
    with pytest.raises(FileNotFoundError, match="available: \\[4, 8\\]"):
        load_checkpoint(tmp_path, 16, model)


def test_no_pickle_anywhere_in_a_checkpoint(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()))
    for f in (tmp_path / "checkpoints" / "step-000001").iterdir():
        assert f.suffix in (".safetensors", ".json")
        assert not f.read_bytes().startswith(b"\x80")  # pickle protocol header


def test_state_json_vouches_for_every_file_with_its_size_and_sha256(tmp_path):
    import hashlib

    from lablib.checkpoints import CheckpointError, newest_loadable, verify_checkpoint

    model = tiny()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, torch.optim.AdamW(model.parameters()), keep_optimizer=None)
    folder = tmp_path / "checkpoints" / "step-000002"
    files = json.loads((folder / "state.json").read_text())["files"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        data = (folder / name).read_bytes()
        assert files[name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert list_checkpoints(tmp_path) == [1, 2]  # listing checks sizes only
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        verify_checkpoint(folder)
    assert newest_loadable(tmp_path, notice=False) == 1
    with pytest.raises(CheckpointError, match="checkpoint step 2 .* unusable"):
        load_checkpoint(tmp_path, 2, tiny())


def test_non_finite_weights_are_never_saved(tmp_path):
    from lablib.checkpoints import NonFiniteWeights

    model = tiny()
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"refusing to save step 3: .* hold NaN or inf, e.g. embed.weight"):
        save_checkpoint(tmp_path, 3, model)
    assert not (tmp_path / "checkpoints").exists()  # nothing was written
