"""In-context linear regression (Garg et al. 2022; Raventós et al. 2023) and its two Bayes-optimal predictors.

Notable here:
- A task is a weight vector w in R^d; a sequence is k pairs (x_i, y_i) with x_i ~ N(0, I_d)
  and y_i = w . x_i + sigma * eps_i. Pretraining tasks come from a finite pool of M vectors
  drawn once from N(0, I_d) (`task_pool`, a function of (seed, M)); "fresh" tasks are drawn
  from N(0, I_d) itself. Everything is batched in torch and drawn from the `icl_regression`
  seeding stream, so a batch is a pure function of (seed, index).
- `RegressionTasks` is the training data source of `lablib.train.train` (its `batch`).
- `dmmse_predictions`: the posterior mean under the discrete prior (uniform over the pool,
  Gaussian likelihood with noise sigma): the memorizing strategy. `ridge_predictions`: the
  posterior mean under N(0, I_d), ridge with lambda = sigma^2: the generalizing strategy. Both
  predict y_t at every position t from the t pairs before it (position 0: the prior mean).
- Trivial rules on the same items: `zero_predictions` (the prior mean), `context_mean_predictions`
  (mean of the ys seen so far), `least_squares_predictions` (minimum-norm least squares) and
  `correlation_predictions` (w estimated by the mean of y x).
- `predict(model, xs, ys, x_query)` scores a trained `lablib.models.ICLRegressor` on one query per
  sequence; NumPy in gives NumPy out, torch gives torch, and a wrong shape is refused in one line.
- `mse` / `mixing_weight`: the distance between two predictors and where a model's predictions
  sit on the segment from ridge (0) to dMMSE (1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lablib.seeding import torch_generator

STREAM = "icl_regression"
POOL, BATCH, EVAL = 0, 1, 2  # first index word of the stream: what is being drawn


def task_pool(d: int, M: int, seed: int) -> torch.Tensor:
    """The M pretraining tasks (M, d), drawn from N(0, I_d); the same for the same (d, M, seed)."""
    if M < 1 or d < 1:
        raise ValueError(f"task pool: expected M >= 1 and d >= 1, got M={M}, d={d}")
    return torch.randn(M, d, generator=torch_generator(seed, STREAM, POOL, d, M))


def sample_sequences(weights: torch.Tensor, k: int, sigma: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """k noisy pairs for each task of weights (B, d): xs (B, k, d), ys (B, k), w (B, d)."""
    B, d = weights.shape
    xs = torch.randn(B, k, d, generator=generator)
    ys = torch.einsum("bkd,bd->bk", xs, weights) + sigma * torch.randn(B, k, generator=generator)
    return {"xs": xs, "ys": ys, "w": weights}


def draw_tasks(B: int, d: int, pool: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """B task vectors: uniformly from the pool, or from N(0, I_d) when pool is None."""
    if pool is None:
        return torch.randn(B, d, generator=generator)
    return pool[torch.randint(len(pool), (B,), generator=generator)]


@dataclass
class RegressionTasks:
    """Training sequences over a pool of M tasks (M=None: tasks from N(0, I_d)); `batch` for lablib.train."""

    d: int
    k: int
    sigma: float
    M: int | None
    pool_seed: int

    def __post_init__(self):
        self.pool = None if self.M is None else task_pool(self.d, self.M, self.pool_seed)

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch_generator(seed, STREAM, BATCH, index)
        return sample_sequences(draw_tasks(batch_size, self.d, self.pool, gen), self.k, self.sigma, gen)


def evaluation_sequences(n: int, d: int, k: int, sigma: float, pool: torch.Tensor | None, seed: int,
                         set_id: int) -> dict[str, torch.Tensor]:
    """n fixed evaluation sequences (pool tasks, or fresh ones when pool is None), drawn apart from training's."""
    gen = torch_generator(seed, STREAM, EVAL, set_id, n)
    return sample_sequences(draw_tasks(n, d, pool, gen), k, sigma, gen)


# --- the two Bayes-optimal predictors and the trivial rules -----------------------------------------

def dmmse_predictions(xs: torch.Tensor, ys: torch.Tensor, pool: torch.Tensor, sigma: float,
                      chunk: int = 64) -> torch.Tensor:
    """Posterior-mean predictions (B, k) under the uniform prior over `pool` (M, d).

    At position t the posterior weight of pool vector w_m is proportional to
    exp(-sum_{i<t} (y_i - w_m . x_i)^2 / (2 sigma^2)); the prediction is the posterior-weighted
    w's dot x_t. Computed in float64, `chunk` sequences at a time (B * k * M numbers per chunk).
    """
    out = []
    W = pool.double()
    for s in range(0, xs.shape[0], chunk):
        x, y = xs[s:s + chunk].double(), ys[s:s + chunk].double()
        preds = torch.einsum("bkd,md->bkm", x, W)  # every pool vector's prediction at every position
        sq = (y[:, :, None] - preds) ** 2
        seen = torch.cumsum(sq, dim=1) - sq  # squared residuals of the pairs before position t
        post = torch.softmax(-seen / (2 * sigma ** 2), dim=-1)  # (b, k, M)
        out.append((post * preds).sum(-1))
    return torch.cat(out).to(xs.dtype)


def ridge_predictions(xs: torch.Tensor, ys: torch.Tensor, lam: float) -> torch.Tensor:
    """Ridge predictions (B, k): at position t, w_t = (X^T X + lam I)^-1 X^T y over the t pairs before it.

    With lam = sigma^2 this is the posterior mean under the N(0, I_d) task prior.
    """
    B, k, d = xs.shape
    x, y = xs.double(), ys.double()
    outer = torch.einsum("bki,bkj->bkij", x, x)
    gram = torch.cumsum(outer, dim=1) - outer  # X^T X over the pairs before t: (B, k, d, d)
    xty = torch.cumsum(x * y[..., None], dim=1) - x * y[..., None]
    eye = torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(gram + lam * eye, xty[..., None])[..., 0]  # (B, k, d)
    return (w * x).sum(-1).to(xs.dtype)


def least_squares_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least squares at every position (ridge as lambda -> 0; 0 before any pair)."""
    B, k, d = xs.shape
    out = torch.zeros(B, k, dtype=torch.float64)
    x, y = xs.double(), ys.double()
    for t in range(1, k):
        w = torch.linalg.pinv(x[:, :t]) @ y[:, :t, None]  # (B, d, 1)
        out[:, t] = (x[:, t] * w[..., 0]).sum(-1)
    return out.to(xs.dtype)


def context_mean_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The mean of the ys seen before position t (0 before any pair)."""
    k = ys.shape[1]
    before = torch.cumsum(ys, dim=1) - ys
    return before / torch.arange(k, dtype=ys.dtype).clamp(min=1)


def correlation_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """x_t . mean(y_i x_i) over the pairs before t: E[y x] = w, so this estimates w without inverting anything."""
    k = ys.shape[1]
    yx = ys[..., None] * xs
    w = (torch.cumsum(yx, dim=1) - yx) / torch.arange(k, dtype=xs.dtype).clamp(min=1)[:, None]
    return (w * xs).sum(-1)


def zero_predictions(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The prior mean of y, 0, whatever the context."""
    return torch.zeros_like(ys)


TRIVIAL_RULES = {"predict 0 (prior mean)": zero_predictions, "mean of ys in context": context_mean_predictions,
                 "least squares (min-norm)": least_squares_predictions,
                 "correlation estimate x . mean(y x)": correlation_predictions}


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference over every sequence and position."""
    return float(((a.double() - b.double()) ** 2).mean())


def mixing_weight(model: torch.Tensor, dmmse: torch.Tensor, ridge: torch.Tensor) -> float:
    """Where the model sits between the strategies: the least-squares p in model ~ p dMMSE + (1-p) ridge, clipped
    to [0, 1] (1/2 when the two predictors agree everywhere)."""
    gap = (dmmse - ridge).double()
    denom = float((gap ** 2).sum())
    if denom == 0.0:
        return 0.5
    return float(min(1.0, max(0.0, float(((model.double() - ridge.double()) * gap).sum()) / denom)))


# --- the scoring interface ----------------------------------------------------------------------------

def _as_tensor(name: str, value: Any, dims: int) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, np.ndarray):
        t = torch.from_numpy(value)
    else:
        raise TypeError(f"{name}: expected a NumPy array or torch tensor, got {type(value).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}")
    return t.float()


def predict(model, xs, ys, x_query):
    """y_hat (B,) for x_query (B, d) after the context pairs xs (B, k, d), ys (B, k), one forward pass.

    NumPy arrays in give a NumPy array out; torch tensors give a tensor on the model's device.
    A shape that does not fit raises a one-line ValueError naming the argument.
    """
    numpy_in = isinstance(xs, np.ndarray)
    X, Y, Q = _as_tensor("xs", xs, 3), _as_tensor("ys", ys, 2), _as_tensor("x_query", x_query, 2)
    B, k, d = X.shape
    if Y.shape != (B, k):
        raise ValueError(f"ys: expected shape (B, k) = ({B}, {k}) to match xs {tuple(X.shape)}, got {tuple(Y.shape)}")
    if Q.shape != (B, d):
        raise ValueError(f"x_query: expected shape (B, d) = ({B}, {d}) to match xs {tuple(X.shape)}, "
                         f"got {tuple(Q.shape)}")
    n_dims = getattr(getattr(model, "cfg", None), "n_dims", d)
    if d != n_dims:
        raise ValueError(f"xs: the model reads x of dimension {n_dims}, got d={d}")
    device = next(model.parameters()).device
    seq_x = torch.cat([X, Q[:, None]], dim=1).to(device)
    seq_y = torch.cat([Y, torch.zeros(B, 1)], dim=1).to(device)  # the query's y is never read (causal)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        y_hat = model(seq_x, seq_y)[:, k].float()
    model.train(was_training)
    return y_hat.cpu().numpy() if numpy_in else y_hat


def model_predictions(model, xs: torch.Tensor, ys: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The model's prediction (B, k) at every position of the sequences (one causal forward pass each)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(xs[s:s + chunk].to(device), ys[s:s + chunk].to(device)).float().cpu()
                         for s in range(0, xs.shape[0], chunk)])
    model.train(was_training)
    return out


def prior_mse(d: int, sigma: float) -> float:
    """The expected squared error of predicting 0 for y = w . x + noise with w, x ~ N(0, I_d)."""
    return d + sigma ** 2

