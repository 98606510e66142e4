import math

import numpy as np
import pytest

from lablib.evidence import Estimate, bootstrap_interval, mean_interval, paired_difference, proportion_interval


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
