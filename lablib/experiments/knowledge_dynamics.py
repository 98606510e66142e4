"""The knowledge-dynamics experiment (notebooks/05_knowledge_dynamics.ipynb): how a model acquires and
forgets facts during pretraining (Chang et al. 2024), at laptop scale.

Notable here:
- `KnowledgeConfig` is notebook 05's flat config. Background text is filler biographies of
  a fictional world's background people (`lablib.tasks.facts`); the facts to inject are the
  biographies of new people who never occur in it.
- `injection_schedule` places each fact in the training run under one of three scenarios:
  `once` (one exposure), `duplicated` (the same text several times) and `paraphrased`
  (a different wording each time). Facts are staggered one step apart so a batch holds
  few of them. `InjectionStream` is a `BatchSource`: ordinary background micro-batches
  whose first rows, at the scheduled steps, start with the injected text.
- `probe_callback` scores every probe of every injected fact (memorization, semantic,
  compositional) and logs their mean log-probabilities into metrics.jsonl through
  `train`'s callbacks, so each fact's spike and decay is a curve in the run.
- Control people are probed but never injected; `drift_corrected` subtracts their mean
  curve, removing the shift that continued background learning gives every probe.
- Measures from the paper: effectivity (the gain from before an exposure to the local
  acquisition maximum after it) and retainability (the fraction of that gain still held
  t steps later), and `fit_power_law`: R(t) = a * t^(-b) by `scipy.optimize.curve_fit`,
  returning the exponent b and R^2. `scenario_summary` fits the mean retention curve in
  log-spaced bins of t (every decade weighs alike) and also reports the per-step R^2.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import TokenBlocks, Tokenizer
from lablib.models import Transformer
from lablib.objectives import CausalLM
from lablib.seeding import seeded_transformer
from lablib.tasks.facts import (N_TRAIN_TEMPLATES, Probe, World, background_documents, biography,
                                make_world, probes_for, target_logprobs, word_tokenizer, world_texts)
from lablib.train import TrainResult, train

SCENARIOS = ("once", "duplicated", "paraphrased")
CONTROL = "control"  # new people who are probed but never injected: the drift every probe shares


@dataclass
class KnowledgeConfig(ModelConfig, TrainConfig):
    n_background: int = knob(200, "background people whose biographies are the ordinary training text", min=1)
    facts_per_scenario: int = knob(8, "new people injected under each scenario", min=1)
    renders_per_person: int = knob(10, "biographies of each background person in the background text", min=1)
    injection_step: int = knob(300, "step of the first injection (the model first learns the background)", min=0)
    exposures: int = knob(5, "exposures of each fact under 'duplicated' and 'paraphrased'", min=1)
    exposure_gap: int = knob(40, "steps between two exposures of the same fact", min=1)
    probe_every: int = knob(1, "steps between probe evaluations", min=1)
    lam_window: int = knob(10, "steps after an exposure searched for the local acquisition maximum", min=1)
    batch_sizes: list[int] = knob([8, 32], "one training run per batch size (the paper's batch-size comparison)")

    presets: ClassVar[dict] = {
        "smoke": dict(n_background=20, facts_per_scenario=2, renders_per_person=2, injection_step=10, exposures=2,
                      exposure_gap=6, steps=40, n_layer=2, n_head=2, d_model=32, seq_len=64, max_seq_len=64,
                      batch_sizes=[8, 16], warmup_steps=5, lam_window=3, log_every=10, checkpoint_every=20, num_threads=1),
        "cpu": dict(n_background=200, facts_per_scenario=8, renders_per_person=10, injection_step=300, exposures=5,
                    exposure_gap=40, steps=800, n_layer=4, n_head=4, d_model=128, seq_len=64, max_seq_len=64,
                    batch_sizes=[8, 32], learning_rate=2e-3, warmup_steps=50, schedule="constant",
                    weight_decay=0.1, log_every=10, checkpoint_every=100,
                    num_threads=1),  # a model this small runs fastest on one thread, above all on a busy machine
        "gpu": dict(n_background=2000, facts_per_scenario=32, renders_per_person=20, injection_step=2000, exposures=10,
                    exposure_gap=100, steps=6000, n_layer=8, n_head=8, d_model=512, seq_len=128, max_seq_len=128,
                    batch_sizes=[32, 256], learning_rate=6e-4, warmup_steps=200, schedule="constant",
                    log_every=20, checkpoint_every=500),
    }

    def validate(self) -> None:
        super().validate()
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError(f"parameter 'batch_sizes': expected a non-empty list of positive integers, got {self.batch_sizes}")
        last = self.injection_step + len(SCENARIOS) * self.facts_per_scenario + (self.exposures - 1) * self.exposure_gap
        if last + self.lam_window >= self.steps:
            raise ConfigError(f"parameter 'steps': expected more than {last + self.lam_window} so every exposure is "
                              f"followed by {self.lam_window} steps, got {self.steps}")
        if self.lam_window >= self.exposure_gap and self.exposures > 1:
            raise ConfigError(f"parameter 'lam_window': expected less than exposure_gap={self.exposure_gap}, "
                              f"got {self.lam_window}")


# --- the injection schedule and the data stream --------------------------------------------------

@dataclass(frozen=True)
class Injection:
    step: int  # the optimizer step whose batch carries the fact
    fact: str  # "<scenario>/<index>"
    exposure: int  # 0 for the first exposure of the fact
    template: int  # which training paraphrase renders it


def injection_schedule(scenarios: Sequence[str], facts_per_scenario: int, first_step: int, exposures: int,
                       gap: int) -> list[Injection]:
    """Fact j of all facts (scenarios interleaved) first appears at first_step + j; repeated exposures
    follow every `gap` steps. `paraphrased` cycles through the training templates, the others keep
    template 0."""
    out = []
    facts = [(s, i) for i in range(facts_per_scenario) for s in scenarios]
    for j, (scenario, i) in enumerate(facts):
        n = 1 if scenario == "once" else exposures
        for k in range(n):
            template = k % N_TRAIN_TEMPLATES if scenario == "paraphrased" else 0
            out.append(Injection(first_step + j + k * gap, f"{scenario}/{i}", k, template))
    return sorted(out, key=lambda inj: (inj.step, inj.fact))


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


def probe_callback(probes: dict[str, list[Probe]], tokenizer: Tokenizer):
    """fn(step, model) -> {probe/<fact>/<kind>: mean log p(target)} over every probe of every fact."""
    flat = [(fact, p) for fact, ps in probes.items() for p in ps]

    def fn(step: int, model: torch.nn.Module) -> dict[str, float]:
        scores = target_logprobs(model, tokenizer, [p for _, p in flat])
        sums: dict[str, list[float]] = {}
        for (fact, p), s in zip(flat, scores):
            sums.setdefault(probe_key(fact, p.kind), []).append(float(s))
        return {k: float(np.mean(v)) for k, v in sums.items()}

    return fn


def probe_curves(metrics: pd.DataFrame) -> pd.DataFrame:
    """Long table (step, scenario, fact, kind, logprob) from a run's metrics."""
    cols = [c for c in metrics.columns if c.startswith("probe/")]
    rows = metrics.dropna(subset=cols[:1])[["step", *cols]].drop_duplicates("step", keep="last")
    long = rows.melt(id_vars="step", var_name="key", value_name="logprob")
    parts = long["key"].str.split("/", expand=True)
    long["scenario"], long["fact"], long["kind"] = parts[1], parts[1] + "/" + parts[2], parts[3]
    return long.drop(columns="key").sort_values(["fact", "kind", "step"]).reset_index(drop=True)


def drift_corrected(curves: pd.DataFrame) -> pd.DataFrame:
    """The injected facts' curves minus the mean control curve of the same probe kind at each step.

    A small model keeps learning the background while the facts decay, which moves every probe's
    log-probability (the answers' prior shifts); the never-injected control people measure that shift.
    """
    control = curves[curves["scenario"] == CONTROL].groupby(["step", "kind"])["logprob"].mean().rename("control")
    out = curves[curves["scenario"] != CONTROL].join(control, on=["step", "kind"])
    return out.assign(logprob=out["logprob"] - out["control"]).drop(columns="control")


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


def retainability(steps: np.ndarray, logprob: np.ndarray, lam_step: int, before: float,
                  at_lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(t, R(t)) for t >= 1 steps after the local acquisition maximum: the fraction of the gain kept."""
    later = steps > lam_step
    gain = at_lam - before
    return steps[later] - lam_step, (logprob[later] - before) / gain if gain > 0 else np.zeros(later.sum())


@dataclass
class PowerLawFit:
    scale: float  # a
    exponent: float  # b in a * t^(-b)
    r2: float

    def __call__(self, t: np.ndarray) -> np.ndarray:
        return self.scale * np.power(t, -self.exponent)


def fit_power_law(t: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """Least-squares fit of y = a * t^(-b) (t >= 1) and its R^2 on the fitted points."""
    from scipy.optimize import curve_fit

    t, y = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(y) & (t >= 1)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        raise ValueError(f"fit_power_law: expected at least 3 finite points with t >= 1, got {len(t)}")
    with np.errstate(all="ignore"):  # wild trial exponents overflow on the way to the optimum
        (a, b), _ = curve_fit(lambda x, a, b: a * np.power(x, -b), t, y, p0=(max(y[0], 1e-3), 0.3), maxfev=20_000)
    residual = y - a * np.power(t, -b)
    total = ((y - y.mean()) ** 2).sum()
    return PowerLawFit(float(a), float(b), float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0)


def fact_measures(curves: pd.DataFrame, schedule: Sequence[Injection], window: int) -> pd.DataFrame:
    """One row per (fact, kind): effectivity of the first and last exposure, measured from the value
    before the first exposure, and where the retention after the last exposure starts."""
    rows = []
    first = {}
    last = {}
    for inj in schedule:
        first.setdefault(inj.fact, inj.step)
        last[inj.fact] = inj.step
    for (fact, kind), g in curves.groupby(["fact", "kind"]):
        steps, lp = g["step"].to_numpy(), g["logprob"].to_numpy()
        a_first = acquisition(steps, lp, first[fact], window)
        a_last = acquisition(steps, lp, last[fact], window, baseline_step=first[fact])
        rows.append({"fact": fact, "scenario": fact.split("/")[0], "kind": kind,
                     "effectivity_first": a_first["effectivity"], "effectivity_total": a_last["effectivity"],
                     "before": a_first["before"], "lam_step": a_last["lam_step"], "at_lam": a_last["at_lam"]})
    return pd.DataFrame(rows)


def retention_table(curves: pd.DataFrame, measures: pd.DataFrame) -> pd.DataFrame:
    """Long table (fact, scenario, kind, t, retainability) after each fact's last local acquisition maximum."""
    parts = []
    for m in measures.itertuples():
        g = curves[(curves["fact"] == m.fact) & (curves["kind"] == m.kind)]
        t, r = retainability(g["step"].to_numpy(), g["logprob"].to_numpy(), m.lam_step, m.before, m.at_lam)
        parts.append(pd.DataFrame({"fact": m.fact, "scenario": m.scenario, "kind": m.kind, "t": t, "retainability": r}))
    return pd.concat(parts, ignore_index=True)


def log_binned(t: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Means of y in `n_bins` log-spaced bins of t, placed at each bin's geometric-mean t.

    A per-step curve has ten times more points in the last decade than in the first; binning on a
    log scale weighs every decade of the decay alike, as the paper's log-scale plots do."""
    edges = np.unique(np.round(np.logspace(0, np.log10(t.max() + 1), n_bins + 1)).astype(int))
    which = np.digitize(t, edges)
    kept = [b for b in np.unique(which) if (which == b).any()]
    centres = np.array([np.exp(np.log(t[which == b]).mean()) for b in kept])
    return centres, np.array([y[which == b].mean() for b in kept])


def scenario_summary(measures: pd.DataFrame, retention: pd.DataFrame, horizon: int, n_bins: int = 12) -> pd.DataFrame:
    """Per (scenario, kind): mean effectivities, mean retainability over the last fifth of the horizon
    (`retained_at_horizon`), and a power law fitted
    to the mean retention curve over t = 1..horizon in `n_bins` log-spaced bins (exponent, R^2), with
    the R^2 of the same law on the unbinned per-step curve beside it."""
    rows = []
    for (scenario, kind), m in measures.groupby(["scenario", "kind"]):
        r = retention[(retention["scenario"] == scenario) & (retention["kind"] == kind) & (retention["t"] <= horizon)]
        mean_curve = r.groupby("t")["retainability"].mean()
        t, y = mean_curve.index.to_numpy(dtype=float), mean_curve.to_numpy()
        fit = fit_power_law(*log_binned(t, y, n_bins))
        per_step_residual = ((y - fit(t)) ** 2).sum()
        per_step_total = ((y - y.mean()) ** 2).sum()
        rows.append({"scenario": scenario, "kind": kind, "effectivity_first": m["effectivity_first"].mean(),
                     "effectivity_total": m["effectivity_total"].mean(),
                     "retained_at_horizon": float(r[r["t"] > 0.8 * horizon]["retainability"].mean()),
                     "power_law_exponent": fit.exponent, "power_law_scale": fit.scale, "power_law_r2": fit.r2,
                     "power_law_r2_per_step": float(1 - per_step_residual / per_step_total) if per_step_total > 0 else 1.0})
    return pd.DataFrame(rows)


# --- the experiment -------------------------------------------------------------------------------

@dataclass
class KnowledgeSetup:
    world: World
    tokenizer: Tokenizer
    background: TokenBlocks
    schedule: list[Injection]
    facts: dict[str, Any]  # "<scenario>/<i>" -> Person
    probes: dict[str, list[Probe]]
    fact_ids: dict[tuple[str, int], list[int]]


def build_setup(cfg: KnowledgeConfig) -> KnowledgeSetup:
    """The world, its tokenizer, the packed background text, the schedule and every probe."""
    world = make_world(cfg.n_background, (len(SCENARIOS) + 1) * cfg.facts_per_scenario, seed=cfg.seed)
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
    facts = {f"{s}/{i}": next(people) for i in range(cfg.facts_per_scenario) for s in (*SCENARIOS, CONTROL)}
    probes = {fact: probes_for(person, world, injected_template=0) for fact, person in facts.items()}
    fact_ids = {(inj.fact, inj.template): tokenizer.encode(biography(facts[inj.fact], inj.template)) for inj in schedule}
    return KnowledgeSetup(world, tokenizer, background, schedule, facts, probes, fact_ids)


def train_with_injections(cfg: KnowledgeConfig, setup: KnowledgeSetup, batch_size: int, run,
                          progress: bool = True) -> tuple[Transformer, TrainResult]:
    """One training run at `batch_size` with every fact injected on schedule and probed every probe_every steps."""
    train_cfg = dataclasses.replace(cfg.project(TrainConfig), batch_size=batch_size)
    model = seeded_transformer(cfg, setup.tokenizer.vocab_size)
    stream = InjectionStream(setup.background, setup.schedule, setup.fact_ids, setup.tokenizer.eos_id)
    if run is not None:
        setup.tokenizer.save(run.path / "tokenizer.json")
    result = train(model, CausalLM(), stream, train_cfg, run, progress=progress,
                   callbacks=[(cfg.probe_every, probe_callback(setup.probes, setup.tokenizer))])
    return model, result
