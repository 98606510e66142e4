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
- `Headline` is the convention every experiment reports by: one metric on one split
  beside its `Baselines` (chance, the untrained step-0 model, the task's strongest
  trivial rule), all computed by code on the same items. A run's notebook writes one
  with single-run values; `aggregate_seeds` turns the per-seed headlines into Estimates
  over seeds with paired differences to each baseline.
- `markdown_table` prints rows of cells as a markdown table (README, notebooks).
- `split_of` / `take_split` put evaluation items into `dev` (for choosing recipes,
  read-outs and thresholds) and `test` (reported) by a stable hash of each item's key,
  so the split is the same in every process and on every machine.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

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
        """Plain JSON: an undefined bound is null (strict JSON has no NaN)."""
        bound = lambda x: None if math.isnan(x) else x  # noqa: E731
        return {"mean": self.mean, "low": bound(self.low), "high": bound(self.high), "n": self.n,
                "method": self.method}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Estimate":
        bound = lambda x: math.nan if x is None else float(x)  # noqa: E731
        return cls(float(data["mean"]), bound(data["low"]), bound(data["high"]), int(data["n"]), str(data["method"]))

    @classmethod
    def single(cls, value: float) -> "Estimate":
        """One run's number: no interval (n=1)."""
        return cls(float(value), math.nan, math.nan, 1, "single run")


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


# --- the headline convention -------------------------------------------------------------------

BASELINES = ("chance", "untrained", "trivial")


def _estimate(value: Estimate | float) -> Estimate:
    return value if isinstance(value, Estimate) else Estimate.single(value)


@dataclass(frozen=True)
class Baselines:
    """What a headline stands beside, each computed by code on the headline's own items.

    chance: uniform guessing (log of the vocabulary for a loss, 1/classes for accuracy);
    untrained: the step-0 model; trivial: the task's strongest trivial rule, named in
    `trivial_rule` (a bigram model, "answer Yes when A causes B is a premise", ...).
    `others` holds further reference points (a unigram model beside the bigram, say).
    """

    chance: Estimate
    untrained: Estimate
    trivial: Estimate
    trivial_rule: str
    others: Mapping[str, Estimate] = field(default_factory=dict)

    @classmethod
    def of(cls, chance: Estimate | float, untrained: Estimate | float, trivial: Estimate | float,
           trivial_rule: str, **others: Estimate | float) -> "Baselines":
        if not trivial_rule:
            raise ValueError("baselines: name the trivial rule (trivial_rule='...'), got an empty string")
        return cls(_estimate(chance), _estimate(untrained), _estimate(trivial), trivial_rule,
                   {k: _estimate(v) for k, v in others.items()})

    def items(self) -> list[tuple[str, Estimate]]:
        """Every reference point by name: chance, untrained, trivial, then the others."""
        return [("chance", self.chance), ("untrained", self.untrained), ("trivial", self.trivial),
                *self.others.items()]

    def to_dict(self) -> dict[str, Any]:
        return {"chance": self.chance.to_dict(), "untrained": self.untrained.to_dict(),
                "trivial": self.trivial.to_dict(), "trivial_rule": self.trivial_rule,
                "others": {k: v.to_dict() for k, v in self.others.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Baselines":
        return cls(Estimate.from_dict(data["chance"]), Estimate.from_dict(data["untrained"]),
                   Estimate.from_dict(data["trivial"]), str(data["trivial_rule"]),
                   {k: Estimate.from_dict(v) for k, v in data.get("others", {}).items()})


SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Headline:
    """An experiment's headline: `metric` on `split`, beside its baselines.

    better: "higher" (accuracy, AUC) or "lower" (a loss). split: "dev", "test", or
    another named set of held-out items, stated (e.g. "val" when the recipe was chosen
    on the same items). `differences` holds value minus each reference point, paired
    over seeds (filled in by `aggregate_seeds`).
    """

    metric: str
    value: Estimate
    baselines: Baselines
    split: str
    better: str = "higher"
    differences: Mapping[str, Estimate] = field(default_factory=dict)

    def __post_init__(self):
        if self.better not in ("higher", "lower"):
            raise ValueError(f"headline: better must be 'higher' or 'lower', got {self.better!r}")
        if not self.split:
            raise ValueError("headline: name the split it reports (dev, test, ...), got an empty string")

    @classmethod
    def of(cls, metric: str, value: Estimate | float, baselines: Baselines, split: str,
           better: str = "higher") -> "Headline":
        return cls(metric, _estimate(value), baselines, split, better)

    def beats(self, name: str) -> bool | None:
        """Whether the paired difference to reference `name` excludes 0 in the better direction
        (None when there is no interval, e.g. one seed)."""
        diff = self.differences.get(name)
        if diff is None or math.isnan(diff.low):
            return None
        return bool(diff.low > 0) if self.better == "higher" else bool(diff.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value.to_dict(), "baselines": self.baselines.to_dict(),
                "split": self.split, "better": self.better,
                "differences": {k: v.to_dict() for k, v in self.differences.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Headline":
        return cls(str(data["metric"]), Estimate.from_dict(data["value"]), Baselines.from_dict(data["baselines"]),
                   str(data["split"]), str(data.get("better", "higher")),
                   {k: Estimate.from_dict(v) for k, v in data.get("differences", {}).items()})


def aggregate_seeds(per_seed: Mapping[Any, Headline | Mapping[str, Any]], confidence: float = CONFIDENCE) -> Headline:
    """One headline over seeds: t intervals of the value and of every reference point, and the
    paired difference (value - reference) over the same seeds.

    per_seed maps a seed to its run's headline (a `Headline` or its dict). All must report
    the same metric, split and trivial rule, and each must be a single run's value.
    """
    if not per_seed:
        raise ValueError("aggregate_seeds: expected at least one seed's headline, got none")
    heads = {seed: h if isinstance(h, Headline) else Headline.from_dict(h) for seed, h in per_seed.items()}
    first = next(iter(heads.values()))
    for seed, h in heads.items():
        same = (h.metric, h.split, h.better, h.baselines.trivial_rule, sorted(h.baselines.others))
        want = (first.metric, first.split, first.better, first.baselines.trivial_rule, sorted(first.baselines.others))
        if same != want:
            raise ValueError(f"aggregate_seeds: seed {seed!r} reports {same}, the others {want}")
    seeds = sorted(heads, key=str)
    value = {s: heads[s].value.mean for s in seeds}
    refs = {name: {s: dict(heads[s].baselines.items())[name].mean for s in seeds}
            for name, _ in first.baselines.items()}
    over = {name: mean_interval([v[s] for s in seeds], confidence) for name, v in refs.items()}
    baselines = Baselines(over["chance"], over["untrained"], over["trivial"], first.baselines.trivial_rule,
                          {k: over[k] for k in first.baselines.others})
    differences = {name: paired_difference(value, v, confidence) for name, v in refs.items()}
    return Headline(first.metric, mean_interval([value[s] for s in seeds], confidence), baselines, first.split,
                    first.better, differences)



def headline_over_seeds(metric: str, value: Mapping[Any, float], references: Mapping[str, Mapping[Any, float]],
                        trivial_rule: str, split: str, better: str = "higher",
                        confidence: float = CONFIDENCE) -> Headline:
    """`aggregate_seeds` from plain numbers: `value` maps a seed to the headline metric, `references`
    maps "chance", "untrained", "trivial" and any other reference point to its value per seed (the
    same seeds); `trivial_rule` names the trivial rule."""
    names = ("chance", "untrained", "trivial")
    missing = [n for n in names if n not in references]
    if missing:
        raise ValueError(f"headline_over_seeds: references need {', '.join(names)}; missing {', '.join(missing)}")
    per_seed = {s: Headline.of(metric, value[s], Baselines.of(*(references[n][s] for n in names), trivial_rule,
                                                             **{k: v[s] for k, v in references.items() if k not in names}),
                               split, better) for s in value}
    return aggregate_seeds(per_seed, confidence)

# --- tables ------------------------------------------------------------------------------------

def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of cells as a markdown table; `columns` picks and orders them (default: the first row's keys).
    Estimates print as `0.91 ± 0.03 (n=5)`; a `|` inside a cell is escaped."""
    if not rows:
        raise ValueError("markdown_table: expected at least one row, got none")
    columns = list(columns or rows[0].keys())
    cell = lambda v: (v.format() if isinstance(v, Estimate) else "" if v is None else str(v)).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --- dev / test splits -------------------------------------------------------------------------

T = TypeVar("T")


def item_key(item: Any) -> str:
    """A stable text key for an evaluation item: strings as they are, anything else as sorted JSON."""
    return item if isinstance(item, str) else json.dumps(item, sort_keys=True, default=str)


def split_of(key: str, dev_fraction: float = 0.5, seed: int = 0) -> str:
    """'dev' or 'test' for one item key, from a SHA-256 hash of (seed, key): the same in every
    process and machine (Python's hash() is salted per process, so it is not used)."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction: expected a value in (0, 1), got {dev_fraction}")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return "dev" if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else "test"


def assign_splits(items: Iterable[T], key: Callable[[T], str] = item_key, dev_fraction: float = 0.5,
                  seed: int = 0) -> dict[str, list[T]]:
    """Items into {'dev': [...], 'test': [...]}, each keeping the items' order."""
    out: dict[str, list[T]] = {name: [] for name in SPLITS}
    for item in items:
        out[split_of(key(item), dev_fraction, seed)].append(item)
    return out


def take_split(items: Iterable[T], split: str, key: Callable[[T], str] = item_key, dev_fraction: float = 0.5,
               seed: int = 0) -> list[T]:
    """The items of one split ('dev' or 'test')."""
    if split not in SPLITS:
        raise ValueError(f"split: expected 'dev' or 'test', got {split!r}")
    return assign_splits(items, key, dev_fraction, seed)[split]
