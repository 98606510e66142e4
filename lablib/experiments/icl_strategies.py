"""In-context learning strategies (notebooks/08_icl_strategies.ipynb): a transformer pretrained on
in-context linear regression over a pool of M tasks behaves like the pool's Bayes-optimal predictor
(dMMSE, memorizing) for small M and like ridge (generalizing) for large M (Raventós et al. 2023); a
rational model that weighs the two strategies' fit against their complexity predicts where each
(M, training step) model sits (Wurgaft et al. 2025, "In-Context Learning Strategies Emerge
Rationally"). The task and its predictors are `lablib.tasks.icl_regression`.

Notable here:
- `ICLStrategiesConfig`: the model knobs are `lablib.models.ICLRegressor`'s (n_dims = d,
  n_points = k); `pool_sizes` x `seeds` is the sweep, one sub-run `models/M<M>-seed<S>/` each
  (metrics, checkpoints on the lab's schedule, resumed from its newest checkpoint when rerun).
- `EvalSets`: fixed fresh-task sets (the same for every M and seed) and pool-task sets (per M and
  seed), each a dev and a test half drawn apart, with the dMMSE, ridge and trivial-rule predictions
  computed once. `strategy_callback` scores the model on them at every checkpoint step (and step 0,
  the untrained model): distance to dMMSE and to ridge, MSE to the targets and the mixing weight.
- `RationalModel`: log posterior odds of memorizing over generalizing
  `exp(log_a) * N^(1 - alpha) * dL(M) - exp(log_b) * (M d)^beta`, with N training sequences seen,
  dL the per-sample loss advantage of dMMSE over ridge on the training distribution and M d the
  numbers the memorizing strategy stores; the model's output is the posterior-weighted mix of the
  two predictors. `fit_rational` fits the four parameters on dev cells to the models' relative
  distance d_dMMSE / (d_dMMSE + d_ridge); `rational_scores` scores held-out cells on test items.
- `transition_pool_size`: where the distance to ridge falls below the distance to dMMSE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from lablib.checkpoints import checkpoint_schedule
from lablib.config import ConfigError, TrainConfig, knob
from lablib.evidence import headline_over_seeds, mean_interval
from lablib.models import ICLRegressor, ICLRegressorConfig
from lablib.seeding import seeded_model
from lablib.tasks import icl_regression as task
from lablib.train import train

EXPERIMENT = "icl_strategies"
SETS = ("fresh_dev", "fresh_test", "pool_dev", "pool_test")
SET_IDS = {name: i for i, name in enumerate(SETS)}
EVAL_SEED = 10_000  # fresh-task sets: drawn with a seed no training run uses


@dataclass
class ICLStrategiesConfig(ICLRegressorConfig, TrainConfig):
    """A transformer per (pool size M, seed) on in-context linear regression, scored against dMMSE and ridge."""

    sigma: float = knob(0.5, "noise standard deviation of y (Raventós et al.: sigma^2 = 0.25)", min=0.0,
                        min_exclusive=True)
    pool_sizes: list[int] = knob([2 ** p for p in range(1, 15)], "pretraining task pool sizes M (the sweep)")
    seeds: list[int] = knob([0, 1, 2], "training seeds (each draws its own pools)")
    n_eval: int = knob(512, "sequences in each evaluation set (fresh / pool, dev / test)", min=8)
    fit_pool_sizes: list[int] | None = knob(None, "M values the rational model is fitted on (None: every other "
                                            "M from the smallest); the rest are held out")
    fit_step_fraction: float = knob(0.5, "the rational model is fitted on steps up to this share of training; "
                                    "later steps are held out", min=0.0, max=1.0, min_exclusive=True)
    min_fit_step: int = knob(32, "steps below this (an untrained model sits nowhere) are left out of fit and "
                             "scores", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(n_dims=2, n_points=6, tokens="pairs", n_layer=1, n_head=2, d_model=16, pool_sizes=[2, 16, 128, 1024],
                      seeds=[0, 1], steps=40, batch_size=16, warmup_steps=4, learning_rate=3e-3, n_eval=32,
                      checkpoint_every=20, log_every=10, eval_every=20, eval_batches=1, min_fit_step=4,
                      num_threads=1),
        # ~38 minutes on one core: d=4, k=8, a 4-layer width-32 transformer over pair tokens (interleaved
        # tokens sat on the predict-0 plateau for 3000+ steps at this size), 6 pool sizes x 3 seeds; batch 256
        # at lr 1.5e-3, 4 layers (chosen on fresh dev tasks at M=2^14 against 2-3 layers, batch 64/512,
        # width 64, lr 3e-3/5e-3: the late context positions, where ridge inverts X^T X, need the depth);
        # pool sizes dense below 2^5, where dMMSE and ridge differ at d=4, so the rational model is
        # fitted on M = 2, 8, 128 and asked for 4, 16 and 2^14
        "cpu": dict(n_dims=4, n_points=8, tokens="pairs", n_layer=4, n_head=2, d_model=32, pool_sizes=[2 ** p for p in
                    (1, 2, 3, 4, 7, 14)], steps=3000, batch_size=256, warmup_steps=100, learning_rate=1.5e-3,
                    n_eval=512, checkpoint_every=500, log_every=100, eval_every=500, eval_batches=1, num_threads=1),
        # near Raventós et al. (d=8, k=16, interleaved tokens, 8 layers, width 256; they train 500k steps of
        # 256 sequences); not run yet
        "gpu": dict(n_dims=8, n_points=16, tokens="interleaved", n_layer=8, n_head=8, d_model=256, steps=100_000, batch_size=256,
                    warmup_steps=2000, learning_rate=3e-4, n_eval=2048, checkpoint_every=5000, log_every=200,
                    eval_every=5000, eval_batches=1, min_fit_step=256, seeds=[0, 1, 2]),
    }

    def validate(self) -> None:
        super().validate()
        if len(self.pool_sizes) < 2 or any(m < 1 for m in self.pool_sizes) or len(set(self.pool_sizes)) != len(self.pool_sizes):
            raise ConfigError(f"parameter 'pool_sizes': expected at least two distinct sizes >= 1, got {self.pool_sizes}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        fit = self.fit_sizes()
        if not fit or set(fit) - set(self.pool_sizes) or set(fit) == set(self.pool_sizes):
            raise ConfigError(f"parameter 'fit_pool_sizes': expected a non-empty proper subset of pool_sizes "
                              f"{self.pool_sizes}, got {self.fit_pool_sizes}")

    def fit_sizes(self) -> list[int]:
        ordered = sorted(self.pool_sizes)
        return sorted(self.fit_pool_sizes) if self.fit_pool_sizes is not None else ordered[0::2]

    def eval_steps(self) -> list[int]:
        """Step 0 (untrained) and the checkpoint schedule: the training-time axis of every plot and fit."""
        return [0, *checkpoint_schedule(self.steps, self.checkpoint_every)]


# --- objective and evaluation sets ----------------------------------------------------------------------

@dataclass
class InContextRegression:
    """Mean squared error of the prediction at every x token (every context length 0..k-1 at once)."""

    name: str = "icl_regression"

    def __call__(self, model, batch, generator):
        pred = model(batch["xs"], batch["ys"]).float()
        loss = ((pred - batch["ys"].float()) ** 2).mean()
        return loss, {"tokens_scored": batch["ys"].numel()}


@dataclass
class EvalSet:
    """Fixed sequences and every reference predictor's outputs on them, (n, k) each."""

    xs: torch.Tensor
    ys: torch.Tensor
    predictions: dict[str, torch.Tensor]  # dmmse, ridge and the trivial rules


def eval_set(cfg: ICLStrategiesConfig, pool: torch.Tensor, name: str, seed: int) -> EvalSet:
    draw_from = pool if name.startswith("pool") else None
    data = task.evaluation_sequences(cfg.n_eval, cfg.n_dims, cfg.n_points, cfg.sigma, draw_from, seed, SET_IDS[name])
    xs, ys = data["xs"], data["ys"]
    preds = {"dmmse": task.dmmse_predictions(xs, ys, pool, cfg.sigma),
             "ridge": task.ridge_predictions(xs, ys, cfg.sigma ** 2)}
    preds.update({rule: fn(xs, ys) for rule, fn in task.TRIVIAL_RULES.items()})
    return EvalSet(xs, ys, preds)


def eval_sets(cfg: ICLStrategiesConfig, M: int, seed: int, fresh: dict[str, torch.Tensor] | None = None
              ) -> dict[str, EvalSet]:
    """The four sets of one (M, seed): fresh tasks (seed-independent draws) and tasks of that seed's pool."""
    pool = task.task_pool(cfg.n_dims, M, seed)
    return {name: eval_set(cfg, pool, name, EVAL_SEED if name.startswith("fresh") else seed) for name in SETS}


def score_predictions(pred: torch.Tensor, s: EvalSet) -> dict[str, float]:
    return {"d_dmmse": task.mse(pred, s.predictions["dmmse"]), "d_ridge": task.mse(pred, s.predictions["ridge"]),
            "mse": task.mse(pred, s.ys),
            "mix": task.mixing_weight(pred, s.predictions["dmmse"], s.predictions["ridge"])}


def strategy_callback(cfg: ICLStrategiesConfig, sets: dict[str, EvalSet], rows: list[dict[str, Any]]):
    """(every, fn) for `train`: at step 0 and each checkpoint step, the model scored on every set."""
    steps = set(cfg.eval_steps())

    def score(step: int, model) -> dict[str, float] | None:
        if step not in steps:
            return None
        out = {"step": step}
        for name, s in sets.items():
            out.update({f"{name}/{k}": v for k, v in score_predictions(task.model_predictions(model, s.xs, s.ys), s).items()})
        rows.append(out)
        return {k: v for k, v in out.items() if k != "step"}

    return (1, score)


def build_model(cfg: ICLStrategiesConfig, seed: int) -> ICLRegressor:
    return seeded_model(ICLRegressor, cfg.project(ICLRegressorConfig), seed)


@dataclass
class TrainedPoint:
    M: int
    seed: int
    rows: list[dict[str, Any]]  # one per evaluation step (step 0 first)
    seconds: float
    n_params: int
    folder: str | None
    resumed_from: int | None  # the checkpoint step training resumed from (None: from scratch)


def train_point(cfg: ICLStrategiesConfig, M: int, seed: int, sets: dict[str, EvalSet], run=None, *,
                progress: bool = False) -> TrainedPoint:
    """Train the model of one (M, seed) in sub-run models/M<M>-seed<seed>/ of `run` (None: no folder);
    a sub-run with checkpoints resumes, its earlier evaluation rows read back from metrics.jsonl."""
    from lablib.runs import start_run

    point_cfg = dataclasses.replace(cfg, seed=seed, pool_sizes=list(cfg.pool_sizes))
    point_cfg.preset = cfg.preset
    sub = None if run is None else start_run(EXPERIMENT, point_cfg, run.path / "models" / f"M{M}-seed{seed}",
                                             pool_size=M)
    rows: list[dict[str, Any]] = []
    model = build_model(cfg, seed)
    result = train(model, InContextRegression(), task.RegressionTasks(cfg.n_dims, cfg.n_points, cfg.sigma, M, seed),
                   point_cfg.project(TrainConfig), sub, callbacks=[strategy_callback(cfg, sets, rows)],
                   progress=progress)
    if sub is not None:
        sub.set_status("done")
        rows = [r for r in sub.log.rows() if "fresh_test/d_dmmse" in r]
    by_step = {r["step"]: {k: v for k, v in r.items() if k == "step" or "/" in k} for r in rows}
    return TrainedPoint(M, seed, [by_step[s] for s in sorted(by_step)], result.seconds, model.num_params(),
                        None if sub is None else str(sub.path), result.resumed_from)


def reference_scores(sets: dict[str, EvalSet]) -> dict[str, dict[str, float]]:
    """Per set: MSE to the targets of each reference predictor, and the gap between dMMSE and ridge."""
    out = {}
    for name, s in sets.items():
        row = {f"mse/{p}": task.mse(pred, s.ys) for p, pred in s.predictions.items()}
        row["gap"] = task.mse(s.predictions["dmmse"], s.predictions["ridge"])
        out[name] = row
    return out


# --- the rational model ------------------------------------------------------------------------------

PARAMS = ("log_a", "alpha", "log_b", "beta")
BOUNDS = ((-30.0, 30.0), (0.0, 1.0), (-30.0, 30.0), (0.0, 3.0))


@dataclass(frozen=True)
class RationalModel:
    """Posterior over the two strategies; `memorizing(N, dL, K)` is P(dMMSE) after N sequences.

    log odds = exp(log_a) * N^(1 - alpha) * dL - exp(log_b) * K^beta, K = M d.
    """

    log_a: float
    alpha: float
    log_b: float
    beta: float

    def log_odds(self, N, dL, K) -> np.ndarray:
        N, dL, K = (np.asarray(v, dtype=float) for v in (N, dL, K))
        return np.exp(self.log_a) * N ** (1 - self.alpha) * dL - np.exp(self.log_b) * K ** self.beta

    def memorizing(self, N, dL, K) -> np.ndarray:
        return 1 / (1 + np.exp(-np.clip(self.log_odds(N, dL, K), -60, 60)))

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def fit_rational(N: np.ndarray, dL: np.ndarray, K: np.ndarray, observed: np.ndarray, weight: np.ndarray | None = None,
                 target=None, starts: int = 24, seed: int = 0) -> RationalModel:
    """Least squares of target(P(dMMSE)) against `observed` per cell, from several starts.

    target: what the posterior predicts about a cell (None: P(dMMSE) itself, against mixing weights;
    `predicted_relative_distance` against relative distances). weight: per cell (the dMMSE-ridge gap:
    where both strategies agree a cell says nothing about which one the model follows).
    """
    from scipy.optimize import least_squares

    target = target or (lambda p: p)
    N, dL, K, mix = (np.asarray(v, dtype=float) for v in (N, dL, K, observed))
    w = np.ones_like(mix) if weight is None else np.sqrt(np.asarray(weight, dtype=float) / np.mean(weight))
    if not (N.shape == dL.shape == K.shape == mix.shape == w.shape) or N.size < len(PARAMS):
        raise ValueError(f"fit_rational: expected equal-length arrays of at least {len(PARAMS)} cells, got shapes "
                         f"{[a.shape for a in (N, dL, K, mix, w)]}")
    lo, hi = np.array(BOUNDS).T
    rng = np.random.default_rng(seed)
    scale_a = -np.log(np.median(N) * max(np.median(np.abs(dL)), 1e-12))
    scale_b = -np.log(np.median(K))
    best = None
    for i in range(starts):
        x0 = np.array([scale_a + rng.normal(0, 3), rng.uniform(0, 1), scale_b + rng.normal(0, 3), rng.uniform(0, 2)])
        x0 = np.clip(x0, lo + 1e-6, hi - 1e-6)
        res = least_squares(lambda x: w * (target(RationalModel(*x).memorizing(N, dL, K)) - mix), x0, bounds=(lo, hi))
        if best is None or res.cost < best.cost:
            best = res
    return RationalModel(*map(float, best.x))


def r_squared(observed: Sequence[float], predicted: Sequence[float], weight: Sequence[float] | None = None) -> float:
    """Share of the (weighted) variance of `observed` that `predicted` explains (1 - SSE / SST; can be negative)."""
    o, p = np.asarray(observed, float), np.asarray(predicted, float)
    w = np.ones_like(o) if weight is None else np.asarray(weight, float)
    sst = float((w * (o - np.average(o, weights=w)) ** 2).sum())
    return float("nan") if sst == 0 else 1 - float((w * (o - p) ** 2).sum()) / sst


def cell_table(points: Sequence[TrainedPoint], refs: dict[tuple[int, int], dict[str, dict[str, float]]],
               cfg: ICLStrategiesConfig) -> list[dict[str, Any]]:
    """One row per (M, seed, step): the model's scores on every set, the gap and dL of its pool."""
    rows = []
    for pt in points:
        ref = refs[(pt.M, pt.seed)]
        dL = ref["pool_dev"]["mse/ridge"] - ref["pool_dev"]["mse/dmmse"]  # the training distribution's dev items
        for r in pt.rows:
            rows.append({"M": pt.M, "seed": pt.seed, "step": r["step"], "N": r["step"] * cfg.batch_size, "dL": dL,
                         "K": pt.M * cfg.n_dims, **{k: v for k, v in r.items() if k != "step"},
                         **{f"{name}/gap": ref[name]["gap"] for name in SETS}})
    return rows


def relative_distance(d_dmmse, d_ridge) -> np.ndarray:
    """d_dmmse / (d_dmmse + d_ridge): 0 at dMMSE, 1 at ridge, 1/2 halfway (or wherever both are equally far)."""
    d_dmmse, d_ridge = np.asarray(d_dmmse, float), np.asarray(d_ridge, float)
    return d_dmmse / np.maximum(d_dmmse + d_ridge, 1e-300)


def predicted_relative_distance(p) -> np.ndarray:
    """The relative distance of the mix p dMMSE + (1-p) ridge: (1-p)^2 / ((1-p)^2 + p^2)."""
    p = np.asarray(p, float)
    return (1 - p) ** 2 / ((1 - p) ** 2 + p ** 2)


def _observed(cells: list[dict[str, Any]], set_name: str) -> dict[str, np.ndarray]:
    get = lambda key: np.array([c[f"{set_name}/{key}"] for c in cells], float)  # noqa: E731
    return {"d_dmmse": get("d_dmmse"), "d_ridge": get("d_ridge"), "mix": get("mix"), "gap": get("gap"),
            "relative": relative_distance(get("d_dmmse"), get("d_ridge"))}


def rational_scores(model: RationalModel, cells: list[dict[str, Any]], set_name: str,
                    constant_relative: float | None = None) -> dict[str, float]:
    """On cells of one set: the share of variance (R^2) the rational model explains in the relative distance
    (the headline; cells weighted by the dMMSE-ridge gap, as in the fit: where the two predictors agree,
    a model is equally far from both whatever it learnt), in the two distances pooled and in the mixing weight.

    The rational model's output p dMMSE + (1-p) ridge is (1-p)^2 * gap from dMMSE and p^2 * gap from
    ridge (mean squared), gap = MSE(dMMSE, ridge) on the set; a model off that segment is further from
    both, which the distances count and the relative distance largely cancels. constant_relative: also
    score a rule that predicts this one relative distance everywhere (the fit cells' mean).
    """
    p = model.memorizing([c["N"] for c in cells], [c["dL"] for c in cells], [c["K"] for c in cells])
    o = _observed(cells, set_name)
    out = {"r2_relative": r_squared(o["relative"], predicted_relative_distance(p), o["gap"]),
           "r2_distances": r_squared(np.concatenate([o["d_dmmse"], o["d_ridge"]]),
                                     np.concatenate([(1 - p) ** 2 * o["gap"], p ** 2 * o["gap"]])),
           "r2_mix": r_squared(o["mix"], p), "cells": len(cells)}
    if constant_relative is not None:
        out["r2_relative_constant"] = r_squared(o["relative"], np.full(len(cells), constant_relative), o["gap"])
    return out


def split_cells(cells: list[dict[str, Any]], cfg: ICLStrategiesConfig) -> dict[str, list[dict[str, Any]]]:
    """fit: fit M values up to fit_step_fraction of training; heldout_M: the other M values (every step);
    later_steps: fit M values after fit_step_fraction. Steps below min_fit_step are left out everywhere."""
    fit_sizes, cut = set(cfg.fit_sizes()), cfg.fit_step_fraction * cfg.steps
    used = [c for c in cells if c["step"] >= cfg.min_fit_step]
    return {"fit": [c for c in used if c["M"] in fit_sizes and c["step"] <= cut],
            "heldout_M": [c for c in used if c["M"] not in fit_sizes],
            "later_steps": [c for c in used if c["M"] in fit_sizes and c["step"] > cut]}


def fit_and_score(cells: list[dict[str, Any]], cfg: ICLStrategiesConfig) -> dict[str, Any]:
    """The rational model fitted on one seed's fit cells (fresh dev items), scored on held-out cells (test items)."""
    parts = split_cells(cells, cfg)
    fit = parts["fit"]
    o = _observed(fit, "fresh_dev")
    model = fit_rational(np.array([c["N"] for c in fit]), np.array([c["dL"] for c in fit]),
                         np.array([c["K"] for c in fit]), o["relative"], weight=o["gap"],
                         target=predicted_relative_distance)
    constant = float(np.average(o["relative"], weights=o["gap"]))
    out: dict[str, Any] = {"params": model.to_dict(), "fit_dev": rational_scores(model, fit, "fresh_dev"),
                           "constant_relative": constant}
    for part in ("heldout_M", "later_steps"):
        if parts[part]:
            out[part] = {name: rational_scores(model, parts[part], name, constant) for name in ("fresh_test", "pool_test")}
    return out


# --- summaries ---------------------------------------------------------------------------------------

def transition_pool_size(final: dict[int, dict[str, float]], set_name: str = "fresh_test") -> float | None:
    """M where log(d_dmmse / d_ridge) first crosses 0 upward (interpolated in log2 M); None when it never does.

    final maps M to the final-step row of one seed."""
    sizes = sorted(final)
    ratio = [math.log(final[m][f"{set_name}/d_dmmse"] / final[m][f"{set_name}/d_ridge"]) for m in sizes]
    for (m0, r0), (m1, r1) in zip(zip(sizes, ratio), zip(sizes[1:], ratio[1:])):
        if r0 < 0 <= r1:
            t = -r0 / (r1 - r0)
            return float(2 ** (math.log2(m0) + t * (math.log2(m1) - math.log2(m0))))
    return None


def interval(values: Sequence[float]) -> dict[str, Any]:
    return mean_interval(values).to_dict()


def headline_dict(metric: str, value: dict[Any, float], references: dict[str, dict[Any, float]], trivial_rule: str,
                  split: str, better: str = "lower") -> dict[str, Any]:
    """A headline over seeds in the lab's results format (`lablib.evidence.headline_over_seeds`)."""
    return headline_over_seeds(metric, value, references, trivial_rule, split, better).to_dict()


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/08_icl_strategies.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/08_icl_strategies.ipynb", preset, parameters)
