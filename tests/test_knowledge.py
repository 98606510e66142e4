"""Fact injection during training, the control null and the measures of acquisition and forgetting."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from lablib.config import ConfigError
from lablib.data import TokenBlocks
from lablib.experiments.knowledge_dynamics import (ARMS, EFFECT, FIT_FORMS, SCENARIOS, InjectionStream, KnowledgeConfig,
                                                   acquisition, best_form_on_dev, binned_curves, build_setup, fact_split,
                                                   fit_cells, fit_curve, flat_curves, headline_per_seed,
                                                   injection_schedule, log_binned, measure_cells, probe_callback,
                                                   probe_curves, pseudo_schedule, r_squared, reference_tables,
                                                   summarise_seed, twin, verdict)
from lablib.seeding import seeded_transformer


@pytest.fixture(scope="module")
def cfg():
    return KnowledgeConfig.resolve("smoke")


@pytest.fixture(scope="module")
def setup(cfg):
    return build_setup(cfg)


def rows_starting_with(tokens: torch.Tensor, ids: list[int]) -> list[int]:
    n = len(ids)
    return [r for r in range(tokens.shape[0]) if tokens[r, :n].tolist() == ids]


def contains(row: list[int], ids: list[int]) -> bool:
    return any(row[i:i + len(ids)] == ids for i in range(len(row) - len(ids) + 1))


# --- the schedule and the stream -----------------------------------------------------------------

def test_schedule_exposes_each_fact_once_or_repeatedly_by_scenario():
    schedule = injection_schedule(SCENARIOS, facts_per_scenario=3, first_step=100, exposures=4, gap=20)
    counts = {}
    for inj in schedule:
        counts[inj.fact] = counts.get(inj.fact, 0) + 1
    assert counts == {f"injected/{s}/{i}": (1 if s == "once" else 4) for s in SCENARIOS for i in range(3)}


def test_paraphrased_facts_change_wording_and_duplicated_ones_do_not():
    schedule = injection_schedule(SCENARIOS, facts_per_scenario=1, first_step=0, exposures=3, gap=10)
    templates = {s: [inj.template for inj in schedule if inj.fact == f"injected/{s}/0"] for s in SCENARIOS}
    assert templates == {"once": [0], "duplicated": [0, 0, 0], "paraphrased": [0, 1, 2]}


def test_pseudo_exposure_steps_of_each_control_match_its_twins_injections(setup):
    pseudo = pseudo_schedule(setup.schedule)
    assert len(pseudo) == len(setup.schedule)
    for inj, fake in zip(setup.schedule, pseudo):
        assert fake.fact == twin(inj.fact) and fake.fact.startswith("control/") and twin(fake.fact) == inj.fact
        assert (fake.step, fake.exposure, fake.template) == (inj.step, inj.exposure, inj.template)
    controls = {f for f in setup.facts if f.startswith("control/")}
    assert {fake.fact for fake in pseudo} == controls  # every control has pseudo-exposures, none is injected
    assert not controls & {inj.fact for inj in setup.schedule} and not controls & {f for f, _ in setup.fact_ids}


def test_control_facts_are_never_in_the_training_stream(cfg, setup):
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id)
    names = {f: setup.tokenizer.encode(p.name) for f, p in setup.facts.items()}
    assert all(len(ids) == 2 for ids in names.values())
    seen = set()
    for batch_size in cfg.batch_sizes:
        for step in range(cfg.steps):
            for row in stream.batch(step, batch_size, seed=cfg.seed)["tokens"].tolist():
                seen |= {f for f, ids in names.items() if contains(row, ids)}
    assert seen == {f for f in setup.facts if f.startswith("injected/")}  # every injected fact, no control


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
    stream = InjectionStream(blocks, schedule, {("injected/once/0", 0): [5, 6]}, eos_id=3)
    with pytest.raises(ValueError, match="do not fit a micro-batch"):
        stream.batch(0, 2, 0)


def test_probes_are_dense_around_every_exposure_and_sparse_elsewhere(cfg, setup):
    steps = set(setup.probe_steps)
    for inj in setup.schedule:
        assert set(range(inj.step, inj.step + cfg.lam_window + 2)) <= steps  # 'before' and the whole window
    assert {0, cfg.steps} <= steps and len(steps) < cfg.steps + 1


def test_twins_share_their_split_and_both_splits_are_used(cfg):
    splits = {fact_split(i) for i in range(cfg.facts_per_scenario)}
    assert splits == {"dev", "test"}


def test_a_bad_seed_list_or_schedule_is_refused():
    with pytest.raises(ConfigError, match="seeds"):
        KnowledgeConfig.resolve("smoke", seeds=[1, 1])
    with pytest.raises(ConfigError, match="steps"):
        KnowledgeConfig.resolve("smoke", steps=15)


# --- probes and the null ----------------------------------------------------------------------

def test_probe_callback_logs_one_value_per_fact_and_kind_at_its_steps_only(cfg, setup):
    model = seeded_transformer(cfg, setup.tokenizer.vocab_size)
    fn = probe_callback(setup.probes, setup.tokenizer, setup.probe_steps)
    row = fn(0, model)
    assert set(row) == {f"probe/{f}/{k}" for f in setup.probes for k in ("memorization", "semantic", "compositional")}
    assert all(v < 0 for v in row.values())
    assert fn(next(s for s in range(cfg.steps) if s not in setup.probe_steps), model) == {}


def untrained_curves(cfg, setup):
    """The pipeline's curves for an untrained model: the real callback at every probe step, no updates."""
    model = seeded_transformer(cfg, setup.tokenizer.vocab_size)
    fn = probe_callback(setup.probes, setup.tokenizer, setup.probe_steps)
    rows = [{"step": s, **fn(s, model)} for s in setup.probe_steps]
    return probe_curves(pd.DataFrame(rows)), rows[0]


def test_the_null_measure_is_zero_on_an_untrained_model(cfg, setup):
    curves, _ = untrained_curves(cfg, setup)
    tables = summarise_seed({8: curves}, setup.schedule, cfg.lam_window, cfg.retention_bins)
    assert set(tables.measures["arm"]) == set(ARMS)
    measures = tables.measures[["acquisition_first", "acquisition_total", "retained"]].to_numpy()
    assert np.abs(measures).max() < 1e-9
    effects = [c["effect"]["mean"] for c in measure_cells({0: tables, 1: tables})]
    assert effects and np.abs(effects).max() < 1e-9


def test_headline_stands_beside_chance_untrained_and_the_control_arm(cfg, setup):
    curves, step0 = untrained_curves(cfg, setup)
    shifted = curves.copy()  # a fake trained run: injected facts gain 1 nat after their first exposure
    first = {inj.fact: inj.step for inj in reversed(setup.schedule)}
    gain = shifted["fact"].map(first).lt(shifted["step"]) & (shifted["arm"] == "injected")
    shifted.loc[gain, "logprob"] += 1.0
    tables = summarise_seed({8: shifted}, setup.schedule, cfg.lam_window, cfg.retention_bins)
    untrained, chance = reference_tables(setup, cfg, {8: {k: v for k, v in step0.items() if k != "step"}})
    head = headline_per_seed(tables, untrained, chance, 8)
    assert head.split == "test" and head.value.mean == pytest.approx(1.0)
    assert head.baselines.trivial.mean == pytest.approx(0.0, abs=1e-9)
    assert head.baselines.untrained.mean == pytest.approx(0.0, abs=1e-9)
    assert head.baselines.chance.mean == pytest.approx(0.0, abs=1e-9)


def test_flat_curves_rebuild_the_curve_table_of_a_model_that_never_changes(setup):
    scores = {"probe/injected/once/0/memorization": -3.0, "probe/control/once/0/memorization": -4.0}
    curves = flat_curves(scores, [0, 5, 10])
    assert curves["logprob"].tolist() == [-4.0] * 3 + [-3.0] * 3
    assert set(curves["arm"]) == set(ARMS) and set(curves["split"]) == {fact_split(0)}


# --- measures ---------------------------------------------------------------------------------

def test_effectivity_is_the_gain_to_the_local_maximum_after_the_exposure():
    steps = np.arange(10)
    logprob = np.array([-5, -5, -5, -3, -2, -2.5, -3, -3.5, -4, -4.0])  # exposure in step 2's batch
    a = acquisition(steps, logprob, exposure_step=2, window=4)
    assert a == {"before": -5.0, "lam_step": 4, "at_lam": -2.0, "effectivity": 3.0}


@pytest.mark.parametrize("form,a,b", [("power law", 0.9, 0.35), ("log-linear", 1.2, 0.15), ("exponential", 0.8, 0.02)])
def test_each_fit_form_recovers_its_own_parameters_from_a_noisy_curve(form, a, b):
    rng = np.random.default_rng(0)
    t = np.arange(1, 301, dtype=float)
    y = FIT_FORMS[form].curve(t, a, b) + rng.normal(0, 0.005, t.shape)
    fit = fit_curve(form, t, y)
    assert fit.a == pytest.approx(a, rel=0.05) and fit.b == pytest.approx(b, rel=0.05)
    assert fit.r2 > 0.95


def test_an_exact_power_law_is_fitted_with_r2_of_one_and_beats_the_exponential():
    t = np.arange(1, 50, dtype=float)
    fit = fit_curve("power law", t, 2.0 * t ** -0.5)
    assert (fit.a, fit.b, fit.r2) == (pytest.approx(2.0), pytest.approx(0.5), pytest.approx(1.0))
    assert fit_curve("exponential", t, 2.0 * t ** -0.5).r2 < fit.r2


def test_an_unknown_fit_form_or_too_few_points_is_refused():
    with pytest.raises(ValueError, match="form"):
        fit_curve("cubic", np.arange(1, 5), np.ones(4))
    with pytest.raises(ValueError, match="at least 3"):
        fit_curve("power law", np.array([1.0, 2.0]), np.array([1.0, 0.5]))


def synthetic_tables(setup, cfg, seed):
    """Curves where injected facts jump after each exposure and decay as a power law, controls drift."""
    rng = np.random.default_rng(seed)
    steps = np.array(setup.probe_steps)
    rows = {"step": steps}
    when = {}
    for inj in [*setup.schedule, *pseudo_schedule(setup.schedule)]:
        when.setdefault(inj.fact, []).append(inj.step)
    for fact, exposures in when.items():
        for kind in ("memorization", "semantic", "compositional"):
            lp = -6.0 + 0.01 * steps + rng.normal(0, 0.02, steps.shape)
            if fact.startswith("injected/"):
                for s in exposures:
                    since = steps - s
                    lp = lp + np.where(since > 0, 1.5 * np.maximum(since, 1) ** -0.4, 0.0)
            rows[f"probe/{fact}/{kind}"] = lp
    curves = probe_curves(pd.DataFrame(rows))
    return summarise_seed({8: curves, 16: curves}, setup.schedule, cfg.lam_window, cfg.retention_bins)


def test_every_reported_r2_matches_a_recomputation_from_its_binned_curve(cfg, setup):
    tables = synthetic_tables(setup, cfg, 0)
    assert len(tables.fits) == 2 * 2 * 3 * 3 * 3 * len(FIT_FORMS)  # batch x split x arm x scenario x kind x form
    keys = ["batch_size", "split", "arm", "scenario", "kind"]
    curves = {k: g for k, g in tables.binned.groupby(keys)}
    for row in tables.fits.itertuples():
        g = curves[tuple(getattr(row, k) for k in keys)]
        predicted = FIT_FORMS[row.form].curve(g["t"].to_numpy(), row.a, row.b)
        assert row.r2 == pytest.approx(r_squared(g["gain"].to_numpy(), predicted), abs=1e-12)
    shifted = tables.fits.assign(r2=tables.fits["r2"] * 0.5)  # a second seed with other R² values
    per_seed = {0: tables, 1: dataclasses.replace(tables, fits=shifted)}
    cells = fit_cells(per_seed)
    assert len(cells) == len(tables.fits)
    by_cell = {tuple(r[k] for k in [*keys, "form"]): r for r in tables.fits.to_dict("records")}
    for cell in cells:
        r2 = by_cell[tuple(cell[k] for k in [*keys, "form"])]["r2"]
        assert cell["r2"]["mean"] == pytest.approx(0.75 * r2) and cell["r2"]["values"] == {"0": r2, "1": 0.5 * r2}
        assert ("a" in cell) == (cell["split"] == "test")
    assert best_form_on_dev(cells)["form"] in FIT_FORMS


def test_the_effect_curve_is_injected_minus_control_bin_by_bin(cfg, setup):
    tables = synthetic_tables(setup, cfg, 0)
    b = tables.binned.set_index(["batch_size", "split", "scenario", "kind", "bin", "arm"])["gain"].unstack("arm").dropna()
    assert np.allclose(b[EFFECT], b["injected"] - b["control"])
    decays = tables.fits[(tables.fits["arm"] == EFFECT) & (tables.fits["form"] == "power law")]
    assert (decays["b"] > 0).all()  # the synthetic gain decays, and the fit says so


def test_log_binning_keeps_a_power_law_exact():
    t = np.arange(1, 1001, dtype=float)
    centres, means = log_binned(t, t ** -0.5, n_bins=10)
    assert len(centres) <= 10 and centres[0] == 1.0
    assert fit_curve("power law", centres, means).b == pytest.approx(0.5, abs=0.05)


def test_binned_curves_weigh_every_fact_alike_whatever_its_probe_steps():
    def arm(name, facts):
        return pd.DataFrame([{"fact": f"{name}/once/0/{f}", "arm": name, "scenario": "once", "index": 0, "split": "test",
                              "kind": "semantic", "t": 1, "gain": g} for f, gains in facts.items() for g in gains])
    retention = pd.concat([arm("injected", {"a": [1.0] * 4, "b": [0.0]}), arm("control", {"c": [0.25]})])
    out = binned_curves(retention, horizon=1, n_bins=3).set_index("arm")["gain"]
    assert out.to_dict() == {"control": 0.25, EFFECT: 0.25, "injected": 0.5}  # fact a's four points count once


def test_verdicts_read_the_interval_against_the_papers_sign():
    assert verdict({"low": 0.1, "high": 0.3}, +1) == "agrees"
    assert verdict({"low": 0.1, "high": 0.3}, -1) == "disagrees"
    assert verdict({"low": -0.1, "high": 0.3}, +1) == "not resolved"
    assert verdict({"low": None, "high": None}, +1) == "not resolved"
