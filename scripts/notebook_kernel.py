"""Give every notebook the lab's kernel: kernelspec metadata `lablib` and a one-line guard cell.

    python scripts/notebook_kernel.py            # rewrite notebooks/*.ipynb in place
    python scripts/notebook_kernel.py --check    # list notebooks that lack either; exit 1 if any

Only the notebook metadata's `kernelspec` and the first code cell are touched: when the
first code cell is not the guard, the guard is inserted before it. A notebook opened with
another kernel (a JupyterLab's own `python3`, which cannot import lablib) then stops at
its first cell with one line saying which kernel to select.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KERNELSPEC = {"name": "lablib", "display_name": "Python (lablib)", "language": "python"}
GUARD = ('import importlib.util, sys; importlib.util.find_spec("lablib") or sys.exit("This kernel cannot import lablib: '
         'select the kernel \'Python (lablib)\' (Kernel > Change Kernel; `lablib kernel --user` installs it)")')
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def guard_cell() -> dict:
    return {"cell_type": "code", "execution_count": None, "id": "lablib-kernel-guard",
            "metadata": {"tags": ["kernel-guard"]}, "outputs": [], "source": GUARD}


def first_code_source(nb: dict) -> str:
    cell = next((c for c in nb["cells"] if c["cell_type"] == "code"), None)
    if cell is None:
        return ""
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def problems(nb: dict) -> list[str]:
    out = []
    if nb.get("metadata", {}).get("kernelspec", {}).get("name") != KERNELSPEC["name"]:
        out.append(f"kernelspec is not {KERNELSPEC['name']!r}")
    if first_code_source(nb).strip() != GUARD:
        out.append("first code cell is not the kernel guard")
    return out


def apply(nb: dict) -> dict:
    nb.setdefault("metadata", {})["kernelspec"] = dict(KERNELSPEC)
    if first_code_source(nb).strip() != GUARD:
        index = next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"), len(nb["cells"]))
        nb["cells"].insert(index, guard_cell())
    return nb


def main(argv: list[str]) -> int:
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if "--check" in argv:
        bad = [(p.name, problems(json.loads(p.read_text()))) for p in paths]
        bad = [(name, why) for name, why in bad if why]
        for name, why in bad:
            print(f"{name}: {'; '.join(why)}")
        return 1 if bad else 0
    import nbformat

    for path in paths:
        nb = json.loads(path.read_text())
        if problems(nb):
            nbformat.write(nbformat.from_dict(apply(nb)), str(path))  # the layout Jupyter itself writes
            print(f"updated {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
