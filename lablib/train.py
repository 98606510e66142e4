"""The training loop and the hardware policy.

Notable here:
- `resolve_hardware(cfg)` turns the `auto` settings into concrete choices (device,
  autocast dtype, TF32, torch.compile, fused AdamW, threads), each with the reason
  it was made; the result is recorded in params.json.
- `train(...)` is the one loop: gradient accumulation up to `batch_tokens`, warm-up
  then cosine / warmup-stable-decay / constant learning rate, gradient clipping,
  held-out evaluation, a tqdm progress bar with loss and tokens/s, throughput and
  (on GPUs with a known peak) MFU in metrics.jsonl, and checkpoints on Pythia's
  schedule.
- Reproducible by construction: the data order, dropout and the objective's masks
  are pure functions of (seed, step), so a run resumed from a checkpoint continues
  with exactly the losses the uninterrupted run would have had (on CPU).
- A NaN or inf loss, or weights that stopped being finite at a checkpoint step, stop
  the run with `TrainingDiverged`, naming the step and the newest checkpoint whose
  weights are all finite (non-finite weights are never saved).
- A model's own loss terms (a mixture of experts' load-balancing loss, `pop_auxiliary_loss`)
  are added to the objective's loss at every micro-batch and logged as `aux_loss`.
- Resuming starts from the newest checkpoint that is intact and holds optimizer state
  (`checkpoints.newest_loadable`), saying in one line when it skipped a newer one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol

import torch

from lablib.checkpoints import (checkpoint_schedule, load_checkpoint, newest_loadable, nonfinite_tensors,
                                save_checkpoint, unwrap)
from lablib.config import ConfigError, TrainConfig
from lablib.loggers import close, make_loggers, send
from lablib.objectives import Objective
from lablib.seeding import stream_seed

# Dense bf16 peak FLOP/s of GPUs we know, for MFU (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class BatchSource(Protocol):
    """Anything that yields micro-batch number `index` as a dict of tensors, reproducibly."""

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]: ...


@dataclass
class HardwarePolicy:
    device: str
    dtype: str
    tf32: bool
    compile: bool
    fused_adamw: bool
    num_threads: int
    reasons: dict[str, str]

    def autocast(self):
        if self.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=getattr(torch, self.dtype))


def resolve_hardware(cfg: TrainConfig) -> HardwarePolicy:
    """Concrete hardware choices for cfg's 'auto' settings, with the reason for each.

    The CPU numbers quoted below come from benchmarks/bench_policy.py (lab model, seq 256,
    'paired' = median step-by-step speed ratio, on a busy shared 2-core AMD EPYC); see
    benchmarks/README.md. The CUDA choices are the standard ones for Ampere and later;
    benchmarks/gpu_check.sh measures them (section policy_cuda) whenever a GPU is at hand.
    """
    reasons: dict[str, str] = {}
    if cfg.device != "auto":
        device, reasons["device"] = cfg.device, "set by the user"
    elif torch.cuda.is_available():
        device, reasons["device"] = "cuda", "a CUDA GPU is present"
    elif torch.backends.mps.is_available():
        device, reasons["device"] = "mps", "Apple MPS is present"
    else:
        device, reasons["device"] = "cpu", "no GPU found"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")

    if cfg.dtype != "auto":
        dtype, reasons["dtype"] = cfg.dtype, "set by the user"
    elif device == "cuda" and torch.cuda.is_bf16_supported():
        dtype, reasons["dtype"] = "bfloat16", "the GPU supports bf16: fp32 range, half the memory traffic"
    elif device == "cuda":
        dtype, reasons["dtype"] = "float16", "pre-Ampere GPU: fp16 with a gradient scaler"
    else:  # bf16 autocast measured 1.17x (1M) and 1.73x (10M) faster on an AVX512-BF16 CPU, but it is emulated
        # (slow) on CPUs without bf16 units and changes the numerics, so CPU runs stay fp32 unless asked
        dtype, reasons["dtype"] = "float32", (f"{device}: fp32 keeps CPU results comparable across machines; "
                                              "dtype='bfloat16' is faster on CPUs with bf16 units (1.7x at 10M, "
                                              "benchmarks/README.md)")

    tf32 = device == "cuda"
    reasons["tf32"] = "TF32 matmuls on CUDA: ~same accuracy for training, much faster" if tf32 else "not CUDA"

    if cfg.compile != "auto":
        compile_, reasons["compile"] = cfg.compile == "on", "set by the user"
    elif device == "cuda":
        compile_, reasons["compile"] = True, "CUDA: kernel fusion pays back its warm-up within a few hundred steps"
    else:  # CPU, 10M params: compiled / eager step speed 1.03x (paired; range 0.89-1.21), warm-up 252 s vs 23 s
        compile_, reasons["compile"] = False, (f"{device}: compiling took minutes for no measurable speed-up "
                                               "(1.03x at 10M, benchmarks/README.md)")

    if cfg.fused_adamw != "auto":
        fused, reasons["fused_adamw"] = cfg.fused_adamw == "on", "set by the user"
    else:  # CPU: fused / foreach step speed 1.00x at 1M, 1.20x at 10M (paired, noisy); the profile puts AdamW at ~4%
        # of a 10M step, so fusing it cannot gain much there; foreach stays, and CPU numerics stay as they were
        fused = device == "cuda"
        reasons["fused_adamw"] = ("one kernel for all parameters on CUDA" if fused else
                                  "AdamW is ~4% of a CPU step; fused measured no clear gain (benchmarks/README.md)")

    # threads: 1 thread ran 3.3x faster than 2 (paired, 10M) on a 2-core machine with load ~20: threads
    # that share borrowed cores wait on each other; on an idle machine one per core is the right default
    env_threads = int(os.environ.get("LABLIB_NUM_THREADS") or 0)  # set by sweeps that run jobs side by side
    threads = cfg.num_threads or env_threads or torch.get_num_threads()
    reasons["num_threads"] = ("set by the user" if cfg.num_threads else "split between parallel sweep jobs"
                              if env_threads else "torch's default (one per core)")
    # SDPA: torch picks the kernel (flash / memory-efficient / math) per call; forcing math measured 0.99x on CPU
    reasons["sdpa"] = "torch's automatic kernel choice (flash attention where it applies)"
    return HardwarePolicy(device, dtype, tf32, compile_, fused, threads, reasons)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.steps * cfg.decay_fraction))
        decay_start = cfg.steps - decay_steps
        if step < decay_start:
            return peak
        return peak - (peak - floor) * (step - decay_start + 1) / decay_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def global_batch_split(cfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(micro-batches per process per step, sequences per micro-batch): the same global batch at any world size.

    One process accumulates A = ceil(batch_tokens / (batch_size * seq_len)) micro-batches of
    batch_size sequences (A = 1 without batch_tokens). W processes share them: each
    accumulates A/W whole micro-batches when W divides A, else each takes batch_size/W
    sequences of every micro-batch. train() reads micro-batch index
    (step * accum + micro) * W + rank, so with a source whose rows follow the index
    (TokenBlocks) both ways read exactly the rows one process would.
    """
    one_process = 1 if cfg.batch_tokens is None else max(1, math.ceil(cfg.batch_tokens / (cfg.batch_size * cfg.seq_len)))
    if one_process % world_size == 0:
        return one_process // world_size, cfg.batch_size
    if cfg.batch_size % world_size == 0:
        return one_process, cfg.batch_size // world_size
    raise ConfigError(f"parameter 'batch_size': the global batch ({one_process} micro-batch(es) of {cfg.batch_size}) "
                      f"cannot be shared by {world_size} processes; expected batch_size or "
                      f"batch_tokens / (batch_size * seq_len) to be a multiple of {world_size}")


def grad_accum_steps(cfg: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches per optimizer step per process (see global_batch_split)."""
    return global_batch_split(cfg, world_size)[0]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, policy: HardwarePolicy) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases, norms or 1-d gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if policy.fused_adamw else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **kwargs)


def auxiliary_loss(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's own loss terms of its last forward pass (a mixture of experts' load balancing), or None."""
    pop = getattr(unwrap(model), "pop_auxiliary_loss", None)
    return pop() if pop is not None else None


def mfu(flops_per_token: float, tokens_per_s: float, device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return None if peak is None else flops_per_token * tokens_per_s / peak


def _to(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: Objective, batches: list[dict[str, torch.Tensor]],
             policy: HardwarePolicy, seed: int = 0) -> dict[str, float]:
    """Mean objective loss over fixed batches, with a fixed generator (same masks every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    total, weight = 0.0, 0
    for batch in batches:
        with policy.autocast():
            loss, metrics = objective(model, _to(batch, policy.device), gen)
        n = int(metrics.get("tokens_scored", 1))
        total, weight = total + float(loss) * n, weight + n
    model.train(was_training)
    return {"val_loss": total / max(1, weight)}


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final: dict[str, Any]
    resumed_from: int | None
    policy: HardwarePolicy


Callback = tuple[int, Callable[..., dict[str, Any] | None]]  # fn(step, model) or fn(step, model, row)


def _takes_row(fn: Callable) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 3 or any(p.name == "row" or p.kind == p.VAR_POSITIONAL for p in params)


def train(model: torch.nn.Module, objective: Objective, data: BatchSource, cfg: TrainConfig, run=None, *,
          val: list[dict[str, torch.Tensor]] | None = None, callbacks: list[Callback] = (),
          resume: bool = True, progress: bool = True, policy: HardwarePolicy | None = None,
          dist=None, loggers: list = ()) -> TrainResult:
    """Train `model` on micro-batches from `data` with `objective` for cfg.steps optimizer steps.

    run: a `lablib.runs.Run` for metrics and checkpoints (None trains without saving).
    val: fixed held-out micro-batches, evaluated every cfg.eval_every steps as val_loss.
    callbacks: (every, fn(step, model) -> extra metrics) pairs, run at step 0 and every `every` steps;
        a fn with a third parameter also gets the row logged so far at that step (loss, val_loss, ...).
    loggers: where each logged row goes besides metrics.jsonl (`lablib.loggers`), on top of those
        named by cfg.loggers.
    resume: continue from the newest checkpoint in the run folder, if there is one.
    dist: a `lablib.distributed.DistContext` when running under torchrun (None: one process).
    """
    from tqdm.auto import tqdm

    policy = policy or resolve_hardware(cfg)
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    main = rank == 0
    torch.set_num_threads(policy.num_threads)
    if policy.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model.to(policy.device)
    optimizer = make_optimizer(model, cfg, policy)
    accum, micro_size = global_batch_split(cfg, world)
    tokens_per_step = accum * micro_size * cfg.seq_len * world  # the same at every world size
    scaler = torch.amp.GradScaler(policy.device) if policy.dtype == "float16" else None
    schedule = set(checkpoint_schedule(cfg.steps, cfg.checkpoint_every))

    start, resumed_from = 0, None
    if run is not None and resume and (resumed_from := newest_loadable(run.path, need_optimizer=True)) is not None:
        state = load_checkpoint(run.path, resumed_from, model, optimizer, device=policy.device)
        start = state["step"]
    if run is not None and main and (resumed_from is not None or run.log.path.exists()):
        run.log.truncate_after(start if resumed_from is not None else -1)  # rows past the checkpoint resumed from
    if run is not None and main:
        run.save_model_spec(model)

    net = model
    if dist is not None:
        net = dist.wrap(model)
    if policy.compile:
        net = torch.compile(net)
    flops_tok = unwrap(model).flops_per_token(cfg.seq_len) if hasattr(unwrap(model), "flops_per_token") else None

    sinks = ([*make_loggers(cfg.loggers, run), *loggers] if main else [])

    def log(row: dict[str, Any]) -> None:
        if run is not None and main:
            run.log.append(row)
        send(sinks, row)

    def run_callbacks(step: int, row: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        for every, fn in callbacks:
            if step % every == 0 or step == cfg.steps:
                args = (step, unwrap(model), {**row, **extra}) if _takes_row(fn) else (step, unwrap(model))
                extra.update(fn(*args) or {})
        return extra

    last_good = resumed_from
    if start == 0:
        row = {"step": 0, "tokens": 0}
        if val:
            row.update(evaluate(net, objective, val, policy, cfg.seed))
        row.update(run_callbacks(0, row))
        log(row)

    gen = torch.Generator()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not (progress and main), dynamic_ncols=True)
    t0 = time.perf_counter()
    t_log, tokens_at_log = t0, start * tokens_per_step
    obj_metrics: dict[str, Any] = {}
    final: dict[str, Any] = {}
    net.train()

    def diverged(what: str) -> TrainingDiverged:  # last_good: only checkpoints whose weights were checked finite
        where = (f"the newest checkpoint with finite weights is step {last_good} in {run.path / 'checkpoints'}"
                 if run is not None and last_good is not None else "no checkpoint was saved before it")
        bar.close()
        return TrainingDiverged(f"{what} at step {step + 1}; {where}. "
                                "Lower learning_rate, raise warmup_steps or check the data.")

    for step in range(start, cfg.steps):
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(stream_seed(cfg.seed, "dropout", step, rank))  # dropout: a function of (seed, step, rank)
        step_loss = torch.zeros((), device=policy.device)
        for micro in range(accum):
            index = (step * accum + micro) * world + rank
            gen.manual_seed(stream_seed(cfg.seed, "masks", index))  # masks: a function of (seed, micro-batch)
            batch = _to(data.batch(index, micro_size, cfg.seed), policy.device)
            sync = contextlib.nullcontext() if (dist is None or micro == accum - 1) else net.no_sync()
            with sync:
                with policy.autocast():
                    loss, obj_metrics = objective(net, batch, gen)
                scaled = loss / accum
                if (aux := auxiliary_loss(model)) is not None:  # a mixture of experts' load balancing: optimised,
                    obj_metrics = {**obj_metrics, "aux_loss": float(aux.detach())}  # logged apart from `loss`
                    scaled = scaled + aux / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            step_loss += loss.detach() / accum
        if dist is not None:
            step_loss = dist.mean(step_loss)
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            raise diverged(f"loss became {loss_value}")
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        row: dict[str, Any] = {}
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - t_log
            tokens = done * tokens_per_step
            tok_s = (tokens - tokens_at_log) / max(elapsed, 1e-9)
            row = {"step": done, "tokens": tokens, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens_per_s": tok_s, **{k: v for k, v in obj_metrics.items() if k != "tokens_scored"}}
            if flops_tok is not None and (u := mfu(flops_tok, tok_s / world, policy.device)) is not None:
                row["mfu"] = u
            t_log, tokens_at_log = time.perf_counter(), tokens
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
        if val and (done % cfg.eval_every == 0 or done == cfg.steps):
            row.update({"step": done, "tokens": done * tokens_per_step, **evaluate(net, objective, val, policy, cfg.seed)})
        extra = run_callbacks(done, row) if any(done % every == 0 or done == cfg.steps for every, _ in callbacks) else {}
        if extra:
            row.update({"step": done, "tokens": done * tokens_per_step, **extra})
        if row:
            log(row)
            final.update(row)
        if run is not None and done in schedule:
            if bad := nonfinite_tensors(model, optimizer):
                raise diverged(f"{len(bad)} weight or optimizer tensor(s) became NaN or inf (e.g. {bad[0]})")
            if main:
                save_checkpoint(run.path, done, model, optimizer,
                                {"tokens": done * tokens_per_step, "seed": cfg.seed,
                                 "data_position": {"micro_batches": done * accum * world, "batch_size": micro_size},
                                 "rng": "lablib.seeding streams: dropout (seed, step, rank), "
                                        "masks (seed, micro-batch index)"},
                                keep_last=cfg.keep_last, keep_optimizer=cfg.keep_optimizer)
            if dist is not None:
                dist.barrier()
            last_good = done
        bar.update(1)
    bar.close()
    close(sinks)
    seconds = time.perf_counter() - t0
    return TrainResult(cfg.steps, cfg.steps * tokens_per_step, seconds, final, resumed_from, policy)


def policy_record(policy: HardwarePolicy) -> dict[str, Any]:
    """The hardware choices as recorded in params.json."""
    return {**asdict(policy), "torch": torch.__version__, "cpu_count": os.cpu_count()}
