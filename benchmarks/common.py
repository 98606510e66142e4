"""Shared helpers of the benchmark scripts: the machine, interleaved timing, results and the README tables.

Notable here:
- `interleaved(...)` times competitors in alternating order (A B, then B A, ...),
  so contention from other processes on a shared machine hits both equally; the
  ratio of medians measured in the same process is the number to quote.
- `machine()` records what the numbers came from, including the load average at
  the start and end of the run (other users of the machine show up there).
- `write_results(name, payload)` writes benchmarks/results/<name>.json;
  `update_readme(name, markdown)` replaces the section between
  `<!-- name:start -->` and `<!-- name:end -->` in benchmarks/README.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    load = info.get("load_average_at_start", (0,))[0]
    end = info.get("load_average_at_end", (None,))[0]
    load_text = f"load average {load:.1f} at start" + (f", {end:.1f} at end" if end is not None else "")
    return (f"{info['cpu']} ({info['cores']} cores{gpu}), torch {info['torch']}, "
            f"transformers {info.get('transformers', '(absent)')}; {load_text}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: str = "cpu") -> dict[str, list[float]]:
    """Seconds per call of each fn, measured `repeats` times in alternating order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(name: str, markdown: str) -> None:
    """Replace the README section between the markers of `name` (appended at the end if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.is_file() else ""
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def stamp(info: dict, date: str | None = None) -> str:
    """'Measured <date> on <machine>.' (date: an ISO timestamp from a results file; default now)."""
    when = dt.datetime.fromisoformat(date) if date else dt.datetime.now(dt.timezone.utc)
    return f"_Measured {when.strftime('%Y-%m-%d %H:%M UTC')} on {machine_line(info)}._"
