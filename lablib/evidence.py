"""Evidence: intervals over seeds, paired differences and the baselines a headline stands beside.

Notable here:
- `Estimate` is one number with its 95% interval and how it was computed; `str()` prints
  `0.91 ± 0.03 (n=5)` and `to_dict()` is what results.json files hold.
- `mean_interval` is Student's t over independent replicates (seeds); with n=1 the
  interval is undefined (NaN), never a made-up zero width.
- `paired_difference` matches two methods on the same seeds or splits (dict keys, or
  positions of two sequences) and takes the t interval of the differences, which is
  what "A beats B" needs when both share seeds.
- `proportion_interval` is Wilson's score interval for an accuracy over n items.
- `bootstrap_interval` (percentile, seeded) is for statistics whose mean is not normal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def excludes(self, value: float = 0.0) -> bool:
        """True when the whole interval lies on one side of `value`."""
        return bool(self.low > value or self.high < value)

    def format(self, digits: int = 2) -> str:
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f} (n={self.n})"

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Estimate":
        return cls(float(data["mean"]), float(data["low"]), float(data["high"]), int(data["n"]), str(data["method"]))


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("an interval needs at least one value, got none")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"an interval needs finite values, got {x.tolist()}")
    return x


def mean_interval(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE) -> Estimate:
    """Mean and Student-t interval over independent replicates (seeds)."""
    x = _values(values)
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean, math.nan, math.nan, 1, "t")
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Estimate(mean, mean - half, mean + half, int(x.size), "t")


def paired_difference(a: Mapping[Any, float] | Sequence[float], b: Mapping[Any, float] | Sequence[float],
                      confidence: float = CONFIDENCE) -> Estimate:
    """Mean of a - b over matched replicates (the keys both mappings share, or positions), with a t interval."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = sorted(set(a) & set(b), key=str)
        if not keys:
            raise ValueError(f"paired difference: no shared keys between {sorted(a, key=str)} and {sorted(b, key=str)}")
        diffs = [a[k] - b[k] for k in keys]
    else:
        if len(a) != len(b):
            raise ValueError(f"paired difference: expected sequences of one length, got {len(a)} and {len(b)}")
        diffs = [x - y for x, y in zip(a, b)]
    est = mean_interval(diffs, confidence)
    return Estimate(est.mean, est.low, est.high, est.n, "paired t")


def proportion_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """An accuracy over n items with Wilson's score interval."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"proportion interval: expected 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = float(stats.norm.ppf((1 + confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Estimate(p, centre - half, centre + half, n, "wilson")


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic=np.mean, confidence: float = CONFIDENCE,
                       resamples: int = 10_000, seed: int = 0) -> Estimate:
    """Percentile bootstrap of `statistic` over the values (seeded, so reports are reproducible)."""
    x = _values(values)
    rng = np.random.default_rng(seed)
    draws = statistic(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(float(statistic(x)), float(low), float(high), int(x.size), "bootstrap")
