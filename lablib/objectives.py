"""Pretraining objectives: a batch and a model in, a loss and metrics out.

Notable here:
- The interface is one call, `objective(model, batch, generator) -> (loss, metrics)`,
  where `batch["tokens"]` is a (B, T+1) block of token ids and `generator` is the
  seeded torch.Generator the training loop owns (so masking is reproducible and a
  resumed run draws the same masks). New objectives plug in by implementing it;
  the training loop never changes.
- `OBJECTIVES` is a table from name to constructor; `make_objective(name, ...)`
  builds one by name.
- Losses are mean token cross-entropy over the positions the objective scores;
  `metrics["tokens_scored"]` says how many that was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

IGNORE = -100  # label value for positions that carry no loss (cross_entropy's ignore_index)


class Objective(Protocol):
    name: str

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over labels != IGNORE, and how many positions that was."""
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)
    return loss, n


@dataclass
class CausalLM:
    """Next-token prediction under the causal mask: predict tokens[:, 1:] from tokens[:, :-1]."""

    name: str = "clm"

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1], mask="causal")
        loss, n = token_cross_entropy(logits, tokens[:, 1:])
        return loss, {"tokens_scored": n}


@dataclass
class PrefixLM:
    """Bidirectional attention over a random prefix, next-token loss on the rest only.

    Each row draws its prefix length uniformly from [min_prefix, T-1]; the model
    sees inputs tokens[:, :-1] with mask 'prefix', and positions whose target
    lies inside the prefix carry no loss (they could see it).
    """

    min_prefix: int = 1
    name: str = "prefix_lm"

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        B, T = x.shape
        prefix = torch.randint(self.min_prefix, T, (B,), generator=generator).to(x.device)
        pos = torch.arange(T, device=x.device)
        y[pos[None, :] < (prefix[:, None] - 1)] = IGNORE  # target at input position i is token i+1
        logits = model(x, mask="prefix", prefix_len=prefix)
        loss, n = token_cross_entropy(logits, y)
        return loss, {"tokens_scored": n, "mean_prefix": float(prefix.float().mean())}


def mask_tokens(tokens: torch.Tensor, mask_ratio: float, mask_id: int, vocab_size: int,
                generator: torch.Generator, special_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: choose mask_ratio of positions; of those 80% -> [MASK], 10% -> random, 10% kept.

    Returns (corrupted inputs, labels with IGNORE at unchosen positions). Special
    tokens are never chosen.
    """
    shape = tokens.shape
    chosen = torch.rand(shape, generator=generator) < mask_ratio
    for sid in special_ids:
        chosen &= tokens.cpu() != sid
    how = torch.rand(shape, generator=generator)
    random_tok = torch.randint(0, vocab_size, shape, generator=generator)
    chosen, how, random_tok = chosen.to(tokens.device), how.to(tokens.device), random_tok.to(tokens.device)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))
    inputs = tokens.clone()
    inputs[chosen & (how < 0.8)] = mask_id
    swap = chosen & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_tok[swap]
    return inputs, labels


@dataclass
class MaskedLM:
    """Bidirectional masked-token prediction (BERT's 80/10/10 corruption) on tokens[:, :-1]."""

    mask_id: int
    vocab_size: int
    mask_ratio: float = 0.15
    special_ids: tuple[int, ...] = ()
    name: str = "mlm"

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio: expected a number in (0, 1), got {self.mask_ratio!r}")

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"][:, :-1]
        inputs, labels = mask_tokens(tokens, self.mask_ratio, self.mask_id, self.vocab_size, generator, self.special_ids)
        logits = model(inputs, mask="bidirectional")
        loss, n = token_cross_entropy(logits, labels)
        return loss, {"tokens_scored": n}


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "clm": CausalLM,
    "prefix_lm": PrefixLM,
    "mlm": MaskedLM,
}


def make_objective(name: str, **kwargs: Any) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**kwargs)
