import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lablib.evidence import Baselines, Headline
from lablib.report import BEGIN, END, ReportError, collect, load_results, reference_markdown, render_readme, report

REPO = Path(__file__).resolve().parents[1]


def fake_run(folder: Path, seed: int, loss: float, untrained: float, status="done", **params) -> Path:
    """A finished quickstart run folder as `lablib run` leaves it (params, status, results, executed notebook)."""
    folder.mkdir(parents=True)
    head = Headline.of("held-out loss (nats/token)", loss,
                       Baselines.of(7.62, untrained, 5.10, "bigram", unigram=6.20), split="val", better="lower")
    provenance = {"git": {"commit": "a" * 40, "dirty": False}, "python": "CPython 3.11.7"}
    (folder / "params.json").write_text(json.dumps({"experiment": "quickstart", "preset": "cpu", "seed": seed,
                                                    "steps": 1200, "provenance": provenance, **params}))
    (folder / "status.json").write_text(json.dumps({"status": status}))
    (folder / "results.json").write_text(json.dumps({
        "experiment": "quickstart", "final_val_loss": loss, "headline": head.to_dict(),
        "measured_on": {"machine": {"cpu_count": 2, "gpu": None}, "load_average": [2.0, 2.1, 3.5 + seed]}}))
    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"input_path": "notebooks/00_quickstart.ipynb",
                                "parameters": {"preset": "cpu", "run_dir": str(folder), "seed": seed}}
    nbformat.write(nb, folder / "notebook.ipynb")
    return folder


@pytest.fixture
def lab(tmp_path):
    """A scratch checkout: pyproject naming lablib, a README with the results markers, three seeds' runs."""
    root = tmp_path / "lab"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "lablib"\n')
    (root / "README.md").write_text(f"# lab\n\n## Results\n\n{BEGIN}\n{END}\n\n## After\n\ntext stays\n")
    runs = [fake_run(tmp_path / "runs" / f"r{s}", s, loss, untrained)
            for s, loss, untrained in [(0, 3.84, 7.66), (1, 3.86, 7.63), (2, 3.85, 7.70)]]
    return root, runs


def test_collect_aggregates_seeds_with_commands_and_provenance(lab):
    root, runs = lab
    path = collect(runs, root=root, collected_with="lablib report --collect r0 r1 r2")
    data = json.loads(path.read_text())
    assert path == root / "results" / "quickstart" / "results.json"
    assert data["seeds"] == [0, 1, 2] and data["split"] == "val" and data["preset"] == "cpu"
    assert data["commands"][1] == "lablib run notebooks/00_quickstart.ipynb --preset cpu -p seed 1"
    assert data["collected_with"] == "lablib report --collect r0 r1 r2"
    assert data["provenance"]["2"]["git"]["commit"] == "a" * 40
    assert data["measured_on"]["0"]["load_average"][2] == 3.5
    head = Headline.from_dict(data["headline"])
    assert head.value.n == 3 and head.value.mean == pytest.approx(3.85)
    assert head.beats("trivial") and head.differences["trivial"].mean == pytest.approx(3.85 - 5.10)
    assert data["per_seed"]["0"]["results"]["final_val_loss"] == 3.84


def test_report_writes_the_table_between_the_markers_only(lab):
    root, runs = lab
    collect(runs, root=root)
    assert report(root) is False  # rewritten
    text = (root / "README.md").read_text()
    assert "| quickstart | held-out loss (nats/token) (lower is better): 3.85 ± 0.02 (n=3) |" in text
    assert "bigram: 5.10 ± 0.00 (n=3); unigram: 6.20 ± 0.00 (n=3)" in text
    assert "`lablib run notebooks/00_quickstart.ipynb --preset cpu -p seed S` for S in 0, 1, 2" in text
    assert "15-min load 3.5-5.5 (loaded: times are upper bounds)" in text
    assert text.startswith("# lab\n\n## Results\n\n") and text.endswith("## After\n\ntext stays\n")
    assert report(root) is True and report(root, check=True) is True


def test_editing_a_number_in_the_readme_by_hand_fails_the_check(lab):
    root, runs = lab
    collect(runs, root=root)
    report(root)
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace("3.85 ± 0.02", "3.75 ± 0.02"))
    assert report(root, check=True) is False
    assert "3.75 ± 0.02" in readme.read_text()  # --check never rewrites
    cli = subprocess.run([sys.executable, "-m", "lablib.cli", "report", "--check"], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cli.returncode == 1
    assert cli.stderr.strip().splitlines() == ["lablib: README.md results section differs from results/; "
                                               "run `lablib report` and commit"]


def test_one_run_that_measured_every_seed_is_taken_as_it_stands(lab, tmp_path):
    root, runs = lab
    one = fake_run(tmp_path / "runs" / "all-seeds", 0, 3.85, 7.66)
    results = json.loads((one / "results.json").read_text())
    per_seed = {s: Headline.of("held-out loss (nats/token)", loss, Baselines.of(7.62, 7.66, 5.10, "bigram"), "val",
                               "lower") for s, loss in ((0, 3.84), (1, 3.86), (2, 3.85))}
    from lablib.evidence import aggregate_seeds

    results.update(seeds=[0, 1, 2], headline=aggregate_seeds(per_seed).to_dict(), provenance={"0": {}, "1": {}, "2": {}},
                   measured_on={str(s): results["measured_on"] for s in range(3)}, curves=[1, 2, 3])
    (one / "results.json").write_text(json.dumps(results))
    data = json.loads(collect([one], root=root).read_text())
    assert data["seeds"] == [0, 1, 2] and data["headline"]["value"]["n"] == 3 and data["curves"] == [1, 2, 3]
    assert data["commands"] == ["lablib run notebooks/00_quickstart.ipynb --preset cpu -p seed 0"]
    assert data["collected_with"].startswith("lablib report --collect ")
    report(root)
    assert "(seeds 0, 1, 2 in one run)" in (root / "README.md").read_text()


def test_runs_that_differ_in_more_than_the_seed_are_refused(lab, tmp_path):
    root, runs = lab
    other = fake_run(tmp_path / "runs" / "r9", 9, 3.9, 7.6, steps=600)
    with pytest.raises(ReportError, match="differs .* in steps; a reference result collects runs that differ only"):
        collect([*runs, other], root=root)


@pytest.mark.parametrize("problem, message", [
    ("unfinished", "status is 'running'; collect only finished runs"),
    ("same seed", r"each seed once, got seeds \[0, 1, 2, 0\]"),
    ("no headline", "results.json has no 'headline'"),
])
def test_bad_run_folders_are_refused_in_one_line(lab, tmp_path, problem, message):
    root, runs = lab
    if problem == "unfinished":
        runs.append(fake_run(tmp_path / "runs" / "x", 5, 3.9, 7.6, status="running"))
    elif problem == "same seed":
        runs.append(fake_run(tmp_path / "runs" / "x", 0, 3.9, 7.6))
    else:
        results = json.loads((runs[0] / "results.json").read_text())
        del results["headline"]
        (runs[0] / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match=message):
        collect(runs, root=root)


def test_a_readme_without_markers_is_refused():
    with pytest.raises(ReportError, match="expected one <!-- results:begin --> line"):
        render_readme("# no markers\n", {})


def test_notebooks_render_the_reference_result_or_say_there_is_none(lab):
    root, runs = lab
    assert "No reference result for `quickstart` is committed yet" in reference_markdown("quickstart", root)
    collect(runs, root=root)
    text = reference_markdown("quickstart", root)
    assert "seeds 0, 1, 2" in text and "| bigram | 5.10 ± 0.00 (n=3) |" in text and "minus bigram: -1.25" in text


def test_the_committed_readme_matches_the_committed_results():
    assert report(REPO, check=True), "README.md's results section differs from results/: run `lablib report`"
    load_results(REPO)  # every committed results file is complete


TYPED_NUMBER = re.compile(r"\d\.\d|\d,\d{3}|±\s*\d|\d\s?%")


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_conclusions_carry_no_typed_numbers(notebook):
    nb = nbformat.read(notebook, as_version=4)
    conclusions = [c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Conclusion")]
    for text in conclusions:
        typed = TYPED_NUMBER.findall(text)
        assert not typed, f"{notebook.name}: the conclusion types {typed}; render numbers from results.json instead"


@pytest.mark.slow
def test_collect_works_on_real_smoke_runs(tmp_path):
    root = tmp_path / "lab"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "lablib"\n')
    (root / "README.md").write_text(f"{BEGIN}\n{END}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "LABLIB_RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    runs = []
    for seed in (0, 1):
        out = subprocess.run([sys.executable, "-m", "lablib.cli", "run", str(REPO / "notebooks" / "00_quickstart.ipynb"),
                              "--preset", "smoke", "-p", "seed", str(seed), "--quiet"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(out.stdout.strip().splitlines()[-1])
    cli = subprocess.run([sys.executable, "-m", "lablib.cli", "report", "--collect", *runs], cwd=root, env=env,
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    data = json.loads((root / "results" / "quickstart" / "results.json").read_text())
    assert data["seeds"] == [0, 1] and data["headline"]["value"]["n"] == 2
    assert data["commands"][0] == "lablib run notebooks/00_quickstart.ipynb --preset smoke -p seed 0"
    assert data["provenance"]["0"]["git"]["commit"]
    assert {"chance", "untrained", "trivial"} <= set(data["headline"]["baselines"])
    assert "| quickstart |" in (root / "README.md").read_text()


def test_collect_keeps_a_run_that_measured_every_seed_itself(tmp_path, lab):
    root, _ = lab
    folder = fake_run(tmp_path / "runs" / "all-seeds", 0, 3.85, 7.66)
    per_seed = {s: Headline.of("held-out loss (nats/token)", loss, Baselines.of(7.62, 7.66, 5.10, "bigram"),
                               split="val", better="lower") for s, loss in ((0, 3.84), (1, 3.86), (2, 3.85))}
    from lablib.evidence import aggregate_seeds

    results = {"experiment": "quickstart", "seeds": [0, 1, 2], "headline": aggregate_seeds(per_seed).to_dict(),
               "curve": [1, 2, 3], "measured_on": {str(s): {"load_average": [1.0, 1.0, 1.0]} for s in (0, 1, 2)}}
    (folder / "results.json").write_text(json.dumps(results))
    data = json.loads(collect([folder], root=root).read_text())
    assert data["seeds"] == [0, 1, 2] and data["headline"]["value"]["n"] == 3 and data["curve"] == [1, 2, 3]
    assert data["commands"] == ["lablib run notebooks/00_quickstart.ipynb --preset cpu -p seed 0"]
    assert set(data["provenance"]) == {"0", "1", "2"} and data["measured_on"]["2"]["load_average"] == [1.0, 1.0, 1.0]
    results["headline"] = per_seed[0].to_dict()  # one seed's value under three seeds: refused
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match="n=1"):
        collect([folder], root=root)
def test_collect_expands_a_run_that_measured_several_seeds_itself(tmp_path):
    root = tmp_path / "lab"
    root.mkdir()
    (root / "pyproject.toml").write_text('[project]\nname = "lablib"\n')
    folder = fake_run(tmp_path / "runs" / "multi", 0, 3.85, 7.66)
    heads = {s: Headline.of("held-out loss (nats/token)", loss, Baselines.of(7.62, 7.66, 5.10, "bigram", unigram=6.20),
                            split="val", better="lower").to_dict() for s, loss in ((0, 3.84), (1, 3.86), (2, 3.85))}
    results = json.loads((folder / "results.json").read_text())
    results.update(seeds=[0, 1, 2], per_seed={str(s): {"headline": h, "steps": 10} for s, h in heads.items()},
                   fits=[{"form": "power law"}], measured_on={str(s): {"load_average": [1.0, 1.0, s]} for s in heads})
    (folder / "results.json").write_text(json.dumps(results))
    data = json.loads(collect([folder], root=root).read_text())
    assert data["seeds"] == [0, 1, 2] and len(data["commands"]) == 1
    assert Headline.from_dict(data["headline"]).value.n == 3
    assert data["per_seed"]["1"]["results"] == {"steps": 10}
    assert data["measured_on"]["2"]["load_average"][2] == 2
    assert data["fits"] == [{"form": "power law"}]  # the run's own tables are kept
def test_collect_takes_a_run_that_measured_every_seed_as_it_is(lab, tmp_path):
    root, runs = lab
    folder = runs[0]
    head = Headline.from_dict(json.loads((folder / "results.json").read_text())["headline"])
    over = {"metric": head.metric, "split": "test", "better": "lower", "baselines": head.baselines.to_dict(),
            "value": {"mean": 3.85, "low": 3.80, "high": 3.90, "n": 3, "method": "t"}, "differences": {}}
    results = {"experiment": "quickstart", "seeds": [0, 1, 2], "headline": over, "extra": {"kept": True},
               "measured_on": {"0": {"load_average": [1.0, 1.0, 1.0]}}, "provenance": {"0": None}}
    (folder / "results.json").write_text(json.dumps(results))
    data = json.loads(collect([folder], root=root).read_text())
    assert data["seeds"] == [0, 1, 2] and data["split"] == "test" and data["extra"] == {"kept": True}
    assert Headline.from_dict(data["headline"]).value.n == 3
    assert data["commands"] == ["lablib run notebooks/00_quickstart.ipynb --preset cpu -p seed 0"]
    results["headline"]["value"]["n"] = 1
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(ReportError, match="headline value is over n=1"):
        collect([folder], root=root)
def test_collect_keeps_the_tables_of_a_run_that_measured_every_seed(lab):
    root, (one, *_) = lab
    head = Headline.of("held-out accuracy", 0.9, Baselines.of(0.1, 0.05, 0.2, "most frequent answer"), split="test")
    results = json.loads((one / "results.json").read_text())
    from lablib.evidence import aggregate_seeds

    over = aggregate_seeds({s: Headline.of("held-out accuracy", v, head.baselines, "test")
                            for s, v in ((0, 0.9), (1, 0.8), (2, 0.85))}).to_dict()
    results.update(seeds=[0, 1, 2], headline=over, commands=["lablib run notebooks/10_x.ipynb --preset cpu"],
                   provenance={"0": {}, "1": {}, "2": {}})
    (one / "results.json").write_text(json.dumps(results))
    data = json.loads(collect([one], root=root).read_text())
    assert data["seeds"] == [0, 1, 2] and data["headline"]["value"]["n"] == 3
    assert data["collected_with"].startswith("lablib report --collect")
    assert set(data["provenance"]) == {"0", "1", "2"}  # each seed's provenance, from the run's params.json
