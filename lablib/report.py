"""Reference results: per-seed runs collected into results/, and the README table generated from them.

Notable here:
- `collect(run_dirs)` turns finished run folders of one experiment (same parameters,
  different seeds) into `results/<experiment>/results.json`: the headline over seeds
  (`lablib.evidence.aggregate_seeds`), each seed's headline and numbers, the command
  that produced each run, every run's provenance and the machine and load it was
  measured on. One run that measured several seeds itself (its results.json lists
  `seeds` and holds their headline, commands, provenance and load, as notebooks 06, 07
  and 10 write it) is taken as it is.
- `render_readme(text, results)` rewrites only what lies between the README's
  `<!-- results:begin -->` and `<!-- results:end -->` markers; `lablib report --check`
  fails when the committed README differs from what it would write, so a number typed
  into the table by hand fails the tests.
- Notebooks render their conclusion's numbers at run time from results.json
  (`headline_markdown`, `reference_markdown` with IPython.display.Markdown), so no
  number is typed into a notebook either.
- A run counts as measured on a loaded machine when the 15-minute load average at its
  end exceeded the CPU count (the run alone can fill every core; more than that means
  other jobs were competing for them, so its times are upper bounds).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Sequence

from lablib.checkpoints import atomic_write_json, atomic_write_text
from lablib.config import ConfigError
from lablib.evidence import Headline, aggregate_seeds, markdown_table

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
COLUMNS = ("experiment", "headline", "chance", "untrained", "trivial rule", "split", "measured on", "command")
# per-run parameters that may differ between the seeds of one reference result
VARYING = ("seed", "provenance", "hardware", "run_dir")


class ReportError(ConfigError):
    """Bad input to `lablib report`: one line saying what was wrong and what to do."""


def project_root() -> Path:
    from lablib.runs import project_root as find

    root = find() or find(Path(__file__).parent)
    if root is None:
        raise ReportError("not inside the lab's checkout (no pyproject.toml naming lablib above the current folder)")
    return root


def results_root(root: Path | None = None) -> Path:
    return (root or project_root()) / "results"


# --- collecting runs ---------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path.parent}: expected a finished run folder with {path.name} ({what})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


def run_command(run_dir: Path, root: Path) -> str:
    """The `lablib run` command that produced a run, from its executed notebook's papermill record."""
    nb = _read_json(run_dir / "notebook.ipynb", "the executed notebook, written by `lablib run`")
    record = nb.get("metadata", {}).get("papermill", {})
    if "input_path" not in record:
        raise ReportError(f"{run_dir}: its notebook.ipynb has no papermill record; collect runs made by `lablib run`")
    source = Path(record["input_path"])
    if source.is_absolute():  # as a path inside the checkout that holds the notebook
        from lablib.runs import project_root as find

        checkout = find(source.parent) or root
        source = source.relative_to(checkout) if source.is_relative_to(checkout) else source
    params = dict(record.get("parameters", {}))
    preset = str(params.pop("preset", "cpu"))
    params.pop("run_dir", None)
    params.update(params.pop("overrides", None) or {})
    return lablib_run_command(str(source), preset, params)


def lablib_run_command(notebook: str, preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run NOTEBOOK --preset P -p NAME VALUE...` line for these parameters (JSON values)."""
    parts = ["lablib", "run", notebook, "--preset", preset]
    for name, value in sorted(parameters.items()):
        parts += ["-p", name, value if isinstance(value, str) else json.dumps(value)]
    return shlex.join(parts)


def _numbers(results: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def collect(run_dirs: Sequence[str | Path], root: Path | None = None, collected_with: str | None = None) -> Path:
    """Aggregate per-seed run folders of one experiment into results/<experiment>/results.json."""
    root = root or project_root()
    if not run_dirs:
        raise ReportError("--collect: expected one or more run folders")
    runs = []
    for d in map(Path, run_dirs):
        params = _read_json(d / "params.json", "its parameters")
        status = _read_json(d / "status.json", "its status").get("status")
        if status != "done":
            raise ReportError(f"{d}: status is {status!r}; collect only finished runs (status 'done')")
        results = _read_json(d / "results.json", "its headline numbers")
        if "headline" not in results:
            raise ReportError(f"{d}: results.json has no 'headline'; its notebook must write one "
                              "(lablib.evidence.Headline(...).to_dict())")
        runs.append((d, params, results))
    if len(runs) == 1 and len(runs[0][2].get("seeds") or []) > 1:  # one run measured every seed: its own headline
        return _collect_multi_seed_run(*runs[0], root, collected_with or shlex.join(["lablib", "report", "--collect",
                                                                                     str(run_dirs[0])]))
    first_dir, first, _ = runs[0]
    experiment = first["experiment"]
    fixed = {k: v for k, v in first.items() if k not in VARYING}
    seeds = []
    for d, params, _ in runs:
        differ = sorted(k for k in set(fixed) | set(params) if k not in VARYING and params.get(k) != fixed.get(k))
        if differ:
            raise ReportError(f"{d} differs from {first_dir} in {', '.join(differ)}; "
                              "a reference result collects runs that differ only in the seed")
        seeds.append(params.get("seed"))
    if len(set(map(str, seeds))) != len(seeds):
        raise ReportError(f"--collect: each seed once, got seeds {seeds}")
    per_seed = {str(seed): {"run": str(d.resolve().relative_to(d.resolve().parents[1])),
                            "command": run_command(d, root), "headline": results["headline"],
                            "results": _numbers(results)}
                for seed, (d, _, results) in zip(seeds, runs)}
    headline = aggregate_seeds({seed: row["headline"] for seed, row in per_seed.items()})
    out = {"experiment": experiment, "preset": first.get("preset"), "seeds": seeds, "split": headline.split,
           "headline": headline.to_dict(), "commands": [row["command"] for row in per_seed.values()],
           "collected_with": collected_with or shlex.join(["lablib", "report", "--collect", *map(str, run_dirs)]),
           "provenance": {str(seed): params.get("provenance") for seed, (_, params, _) in zip(seeds, runs)},
           "measured_on": {str(seed): results.get("measured_on") for seed, (_, _, results) in zip(seeds, runs)},
           "per_seed": per_seed}
    path = results_root(root) / experiment / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(json.dumps(out, allow_nan=False)))
    return path


def _collect_multi_seed_run(d: Path, params: dict[str, Any], results: dict[str, Any], root: Path,
                            collected_with: str) -> Path:
    missing = [k for k in ("experiment", "seeds", "commands", "measured_on", "provenance") if k not in results]
    if missing:
        raise ReportError(f"{d}: results.json of a run over seeds {results['seeds']} lacks {', '.join(missing)}; "
                          "its notebook must write them beside the headline")
    Headline.from_dict(results["headline"])  # a malformed headline is refused here, not in the README
    out = {**results, "collected_with": collected_with}
    path = results_root(root) / results["experiment"] / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, json.loads(json.dumps(out, allow_nan=False)))
    return path


# --- reading and rendering ---------------------------------------------------------------------

def load_results(root: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every committed results/<experiment>/results.json, by experiment name (sorted)."""
    folder = results_root(root)
    out = {}
    for path in sorted(folder.glob("*/results.json")) if folder.is_dir() else []:
        data = _read_json(path, "a reference result")
        for key in ("headline", "seeds", "commands", "measured_on", "provenance"):
            if key not in data:
                raise ReportError(f"{path}: expected a '{key}' entry (write it with `lablib report --collect`)")
        out[path.parent.name] = data
    return out


def loaded(measured: dict[str, Any] | None) -> bool | None:
    """Whether a run's machine was loaded beyond its cores at the run's end (None when unknown)."""
    try:
        return measured["load_average"][2] > measured["machine"]["cpu_count"]
    except (TypeError, KeyError, IndexError):
        return None


def measured_on_text(measured_on: dict[str, Any]) -> str:
    rows = [m for m in measured_on.values() if isinstance(m, dict)]
    if not rows:
        return "not recorded"
    machine = rows[0].get("machine") or {}
    gpu = machine.get("gpu")
    where = f"{machine.get('cpu_count', '?')} CPUs" + (f", {gpu}" if isinstance(gpu, str) and gpu != "torch not imported" else "")
    loads = [m["load_average"][2] for m in rows if isinstance(m.get("load_average"), list)]
    flags = [loaded(m) for m in rows]
    load = f"; 15-min load {min(loads):.1f}-{max(loads):.1f}" if loads else ""
    state = " (loaded: times are upper bounds)" if any(flags) else " (not loaded)" if all(f is False for f in flags) else ""
    return where + load + state


def command_text(commands: Sequence[str], seeds: Sequence[Any]) -> str:
    if len(commands) == 1 and len(seeds) > 1:  # one run measured every seed
        return f"`{commands[0]}` (seeds {', '.join(map(str, seeds))} in one run)"
    generic = {c.replace(f"-p seed {s}", "-p seed S") for c, s in zip(commands, seeds)}
    if len(generic) == 1 and len(seeds) > 1:
        return f"`{generic.pop()}` for S in {', '.join(map(str, seeds))}"
    return "; ".join(f"`{c}`" for c in commands)


def results_row(experiment: str, data: dict[str, Any]) -> dict[str, str]:
    h = Headline.from_dict(data["headline"])
    trivial = f"{h.baselines.trivial_rule}: {h.baselines.trivial.format()}"
    trivial += "".join(f"; {name}: {est.format()}" for name, est in h.baselines.others.items())
    return {"experiment": experiment, "headline": f"{h.metric} ({h.better} is better): {h.value.format()}",
            "chance": h.baselines.chance.format(), "untrained": h.baselines.untrained.format(),
            "trivial rule": trivial, "split": h.split, "measured on": measured_on_text(data["measured_on"]),
            "command": command_text(data["commands"], data["seeds"])}


def results_section(results: dict[str, dict[str, Any]]) -> str:
    """What goes between the README's markers."""
    note = ("Generated by `lablib report` from the committed `results/<experiment>/results.json` files "
            "(do not edit by hand; `lablib report --check` fails when this table and those files disagree). "
            "Intervals are 95% t intervals over seeds; n counts seeds.")
    if not results:
        return note + "\n\nNo reference results are committed yet: each experiment's numbers appear here once " \
                      "its per-seed runs are collected with `lablib report --collect RUN_DIR...`."
    return note + "\n\n" + markdown_table([results_row(name, data) for name, data in results.items()], COLUMNS)


def render_readme(text: str, results: dict[str, dict[str, Any]]) -> str:
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ReportError(f"README: expected one {BEGIN} line followed by one {END} line around the results table")
    return text[:begin + len(BEGIN)] + "\n" + results_section(results) + "\n" + text[end:]


def report(root: Path | None = None, check: bool = False) -> bool:
    """Regenerate (or, with check, compare) the README's results section. True when it was up to date."""
    root = root or project_root()
    readme = root / "README.md"
    text = readme.read_text()
    wanted = render_readme(text, load_results(root))
    if wanted == text:
        return True
    if not check:
        atomic_write_text(readme, wanted)
    return False


# --- notebooks ---------------------------------------------------------------------------------

def headline_markdown(headline: Headline | dict[str, Any]) -> str:
    """One headline as a markdown sentence and table (for a notebook's conclusion, rendered at run time)."""
    h = headline if isinstance(headline, Headline) else Headline.from_dict(headline)
    rows = [{"": h.metric, "value": h.value}] + [{"": name if name != "trivial" else h.baselines.trivial_rule,
                                                   "value": est} for name, est in h.baselines.items()]
    return f"**{h.metric}** on the `{h.split}` split ({h.better} is better):\n\n" + markdown_table(rows)


def reference_markdown(experiment: str, root: Path | None = None) -> str:
    """The committed reference result of an experiment as markdown, or a sentence saying there is none yet."""
    try:
        data = load_results(root).get(experiment)
    except ReportError as e:
        return f"The committed reference result could not be read: {e}"
    if data is None:
        return (f"No reference result for `{experiment}` is committed yet (`results/{experiment}/results.json`, "
                "written by `lablib report --collect`).")
    h = Headline.from_dict(data["headline"])
    label = {"trivial": h.baselines.trivial_rule}
    diffs = "".join(f"\n- minus {label.get(name, name)}: {h.differences[name].format()}"
                    for name, _ in h.baselines.items() if name in h.differences)
    return (f"Reference result (`results/{experiment}/results.json`, preset `{data.get('preset')}`, seeds "
            f"{', '.join(map(str, data['seeds']))}; measured on {measured_on_text(data['measured_on'])}):\n\n"
            + headline_markdown(h) + ("\n\nPaired differences over seeds:" + diffs if diffs else ""))

