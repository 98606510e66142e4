"""Fact injection during training and the measures of acquisition and forgetting."""

import numpy as np
import pytest
import torch

from lablib.config import ConfigError
from lablib.data import TokenBlocks
from lablib.experiments.knowledge_dynamics import (SCENARIOS, InjectionStream, KnowledgeConfig, acquisition, build_setup,
                              fit_power_law, injection_schedule, probe_callback, retainability)


@pytest.fixture(scope="module")
def setup():
    return build_setup(KnowledgeConfig.resolve("smoke"))


def rows_starting_with(tokens: torch.Tensor, ids: list[int]) -> list[int]:
    n = len(ids)
    return [r for r in range(tokens.shape[0]) if tokens[r, :n].tolist() == ids]


def test_schedule_exposes_each_fact_once_or_repeatedly_by_scenario():
    schedule = injection_schedule(SCENARIOS, facts_per_scenario=3, first_step=100, exposures=4, gap=20)
    counts = {}
    for inj in schedule:
        counts[inj.fact] = counts.get(inj.fact, 0) + 1
    assert counts == {f"{s}/{i}": (1 if s == "once" else 4) for s in SCENARIOS for i in range(3)}


def test_paraphrased_facts_change_wording_and_duplicated_ones_do_not():
    schedule = injection_schedule(SCENARIOS, facts_per_scenario=1, first_step=0, exposures=3, gap=10)
    templates = {s: [inj.template for inj in schedule if inj.fact == f"{s}/0"] for s in SCENARIOS}
    assert templates == {"once": [0], "duplicated": [0, 0, 0], "paraphrased": [0, 1, 2]}


def test_every_fact_is_in_exactly_the_batches_the_schedule_names(setup):
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id)
    eos = setup.tokenizer.eos_id
    last = max(inj.step for inj in setup.schedule)
    for step in range(last + 3):
        tokens = stream.batch(step, 8, seed=0)["tokens"]
        for (fact, template), ids in setup.fact_ids.items():
            due = any(inj.step == step and inj.fact == fact and inj.template == template for inj in setup.schedule)
            assert bool(rows_starting_with(tokens, [eos] + ids + [eos])) == due, (step, fact, template)


def test_injected_rows_keep_the_background_after_the_fact(setup):
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id)
    step = setup.schedule[0].step
    plain = setup.background.batch(step, 8, seed=0)["tokens"]
    injected = stream.batch(step, 8, seed=0)["tokens"]
    n = len(setup.fact_ids[(setup.schedule[0].fact, setup.schedule[0].template)]) + 2
    n_due = len([i for i in setup.schedule if i.step == step])
    assert torch.equal(injected[0, n:], plain[0, n:])
    assert torch.equal(injected[n_due:], plain[n_due:])


def test_with_accumulation_facts_go_in_the_first_micro_batch_of_their_step(setup):
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id,
                             micro_batches_per_step=2)
    first = setup.schedule[0]
    ids = [setup.tokenizer.eos_id] + setup.fact_ids[(first.fact, first.template)] + [setup.tokenizer.eos_id]
    assert rows_starting_with(stream.batch(2 * first.step, 8, 0)["tokens"], ids)
    assert not rows_starting_with(stream.batch(2 * first.step + 1, 8, 0)["tokens"], ids)


def test_too_many_facts_for_one_micro_batch_is_refused():
    blocks = TokenBlocks(torch.zeros(4, 10, dtype=torch.long))
    schedule = injection_schedule(["once"], 1, 0, 1, 1) * 3
    stream = InjectionStream(blocks, schedule, {("once/0", 0): [5, 6]}, eos_id=3)
    with pytest.raises(ValueError, match="do not fit a micro-batch"):
        stream.batch(0, 2, 0)


def test_probe_callback_logs_one_value_per_fact_and_kind(setup):
    from lablib.seeding import seeded_transformer

    model = seeded_transformer(KnowledgeConfig.resolve("smoke"), setup.tokenizer.vocab_size)
    row = probe_callback(setup.probes, setup.tokenizer)(0, model)
    assert set(row) == {f"probe/{f}/{k}" for f in setup.probes for k in ("memorization", "semantic", "compositional")}
    assert all(v < 0 for v in row.values())


def test_effectivity_is_the_gain_to_the_local_maximum_after_the_exposure():
    steps = np.arange(10)
    logprob = np.array([-5, -5, -5, -3, -2, -2.5, -3, -3.5, -4, -4.0])  # exposure in step 2's batch
    a = acquisition(steps, logprob, exposure_step=2, window=4)
    assert a == {"before": -5.0, "lam_step": 4, "at_lam": -2.0, "effectivity": 3.0}
    t, r = retainability(steps, logprob, a["lam_step"], a["before"], a["at_lam"])
    assert t.tolist() == [1, 2, 3, 4, 5]
    assert r == pytest.approx([2.5 / 3, 2 / 3, 1.5 / 3, 1 / 3, 1 / 3])


def test_power_law_fit_recovers_known_parameters_from_noisy_curves():
    rng = np.random.default_rng(0)
    t = np.arange(1, 301)
    y = 0.9 * t ** -0.35 + rng.normal(0, 0.01, t.shape)
    fit = fit_power_law(t, y)
    assert fit.scale == pytest.approx(0.9, abs=0.03)
    assert fit.exponent == pytest.approx(0.35, abs=0.02)
    assert fit.r2 > 0.95


def test_power_law_fit_of_an_exact_curve_has_r2_of_one():
    t = np.arange(1, 50)
    fit = fit_power_law(t, 2.0 * t ** -0.5)
    assert (fit.scale, fit.exponent) == (pytest.approx(2.0), pytest.approx(0.5))
    assert fit.r2 == pytest.approx(1.0)


def test_a_schedule_that_runs_past_the_end_of_training_is_refused():
    with pytest.raises(ConfigError, match="steps"):
        KnowledgeConfig.resolve("smoke", steps=15)


def test_drift_correction_subtracts_the_control_curve_of_the_same_kind():
    import pandas as pd

    from lablib.experiments.knowledge_dynamics import drift_corrected

    curves = pd.DataFrame({"step": [0, 1, 0, 1, 0, 1], "scenario": ["once"] * 2 + ["control"] * 4,
                           "fact": ["once/0"] * 2 + ["control/0"] * 2 + ["control/1"] * 2,
                           "kind": ["semantic"] * 6, "logprob": [-5.0, -3.0, -4.0, -5.0, -6.0, -5.0]})
    out = drift_corrected(curves)
    assert out["fact"].tolist() == ["once/0", "once/0"]
    assert out["logprob"].tolist() == [0.0, 2.0]


def test_log_binning_keeps_a_power_law_exact():
    from lablib.experiments.knowledge_dynamics import log_binned

    t = np.arange(1, 1001, dtype=float)
    centres, means = log_binned(t, t ** -0.5, n_bins=10)
    assert len(centres) <= 10 and centres[0] == 1.0
    assert fit_power_law(centres, means).exponent == pytest.approx(0.5, abs=0.05)
