"""The `lablib` command: run a notebook, sweep a grid, list runs.

    lablib run NOTEBOOK [--preset P] [-p NAME VALUE]... [--run-dir DIR | --resume RUN_DIR]
    lablib sweep NOTEBOOK --grid NAME=V1,V2 [--grid ...] [-p NAME VALUE]... [--jobs N] [--name NAME]
                 [--backend local|ray] [--address RAY_ADDRESS]
    lablib runs [EXPERIMENT]
    lablib report [--check] [--collect RUN_DIR...]
    lablib kernel [--user] | lablib kernel --notebooks [NOTEBOOK...] [--check]
    lablib import-hf FOLDER [--revisions R...] [--run-dir DIR]

A bad parameter is refused before any work: one line naming it, what was expected
and what was given, exit status 2. A failed cell is one line too (which cell, why),
exit status 1. Ctrl-C or SIGTERM stops the notebook (and a sweep's running points) with
exit status 130 or 143; the checkpoints stay, and `--resume RUN_DIR` (or the same sweep
again) carries on.

`lablib run` checks before the kernel starts what it can: the notebook is a notebook,
the run folder is readable and writable and (when it exists) was made with the same
parameters, its checkpoints include an intact one to resume from, and a local corpus is
non-empty UTF-8 text holding at least one block. A later attempt never downgrades a
finished run: its notebook.ipynb, params.json and status stay until the attempt succeeds
(README: "What can go wrong").
"""

from __future__ import annotations

import argparse
import ast
import os
import shlex
import signal
import sys
from pathlib import Path

from lablib.config import ConfigError, default_preset
from lablib.interrupts import Terminated, sigterm_as_interrupt

EXIT_BAD_INPUT = 2


def _params(pairs: list[list[str]] | None, config_cls) -> dict:
    return {name: config_cls.parse(name, value) for name, value in (pairs or [])}


def _writable(folder: Path) -> bool:
    """Can files be created in `folder` (or, when it does not exist yet, in its nearest existing parent)?

    Tried for real: permission bits say nothing about a read-only mount, or to root.
    """
    import tempfile

    while not folder.exists():
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lablib-write-test-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _cell_defaults(info) -> dict:
    """Config knobs the parameters cell sets to a literal other than None (the kernel resolves them too)."""
    fields = info.config_cls.fields_by_name()
    out = {}
    for name, spec in info.cell_params.items():
        if name in fields:
            try:
                value = ast.literal_eval(spec.get("default", "None"))
            except (ValueError, SyntaxError):
                continue
            if value is not None:
                out[name] = value
    return out


def _preflight(info, run_dir: Path, preset: str, params: dict) -> None:
    """What would stop the run, found before papermill writes anything; raises ConfigError (one line)."""
    from lablib.checkpoints import CheckpointError, newest_loadable
    from lablib.data import CorpusError, check_corpus
    from lablib.runs import Run, parameter_changes

    fields = info.config_cls.fields_by_name()
    cfg = info.config_cls.resolve(preset, **{**_cell_defaults(info), **{k: v for k, v in params.items() if k in fields}})
    if not _writable(run_dir):
        raise ConfigError(f"run folder {run_dir} is not writable; choose another with --run-dir or $LABLIB_RUNS")
    if run_dir.exists() and (run_dir / "params.json").exists():
        run = Run(run_dir)
        try:
            before, _ = run.params, run.status
        except (OSError, ValueError) as e:
            raise ConfigError(f"run folder {run_dir} is unreadable: {e}; start a new run") from None
        if diff := parameter_changes(before, cfg):
            raise ConfigError(f"run folder {run_dir} was made with other parameters: {diff}; "
                              "resume with the same parameters or start a new run")
        try:
            newest_loadable(run_dir, need_optimizer=True)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
    if "corpus" in fields:
        try:
            check_corpus(cfg.corpus, getattr(cfg, "seq_len", None), getattr(cfg, "corpus_max_chars", None))
        except CorpusError as e:
            raise ConfigError(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from lablib.notebooks import NotebookFailed, check_params, execute, inspect
    from lablib.progress import follow_metrics
    from lablib.runs import Run, new_run_id, runs_root

    info = inspect(args.notebook)
    params = _params(args.param, info.config_cls)
    preset = args.preset
    if args.resume:
        run = Run(args.resume)
        try:
            stored = run.params
        except (OSError, ValueError) as e:
            raise ConfigError(f"--resume {args.resume}: {e}") from None
        if not stored:
            raise ConfigError(f"--resume {args.resume}: expected a run folder with params.json")
        if params:
            raise ConfigError("--resume takes the run's own parameters; drop the -p options")
        preset = stored.get("preset") or preset
        fields = info.config_cls.fields_by_name()
        params = {k: v for k, v in stored.items() if k in fields}
        run_dir = run.path
    else:
        run_dir = Path(args.run_dir).resolve() if args.run_dir else runs_root() / info.experiment / new_run_id()
    preset = preset or default_preset()
    cell, overrides = check_params(info, preset, params)
    _preflight(info, run_dir, preset, params)
    finished = (run_dir / "params.json").is_file() and Run(run_dir).status.get("status") == "done"  # read by _preflight
    if not args.quiet:
        print(f"lablib: running {info.path.name} (preset {preset}) into {run_dir}", file=sys.stderr)
    try:
        with follow_metrics(run_dir, enabled=not args.quiet):  # a line per logged step on stderr
            execute(info, run_dir, preset, cell, overrides, progress=not args.quiet)
    except KeyboardInterrupt:
        if not finished and (run_dir / "params.json").is_file() and Run(run_dir).status.get("status") == "running":
            Run(run_dir).set_status("stopped", error="interrupted")
        print(f"lablib: interrupted; `lablib run {args.notebook} --resume {run_dir}` carries on", file=sys.stderr)
        raise
    except NotebookFailed as e:
        if finished:  # the finished run keeps its record; the failed attempt is noted beside it
            Run(run_dir).set_status("done", attempt={"status": "failed", "error": str(e)})
            print(f"lablib: {e}; the finished run in {run_dir} is unchanged", file=sys.stderr)
            return 1
        if (run_dir / "params.json").is_file():
            Run(run_dir).set_status("failed", error=str(e))
        print(f"lablib: {e}", file=sys.stderr)
        return 1
    run = Run(run_dir)
    if run.status.get("status") != "done":
        run.set_status("done")
    print(run_dir)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lablib.notebooks import inspect
    from lablib.sweep import run_sweep

    config_cls = inspect(args.notebook).config_cls
    grid = {}
    for spec in args.grid:
        name, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {spec!r}: expected NAME=V1,V2,...")
        grid[name] = [config_cls.parse(name, v) for v in values.split(",")]
    try:
        table = run_sweep(args.notebook, grid, preset=args.preset, params=_params(args.param, config_cls),
                          jobs=args.jobs, name=args.name, progress=True, backend=args.backend, address=args.address)
    except KeyboardInterrupt:
        print("lablib: sweep interrupted; its running points were stopped, and the same command resumes them",
              file=sys.stderr)
        raise
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["run_dir"]).to_string(index=False))
    failed = int((table["status"] != "done").sum())
    print(f"{len(table) - failed} done, {failed} not done; table: {Path(table['run_dir'].iloc[0]).parent / 'sweep.csv'}")
    return 0 if failed == 0 else 1


def cmd_runs(args: argparse.Namespace) -> int:
    import pandas as pd

    from lablib.runs import runs_table

    table = runs_table(args.experiment)
    if table.empty:
        print("no runs" + (f" of {args.experiment}" if args.experiment else ""))
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lablib.report import collect, report

    if args.collect:
        print(f"lablib: wrote {collect(args.collect, collected_with=shlex.join(['lablib', *sys.argv[1:]]))}")
    if report(check=args.check):
        print("README results section is up to date")
        return 0
    if args.check:
        print("lablib: README.md results section differs from results/; run `lablib report` and commit", file=sys.stderr)
        return 1
    print("README results section rewritten from results/")
    return 0


def cmd_kernel(args: argparse.Namespace) -> int:
    from lablib.notebooks import ensure_kernel, kernel_folder, set_lab_kernel

    if args.notebooks is not None:
        paths = sorted(Path(p) for p in args.notebooks) or sorted(Path("notebooks").glob("*.ipynb"))
        found = set_lab_kernel(paths, check=args.check)
        for name, problems in found:
            print(f"{name}: {'; '.join(problems)}" if args.check else f"updated {name}")
        return 1 if args.check and found else 0
    name = ensure_kernel(user=args.user)
    print(f"kernel {name!r} (\"Python (lablib)\") for {sys.executable} registered in {kernel_folder(args.user)}")
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    from lablib.hf_import import import_run

    print(import_run(args.folder, args.revisions, run_dir=args.run_dir))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lablib", description="Run, sweep and list the lab's notebook experiments.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook into a new run folder")
    run.add_argument("notebook")
    run.add_argument("--preset", help="smoke | cpu | gpu, or a preset the notebook's config adds (e.g. paper); "
                     "default: $LABLIB_PRESET or cpu")
    run.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    where = run.add_mutually_exclusive_group()
    where.add_argument("--run-dir", help="write into this folder instead of runs/<experiment>/<run-id>")
    where.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its newest checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no line per logged step")
    run.set_defaults(func=cmd_run)
    sw = sub.add_parser("sweep", help="run a notebook over a grid of parameters")
    sw.add_argument("notebook")
    sw.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2")
    sw.add_argument("--preset", choices=["smoke", "cpu", "gpu"])
    sw.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"))
    sw.add_argument("--jobs", type=int, help="parallel processes (default: half the cores)")
    sw.add_argument("--name", help="readable start of the sweep folder's name (default: sweep-<preset>); a hash "
                    "of the grid and the resolved preset follows, so an edited preset never reuses old runs")
    sw.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local: parallel processes here; ray: one Ray task per point (the runs root must be "
                    "shared by the cluster's nodes)")
    sw.add_argument("--address", help="with --backend ray: the cluster to join (default: $RAY_ADDRESS, else a "
                    "local Ray instance)")
    sw.set_defaults(func=cmd_sweep)
    ls = sub.add_parser("runs", help="list runs with status, key params and headline results")
    ls.add_argument("experiment", nargs="?")
    ls.set_defaults(func=cmd_runs)
    rep = sub.add_parser("report", help="rebuild the README's results table from results/ (--check: only compare)")
    what = rep.add_mutually_exclusive_group()
    what.add_argument("--check", action="store_true", help="exit 1 when the README differs from what report writes")
    what.add_argument("--collect", nargs="+", metavar="RUN_DIR", help="first aggregate these finished runs (one "
                     "experiment, seeds differing) into results/<experiment>/results.json")
    rep.set_defaults(func=cmd_report)
    k = sub.add_parser("kernel", help="register the 'lablib' Jupyter kernel for this environment")
    k.add_argument("--user", action="store_true", help="register it for every JupyterLab of this user "
                   "(the user's Jupyter data folder), not only this environment's")
    k.add_argument("--notebooks", nargs="*", metavar="NOTEBOOK", help="instead, give these notebooks (default: "
                   "notebooks/*.ipynb) the lab's kernelspec and the one-line guard as their first code cell")
    k.add_argument("--check", action="store_true", help="with --notebooks: only list those that lack either; exit 1 if any")
    k.set_defaults(func=cmd_kernel)
    hf = sub.add_parser("import-hf", help="a run folder from a local GPT-NeoX (Pythia) checkpoint folder, "
                        "one checkpoint per revision, for the analysis tools and widgets")
    hf.add_argument("folder", help="a save_pretrained folder, a folder of revision sub-folders (step1000/, ...) "
                    "or a Hugging Face cache folder (models--org--name)")
    hf.add_argument("--revisions", nargs="+", metavar="REVISION", help="which revisions (default: all found)")
    hf.add_argument("--run-dir", help="write here instead of runs/hf-import/<folder name>")
    hf.set_defaults(func=cmd_import_hf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():  # papermill then interrupts the kernel rather than orphaning it
            return args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"lablib: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # a read-only or full disk met after the checks (papermill writing its notebook, say)
        print(f"lablib: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
