"""Checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Notable here:
- A checkpoint is a folder `checkpoints/step-000100/` holding `model.safetensors`,
  `optimizer.safetensors` and `state.json`. It is written under a temporary name
  and renamed into place, so a reader (a widget polling a live run) never sees
  half of one; `state.json` is written last inside it.
- Optimizer state is flattened into named tensors (`state.<param>.<key>`); the
  param groups (learning rate etc.) go to `state.json`.
- The schedule is Pythia's: log-spaced early steps (1, 2, 4, ...), then every N.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

STEP_DIR = re.compile(r"^step-(\d+)$")


def atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run folders are meant to be shared and copied
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


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


def list_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in run_dir (those with a state.json), ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        m = STEP_DIR.match(child.name)
        if m and (child / "state.json").is_file():
            steps.append(int(m.group(1)))
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically and prune to keep_last; returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)
    try:
        save_model(unwrap(model), str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {"step": step, **(state or {})}
        if optimizer is not None:
            tensors, groups = optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            meta["optimizer_param_groups"] = groups
        atomic_write_json(tmp / "state.json", meta)
        if final.exists():  # re-saving a step: move the old one aside first, then swap
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last is not None:
        for old_step in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(root / step_dir_name(old_step), ignore_errors=True)
    return final


def read_state(run_dir: Path, step: int) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "checkpoints" / step_dir_name(step) / "state.json").read_text())


def load_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load weights (and optimizer state) of `step` into model (and optimizer); returns state.json."""
    folder = Path(run_dir) / "checkpoints" / step_dir_name(step)
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {folder.parent}; "
                                f"available: {list_checkpoints(run_dir)}")
    load_model(unwrap(model), str(folder / "model.safetensors"), device=str(device))
    state = json.loads((folder / "state.json").read_text())
    if optimizer is not None:
        load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors"), device=str(device)),
                       state["optimizer_param_groups"])
    return state
