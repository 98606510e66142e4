"""Synthetic classification tasks from random structural causal models (TabPFN's prior).

Notable here:
- `TabularPrior(kind="scm")` follows TabPFN's MLP-SCM prior (Hollmann et al. 2022, and
  `tabpfn/priors/mlp.py` of the v1 code): root causes with pre-sampled means and
  spreads feed a layered random DAG whose edges are the non-zero entries of sparse
  random weight matrices (weight dropout = graph sparsity); every node is a linear or
  MLP-style mechanism (tanh / ReLU / leaky ReLU / identity) of its parents plus
  Gaussian noise. Features and the target are read off randomly chosen nodes, so a
  feature may be a cause, an effect or a sibling of the target.
- `TabularPrior(kind="mlp")` is the non-causal comparison (TabPFN's BNN prior): the
  features are the root causes themselves and the target is the output of a random
  noisy MLP of them.
- The continuous target becomes classes by thresholding at the values of randomly
  chosen rows (TabPFN's "rank" multiclass), then the class ids are shuffled.
- Hyperparameters (features, classes, depth, width, noise, weight scale, sparsity,
  activation, cause distribution) are sampled per task or per batch; everything is
  generated for a whole batch at once with batched matmuls (`torch.bmm`) and one
  seeded `torch.Generator`, so `batch(index, batch_size, seed)` is a pure function of
  its arguments and fast enough that training never waits for data.
- Features are standardised with the statistics of the training rows only (as at test
  time), clipped, zero-padded to `max_features`; rows are i.i.d., so the first
  `n_train` rows are the in-context examples and the rest are the queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F

from lablib.seeding import torch_generator

MECHANISMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "identity": lambda z: z,  # a linear mechanism
}

FEATURE_CLIP = 4.0  # standard deviations; TabPFN also removes outliers beyond a few sigma


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen)


def _log_uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.exp(_uniform(gen, shape, math.log(low), math.log(high)))


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def standardize_by_train_rows(x: torch.Tensor, n_train: int, clip: float = FEATURE_CLIP) -> torch.Tensor:
    """(B, N, F) -> per task and feature, minus the training rows' mean, over their std, clipped."""
    train = x[:, :n_train]
    mean, std = train.mean(1, keepdim=True), train.std(1, keepdim=True, unbiased=False)
    return ((x - mean) / (std + 1e-6)).clamp(-clip, clip)


@dataclass
class TabularPrior:
    """Batches of classification tasks: x (B, N, max_features), y (B, N), and their sizes.

    A batch is {"x", "y", "n_train" (0-d), "n_features" (B,), "n_classes" (B,)}. Within a
    batch all tasks share the number of rows, the split point and the graph's depth
    and width (as in TabPFN, where such hyperparameters are drawn per batch); each
    task has its own features count, classes, weights, noise, sparsity and mechanism.
    """

    kind: Literal["scm", "mlp"] = "scm"
    n_rows: int = 256  # rows per task (context + queries)
    max_features: int = 16
    max_classes: int = 10
    min_train_rows: int = 8
    min_test_rows: int = 16
    layers: tuple[int, int] = (2, 5)  # depth of the graph (layers of nodes after the causes)
    hidden: tuple[int, int] = (8, 40)  # nodes per layer
    noise_std: tuple[float, float] = (1e-3, 0.3)  # log-uniform
    weight_std: tuple[float, float] = (0.3, 3.0)  # log-uniform, before the 1/sqrt(fan-in) scaling
    edge_dropout: tuple[float, float] = (0.0, 0.8)  # fraction of absent edges, uniform
    p_binary: float = 0.3  # probability that a task has two classes; else uniform in [3, max_classes]

    def __post_init__(self):
        checks = {
            "kind": (self.kind in ("scm", "mlp"), "'scm' or 'mlp'"),
            "max_features": (self.max_features >= 1, "at least 1"),
            "max_classes": (self.max_classes >= 2, "at least 2"),
            "n_rows": (self.n_rows >= self.min_train_rows + self.min_test_rows,
                       f"at least min_train_rows + min_test_rows = {self.min_train_rows + self.min_test_rows}"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"TabularPrior {name}: expected {expected}, got {getattr(self, name)!r}")

    # --- the pieces of one batch ----------------------------------------------------
    def _causes(self, gen: torch.Generator, B: int, N: int, n: int) -> torch.Tensor:
        """(B, N, n) root causes: per cause a pre-sampled mean and spread (TabPFN's 'normal'),
        or, for a quarter of the tasks, uniform causes."""
        mean = torch.randn((B, 1, n), generator=gen)
        spread = (torch.randn((B, 1, n), generator=gen) * mean).abs() + 0.1
        normal = mean + spread * torch.randn((B, N, n), generator=gen)
        uniform = torch.rand((B, N, n), generator=gen)
        use_uniform = torch.rand((B, 1, 1), generator=gen) < 0.25
        return torch.where(use_uniform, uniform, normal)

    def _layer(self, gen: torch.Generator, z: torch.Tensor, width: int, mechanism: torch.Tensor,
               noise: torch.Tensor, weight_std: torch.Tensor, dropout: torch.Tensor, activate: bool) -> torch.Tensor:
        """One layer of nodes: each a (sparse) weighted sum of its parents, a mechanism, plus noise."""
        B, N, fan_in = z.shape
        if activate:  # TabPFN's block is (activation, Linear, noise): the mechanism acts on the parents
            every = torch.stack([f(z) for f in MECHANISMS.values()])  # (M, B, N, fan_in)
            z = every[mechanism, torch.arange(B)]
        keep = 1.0 - dropout  # (B, 1, 1)
        edges = torch.rand((B, fan_in, width), generator=gen) < keep
        weights = torch.randn((B, fan_in, width), generator=gen) * weight_std / torch.sqrt(keep * fan_in) * edges
        bias = torch.randn((B, 1, width), generator=gen) * 0.1
        return torch.bmm(z, weights) + bias + noise * torch.randn((B, N, width), generator=gen)

    def _graph(self, gen: torch.Generator, B: int, N: int, n_causes: int, causes: torch.Tensor | None = None,
               out_width: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run a random layered DAG on fresh causes; returns (causes, node values of every layer)."""
        depth, width = _randint(gen, *self.layers), _randint(gen, *self.hidden)
        if self.kind == "scm":  # enough nodes to read max_features features and a target off them
            width = max(width, math.ceil((self.max_features + 1) / depth))
        mechanism = torch.randint(len(MECHANISMS), (B,), generator=gen)
        noise = _log_uniform(gen, (B, 1, 1), *self.noise_std)
        weight_std = _log_uniform(gen, (B, 1, 1), *self.weight_std)
        dropout = _uniform(gen, (B, 1, 1), *self.edge_dropout)
        causes = self._causes(gen, B, N, n_causes) if causes is None else causes
        z = self._layer(gen, causes, width, mechanism, noise, weight_std, torch.zeros_like(dropout), activate=False)
        layers = []
        for i in range(depth):
            last = i == depth - 1 and out_width is not None
            z = self._layer(gen, z, out_width if last else width, mechanism, noise, weight_std, dropout, activate=True)
            layers.append(z)
        return causes, layers

    def _scm_task(self, gen: torch.Generator, B: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and target read off random nodes of a random causal graph (unread nodes stay hidden)."""
        n_causes = _randint(gen, 1, max(2, self.max_features // 2))
        causes, layers = self._graph(gen, B, N, n_causes)
        nodes = torch.cat(layers, dim=-1)  # (B, N, M): every node below the causes
        order = torch.argsort(torch.rand((B, nodes.shape[-1]), generator=gen), dim=1)
        target = nodes.gather(2, order[:, None, :1].expand(B, N, 1))[..., 0]
        features = nodes.gather(2, order[:, None, 1:1 + self.max_features].expand(B, N, self.max_features))
        return features, target

    def _mlp_task(self, gen: torch.Generator, B: int, N: int, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features are independent causes; the target is a random noisy MLP of the used ones."""
        causes = self._causes(gen, B, N, self.max_features) * used
        _, layers = self._graph(gen, B, N, self.max_features, causes=causes, out_width=1)
        return causes, layers[-1][..., 0]

    def _classes(self, gen: torch.Generator, target: torch.Tensor, n_classes: torch.Tensor) -> torch.Tensor:
        """Threshold the target at the values of n_classes-1 random rows, then shuffle class ids."""
        B, N = target.shape
        rows = torch.randint(N, (B, self.max_classes - 1), generator=gen)
        bounds = target.gather(1, rows)
        unused = torch.arange(self.max_classes - 1)[None, :] >= (n_classes[:, None] - 1)
        bounds = bounds.masked_fill(unused, float("inf"))
        rank = (target[:, :, None] > bounds[:, None, :]).sum(-1)  # (B, N) in [0, n_classes)
        absent = torch.arange(self.max_classes)[None, :] >= n_classes[:, None]
        shuffle = torch.argsort(torch.rand((B, self.max_classes), generator=gen) + 2.0 * absent, dim=1)
        return shuffle.gather(1, rank)

    # --- the BatchSource interface ----------------------------------------------------
    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        gen = torch_generator(seed, "prior", index)
        B, N = batch_size, self.n_rows
        n_train = _randint(gen, self.min_train_rows, N - self.min_test_rows)
        n_features = torch.randint(1, self.max_features + 1, (B,), generator=gen)
        many = torch.randint(3, max(3, self.max_classes) + 1, (B,), generator=gen).clamp(max=self.max_classes)
        n_classes = torch.where(torch.rand((B,), generator=gen) < self.p_binary, torch.full_like(many, 2), many)
        used = (torch.arange(self.max_features)[None, None, :] < n_features[:, None, None]).float()  # (B, 1, F)
        features, target = self._scm_task(gen, B, N) if self.kind == "scm" else self._mlp_task(gen, B, N, used)
        features = torch.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)
        target = torch.nan_to_num(target, nan=0.0, posinf=0.0, neginf=0.0)
        x = standardize_by_train_rows(features, n_train)
        x = x * used
        y = self._classes(gen, target, n_classes)
        return {"x": x.float(), "y": y, "n_train": torch.tensor(n_train), "n_features": n_features,
                "n_classes": n_classes}
