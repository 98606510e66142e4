import math

import numpy as np
import pytest

from lablib.evidence import (Baselines, Estimate, Headline, aggregate_seeds, assign_splits, bootstrap_interval,
                             item_key, markdown_table, mean_interval, paired_difference, proportion_interval, split_of,
                             take_split)


def test_mean_interval_matches_the_t_formula():
    est = mean_interval([0.90, 0.92, 0.94])
    assert est.mean == pytest.approx(0.92)
    assert est.half_width == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    assert str(est) == "0.92 ± 0.05 (n=3)"


def test_one_seed_has_no_interval_rather_than_a_zero_one():
    est = mean_interval([0.7])
    assert math.isnan(est.low) and str(est) == "0.70 (n=1)"
    assert not est.excludes(0.0)


def test_paired_difference_uses_shared_seeds_only():
    a = {0: 0.8, 1: 0.9, 2: 0.85, 3: 0.5}
    b = {0: 0.7, 1: 0.8, 2: 0.75}
    est = paired_difference(a, b)
    assert est.n == 3 and est.mean == pytest.approx(0.1)
    assert est.excludes(0.0)  # identical differences: a zero-width interval at 0.1


def test_pairing_removes_shared_seed_noise():
    rng = np.random.default_rng(0)
    seed_effect = rng.normal(0, 1, size=8)
    a, b = seed_effect + 0.1, seed_effect
    assert paired_difference(list(a), list(b)).excludes(0.0)
    unpaired = mean_interval(a).low - mean_interval(b).high
    assert unpaired < 0  # the unpaired intervals overlap


def test_wilson_interval_stays_inside_zero_one():
    est = proportion_interval(10, 10)
    assert est.mean == 1.0 and est.high <= 1.0 and est.low == pytest.approx(0.7225, abs=1e-3)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        proportion_interval(11, 10)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.arange(20.0)
    a, b = bootstrap_interval(values, seed=3), bootstrap_interval(values, seed=3)
    assert a == b and a.low < a.mean < a.high


def test_estimates_round_trip_through_json_dicts():
    est = mean_interval([1.0, 2.0, 4.0])
    assert Estimate.from_dict(est.to_dict()) == est


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])


def _seed_headline(value, untrained, trivial, chance=7.62):
    return Headline.of("held-out loss", value, Baselines.of(chance, untrained, trivial, "bigram", unigram=6.0),
                       split="val", better="lower")


def test_aggregate_seeds_gives_t_intervals_and_paired_differences():
    per_seed = {0: _seed_headline(3.9, 7.7, 5.0), 1: _seed_headline(3.8, 7.6, 5.0), 2: _seed_headline(4.0, 7.8, 5.0)}
    agg = aggregate_seeds(per_seed)
    assert agg.value == mean_interval([3.9, 3.8, 4.0])
    assert agg.baselines.untrained == mean_interval([7.7, 7.6, 7.8])
    assert agg.baselines.trivial.half_width == 0.0 and agg.baselines.others["unigram"].mean == 6.0
    assert agg.differences["trivial"].mean == pytest.approx(-1.1) and agg.differences["trivial"].n == 3
    assert agg.beats("trivial") and agg.beats("untrained")
    assert str(agg.value) == "3.90 ± 0.25 (n=3)"


def test_a_headline_that_does_not_clear_its_trivial_rule_is_not_called_a_win():
    per_seed = {0: _seed_headline(5.1, 7.7, 5.0), 1: _seed_headline(4.9, 7.6, 5.0)}
    assert aggregate_seeds(per_seed).beats("trivial") is False
    assert aggregate_seeds({0: _seed_headline(3.9, 7.7, 5.0)}).beats("trivial") is None  # one seed: no claim


def test_seeds_reporting_different_splits_are_not_aggregated():
    other = Headline.of("held-out loss", 3.9, Baselines.of(7.62, 7.7, 5.0, "bigram", unigram=6.0), split="test",
                        better="lower")
    with pytest.raises(ValueError, match="seed 1"):
        aggregate_seeds({0: _seed_headline(3.9, 7.7, 5.0), 1: other})


def test_headlines_round_trip_through_json():
    agg = aggregate_seeds({0: _seed_headline(3.9, 7.7, 5.0), 1: _seed_headline(3.8, 7.6, 5.0)})
    import json
    assert Headline.from_dict(json.loads(json.dumps(agg.to_dict(), allow_nan=False))) == agg
    single = _seed_headline(3.9, 7.7, 5.0)
    assert Headline.from_dict(json.loads(json.dumps(single.to_dict(), allow_nan=False))) == single


def test_markdown_table_prints_estimates_in_the_headline_format():
    table = markdown_table([{"method": "a|b", "auc": mean_interval([0.90, 0.92, 0.94]), "note": None}])
    assert table.splitlines() == ["| method | auc | note |", "|---|---|---|", "| a\\|b | 0.92 ± 0.05 (n=3) |  |"]


def test_splits_are_stable_disjoint_and_near_the_fraction():
    items = [f"item-{i}" for i in range(2000)]
    parts = assign_splits(items, dev_fraction=0.3, seed=1)
    assert sorted(parts["dev"] + parts["test"]) == sorted(items) and not set(parts["dev"]) & set(parts["test"])
    assert 0.26 < len(parts["dev"]) / len(items) < 0.34
    assert split_of("item-7", 0.3, 1) == split_of("item-7", 0.3, 1)
    assert take_split(items, "test", dev_fraction=0.3, seed=1) == parts["test"]
    assert assign_splits(items, seed=2)["dev"] != assign_splits(items, seed=1)["dev"]


def test_split_keys_of_structured_items_do_not_depend_on_key_order():
    assert item_key({"b": 2, "a": 1}) == item_key({"a": 1, "b": 2}) == '{"a": 1, "b": 2}'
    parts = assign_splits([{"b": 2, "a": 1}])
    assert parts[split_of('{"a": 1, "b": 2}')] == [{"b": 2, "a": 1}]
    with pytest.raises(ValueError, match="'dev' or 'test'"):
        take_split([1, 2], "val")


def test_headline_over_seeds_matches_the_per_seed_headlines_and_names_a_missing_reference():
    from lablib.evidence import headline_over_seeds

    value = {0: 0.8, 1: 0.7, 2: 0.9}
    refs = {"chance": {0: 0.5, 1: 0.5, 2: 0.5}, "untrained": {0: 0.4, 1: 0.6, 2: 0.5},
            "trivial": {0: 0.6, 1: 0.6, 2: 0.7}, "oracle": {0: 1.0, 1: 1.0, 2: 1.0}}
    h = headline_over_seeds("accuracy", value, refs, "edge lookup", "test")
    assert abs(h.value.mean - 0.8) < 1e-12 and h.value.n == 3 and h.split == "test"
    assert h.baselines.trivial_rule == "edge lookup" and set(h.baselines.others) == {"oracle"}
    assert abs(h.differences["trivial"].mean - (0.8 - 0.6333333333333333)) < 1e-9
    assert abs(h.differences["oracle"].mean + 0.2) < 1e-9
    with pytest.raises(ValueError, match="missing untrained"):
        headline_over_seeds("accuracy", value, {"chance": refs["chance"], "trivial": refs["trivial"]}, "rule", "test")
