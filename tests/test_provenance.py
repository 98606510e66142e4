import json
import subprocess

import pytest

from lablib import provenance as prov
from lablib.runs import create_run


def _git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_git_state_gives_the_commit_and_the_dirty_flag(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert prov.git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert prov.git_state(tmp_path) == {"commit": head, "dirty": True}


def test_a_folder_outside_git_says_so(tmp_path):
    assert prov.git_state(tmp_path) == "not a git checkout"


def test_provenance_names_python_packages_and_machine():
    record = prov.provenance()
    assert record["python"].split()[-1].count(".") == 2
    assert set(prov.PACKAGES) <= set(record["packages"])
    assert record["packages"]["torch"] not in ("", "not installed")
    assert record["machine"]["cpu_count"] >= 1
    assert len(record["load_average"]) == 3
    json.dumps(record, allow_nan=False)  # plain JSON


def test_a_failing_part_becomes_a_string_not_an_error(monkeypatch):
    def broken():
        raise OSError("no /proc")

    monkeypatch.setattr(prov, "load_average", broken)
    monkeypatch.setattr(prov, "git_state", lambda root: (_ for _ in ()).throw(PermissionError("denied")))
    record = prov.provenance()
    assert record["load_average"] == "unavailable: OSError: no /proc"
    assert record["git"].startswith("unavailable: PermissionError")


def test_every_run_folder_records_its_provenance(tmp_path):
    run = create_run("demo", {"seed": 3}, tmp_path / "run")
    params = json.loads((run.path / "params.json").read_text())
    assert params["seed"] == 3
    assert set(params["provenance"]) == {"git", "python", "packages", "machine", "load_average"}
    git = params["provenance"]["git"]
    assert git == "not a git checkout" or len(git["commit"]) == 40


@pytest.mark.parametrize("missing", ["definitely-not-a-package-xyz"])
def test_a_missing_package_is_recorded_as_such(missing):
    assert prov.package_versions((missing,)) == {missing: "not installed"}
