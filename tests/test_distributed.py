"""Data parallel training (torchrun + DDP over gloo) gives the single-process run's losses.

`train_tiny` below is the training function the workers run: it lives in this
importable module because a function defined elsewhere (a notebook cell) cannot be
sent to worker processes. Two CPU processes share a global batch of 2 micro-batches
of 4 sequences; the single-process run accumulates the same 2 micro-batches.

Tolerance: the two runs add the same gradients in a different order (DDP's
all-reduce sums per-rank halves; one process accumulates them in sequence), so
they can differ by float32 rounding, ~1e-7 relative per step (measured here: no
difference at all); AdamW's update divides by sqrt(v), which can amplify a
rounding difference in a near-zero gradient, so over 8 steps we allow 1e-4 on
losses around 3.4. That still catches a wrong global batch at step 1: different
batches of this data give the initial model losses 1e-3 to 2.5e-2 apart.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig
from lablib.data import TokenBlocks
from lablib.distributed import import_target, launch, torchrun_args
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.train import global_batch_split, train

LOSS_TOLERANCE = 1e-4
SEQ_LEN, VOCAB = 16, 32


def tiny_config(**overrides) -> TrainConfig:
    knobs = dict(steps=8, batch_size=4, seq_len=SEQ_LEN, batch_tokens=128, warmup_steps=2, learning_rate=3e-3,
                 log_every=1, checkpoint_every=4, device="cpu", compile="off", num_threads=1)
    return TrainConfig.resolve("smoke", **{**knobs, **overrides})


def counting_blocks(n_blocks: int = 64) -> TokenBlocks:
    """Sequences that count up by 1 or 2 (mod VOCAB): learnable, so the loss moves every step."""
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(1, 3, (n_blocks, SEQ_LEN + 1), generator=g)
    start = torch.randint(0, VOCAB, (n_blocks, 1), generator=g)
    return TokenBlocks((start + steps.cumsum(1)) % VOCAB)


def train_tiny(dist=None, run_dir: str = "", **overrides) -> dict:
    """The training function of the test: a tiny causal LM logging every step into run_dir."""
    from lablib.runs import start_run

    cfg = tiny_config(**overrides)
    run = dist.start_run("ddp-test", cfg, run_dir) if dist else start_run("ddp-test", cfg, run_dir)
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ_LEN))
    result = train(model, CausalLM(), counting_blocks(), cfg, run, progress=False, dist=dist)
    return {"resumed_from": result.resumed_from, "tokens": result.tokens}


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def train_interrupt_resume(dist, run_dir: str) -> dict:
    """Train 8 steps; then, as if interrupted after step 4, drop checkpoint 8 and resume in the same folder.

    Both runs happen in one launch because starting workers costs seconds; the resumed
    run still goes through everything a fresh job would (every rank loads step 4,
    rank 0 truncates the metrics and rewrites steps 5..8).
    """
    train_tiny(dist, run_dir, keep_optimizer=2)  # step 4 keeps its optimizer state to resume from
    first = losses(Path(run_dir)) if dist.is_main else None
    if dist.is_main:
        (Path(run_dir) / "checkpoints" / "step-000008" / "state.json").unlink()
    dist.barrier()
    resumed = train_tiny(dist, run_dir, keep_optimizer=2)
    return {"first": list(first.items()) if first else None, "resumed_from": resumed["resumed_from"]}


@pytest.mark.parametrize("batch_tokens, world", [(128, 2), (None, 2), (256, 2), (384, 3), (None, 4)])
def test_processes_read_exactly_the_rows_of_one_process(batch_tokens, world):
    cfg = tiny_config(batch_tokens=batch_tokens)
    blocks = TokenBlocks(torch.arange(1000)[:, None])  # row i holds the number i
    one_accum, one_size = global_batch_split(cfg, 1)
    accum, size = global_batch_split(cfg, world)
    for step in range(3):
        one = {int(r) for m in range(one_accum) for r in blocks.batch(step * one_accum + m, one_size, 0)["tokens"]}
        shared = [int(r) for rank in range(world) for m in range(accum)
                  for r in blocks.batch((step * accum + m) * world + rank, size, 0)["tokens"]]
        assert sorted(shared) == sorted(one) and len(shared) == len(one)


def test_global_batch_that_cannot_be_shared_is_refused():
    with pytest.raises(ConfigError, match="batch_size"):
        global_batch_split(tiny_config(batch_size=3, batch_tokens=None), 2)


def test_two_gloo_processes_match_one_process_and_resume(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_tiny(run_dir=str(single))
    out = launch("test_distributed:train_interrupt_resume", nprocs=2, device="cpu", run_dir=str(ddp))

    one, two = losses(single), dict(out["first"])
    assert sorted(two) == list(range(1, 9))  # every step logged once: only rank 0 writes
    assert one[8] < one[1] - 0.1  # the curve moves, so matching it means something
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOLERANCE), step

    assert out["resumed_from"] == 4
    again = losses(ddp)
    assert sorted(again) == list(range(1, 9))
    for step in range(5, 9):
        assert again[step] == pytest.approx(two[step], abs=1e-6), step


def test_launch_refuses_a_target_it_cannot_import():
    with pytest.raises(ValueError, match="module:function"):
        import_target("train_tiny")


def world_info(dist):
    """A launch target: what rank 0 sees of the job."""
    return {"world_size": dist.world_size, "rank": dist.rank, "master": os.environ["MASTER_ADDR"]}


def test_torchrun_flags_for_one_machine_static_and_elastic_rendezvous():
    assert torchrun_args(2) == ["--standalone", "--nproc-per-node=2"]
    assert torchrun_args(4, nnodes=2, node_rank=1, master_addr="10.0.0.1") == [
        "--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1", "--master-port=29500"]
    assert torchrun_args(8, nnodes="1:4", rdzv_endpoint="head:29400", rdzv_id="job-7") == [
        "--nproc-per-node=8", "--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=job-7"]
    with pytest.raises(ValueError, match="master_addr and node_rank"):
        torchrun_args(2, nnodes=2)
    with pytest.raises(ValueError, match="node_rank"):
        torchrun_args(2, nnodes=2, node_rank=2, master_addr="10.0.0.1")


def test_launch_passes_static_rendezvous_flags_to_torchrun():
    with socket.socket() as s:  # a free port for this one-node job
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = launch("test_distributed:world_info", nprocs=2, device="cpu", nnodes=1, node_rank=0,
                 master_addr="127.0.0.1", master_port=port)
    assert out == {"world_size": 2, "rank": 0, "master": "127.0.0.1"}
