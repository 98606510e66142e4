"""Packaging: declared dependencies, conda environment, set-up switches, licence, notebook kernel."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name, where they differ

from lablib.notebooks import KERNEL_GUARD, kernel_problems  # noqa: E402


def requirement(spec: str) -> tuple[str, str]:
    """'scikit-learn>=1.6' -> ('scikit-learn', '>=1.6')."""
    name, floor = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(.*)$", spec).groups()
    return name.lower(), floor.replace(" ", "")


def declared(extra: str | None = None) -> dict[str, str]:
    specs = PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][extra]
    return dict(requirement(s) for s in specs)


def test_version_floors_match_the_features_used():
    assert declared()["scikit-learn"] == ">=1.6"  # sklearn.utils.validation.validate_data
    assert declared("hf")["transformers"] == ">=4.56"  # from_pretrained(dtype=...)
    assert "transformers" not in declared()  # a user feature, but optional: the hf extra


def test_every_extra_is_in_dev():
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    bundled = next(s for s in dev if s.startswith("lablib["))
    extras = set(bundled[len("lablib["):-1].split(","))
    assert extras == set(PYPROJECT["project"]["optional-dependencies"]) - {"dev"}


def test_no_unused_dependency_is_declared():
    code = "\n".join(p.read_text() for folder in ("lablib", "widgets") for p in (ROOT / folder).rglob("*.py"))
    assert "anywidget" not in json.dumps(PYPROJECT)
    assert "anywidget" not in code


def test_licence_file_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert text.startswith("MIT License") and "lablib contributors" in text


def test_environment_yml_is_conda_forge_only_and_lists_every_runtime_dependency():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert [c for c in env["channels"] if c != "nodefaults"] == ["conda-forge"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    assert not any("::" in d for d in conda), "a package pinned to another channel"
    assert "cpuonly" not in conda  # the retired pytorch channel's switch
    assert "pytorch-cpu" in conda
    listed = dict(requirement(d) for d in conda)
    for name, floor in declared().items():
        conda_name = CONDA_NAMES.get(name, name)
        assert conda_name in listed, f"environment.yml lacks {conda_name} (pyproject: {name}{floor})"
        assert listed[conda_name] == floor, f"{conda_name}: environment.yml {listed[conda_name]!r}, pyproject {floor!r}"


def make_dry_run(*args: str) -> str:
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_torch_index_switch_defaults_to_the_configured_index():
    default = make_dry_run("setup", "VENV=/nonexistent-venv")
    assert "--index-url" not in default and '"torch==' in default
    cpu_index = "https://download.pytorch.org/whl/cpu"
    assert f"TORCH_CPU_INDEX := {cpu_index}" in (ROOT / "Makefile").read_text()
    cpu = make_dry_run("setup", "VENV=/nonexistent-venv", f"TORCH_INDEX={cpu_index}")
    assert f"--index-url {cpu_index}" in cpu


def test_gpu_setup_route_installs_a_cuda_build():
    gpu = make_dry_run("setup-gpu", "VENV=/nonexistent-venv", "TORCH_GPU_INDEX=https://download.pytorch.org/whl/cu128")
    assert "torch.version.cuda is None" in gpu  # a CPU build already there is replaced
    assert "--force-reinstall" in gpu and "--index-url https://download.pytorch.org/whl/cu128" in gpu


def test_committed_notebooks_are_clean():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs"


def test_every_notebook_names_the_lab_kernel_and_starts_with_the_guard():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert kernel_problems(nb) == [], f"{path.name}: run `lablib kernel --notebooks`"
        assert nb["metadata"]["kernelspec"]["display_name"] == "Python (lablib)"


def test_guard_prints_one_line_naming_the_kernel_where_lablib_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare = subprocess.run([sys.executable, "-I", "-S", "-c", KERNEL_GUARD], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert bare.returncode == 1
    assert bare.stderr.strip().count("\n") == 0 and "'Python (lablib)'" in bare.stderr
    ok = subprocess.run([sys.executable, "-c", KERNEL_GUARD], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stderr == ""


def test_kernel_user_installs_the_kernelspec_in_the_users_jupyter_folder(tmp_path):
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "jupyter")}
    out = subprocess.run([sys.executable, "-m", "lablib.cli", "kernel", "--user"], env=env, capture_output=True,
                         text=True, check=True).stdout
    spec = json.loads((tmp_path / "jupyter" / "kernels" / "lablib" / "kernel.json").read_text())
    assert spec["display_name"] == "Python (lablib)" and spec["argv"][0] == sys.executable
    assert str(tmp_path / "jupyter") in out
    # as a Jupyter of another environment sees it (this venv's own copy of the kernel does not count)
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list", "--json"],
                            env={**env, "JUPYTER_PREFER_ENV_PATH": "0"},
                            capture_output=True, text=True, check=True).stdout
    assert json.loads(listed)["kernelspecs"]["lablib"]["resource_dir"].startswith(str(tmp_path / "jupyter"))


@pytest.mark.slow
def test_an_executed_notebook_shows_its_figures_in_nbconvert_html(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PLOTLY_RENDERER"}
    subprocess.run([sys.executable, "-m", "lablib.cli", "run", str(ROOT / "notebooks" / "00_quickstart.ipynb"),
                    "--preset", "smoke", "--quiet", "--run-dir", str(run_dir)], env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    executed = json.loads((run_dir / "notebook.ipynb").read_text())
    figures = [o for c in executed["cells"] for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures and all("text/html" in o["data"] for o in figures)  # the interactive figure and its HTML copy
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(run_dir / "notebook.ipynb"),
                    "--output-dir", str(tmp_path)], check=True, capture_output=True, text=True, timeout=300)
    html = (tmp_path / "notebook.html").read_text()
    assert 'class="plotly-graph-div"' in html and "Plotly.newPlot" in html  # drawn by plotly.js, no kernel
    assert re.search(r'src="https://cdn\.plot\.ly/plotly-[0-9.]+\.min\.js"', html)  # plotly.js from its CDN


def test_kernel_notebooks_flag_lists_then_restores_the_kernel_and_guard(tmp_path):
    nb = json.loads((ROOT / "notebooks" / "00_quickstart.ipynb").read_text())
    nb["cells"] = [c for c in nb["cells"] if "".join(c["source"]).strip() != KERNEL_GUARD]
    nb["metadata"]["kernelspec"]["name"] = "python3"
    path = tmp_path / "bare.ipynb"
    path.write_text(json.dumps(nb))
    lablib = [sys.executable, "-m", "lablib.cli", "kernel", "--notebooks", str(path)]
    check = subprocess.run([*lablib, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "kernelspec is not 'lablib'" in check.stdout
    assert subprocess.run(lablib, capture_output=True, text=True).returncode == 0
    assert kernel_problems(json.loads(path.read_text())) == []
    assert subprocess.run([*lablib, "--check"], capture_output=True, text=True).returncode == 0
