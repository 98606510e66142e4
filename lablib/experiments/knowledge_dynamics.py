"""The knowledge-dynamics experiment (notebooks/05_knowledge_dynamics.ipynb): how a model acquires and
forgets facts during pretraining (Chang et al. 2024), at laptop scale, with a null for every measure.

Notable here:
- `KnowledgeConfig` is notebook 05's flat config. Background text is filler biographies of
  a fictional world's background people (`lablib.tasks.facts`); the facts to inject are the
  biographies of new people who never occur in it. `seeds` runs the whole experiment (world,
  initialisation, data order) once per seed.
- `injection_schedule` places each fact under one of three scenarios: `once` (one exposure),
  `duplicated` (the same text several times) and `paraphrased` (a different wording each time).
  Facts are staggered one step apart so a batch holds few of them. `InjectionStream` is a
  `BatchSource`: ordinary background micro-batches whose first rows, at the scheduled steps,
  start with the injected text.
- The null: every injected fact `injected/<scenario>/<i>` has a control twin
  `control/<scenario>/<i>`, another new person from the same generator who is never injected.
  `pseudo_schedule` gives the twin the injected fact's exposure steps, and every measure below is
  computed for both arms in exactly the same way, so each effect is injected minus control.
- `probe_callback` scores every probe (memorization, semantic, compositional) of every fact of
  both arms, every step around the exposures and every `probe_every` steps elsewhere
  (`probe_steps`), into metrics.jsonl through `train`'s callbacks.
- Measures (the paper's): acquisition (effectivity: log p at the local acquisition maximum
  within `lam_window` steps after an exposure minus log p just before the first exposure, after
  the first and after the last exposure) and retention (the gain still held t steps after the
  last maximum, in nats, mean over the last fifth of the horizon). `FIT_FORMS` is the table of
  forgetting curves fitted to the log-binned mean retention curve of each arm and of their
  difference: power law a·t^(-b), log-linear a - b·ln t, exponential a·e^(-b·t), each fitted by
  least squares with its R² on the fitted points.
- `summarise_seed` turns one seed's runs into per-fact measures and the fits of every cell
  (batch size x split x arm x scenario x probe kind x fit form); `aggregate` makes mean and 95%
  t intervals over seeds and the paired injected-minus-control differences (`lablib.evidence`).
  Facts are split into dev and test by `lablib.evidence.split_of` on their index, twins together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import TokenBlocks, Tokenizer
from lablib.evidence import Baselines, Headline, aggregate_seeds, mean_interval, paired_difference, split_of
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.seeding import seeded_transformer
from lablib.tasks.facts import (N_TRAIN_TEMPLATES, PROBE_KINDS, Probe, World, background_documents, biography,
                                make_world, probes_for, target_logprobs, word_tokenizer, world_texts)
from lablib.train import TrainResult, train

SCENARIOS = ("once", "duplicated", "paraphrased")
ARMS = ("injected", "control")  # control: never-injected twins scored at the injected facts' exposure steps
EFFECT = "effect"  # injected minus control: the arm under which the difference curve's fits are filed
MEASURES = ("acquisition_first", "acquisition_total", "retained")
HEADLINE_KIND = "memorization"  # the probe kind of the headline, fixed before any run
TRIVIAL_RULE = "never-injected control facts at the pseudo-exposure steps"


@dataclass
class KnowledgeConfig(ModelConfig, TrainConfig):
    seeds: list[int] = knob([0, 1, 2], "one world, initialisation and data order per seed")
    n_background: int = knob(200, "background people whose biographies are the ordinary training text", min=1)
    facts_per_scenario: int = knob(8, "new people injected under each scenario (as many again are their controls)", min=1)
    renders_per_person: int = knob(10, "biographies of each background person in the background text", min=1)
    injection_step: int = knob(300, "step of the first injection (the model first learns the background)", min=1)
    exposures: int = knob(5, "exposures of each fact under 'duplicated' and 'paraphrased'", min=1)
    exposure_gap: int = knob(40, "steps between two exposures of the same fact", min=1)
    probe_every: int = knob(5, "steps between probe evaluations away from the exposures", min=1)
    dense_probe_steps: int = knob(30, "steps after the last exposure's window still probed every step", min=0)
    lam_window: int = knob(10, "steps after an exposure searched for the local acquisition maximum", min=1)
    retention_bins: int = knob(12, "log-spaced bins of t in which retention curves are averaged before fitting", min=3)
    batch_sizes: list[int] = knob([8, 32], "one training run per batch size (the paper's batch-size comparison)")

    presets: ClassVar[dict] = {
        "smoke": dict(seeds=[0, 1], n_background=20, facts_per_scenario=2, renders_per_person=2, injection_step=10,
                      exposures=2, exposure_gap=6, probe_every=2, dense_probe_steps=4, steps=40, n_layer=2, n_head=2,
                      d_model=32, seq_len=64, max_seq_len=64, batch_sizes=[8, 16], warmup_steps=5, lam_window=3,
                      retention_bins=6, log_every=10, checkpoint_every=20, num_threads=1),
        # 3 seeds x 2 batch sizes of 800 steps: about 15-20 minutes on one core (docs/LOG.md)
        "cpu": dict(seeds=[0, 1, 2], n_background=200, facts_per_scenario=8, renders_per_person=10, injection_step=300,
                    exposures=5, exposure_gap=40, probe_every=5, dense_probe_steps=30, steps=800, n_layer=4, n_head=4,
                    d_model=128, seq_len=64, max_seq_len=64, batch_sizes=[8, 32], learning_rate=2e-3, warmup_steps=50,
                    schedule="constant", weight_decay=0.1, log_every=10, checkpoint_every=100,
                    num_threads=1),  # a model this small runs fastest on one thread, above all on a busy machine
        "gpu": dict(seeds=[0, 1, 2, 3, 4], n_background=2000, facts_per_scenario=32, renders_per_person=20,
                    injection_step=2000, exposures=10, exposure_gap=100, probe_every=10, dense_probe_steps=100,
                    steps=6000, n_layer=8, n_head=8, d_model=512, seq_len=128, max_seq_len=128, batch_sizes=[32, 256],
                    learning_rate=6e-4, warmup_steps=200, schedule="constant", log_every=20, checkpoint_every=500),
    }

    def validate(self) -> None:
        super().validate()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"parameter 'seeds': expected distinct non-negative seeds, got {self.seeds}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"parameter 'batch_sizes': expected a non-empty list of positive integers, got {self.batch_sizes}")
        last = self.injection_step + len(SCENARIOS) * self.facts_per_scenario + (self.exposures - 1) * self.exposure_gap
        if last + self.lam_window + 3 >= self.steps:
            raise ConfigError(f"parameter 'steps': expected more than {last + self.lam_window + 3} so every exposure is "
                              f"followed by {self.lam_window} steps and some retention, got {self.steps}")
        if self.lam_window >= self.exposure_gap and self.exposures > 1:
            raise ConfigError(f"parameter 'lam_window': expected less than exposure_gap={self.exposure_gap}, "
                              f"got {self.lam_window}")


# --- facts, the injection schedule and the data stream --------------------------------------------

def fact_id(arm: str, scenario: str, index: int) -> str:
    return f"{arm}/{scenario}/{index}"


def parse_fact(fact: str) -> tuple[str, str, int]:
    """(arm, scenario, index) of a fact id `<arm>/<scenario>/<index>`."""
    arm, scenario, index = fact.split("/")
    return arm, scenario, int(index)


def twin(fact: str) -> str:
    """The other arm's fact of the same scenario and index: an injected fact's control, and back."""
    arm, scenario, index = parse_fact(fact)
    return fact_id(ARMS[1 - ARMS.index(arm)], scenario, index)


def fact_split(index: int) -> str:
    """'dev' or 'test' for fact index `index` (all scenarios and both arms of an index go together)."""
    return split_of(f"fact-{index}")


@dataclass(frozen=True)
class Injection:
    step: int  # the optimizer step whose batch carries the fact
    fact: str  # "<arm>/<scenario>/<index>"
    exposure: int  # 0 for the first exposure of the fact
    template: int  # which training paraphrase renders it


def injection_schedule(scenarios: Sequence[str], facts_per_scenario: int, first_step: int, exposures: int,
                       gap: int) -> list[Injection]:
    """Fact j of all injected facts (scenarios interleaved) first appears at first_step + j; repeated
    exposures follow every `gap` steps. `paraphrased` cycles through the training templates, the
    others keep template 0."""
    out = []
    facts = [(s, i) for i in range(facts_per_scenario) for s in scenarios]
    for j, (scenario, i) in enumerate(facts):
        n = 1 if scenario == "once" else exposures
        for k in range(n):
            template = k % N_TRAIN_TEMPLATES if scenario == "paraphrased" else 0
            out.append(Injection(first_step + j + k * gap, fact_id("injected", scenario, i), k, template))
    return sorted(out, key=lambda inj: (inj.step, inj.fact))


def pseudo_schedule(schedule: Sequence[Injection]) -> list[Injection]:
    """The control twins' pseudo-exposures: each injected fact's exposures, at the same steps, for its
    never-injected twin (never part of any training batch; only the measures read them)."""
    return [dataclasses.replace(inj, fact=twin(inj.fact)) for inj in schedule]


def probe_steps(schedule: Sequence[Injection], steps: int, probe_every: int, lam_window: int,
                dense_after: int) -> list[int]:
    """Steps at which probes are scored: every step from the first exposure to `dense_after` steps past
    the last exposure's window (so each acquisition maximum and the early retention are seen step by
    step), every `probe_every` steps elsewhere, and the last step."""
    first = min(inj.step for inj in schedule)
    last = max(inj.step for inj in schedule)
    dense = range(first, min(steps, last + 1 + lam_window + dense_after) + 1)
    return sorted(set(dense) | set(range(0, steps + 1, probe_every)) | {steps})


@dataclass
class InjectionStream:
    """Background micro-batches with the scheduled facts written over the start of their first rows.

    An injected row is `<eos> biography <eos>` followed by the background text it replaced, so every
    row keeps its length. With gradient accumulation the facts go in the step's first micro-batch.
    """

    background: TokenBlocks
    injections: Sequence[Injection]
    fact_ids: dict[tuple[str, int], list[int]]  # (fact, template) -> token ids of the injected text
    eos_id: int
    micro_batches_per_step: int = 1

    def __post_init__(self):
        self.by_step: dict[int, list[Injection]] = {}
        for inj in self.injections:
            self.by_step.setdefault(inj.step, []).append(inj)
        row_len = self.background.blocks.shape[1]
        for key, ids in self.fact_ids.items():
            if len(ids) + 2 > row_len:
                raise ValueError(f"fact {key}: {len(ids) + 2} tokens do not fit a row of {row_len}; raise seq_len")

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        tokens = self.background.batch(index, batch_size, seed)["tokens"].clone()
        step, micro = divmod(index, self.micro_batches_per_step)
        due = self.by_step.get(step, []) if micro == 0 else []
        if len(due) > batch_size:
            raise ValueError(f"step {step}: {len(due)} injected facts do not fit a micro-batch of {batch_size} rows")
        for row, inj in enumerate(due):
            ids = [self.eos_id] + self.fact_ids[(inj.fact, inj.template)] + [self.eos_id]
            tokens[row, :len(ids)] = torch.tensor(ids)
        return {"tokens": tokens}


# --- probes ---------------------------------------------------------------------------------------

def probe_key(fact: str, kind: str) -> str:
    return f"probe/{fact}/{kind}"


def probe_callback(probes: dict[str, list[Probe]], tokenizer: Tokenizer, steps: Sequence[int] | None = None):
    """fn(step, model) -> {probe/<fact>/<kind>: mean log p(target)} over every probe of every fact,
    at `steps` only (None: whenever called)."""
    flat = [(fact, p) for fact, ps in probes.items() for p in ps]
    wanted = None if steps is None else set(steps)

    def fn(step: int, model: torch.nn.Module) -> dict[str, float]:
        if wanted is not None and step not in wanted:
            return {}
        return _mean_by_key(flat, target_logprobs(model, tokenizer, [p for _, p in flat]))

    return fn


def _mean_by_key(flat: Sequence[tuple[str, Probe]], scores: Sequence[float]) -> dict[str, float]:
    sums: dict[str, list[float]] = {}
    for (fact, p), s in zip(flat, scores):
        sums.setdefault(probe_key(fact, p.kind), []).append(float(s))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def uniform_scores(probes: dict[str, list[Probe]], tokenizer: Tokenizer) -> dict[str, float]:
    """What probe_callback logs for a model that guesses uniformly over the vocabulary (chance)."""
    flat = [(fact, p) for fact, ps in probes.items() for p in ps]
    per_token = -np.log(tokenizer.vocab_size)
    return _mean_by_key(flat, [per_token * len(tokenizer.encode(p.target)) for _, p in flat])


def probe_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Long table (step, fact, arm, scenario, index, split, kind, logprob) from a run's metrics."""
    cols = [c for c in metrics.columns if c.startswith("probe/")]
    rows = metrics.dropna(subset=cols[:1])[["step", *cols]].drop_duplicates("step", keep="last")
    long = rows.melt(id_vars="step", var_name="key", value_name="logprob")
    parts = long["key"].str.split("/", expand=True)
    long["fact"] = parts[1] + "/" + parts[2] + "/" + parts[3]
    long["arm"], long["scenario"], long["index"], long["kind"] = parts[1], parts[2], parts[3].astype(int), parts[4]
    long["split"] = long["index"].map(fact_split)
    long["step"] = long["step"].astype(int)
    return long.drop(columns="key").sort_values(["fact", "kind", "step"]).reset_index(drop=True)


def flat_curves(scores: Mapping[str, float], steps: Sequence[int]) -> pd.DataFrame:
    """The curve table of a model that never changes: `scores` (probe key -> value) at every step."""
    return probe_curves(pd.DataFrame([{"step": s, **scores} for s in steps]))


# --- measures -------------------------------------------------------------------------------------

def acquisition(steps: np.ndarray, logprob: np.ndarray, exposure_step: int, window: int,
                baseline_step: int | None = None) -> dict[str, float]:
    """Effectivity of one exposure: log p at the local acquisition maximum (the best value within
    `window` steps after the exposure's update) minus log p before it (at `baseline_step`, default
    the exposure step, i.e. just before its update)."""
    baseline_step = exposure_step if baseline_step is None else baseline_step
    before = logprob[steps <= baseline_step][-1]
    after = (steps > exposure_step) & (steps <= exposure_step + 1 + window)
    lam = int(np.argmax(np.where(after, logprob, -np.inf)))
    return {"before": float(before), "lam_step": int(steps[lam]), "at_lam": float(logprob[lam]),
            "effectivity": float(logprob[lam] - before)}


def exposure_steps(schedule: Sequence[Injection]) -> dict[str, tuple[int, int]]:
    """fact -> (first, last) exposure step."""
    out: dict[str, tuple[int, int]] = {}
    for inj in schedule:
        first, last = out.get(inj.fact, (inj.step, inj.step))
        out[inj.fact] = (min(first, inj.step), max(last, inj.step))
    return out


def fact_measures(curves: pd.DataFrame, schedule: Sequence[Injection], window: int) -> pd.DataFrame:
    """One row per (fact, kind), injected and control alike: acquisition after the first and after the
    last (pseudo-)exposure, both from the value just before the first, and where retention starts.
    `schedule` must hold every fact's exposures: the injections and their `pseudo_schedule`."""
    when = exposure_steps(schedule)
    rows = []
    for (fact, kind), g in curves.groupby(["fact", "kind"]):
        if fact not in when:
            raise ValueError(f"fact {fact}: not in the schedule; pass the injections plus pseudo_schedule(injections)")
        first, last = when[fact]
        steps, lp = g["step"].to_numpy(), g["logprob"].to_numpy()
        a_first = acquisition(steps, lp, first, window)
        a_last = acquisition(steps, lp, last, window, baseline_step=first)
        arm, scenario, index = parse_fact(fact)
        rows.append({"fact": fact, "arm": arm, "scenario": scenario, "index": index, "split": fact_split(index),
                     "kind": kind, "acquisition_first": a_first["effectivity"],
                     "acquisition_total": a_last["effectivity"], "before": a_first["before"],
                     "lam_step": a_last["lam_step"], "at_lam": a_last["at_lam"]})
    return pd.DataFrame(rows)


def retention_table(curves: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """Long table (fact, arm, scenario, index, split, kind, t, gain): log p t >= 1 steps after each fact's
    last local acquisition maximum minus log p before its first exposure (nats still held)."""
    parts = []
    by_key = {key: g for key, g in curves.groupby(["fact", "kind"])}
    for m in measures.itertuples():
        g = by_key[(m.fact, m.kind)]
        later = g["step"].to_numpy() > m.lam_step
        parts.append(pd.DataFrame({"fact": m.fact, "arm": m.arm, "scenario": m.scenario, "index": m.index,
                                   "split": m.split, "kind": m.kind, "t": g["step"].to_numpy()[later] - m.lam_step,
                                   "gain": g["logprob"].to_numpy()[later] - m.before}))
    return pd.concat(parts, ignore_index=True)


def common_horizon(retention: pd.DataFrame) -> int:
    """The largest t every fact's retention curve reaches."""
    return int(retention.groupby(["fact", "kind"])["t"].max().min())


def add_retained(measures: pd.DataFrame, retention: pd.DataFrame, horizon: int) -> pd.DataFrame:
    """`retained`: the mean gain still held over the last fifth of the horizon (0.8 h < t <= h)."""
    late = retention[(retention["t"] > 0.8 * horizon) & (retention["t"] <= horizon)]
    held = late.groupby(["fact", "kind"])["gain"].mean().rename("retained")
    return measures.join(held, on=["fact", "kind"])


def log_bin_edges(horizon: int, n_bins: int) -> np.ndarray:
    """Integer edges of up to `n_bins` log-spaced bins covering t = 1..horizon."""
    return np.unique(np.round(np.logspace(0, np.log10(horizon + 1), n_bins + 1)).astype(int))


def log_binned(t: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of y in `n_bins` log-spaced bins of t, placed at each bin's geometric-mean t.

    A per-step curve has ten times more points in the last decade than in the first; binning on a
    log scale weighs every decade of the decay alike, as the paper's log-scale plots do."""
    which = np.digitize(t, log_bin_edges(int(t.max()), n_bins))
    kept = np.unique(which)
    centres = np.array([np.exp(np.log(t[which == b]).mean()) for b in kept])
    return centres, np.array([y[which == b].mean() for b in kept])


def binned_curves(retention: pd.DataFrame, horizon: int, n_bins: int) -> pd.DataFrame:
    """Mean retention curves in log-spaced bins of t (t <= horizon), per (split, arm, scenario, kind),
    plus the `effect` arm (injected minus control, bin by bin). Each fact is averaged within a bin
    first, so every fact weighs alike whichever steps were probed; a bin sits at the geometric mean
    of its facts' t."""
    r = retention[retention["t"] <= horizon].copy()
    r["bin"] = np.digitize(r["t"], log_bin_edges(horizon, n_bins))
    r["log_t"] = np.log(r["t"])
    keys = ["split", "arm", "scenario", "kind"]
    per_fact = r.groupby([*keys, "fact", "bin"], as_index=False)[["log_t", "gain"]].mean()
    mean = per_fact.groupby([*keys, "bin"], as_index=False)[["log_t", "gain"]].mean()
    parts = [mean]
    if set(ARMS) <= set(mean["arm"]):
        wide = mean.pivot_table(index=["split", "scenario", "kind", "bin"], columns="arm", values=["log_t", "gain"])
        wide = wide.dropna()
        effect = pd.DataFrame({"log_t": (wide[("log_t", "injected")] + wide[("log_t", "control")]) / 2,
                               "gain": wide[("gain", "injected")] - wide[("gain", "control")]}).reset_index()
        parts.append(effect.assign(arm=EFFECT))
    out = pd.concat(parts, ignore_index=True)
    out["t"] = np.exp(out.pop("log_t"))
    return out.sort_values([*keys, "bin"]).reset_index(drop=True)[[*keys, "bin", "t", "gain"]]


# --- forgetting curves ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FitForm:
    formula: str
    curve: Callable[[np.ndarray, float, float], np.ndarray]  # (t, a, b) -> y
    basis: Callable[[np.ndarray, float], np.ndarray] | None  # y = a * basis(t, b); None: linear in a and b
    b_range: tuple[float, float] = (0.0, 0.0)  # where b is searched (profile least squares)


FIT_FORMS: dict[str, FitForm] = {
    "power law": FitForm("a·t^(-b)", lambda t, a, b: a * np.power(t, -b), lambda t, b: np.power(t, -b), (-3.0, 3.0)),
    "log-linear": FitForm("a - b·ln t", lambda t, a, b: a - b * np.log(t), None),
    "exponential": FitForm("a·e^(-b·t)", lambda t, a, b: a * np.exp(-b * t), lambda t, b: np.exp(-b * t), (0.0, 1.0)),
}


@dataclass(frozen=True)
class Fit:
    form: str
    a: float
    b: float  # the power law's exponent, the log-linear loss per e-fold of t, the exponential's rate per step
    r2: float  # on the fitted points
    n_points: int

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return FIT_FORMS[self.form].curve(np.asarray(t, dtype=float), self.a, self.b)


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    """1 - residual sum of squares / total sum of squares (1.0 for a constant curve fitted exactly)."""
    residual = float(((y - predicted) ** 2).sum())
    total = float(((y - y.mean()) ** 2).sum())
    return 1.0 - residual / total if total > 0 else float(residual == 0)


def fit_curve(form: str, t: np.ndarray, y: np.ndarray) -> Fit:
    """Least-squares fit of one of FIT_FORMS to (t, y), t >= 1, with its R² on the fitted points.

    The log-linear form is an ordinary regression on ln t; the others are linear in a for a given b,
    so a is solved exactly and b found by a grid over `b_range` refined by a bounded 1-D search
    (no starting guess, no failure to converge)."""
    from scipy.optimize import minimize_scalar

    if form not in FIT_FORMS:
        raise ValueError(f"form: expected one of {', '.join(FIT_FORMS)}, got {form!r}")
    spec = FIT_FORMS[form]
    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(y) & (t >= 1)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        raise ValueError(f"fit_curve: expected at least 3 finite points with t >= 1, got {len(t)}")
    if spec.basis is None:
        slope, intercept = np.polyfit(np.log(t), y, 1)
        a, b = float(intercept), float(-slope)
    else:
        def sse(b: float) -> float:
            g = spec.basis(t, b)
            gg = float(g @ g)
            return float(y @ y - (g @ y) ** 2 / gg) if gg > 0 else float(y @ y)

        grid = np.linspace(*spec.b_range, 121)
        k = int(np.argmin([sse(b) for b in grid]))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        b = float(minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}).x)
        b = b if sse(b) <= sse(grid[k]) else float(grid[k])
        g = spec.basis(t, b)
        a = float(g @ y / (g @ g)) if g @ g > 0 else 0.0
    return Fit(form, a, b, r_squared(y, spec.curve(t, a, b)), len(t))


def fit_table(binned: pd.DataFrame) -> pd.DataFrame:
    """Every fit form on every binned curve: one row per (split, arm, scenario, kind, form) with a, b, R²."""
    rows = []
    for (split, arm, scenario, kind), g in binned.groupby(["split", "arm", "scenario", "kind"]):
        if len(g) < 3:
            continue
        for form in FIT_FORMS:
            fit = fit_curve(form, g["t"].to_numpy(), g["gain"].to_numpy())
            rows.append({"split": split, "arm": arm, "scenario": scenario, "kind": kind, "form": form,
                         "a": fit.a, "b": fit.b, "r2": fit.r2, "n_points": fit.n_points})
    return pd.DataFrame(rows)


# --- one seed, then over seeds --------------------------------------------------------------------

@dataclass
class SeedTables:
    measures: pd.DataFrame  # one row per (batch_size, fact, kind)
    binned: pd.DataFrame  # binned mean retention curves per (batch_size, split, arm, scenario, kind)
    fits: pd.DataFrame  # one row per (batch_size, split, arm, scenario, kind, form)
    horizon: int


def summarise_seed(curves: Mapping[int, pd.DataFrame], schedule: Sequence[Injection], window: int,
                   n_bins: int) -> SeedTables:
    """Measures, binned retention curves and fits of one seed's runs (batch size -> curve table), over
    a retention horizon that every fact of every batch size reaches."""
    full = [*schedule, *pseudo_schedule(schedule)]
    measures = {bs: fact_measures(c, full, window) for bs, c in curves.items()}
    retention = {bs: retention_table(curves[bs], measures[bs]) for bs in curves}
    horizon = min(common_horizon(r) for r in retention.values())
    measures = {bs: add_retained(m, retention[bs], horizon) for bs, m in measures.items()}
    binned = {bs: binned_curves(r, horizon, n_bins) for bs, r in retention.items()}
    return SeedTables(pd.concat([m.assign(batch_size=bs) for bs, m in measures.items()], ignore_index=True),
                      pd.concat([b.assign(batch_size=bs) for bs, b in binned.items()], ignore_index=True),
                      pd.concat([fit_table(b).assign(batch_size=bs) for bs, b in binned.items()], ignore_index=True),
                      horizon)


def measure_means(measures: pd.DataFrame) -> pd.DataFrame:
    """Mean of each measure over the facts of each (batch_size, split, arm, scenario, kind)."""
    return measures.groupby(["batch_size", "split", "arm", "scenario", "kind"], as_index=False)[list(MEASURES)].mean()


def _estimate(values: Mapping[Any, float]) -> dict[str, Any]:
    return {**mean_interval([values[s] for s in sorted(values)]).to_dict(), "values": {str(s): values[s] for s in sorted(values)}}


def _paired(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any]:
    shared = sorted(set(a) & set(b))
    return {**paired_difference({s: a[s] for s in shared}, {s: b[s] for s in shared}).to_dict(),
            "values": {str(s): a[s] - b[s] for s in shared}}


def measure_cells(per_seed: Mapping[int, SeedTables]) -> list[dict[str, Any]]:
    """Every (batch_size, split, scenario, kind, measure): injected and control over seeds (mean, 95% t
    interval) and their paired difference (the effect), with each seed's value."""
    long = pd.concat([measure_means(t.measures).assign(seed=s) for s, t in per_seed.items()], ignore_index=True)
    rows = []
    for (bs, split, scenario, kind), g in long.groupby(["batch_size", "split", "scenario", "kind"]):
        for measure in MEASURES:
            arm = {a: dict(zip(ga["seed"], ga[measure].astype(float))) for a, ga in g.groupby("arm")}
            if set(arm) != set(ARMS):
                continue
            rows.append({"batch_size": int(bs), "split": split, "scenario": scenario, "kind": kind, "measure": measure,
                         "injected": _estimate(arm["injected"]), "control": _estimate(arm["control"]),
                         "effect": _paired(arm["injected"], arm["control"])})
    return rows


def fit_cells(per_seed: Mapping[int, SeedTables], parameters_on: Sequence[str] = ("test",)) -> list[dict[str, Any]]:
    """Every (batch_size, split, arm, scenario, kind, form): R² over seeds, and a and b on the splits in
    `parameters_on` (dev only chooses a form by its R²); for the injected and effect arms also R² minus
    the control arm's R² of the same cell (paired over seeds)."""
    long = pd.concat([t.fits.assign(seed=s) for s, t in per_seed.items()], ignore_index=True)
    keys = ["batch_size", "split", "scenario", "kind", "form"]
    control_r2 = {k: dict(zip(g["seed"], g["r2"])) for k, g in long[long["arm"] == "control"].groupby(keys)}
    rows = []
    for (bs, split, arm, scenario, kind, form), g in long.groupby(["batch_size", "split", "arm", "scenario", "kind", "form"]):
        row = {"batch_size": int(bs), "split": split, "arm": arm, "scenario": scenario, "kind": kind, "form": form,
               "formula": FIT_FORMS[form].formula,
               **{name: _estimate(dict(zip(g["seed"], g[name].astype(float))))
                  for name in ("r2", "a", "b") if name == "r2" or split in parameters_on}}
        null = control_r2.get((bs, split, scenario, kind, form))
        if arm != "control" and null:
            row["r2_minus_control"] = _paired(dict(zip(g["seed"], g["r2"].astype(float))), null)
        rows.append(row)
    return rows


def best_form_on_dev(fits: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The fit form with the highest mean R² over the dev split's effect curves (every scenario, kind and
    batch size): the one choice this experiment makes on dev."""
    scores = {form: float(np.mean([f["r2"]["mean"] for f in fits
                                   if f["form"] == form and f["split"] == "dev" and f["arm"] == EFFECT]))
              for form in FIT_FORMS}
    best = max(scores, key=scores.get)
    return {"form": best, "formula": FIT_FORMS[best].formula, "mean_r2_dev": scores}


def headline_per_seed(tables: SeedTables, untrained: SeedTables, chance: SeedTables, batch_size: int) -> Headline:
    """One seed's headline: first-exposure acquisition of the injected facts' memorization probes on the
    test split at `batch_size`, beside chance (uniform guessing), the untrained model (step 0, never
    updated) and the trivial rule: the same measure on the never-injected control twins."""
    def mean(t: SeedTables, arm: str) -> float:
        m = t.measures
        sel = m[(m["batch_size"] == batch_size) & (m["split"] == "test") & (m["arm"] == arm) & (m["kind"] == HEADLINE_KIND)]
        if sel.empty:
            raise ValueError(f"headline: no {arm} facts on the test split at batch size {batch_size}")
        return float(sel["acquisition_first"].mean())

    return Headline.of(f"first-exposure acquisition, {HEADLINE_KIND} probes, batch {batch_size} (nats)",
                       mean(tables, "injected"),
                       Baselines.of(mean(chance, "injected"), mean(untrained, "injected"), mean(tables, "control"),
                                    TRIVIAL_RULE),
                       split="test")


def headline_over_seeds(per_seed: Mapping[int, Headline]) -> Headline:
    return aggregate_seeds({str(s): h for s, h in per_seed.items()})


# --- the paper's claims, read off the cells -------------------------------------------------------

def verdict(estimate: Mapping[str, Any], expected_sign: int) -> str:
    """'agrees' when the interval excludes 0 on the paper's side, 'disagrees' when on the other side,
    'not resolved' when it covers 0 (or there is no interval)."""
    low, high = estimate.get("low"), estimate.get("high")
    if low is None or high is None:
        return "not resolved"
    if (low > 0 and expected_sign > 0) or (high < 0 and expected_sign < 0):
        return "agrees"
    if (low > 0 and expected_sign < 0) or (high < 0 and expected_sign > 0):
        return "disagrees"
    return "not resolved"


def _values(cells: Sequence[Mapping[str, Any]], key: str, **where: Any) -> dict[str, float]:
    """Per-seed values of `key` of the one cell matching `where`."""
    found = [c for c in cells if all(c.get(k) == v for k, v in where.items())]
    if len(found) != 1:
        raise ValueError(f"expected one cell for {where}, found {len(found)}")
    return {s: float(v) for s, v in found[0][key]["values"].items()}


def _mean_over(dicts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    seeds = sorted(set.intersection(*(set(d) for d in dicts)))
    return {s: float(np.mean([d[s] for d in dicts])) for s in seeds}


def paper_comparisons(measures: Sequence[Mapping[str, Any]], fits: Sequence[Mapping[str, Any]],
                      batch_sizes: Sequence[int], split: str = "test", kind: str = HEADLINE_KIND) -> list[dict[str, Any]]:
    """Chang et al.'s findings as paired quantities over seeds on `split`, each with its verdict."""
    small, large = batch_sizes[0], batch_sizes[-1]
    effect = lambda measure, scenario, bs: _values(measures, "effect", batch_size=bs, split=split,  # noqa: E731
                                                    scenario=scenario, kind=kind, measure=measure)
    fit = lambda key, scenario, bs, form="power law": _values(fits, key, batch_size=bs, split=split, arm=EFFECT,  # noqa: E731
                                                               scenario=scenario, kind=kind, form=form)
    out = []

    def claim(name: str, paper: str, quantity: str, est: dict[str, Any], sign: int) -> None:
        out.append({"claim": name, "paper": paper, "quantity": quantity, "estimate": est, "expected_sign": sign,
                    "verdict": verdict(est, sign)})

    first = _mean_over([effect("acquisition_first", s, small) for s in SCENARIOS])
    claim("one exposure raises the fact's log-probability", "each exposure gives a small increase",
          f"first-exposure acquisition, injected minus control (all scenarios, batch {small})",
          _paired(first, {s: 0.0 for s in first}), +1)
    for scenario in ("duplicated", "paraphrased"):
        total, once = effect("acquisition_total", scenario, small), effect("acquisition_first", scenario, small)
        claim(f"acquisition accumulates over exposures ({scenario})", "the increases accumulate over exposures",
              f"effect after the last exposure minus after the first ({scenario}, batch {small})", _paired(total, once), +1)
    decays = _mean_over([{s: v for s, v in fit("b", sc, bs).items()} for sc in SCENARIOS for bs in batch_sizes])
    claim("the retained gain decays with t", "forgetting follows a power law in steps",
          "power-law exponent b of the effect curve (mean over scenarios and batch sizes)",
          _paired(decays, {s: 0.0 for s in decays}), +1)
    power = _mean_over([fit("r2", sc, bs) for sc in SCENARIOS for bs in batch_sizes])
    expo = _mean_over([fit("r2", sc, bs, "exponential") for sc in SCENARIOS for bs in batch_sizes])
    claim("a power law describes forgetting better than an exponential", "forgetting follows a power law in steps",
          "R² of the power law minus R² of the exponential (effect curves, mean over scenarios and batch sizes)",
          _paired(power, expo), +1)
    dup = _mean_over([fit("b", "duplicated", bs) for bs in batch_sizes])
    par = _mean_over([fit("b", "paraphrased", bs) for bs in batch_sizes])
    claim("duplicated facts are forgotten faster than paraphrased ones", "duplication forgets faster",
          "power-law exponent b, duplicated minus paraphrased (mean over batch sizes)", _paired(dup, par), +1)
    if large != small:
        b_large = _mean_over([fit("b", sc, large) for sc in SCENARIOS])
        b_small = _mean_over([fit("b", sc, small) for sc in SCENARIOS])
        claim("larger batches forget more slowly", "larger batches are more robust to forgetting",
              f"power-law exponent b, batch {large} minus batch {small} (mean over scenarios)", _paired(b_large, b_small), -1)
    return out


# --- the experiment -------------------------------------------------------------------------------

@dataclass
class KnowledgeSetup:
    world: World
    tokenizer: Tokenizer
    background: TokenBlocks
    schedule: list[Injection]  # the injected facts' exposures (the controls' are pseudo_schedule(schedule))
    facts: dict[str, Any]  # "<arm>/<scenario>/<i>" -> Person
    probes: dict[str, list[Probe]]
    fact_ids: dict[tuple[str, int], list[int]]
    probe_steps: list[int]


def build_setup(cfg: KnowledgeConfig) -> KnowledgeSetup:
    """The world of seed cfg.seed, its tokenizer, the packed background text, the schedule and every probe."""
    world = make_world(cfg.n_background, len(ARMS) * len(SCENARIOS) * cfg.facts_per_scenario, seed=cfg.seed)
    tokenizer = word_tokenizer(world_texts(world))
    docs = background_documents(world, cfg.renders_per_person, seed=cfg.seed)
    flat = [i for ids in tokenizer.encode_batch(docs) for i in ids + [tokenizer.eos_id]]
    n_rows = len(flat) // (cfg.seq_len + 1)
    if n_rows < max(cfg.batch_sizes):
        raise ConfigError(f"parameter 'renders_per_person': the background text makes {n_rows} rows, fewer than a "
                          f"batch of {max(cfg.batch_sizes)}; raise it or n_background")
    background = TokenBlocks(torch.tensor(flat[: n_rows * (cfg.seq_len + 1)]).view(n_rows, cfg.seq_len + 1))
    schedule = injection_schedule(SCENARIOS, cfg.facts_per_scenario, cfg.injection_step, cfg.exposures, cfg.exposure_gap)
    people = iter(world.new)
    facts = {fact_id(arm, s, i): next(people) for i in range(cfg.facts_per_scenario) for s in SCENARIOS for arm in ARMS}
    probes = {fact: probes_for(person, world, injected_template=0) for fact, person in facts.items()}
    fact_ids = {(inj.fact, inj.template): tokenizer.encode(biography(facts[inj.fact], inj.template)) for inj in schedule}
    steps = probe_steps(schedule, cfg.steps, cfg.probe_every, cfg.lam_window, cfg.dense_probe_steps)
    return KnowledgeSetup(world, tokenizer, background, schedule, facts, probes, fact_ids, steps)


def train_with_injections(cfg: KnowledgeConfig, setup: KnowledgeSetup, batch_size: int, run,
                          progress: bool = True) -> tuple[Transformer, TrainResult]:
    """One training run at `batch_size` (seed cfg.seed) with every fact injected on schedule and every
    fact of both arms probed at setup.probe_steps."""
    train_cfg = dataclasses.replace(cfg.project(TrainConfig), batch_size=batch_size)
    model = seeded_transformer(cfg, setup.tokenizer.vocab_size)
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id)
    if run is not None:
        setup.tokenizer.save(run.path / "tokenizer.json")
    result = train(model, CausalLM(), stream, train_cfg, run, progress=progress,
                   callbacks=[(1, probe_callback(setup.probes, setup.tokenizer, setup.probe_steps))])
    return model, result


def reference_tables(setup: KnowledgeSetup, cfg: KnowledgeConfig, step0: Mapping[int, Mapping[str, float]]
                     ) -> tuple[SeedTables, SeedTables]:
    """(untrained, chance): the measures of a model that never changes, from the step-0 scores of each
    batch size's run (`step0`: batch size -> probe key -> value) and from uniform guessing."""
    uniform = uniform_scores(setup.probes, setup.tokenizer)
    return tuple(summarise_seed({bs: flat_curves(scores_of(bs), setup.probe_steps) for bs in step0}, setup.schedule,
                                cfg.lam_window, cfg.retention_bins)
                 for scores_of in (lambda bs: step0[bs], lambda bs: uniform))


def compact(obj: Any, digits: int = 6) -> Any:
    """`obj` with every float rounded to `digits` significant digits (results.json stays small and readable)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: compact(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [compact(v, digits) for v in obj]
    return obj


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/05_knowledge_dynamics.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/05_knowledge_dynamics.ipynb", preset, parameters)
