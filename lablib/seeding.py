"""Seeds: named random streams and the one seeded model builder.

Notable here:
- A random draw is a function of (seed, stream, index...): `numpy.random.SeedSequence`
  mixes the three, so streams never collide (no `seed * K + index` arithmetic, under
  which seed 1 at index 0 would equal seed 0 at index K) and adding a stream never
  shifts another.
- `STREAMS` names every stream the lab draws from; a stream's number is its entropy word.
- `seeded_model(cls, cfg, seed)` is the one way an experiment builds a model: its
  initialisation is drawn from `torch.manual_seed(seed)` inside `torch.random.fork_rng`,
  so building a model leaves the caller's global generator as it was.
  `seeded_transformer(cfg, vocab_size)` is its common case: the plain `Transformer` of a
  flat experiment config, over the tokenizer's ids, long enough for its training rows.
"""

from __future__ import annotations

from typing import TypeVar

import dataclasses

import numpy as np
import torch

from lablib.config import ModelConfig
from lablib.models import Transformer

STREAMS = {  # stream name -> its entropy word (never renumber: results depend on it)
    "dropout": 1,  # per (step, rank): dropout and any other global-generator draw in a step
    "masks": 2,  # per micro-batch: the objective's generator (masking, span corruption, mixtures)
    "epoch_order": 3,  # per epoch: the order of the training blocks
    "pairs": 4,  # per micro-batch: the contrastive objective's (docstring, function) pairs
    "prior": 5,  # per micro-batch: the tabular prior's tasks
    "induction": 6,  # per micro-batch: the induction task's random strings
    "noise": 7,  # causal tracing's corruption noise
    "corr2cause": 8,  # per micro-batch: the Corr2Cause classes and hypotheses drawn for training
    "icl_regression": 9,  # in-context regression: task pools, training sequences, evaluation sets
    "preferences": 10,  # per epoch: the order of scored segments; per model: its samples and random-token draws
    "grokking": 11,  # modular groups' train / held-out pairs and, per micro-batch, the equations drawn
    "finetune": 12,  # per micro-batch: the examples drawn for a fine-tuning step (objectives' downstream task)
}

M = TypeVar("M", bound=torch.nn.Module)


def _entropy(seed: int, stream: str, index: tuple[int, ...]) -> list[int]:
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {', '.join(STREAMS)}, got {stream!r}")
    return [int(seed), STREAMS[stream], *map(int, index)]


def stream_seed(seed: int, stream: str, *index: int) -> int:
    """A 63-bit seed for a torch generator, a function of (seed, stream, index...) only."""
    state = np.random.SeedSequence(_entropy(seed, stream, index)).generate_state(1, np.uint64)[0]
    return int(state) >> 1  # torch seeds are signed 64-bit


def torch_generator(seed: int, stream: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, stream, *index))


def numpy_rng(seed: int, stream: str, *index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, stream, index)))


def seeded_model(cls: type[M], cfg, seed: int) -> M:
    """`cls(cfg)` with its initialisation drawn from seed `seed`; the global generator is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def seeded_transformer(cfg, vocab_size: int, **changes) -> Transformer:
    """The `Transformer` of a flat config's model knobs (and `changes`) over `vocab_size` ids, seeded by cfg.seed."""
    model_cfg = dataclasses.replace(cfg.project(ModelConfig), vocab_size=vocab_size,
                                    max_seq_len=max(cfg.max_seq_len, getattr(cfg, "seq_len", 0)), **changes)
    return seeded_model(Transformer, model_cfg, cfg.seed)
