"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Notable here:
- A checkpoint is a folder `checkpoints/step-000100/` holding `model.safetensors`,
  (optionally) `optimizer.safetensors` and `state.json`. It is written under a
  temporary name, every file fsynced, and renamed into place; `state.json` is written
  last and records the size and sha256 of every other file.
- A checkpoint counts only when its files match `state.json`: listing checks sizes,
  loading checks checksums too. `newest_loadable(...)` walks back from the newest one
  and says in one line which checkpoint it skipped and why (torn, bit-flipped, missing).
  Folders written before checksums were recorded count when their state.json parses.
- Weights that are not all finite are never saved (`NonFiniteWeights`).
- Optimizer state is flattened into named tensors (`state.<param>.<key>`); the
  param groups (learning rate etc.) go to `state.json`. Only the checkpoints that a
  resume may need keep it: `keep_optimizer` newest ones (default 1); older checkpoints
  keep their weights.
- The schedule is Pythia's: log-spaced early steps (1, 2, 4, ...), then every N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from lablib.io import atomic_write_json, atomic_write_text, file_digest, fsync_dir, fsync_file

__all__ = ["atomic_write_json", "atomic_write_text", "CheckpointError", "NonFiniteWeights", "checkpoint_schedule",
           "list_checkpoints", "load_checkpoint", "newest_loadable", "save_checkpoint", "verify_checkpoint"]

STEP_DIR = re.compile(r"^step-(\d+)$")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


class CheckpointError(ValueError):
    """A checkpoint's files do not match its state.json (or cannot be read); one line says which and why."""


class NonFiniteWeights(ValueError):
    """Refusal to save weights holding NaN or inf."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_schedule(total_steps: int, every: int) -> list[int]:
    """Pythia's schedule: 1, 2, 4, ... below `every`, then every `every` steps, and the last step."""
    steps = {total_steps}
    s = 1
    while s < min(every, total_steps):
        steps.add(s)
        s *= 2
    steps.update(range(every, total_steps + 1, every))
    return sorted(steps)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{pid}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})



def _folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / step_dir_name(step)


def verify_checkpoint(folder: Path, checksums: bool = True) -> dict[str, Any]:
    """state.json of the checkpoint in `folder` when its files match it; else CheckpointError saying why.

    checksums=False checks presence and sizes only (cheap: what listing uses).
    """
    from lablib.io import read_json_object

    folder = Path(folder)
    try:
        state = read_json_object(folder / "state.json")
    except FileNotFoundError:
        raise CheckpointError("state.json is missing (the checkpoint was never finished)") from None
    except ValueError:
        raise CheckpointError("state.json is malformed") from None
    files = state.get("files")
    if files is None:  # written before checksums were recorded: complete when its files are whole safetensors
        if not (folder / "model.safetensors").is_file():
            raise CheckpointError("model.safetensors is missing")
        for name in TENSOR_FILES if checksums else ():
            if (folder / name).is_file():
                try:
                    with safe_open(str(folder / name), "pt") as f:
                        f.keys()
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{name} is not a whole safetensors file ({str(e).splitlines()[0][:80]})") from None
        return state
    if not isinstance(files, dict) or "model.safetensors" not in files:
        raise CheckpointError("state.json does not list model.safetensors")
    for name, record in files.items():
        if name not in TENSOR_FILES or not isinstance(record, dict):
            raise CheckpointError(f"state.json lists an unexpected entry {str(name)[:40]!r}")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        size = path.stat().st_size
        if size != record.get("size"):
            raise CheckpointError(f"{name} has {size} bytes, state.json says {record.get('size')} (torn write)")
        if checksums and file_digest(path)["sha256"] != record.get("sha256"):
            raise CheckpointError(f"{name} does not match its sha256 in state.json (corrupted)")
    return state


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every step-NNNNNN folder, complete or not, ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), child) for child in root.iterdir() if (m := STEP_DIR.match(child.name)))


def list_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in run_dir (state.json present, file sizes matching), ascending."""
    steps = []
    for step, folder in _step_folders(run_dir):
        try:
            verify_checkpoint(folder, checksums=False)
        except CheckpointError:
            continue
        steps.append(step)
    return steps


def has_optimizer(run_dir: Path, step: int) -> bool:
    """Does checkpoint `step` hold optimizer state (as its state.json records it)?"""
    folder = _folder(run_dir, step)
    try:
        state = verify_checkpoint(folder, checksums=False)
    except CheckpointError:
        return False
    files = state.get("files")
    recorded = "optimizer_param_groups" in state and (files is None or "optimizer.safetensors" in files)
    return recorded and (folder / "optimizer.safetensors").is_file()


def newest_loadable(run_dir: Path, need_optimizer: bool = False, notice: bool = True) -> int | None:
    """The newest checkpoint whose files all match their checksums (and hold optimizer state if needed).

    Skipped newer checkpoints are reported in one line on stderr: which one is used and why.
    """
    damaged: list[tuple[int, str]] = []  # (step, why), newest first
    for step, folder in reversed(_step_folders(run_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            damaged.append((step, str(e)))
            continue
        if need_optimizer and not has_optimizer(run_dir, step):
            continue  # an older checkpoint that kept only its weights
        if notice and damaged:
            bad, why = damaged[0]
            print(f"lablib: using checkpoint step {step} of {run_dir}: step {bad} is unusable ({why})", file=sys.stderr)
        return step
    if damaged:
        bad, why = damaged[0]
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: the newest, step {bad}, "
                              f"is unusable ({why})" + ("; no older one holds optimizer state" if need_optimizer else ""))
    if need_optimizer and list_checkpoints(run_dir):
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} holds optimizer state to resume from")
    return None


def nonfinite_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters/buffers (and optimizer tensors) that hold NaN or inf."""
    bad = [name for name, t in unwrap(model).state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if optimizer is not None:
        bad += [name for name, t in optimizer_tensors(optimizer)[0].items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    return bad


def _written(path: Path) -> dict[str, Any]:
    """fsync a file safetensors wrote, make it readable like the rest of the folder; its size and sha256."""
    fsync_file(path)
    os.chmod(path, 0o644)  # safetensors creates 0600 files; run folders are meant to be shared and copied
    return file_digest(path)


def _strip_optimizer(folder: Path) -> None:
    """Drop optimizer state from a complete checkpoint: state.json first (atomically), then the file."""
    try:
        state = verify_checkpoint(folder, checksums=False)
    except CheckpointError:
        return
    files = state.get("files")
    if isinstance(files, dict) and "optimizer.safetensors" in files:
        files.pop("optimizer.safetensors")
        state.pop("optimizer_param_groups", None)
        atomic_write_json(folder / "state.json", state)
    if files is not None:  # folders without checksums keep theirs: their state.json cannot be rewritten safely
        (folder / "optimizer.safetensors").unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = None, keep_optimizer: int | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then prune; returns its folder.

    keep_last: keep only this many newest checkpoints (None: all).
    keep_optimizer: keep optimizer state in only this many newest checkpoints (None: all).
    Raises NonFiniteWeights (and writes nothing) when a weight or optimizer tensor is NaN or inf.
    """
    bad = nonfinite_tensors(model, optimizer)
    if bad:
        raise NonFiniteWeights(f"refusing to save step {step}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # temporaries of a writer that was killed (one writer per run)
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)
    try:
        save_model(unwrap(model), str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"step": step, **(state or {}), "files": {"model.safetensors": _written(tmp / "model.safetensors")}}
        if optimizer is not None:
            tensors, groups = optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["files"]["optimizer.safetensors"] = _written(tmp / "optimizer.safetensors")
            meta["optimizer_param_groups"] = groups
        atomic_write_json(tmp / "state.json", meta)  # last: it vouches for the files above
        if final.exists():  # re-saving a step: move the old one aside first, then swap
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps = list_checkpoints(run_dir)
    if keep_last is not None:
        for old_step in steps[:-keep_last]:
            shutil.rmtree(_folder(run_dir, old_step), ignore_errors=True)
        steps = steps[-keep_last:]
    if keep_optimizer is not None and optimizer is not None:
        for old_step in steps[:-keep_optimizer] if keep_optimizer else steps:
            if old_step != step:
                _strip_optimizer(_folder(run_dir, old_step))
    return final


def read_state(run_dir: Path, step: int) -> dict[str, Any]:
    return verify_checkpoint(_folder(run_dir, step), checksums=False)


def load_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (and optimizer state) of `step` into model (and optimizer); returns state.json.

    The files are checked against state.json first: a torn or corrupted checkpoint is a
    CheckpointError (use `newest_loadable` to pick one that is intact).
    """
    folder = _folder(run_dir, step)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {folder.parent}; "
                                f"available: {list_checkpoints(run_dir)}")
    try:
        state = verify_checkpoint(folder)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint step {step} in {folder.parent} is unusable: {e}") from None
    if optimizer is not None and not has_optimizer(run_dir, step):
        raise CheckpointError(f"checkpoint step {step} in {folder.parent} holds no optimizer state "
                              "(kept only in the newest keep_optimizer checkpoints)")
    try:
        load_model(unwrap(model), str(folder / "model.safetensors"), device=str(device))
        if optimizer is not None:
            load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors"), device=str(device)),
                           state["optimizer_param_groups"])
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint step {step} in {folder.parent} is unreadable: "
                              f"{str(e).splitlines()[0][:200]}") from None
    return state
