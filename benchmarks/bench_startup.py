"""Start-up overhead of `lablib run` (papermill + a Jupyter kernel) against a plain Python script.

Both do the same minimal experiment: resolve a config from a preset, make a run
folder, write results.json. The notebook goes through `lablib run` (parameter
checks, papermill, kernel start, the executed notebook saved in the run folder);
the script is the same cells pasted into a .py file and run with `python`.
Each is timed end to end as a subprocess, alternately, and the difference of the
medians is what a notebook costs on top of a script for every run (and every
sweep job).

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from common import interleaved, machine, markdown_table, median, stamp, update_readme, write_results

PARAMETERS = 'preset = None\nrun_dir = None\noverrides = {}\nsteps = None'
BODY = ('from lablib.config import notebook_config\n'
        'from lablib.experiments.quickstart import LMConfig\n'
        'from lablib.runs import start_run\n'
        'cfg = notebook_config(LMConfig, globals())\n'
        'run = start_run("startup", cfg, run_dir)\n'
        'run.write_results({"steps": cfg.steps})')


def write_notebook(path: Path) -> None:
    params = nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(BODY)])
    nb.metadata["lablib"] = {"experiment": "startup", "config": "lablib.experiments.quickstart:LMConfig"}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def write_script(path: Path) -> None:
    path.write_text("import sys\n" + PARAMETERS + "\npreset = 'smoke'\nrun_dir = sys.argv[1]\n" + BODY + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    info = machine()
    lablib_cli = [sys.executable, "-m", "lablib.cli"]
    with tempfile.TemporaryDirectory(prefix="lablib-startup-") as tmp:
        tmp = Path(tmp)
        write_notebook(tmp / "startup.ipynb")
        write_script(tmp / "startup.py")
        count = iter(range(10**6))

        def notebook():
            out = tmp / f"nb-{next(count)}"
            subprocess.run([*lablib_cli, "run", str(tmp / "startup.ipynb"), "--preset", "smoke", "--quiet",
                            "--run-dir", str(out)], check=True, capture_output=True)
            assert json.loads((out / "results.json").read_text())["steps"] > 0
            shutil.rmtree(out)

        def script():
            out = tmp / f"py-{next(count)}"
            subprocess.run([sys.executable, str(tmp / "startup.py"), str(out)], check=True, capture_output=True)
            assert json.loads((out / "results.json").read_text())["steps"] > 0
            shutil.rmtree(out)

        notebook(), script()  # first runs fill the OS file cache and register the kernel
        times = interleaved({"lablib run": notebook, "python script": script}, args.repeats)
    nb_s, py_s = median(times["lablib run"]), median(times["python script"])
    info["load_average_at_end"] = os.getloadavg()
    path = write_results("startup", {"machine": info, "args": vars(args), "seconds": times,
                                     "lablib_run_s": nb_s, "script_s": py_s, "overhead_s": nb_s - py_s})
    rows = [{"how": "python script.py", "seconds (median)": f"{py_s:.1f}"},
            {"how": "lablib run notebook.ipynb", "seconds (median)": f"{nb_s:.1f}"},
            {"how": "overhead of the notebook", "seconds (median)": f"{nb_s - py_s:+.1f} ({nb_s / py_s:.1f}x)"}]
    text = markdown_table(rows, list(rows[0]))
    update_readme("startup", f"{text}\n\n{stamp(info)} Median of {args.repeats} alternating runs of a minimal "
                             f"experiment (config, run folder, results.json); raw numbers: "
                             f"`{path.relative_to(path.parents[1])}`.")
    print(text)


if __name__ == "__main__":
    main()
