"""Provenance: what a run needs recorded to be reproduced elsewhere.

Notable here:
- `provenance()` returns the git commit of the lab's code and whether its tree was dirty
  (or "not a git checkout"), Python, torch and the key package versions, and the machine
  (platform, CPU count, GPU name if any). The default corpus is the Python standard
  library's own source, so the Python version is part of the data.
- `measured_on()` is the machine and its load average, recorded when a result is
  written: a number measured while other jobs shared the machine says so.
- Nothing here ever fails a run: a part that cannot be read becomes a string saying why.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

PACKAGES = ("torch", "numpy", "datasets", "tokenizers", "safetensors", "scikit-learn", "papermill", "lablib")
CODE_ROOT = Path(__file__).resolve().parent.parent  # the checkout that holds this lablib


def _guard(part: Callable[[], Any]) -> Any:
    try:
        return part()
    except Exception as e:  # provenance is a record, never a reason to stop a run
        return f"unavailable: {type(e).__name__}: {e}"


def git_state(root: Path = CODE_ROOT) -> dict[str, Any] | str:
    """{"commit": sha, "dirty": bool} for the checkout holding the code, or "not a git checkout"."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        if git("rev-parse", "--is-inside-work-tree") != "true":
            return "not a git checkout"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "not a git checkout"
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _gpu() -> str | None:
    torch = sys.modules.get("torch")  # only asked when torch is already loaded: provenance never imports it
    if torch is None:
        return "torch not imported"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple MPS"
    return None


def machine() -> dict[str, Any]:
    return {"platform": _guard(platform.platform), "processor": _guard(platform.machine),
            "cpu_count": _guard(os.cpu_count), "gpu": _guard(_gpu)}


def load_average() -> list[float] | str:
    return [round(x, 2) for x in os.getloadavg()]


def provenance(root: Path = CODE_ROOT) -> dict[str, Any]:
    return {"git": _guard(lambda: git_state(root)),
            "python": _guard(lambda: f"{platform.python_implementation()} {platform.python_version()}"),
            "packages": _guard(package_versions), "machine": _guard(machine),
            "load_average": _guard(load_average)}


def measured_on() -> dict[str, Any]:
    """The machine and its 1/5/15-minute load average now (at the end of a run the 15-minute one covers it)."""
    return {"machine": _guard(machine), "load_average": _guard(load_average)}
