"""Shared set-up: runs and caches of the test session live in a scratch folder; each test gets its own runs root."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # notebooks run by nbval (in their own kernels) inherit these: their runs and caches stay out of the repo
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="lablib-tests-"))
    config.add_cleanup(lambda: shutil.rmtree(scratch, ignore_errors=True))
    os.environ.setdefault("LABLIB_RUNS", str(scratch / "runs"))
    os.environ.setdefault("LABLIB_CACHE", str(scratch / "cache"))


@pytest.fixture(autouse=True)
def isolated_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("LABLIB_RUNS", str(tmp_path / "runs"))
    return tmp_path / "runs"


