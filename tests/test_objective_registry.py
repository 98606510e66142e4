"""The objective registry: every objective is one entry, and config choices and checks come from it."""

import os
import subprocess
import sys
import typing

import pytest

from conftest import REPO
from lablib.config import ConfigError
from lablib.experiments.objectives import ObjectivesRunConfig
from lablib.experiments.quickstart import LMConfig
from lablib.objectives import OBJECTIVES, ObjectiveConfig, register_objective
from lablib.runs import open_run

QUICKSTART = str(REPO / "notebooks" / "00_quickstart.ipynb")
PLUGINS = REPO / "tests" / "plugins"


def lablib_run(*args, plugins: str | None = None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(PLUGINS)])}
    env.pop("LABLIB_PLUGINS", None)
    if plugins:
        env["LABLIB_PLUGINS"] = plugins
    return subprocess.run([sys.executable, "-m", "lablib.cli", "run", QUICKSTART, *args], capture_output=True,
                          text=True, env=env)


def test_config_choices_are_the_registry():
    choices = typing.get_args(typing.get_type_hints(ObjectiveConfig)["objective"])
    assert choices == tuple(OBJECTIVES)
    simple = typing.get_args(typing.get_type_hints(ObjectiveConfig)["biphasic_first"])
    assert simple == tuple(n for n, s in OBJECTIVES.items() if not s.combines)


def test_checks_and_choices_follow_each_entrys_needs():
    with pytest.raises(ConfigError, match="encoder-decoder trains with"):
        ObjectivesRunConfig.resolve("smoke", architecture="encdec", objective="clm")
    with pytest.raises(ConfigError, match="different models"):
        ObjectivesRunConfig.resolve("smoke", objective="mixture", mixture_weights={"multi_token": 1, "future_token": 1})
    with pytest.raises(ConfigError, match="n_layer"):
        ObjectivesRunConfig.resolve("smoke", objective="multi_token", n_layer=1)
    with pytest.raises(ConfigError, match="token blocks only"):
        LMConfig.resolve("smoke", objective="contrastive")
    mixed = ObjectivesRunConfig.resolve("smoke", objective="mixture", mixture_weights={"clm": 1, "multi_token": 1})
    assert mixed.decoder_model(50)[0].__name__ == "MultiTokenTransformer"  # clm trains on any decoder
    assert ObjectivesRunConfig.resolve("smoke", objective="future_token").embedding_mask() == "causal"
    assert ObjectivesRunConfig.resolve("smoke", objective="gpt_bert").predicts_next_token()
    assert not ObjectivesRunConfig.resolve("smoke", objective="mlm").predicts_next_token()


def test_an_objective_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_objective("clm", reads="causal", next_token=True)(lambda cfg, tok, n: None)


def test_an_unregistered_objective_is_refused_in_one_line():
    proc = lablib_run("--preset", "smoke", "-p", "objective", "skip_token")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lablib: error: parameter 'objective': expected one of 'clm',")


def test_a_plugin_objective_registered_in_one_entry_trains_through_lablib_run(isolated_runs):
    proc = lablib_run("--preset", "smoke", "--quiet", "-p", "objective", "skip_token", "-p", "steps", "4",
                      "-p", "warmup_steps", "1", plugins="toy_objective")
    assert proc.returncode == 0, proc.stderr
    run = open_run(proc.stdout.strip().splitlines()[-1])
    assert run.params["objective"] == "skip_token"
    losses = [row["loss"] for row in run.log.rows() if "loss" in row]
    assert losses and all(loss > 0 for loss in losses)
    assert run.results["steps"] == 4 and run.results["reload_matches"] is True
