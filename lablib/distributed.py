"""Data-parallel training with PyTorch's own engine: torchrun + DistributedDataParallel.

Notable here:
- `DistContext` is what `lablib.train.train(..., dist=ctx)` needs: rank, world
  size, `wrap(model)` (DDP), `mean(tensor)` (all-reduce), `barrier()`. `init()`
  builds it from torchrun's environment: gloo on CPU, NCCL on CUDA (one GPU per
  local rank), and each CPU process gets its share of the cores.
- The entry point runs any training function of an importable module on every rank:

      torchrun --nproc-per-node 2 -m lablib.distributed mypackage.experiment:main --kwargs '{"steps": 200}'

  calls `main(dist=ctx, steps=200)` in each process; rank 0's return value (JSON)
  can be written with `--result FILE`.
- `launch("mypackage.experiment:main", nprocs=2, steps=200)` does the same from a
  notebook: it starts torchrun as a subprocess (fresh interpreters, the same code
  path as the command line), streams the workers' output into the cell and returns
  rank 0's result. The function must live in an importable module: a function
  defined in a notebook cell cannot be pickled into worker processes.
- Several machines: `launch(..., nnodes=2, node_rank=0, master_addr="10.0.0.1",
  master_port=29500)` on every node (its own node_rank), or elastic rendezvous with
  `rdzv_endpoint="10.0.0.1:29400", rdzv_id="job-1"`; `torchrun_args` turns these
  into torchrun's own flags (`--nnodes --node-rank --master-addr --master-port`, or
  `--rdzv-backend c10d --rdzv-endpoint --rdzv-id`). Only the node holding global
  rank 0 gets the result; the run folder must be on storage every node sees.
- `ctx.start_run(...)` makes the run folder on rank 0 and hands its path to the other
  ranks, which read checkpoints from it (for resume) but never write.
- The global batch is the same at every world size; `lablib.train.global_batch_split`
  says how it is cut into per-process micro-batches.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # NCCL only drives GPUs; gloo is the CPU engine


@dataclass
class DistContext:
    """One process of a data-parallel job (what `train(..., dist=)` uses)."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around `model` (already on this process's device); rank 0's weights are broadcast."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.local_rank] if self.device == "cuda" else None
        # no buffer sync before each forward: the lab's buffers are fixed position tables, equal on every rank
        # (torch >= 2.13 names the switch forward_sync_buffers; older releases broadcast_buffers)
        knob = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
            else "broadcast_buffers"
        return DistributedDataParallel(model, device_ids=device_ids, **{knob: False})

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over all ranks (gloo has no AVG op, so SUM then divide)."""
        out = tensor.detach().clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out / self.world_size

    def barrier(self) -> None:
        torch_dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (any picklable value)."""
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def start_run(self, experiment: str, cfg, run_dir: str | Path | None = None, **extra: Any):
        """The run folder: created (or reopened for resume) by rank 0, opened read-only by the others."""
        from lablib.runs import open_run, start_run

        run = start_run(experiment, cfg, run_dir, **extra) if self.is_main else None
        path = self.broadcast(str(run.path) if run is not None else None)
        return run if self.is_main else open_run(path)


def torchrun_env() -> dict[str, int] | None:
    """RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as torchrun sets them, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    return {"RANK": int(os.environ["RANK"]), "WORLD_SIZE": world, "LOCAL_RANK": int(os.environ.get("LOCAL_RANK", 0)),
            "LOCAL_WORLD_SIZE": int(os.environ.get("LOCAL_WORLD_SIZE", world))}


def init(device: str | None = None) -> DistContext | None:
    """Join the process group torchrun set up; None when not started by torchrun (one process)."""
    env = torchrun_env()
    if env is None:
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in BACKENDS:
        raise ValueError(f"device: data parallel runs on one of {', '.join(BACKENDS)}, got {device!r}")
    if device == "cuda":
        torch.cuda.set_device(env["LOCAL_RANK"])
    else:  # processes on one machine share its cores; oversubscribing them slows every rank
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env["LOCAL_WORLD_SIZE"]))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(BACKENDS[device])
    return DistContext(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], device, BACKENDS[device])


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def import_target(target: str) -> Callable[..., Any]:
    """'package.module:function' -> the function."""
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"target: expected 'module:function' (an importable module), got {target!r}")
    fn = importlib.import_module(module)
    for part in name.split("."):
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"target {target!r} is not callable")
    return fn


def main(argv: list[str] | None = None) -> None:
    """The torchrun entry point: run TARGET(dist=ctx, **kwargs) on every rank."""
    parser = argparse.ArgumentParser(prog="python -m lablib.distributed",
                                     description="Run a training function on every torchrun rank.")
    parser.add_argument("target", help="module:function; called as function(dist=ctx, **kwargs)")
    parser.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    parser.add_argument("--device", default=None, choices=list(BACKENDS), help="default: cuda when present")
    parser.add_argument("--result", default=None, help="write rank 0's return value here as JSON")
    args = parser.parse_args(argv)
    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        parser.error(f"--kwargs: expected a JSON object, got {args.kwargs!r}")
    fn = import_target(args.target)
    ctx = init(args.device)
    try:
        result = fn(dist=ctx, **kwargs)
        if args.result and (ctx is None or ctx.is_main):
            Path(args.result).write_text(json.dumps(result, default=str))
    finally:
        shutdown()


def torchrun_args(nprocs: int, nnodes: int | str = 1, node_rank: int | None = None, master_addr: str | None = None,
                  master_port: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                  rdzv_backend: str = "c10d") -> list[str]:
    """torchrun's flags for one node of a job: standalone on one machine, else static or elastic rendezvous.

    nnodes: machines in the job (an int, or "MIN:MAX" for elastic rendezvous).
    Static: node_rank, master_addr and master_port (default 29500), the same address on every node.
    Elastic: rdzv_endpoint ("host:port") and rdzv_id (one name per job); node ranks are assigned.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs: expected at least 1, got {nprocs}")
    args = [f"--nproc-per-node={nprocs}"]
    if rdzv_endpoint:
        if master_addr or node_rank is not None:
            raise ValueError("rdzv_endpoint: elastic rendezvous assigns node ranks; drop node_rank and master_addr")
        return [*args, f"--nnodes={nnodes}", f"--rdzv-backend={rdzv_backend}", f"--rdzv-endpoint={rdzv_endpoint}",
                f"--rdzv-id={rdzv_id or 'lablib'}"]
    if str(nnodes) == "1" and master_addr is None:
        return ["--standalone", *args]
    if master_addr is None or node_rank is None:
        raise ValueError(f"nnodes={nnodes}: expected master_addr and node_rank (static rendezvous) "
                         "or rdzv_endpoint (elastic rendezvous)")
    if not str(nnodes).isdigit() or not 0 <= node_rank < int(nnodes):
        raise ValueError(f"node_rank: expected 0 <= node_rank < nnodes={nnodes}, got {node_rank}")
    return [*args, f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--master-addr={master_addr}",
            f"--master-port={master_port or 29500}"]


def launch(target: str, nprocs: int = 2, *, device: str | None = None, nnodes: int | str = 1,
           node_rank: int | None = None, master_addr: str | None = None, master_port: int | None = None,
           rdzv_endpoint: str | None = None, rdzv_id: str | None = None, **kwargs: Any) -> Any:
    """Run `target` ('module:function') on `nprocs` processes of this machine; returns rank 0's result.

    Usable from a notebook: the workers are fresh interpreters started by torchrun,
    they can import whatever this process can (its sys.path is passed on), and their
    output is printed here as it arrives. kwargs must be JSON-serialisable.
    nnodes, node_rank, master_addr, master_port, rdzv_endpoint, rdzv_id: a job over several
    machines, called on each (see `torchrun_args`); the result comes back on global rank 0's node.
    """
    import_target(target)  # a typo fails here, before any process starts
    flags = torchrun_args(nprocs, nnodes, node_rank, master_addr, master_port, rdzv_endpoint, rdzv_id)
    with tempfile.TemporaryDirectory(prefix="lablib-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", *flags,
               "-m", "lablib.distributed", target, "--kwargs", json.dumps(kwargs), "--result", str(result_file)]
        if device:
            cmd += ["--device", device]
        importable = [os.path.abspath(p or os.curdir) for p in sys.path if os.path.isdir(p or os.curdir)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(importable),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last_lines: collections.deque[str] = collections.deque(maxlen=20)  # for the error message
        try:
            for line in proc.stdout:
                last_lines.append(line)
                print(line, end="", flush=True)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            tail = "".join(last_lines)
            raise RuntimeError(f"distributed run of {target} on {nprocs} processes failed "
                               f"(exit {proc.returncode}); last output:\n{tail}")
        return json.loads(result_file.read_text()) if result_file.is_file() else None


if __name__ == "__main__":
    main()
