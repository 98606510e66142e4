import pytest

from lablib.config import ConfigError, TrainConfig, notebook_config, parse_cli_value
from lablib.experiments.quickstart import LMConfig


def test_presets_override_defaults():
    smoke, cpu = LMConfig.resolve("smoke"), LMConfig.resolve("cpu")
    assert smoke.steps < cpu.steps
    assert smoke.preset == "smoke" and cpu.preset == "cpu"


def test_lablib_preset_environment_variable_picks_the_default(monkeypatch):
    monkeypatch.setenv("LABLIB_PRESET", "smoke")
    assert LMConfig.resolve().preset == "smoke"
    monkeypatch.setenv("LABLIB_PRESET", "huge")
    with pytest.raises(ConfigError, match="LABLIB_PRESET: expected one of smoke, cpu, gpu, got 'huge'"):
        LMConfig.resolve()


def test_misspelled_name_gets_a_close_match():
    with pytest.raises(ConfigError, match=r"unknown parameter 'learnin_rate'; did you mean 'learning_rate'\?"):
        LMConfig.resolve("smoke", learnin_rate=0.1)


def test_wrong_type_names_parameter_expectation_and_value():
    with pytest.raises(ConfigError) as e:
        LMConfig.resolve("smoke", n_layer=2.5)
    assert str(e.value) == "parameter 'n_layer': expected an integer, got 2.5"


def test_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"parameter 'learning_rate': expected a value > 0.0, got -1"):
        LMConfig.resolve("smoke", learning_rate=-1)


def test_choice_outside_literal_is_refused():
    with pytest.raises(ConfigError, match="parameter 'pos': expected one of 'learned', 'sinusoidal', 'rope', 'none'"):
        LMConfig.resolve("smoke", pos="rotary")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="d_model"):
        LMConfig.resolve("smoke", d_model=65, n_head=2)
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig.resolve("smoke", steps=10, warmup_steps=20)


def test_int_accepted_for_float_and_bool_not_for_int():
    assert LMConfig.resolve("smoke", learning_rate=1).learning_rate == 1.0
    with pytest.raises(ConfigError):
        LMConfig.resolve("smoke", steps=True)


def test_notebook_config_reads_knobs_and_overrides_from_a_namespace():
    ns = {"preset": "smoke", "steps": 7, "learning_rate": None, "overrides": {"pos": "rope"}, "unrelated": 1}
    cfg = notebook_config(LMConfig, ns)
    assert (cfg.steps, cfg.pos, cfg.learning_rate) == (7, "rope", LMConfig.resolve("smoke").learning_rate)


def test_cli_strings_are_parsed_with_the_field_type_in_mind():
    assert parse_cli_value("3") == 3 and parse_cli_value("1e-3") == 1e-3 and parse_cli_value("true") is True
    assert LMConfig.parse("pos", "none") == "none"  # a literal choice, not Python's None
    assert LMConfig.parse("corpus_max_chars", "none") is None
    assert LMConfig.parse("corpus", "123") == "123"


def test_round_trip_through_dict():
    cfg = LMConfig.resolve("smoke", steps=12)
    again = LMConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.preset == "smoke"
