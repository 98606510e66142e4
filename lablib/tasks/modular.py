"""Modular arithmetic groups (Power et al. 2022): equations `a op b = c (mod p)` with held-out pairs.

Notable here:
- A `ModularGroup` is one operation and one modulus ("add:47" is a + b mod 47). `OPERATIONS`
  is the table of operations; division is a * b^-1 (b != 0), as in Power et al.
- `split_pairs` puts a fixed share of a group's (a, b) pairs into training and the rest into the
  held-out set, drawn from the `grokking` stream; the held-out set is split again into `dev`
  (for choosing recipes) and `test` (reported) by `lablib.evidence.split_of`.
- `ModularVocab` gives the tokens after a text tokenizer's ids: one per residue 0..max_p-1
  (shared by all groups), one operation token per group and "=". An equation is the five tokens
  `[op_g, a, b, =, c]`; the answer c is predicted at the "=" position.
- `equation_rows` packs equations back to back into rows of a fixed length (the rest filled
  with <eos>), the form in which they are mixed into the pretraining stream and evaluated.
- `answer_accuracy` scores a model's argmax answer for every equation of a set of pairs;
  `most_frequent_answer_accuracy` is the trivial rule (answer the training set's commonest c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from lablib.evidence import split_of
from lablib.seeding import numpy_rng

EQUATION_LEN = 5  # op, a, b, =, c
ANSWER_OFFSET = 3  # the "=" token: its next-token prediction is the answer


def _divide(a: np.ndarray, b: np.ndarray, p: int) -> np.ndarray:
    return (a * np.array([pow(int(x), -1, p) for x in b], dtype=np.int64)) % p


OPERATIONS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]]] = {
    "add": ("+", lambda a, b, p: (a + b) % p),
    "sub": ("-", lambda a, b, p: (a - b) % p),
    "mul": ("*", lambda a, b, p: (a * b) % p),
    "div": ("/", _divide),
    "square_sum": ("x²+y²", lambda a, b, p: (a * a + b * b) % p),
}


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


@dataclass(frozen=True)
class ModularGroup:
    op: str
    p: int

    @property
    def name(self) -> str:
        return f"{self.op}:{self.p}"

    def describe(self) -> str:
        return f"a {OPERATIONS[self.op][0]} b mod {self.p}"

    def pairs(self) -> np.ndarray:
        """Every (a, b) the operation is defined on, (N, 2) int64 in row-major order."""
        a, b = np.meshgrid(np.arange(self.p), np.arange(self.p), indexing="ij")
        pairs = np.stack([a.ravel(), b.ravel()], 1).astype(np.int64)
        return pairs[pairs[:, 1] != 0] if self.op == "div" else pairs

    def answers(self, pairs: np.ndarray) -> np.ndarray:
        return OPERATIONS[self.op][1](pairs[:, 0], pairs[:, 1], self.p).astype(np.int64)


def parse_group(text: str) -> ModularGroup:
    """'add:47' -> ModularGroup('add', 47); a bad name is one ValueError line."""
    op, _, p = text.partition(":")
    if op not in OPERATIONS or not p.isdigit():
        raise ValueError(f"group {text!r}: expected OP:P with OP one of {', '.join(OPERATIONS)} and P a prime, e.g. 'add:47'")
    if not _is_prime(int(p)):
        raise ValueError(f"group {text!r}: expected a prime modulus (every b then has an inverse), got {p}")
    return ModularGroup(op, int(p))


@dataclass(frozen=True)
class GroupSplit:
    """A group's pairs: `train` (in the pretraining stream) and the held-out `dev` and `test` pairs (never in it)."""

    group: ModularGroup
    train: np.ndarray
    dev: np.ndarray
    test: np.ndarray

    @property
    def heldout(self) -> np.ndarray:
        return np.concatenate([self.dev, self.test])


def split_pairs(group: ModularGroup, train_fraction: float, seed: int = 0) -> GroupSplit:
    """round(train_fraction * N) random pairs for training; the rest held out, halved into dev / test by hash."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction: expected a value in (0, 1), got {train_fraction}")
    pairs = group.pairs()
    order = numpy_rng(seed, "grokking", group.p, list(OPERATIONS).index(group.op)).permutation(len(pairs))
    n_train = int(round(train_fraction * len(pairs)))
    train, rest = pairs[np.sort(order[:n_train])], pairs[np.sort(order[n_train:])]
    is_dev = np.array([split_of(f"{group.name}:{a}:{b}", seed=seed) == "dev" for a, b in rest], dtype=bool)
    return GroupSplit(group, train, rest[is_dev], rest[~is_dev])


@dataclass(frozen=True)
class ModularVocab:
    """Token ids of the arithmetic after `base` ids of a text tokenizer: residues, one op token per group, '='."""

    base: int
    max_p: int
    n_groups: int

    @classmethod
    def for_groups(cls, base: int, groups: Sequence[ModularGroup]) -> "ModularVocab":
        return cls(base, max(g.p for g in groups), len(groups))

    def residue(self, n: np.ndarray | int):
        return self.base + n

    def op_token(self, group_index: int) -> int:
        return self.base + self.max_p + group_index

    @property
    def equals(self) -> int:
        return self.base + self.max_p + self.n_groups

    @property
    def size(self) -> int:
        """Vocabulary size of a model over the text ids and these."""
        return self.equals + 1


def equations(vocab: ModularVocab, group_index: int, group: ModularGroup, pairs: np.ndarray) -> np.ndarray:
    """(N, 5) token ids `[op, a, b, =, c]` of the pairs."""
    n = len(pairs)
    return np.stack([np.full(n, vocab.op_token(group_index)), vocab.residue(pairs[:, 0]), vocab.residue(pairs[:, 1]),
                     np.full(n, vocab.equals), vocab.residue(group.answers(pairs))], 1).astype(np.int64)


def per_row(row_len: int) -> int:
    """Equations that fit in one row of row_len tokens."""
    if row_len < EQUATION_LEN:
        raise ValueError(f"a row of {row_len} tokens cannot hold one equation of {EQUATION_LEN}")
    return row_len // EQUATION_LEN


def equation_rows(eqs: np.ndarray, row_len: int, fill: int) -> np.ndarray:
    """Equations packed back to back into (ceil(N / per_row), row_len) rows; the tail filled with `fill`."""
    k = per_row(row_len)
    n_rows = -(-len(eqs) // k)
    flat = np.full((n_rows * k, EQUATION_LEN), fill, dtype=np.int64)
    flat[: len(eqs)] = eqs
    rows = np.full((n_rows, row_len), fill, dtype=np.int64)
    rows[:, : k * EQUATION_LEN] = flat.reshape(n_rows, k * EQUATION_LEN)
    return rows


def answer_positions(row_len: int) -> np.ndarray:
    """Input positions (of rows[:, :-1]) whose next-token prediction is an equation's answer."""
    return np.arange(per_row(row_len)) * EQUATION_LEN + ANSWER_OFFSET


@torch.no_grad()
def answer_predictions(model, eqs: np.ndarray, row_len: int, fill: int, batch_rows: int = 64) -> np.ndarray:
    """The model's argmax answer token for each equation, read in packed rows as in training."""
    rows = torch.from_numpy(equation_rows(eqs, row_len, fill))
    pos = torch.from_numpy(answer_positions(row_len))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(rows), batch_rows):
        logits = model(rows[i:i + batch_rows, :-1].to(device), mask="causal")
        out.append(logits[:, pos].argmax(-1).reshape(-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()[: len(eqs)]


def answer_accuracy(model, eqs: np.ndarray, row_len: int, fill: int) -> float:
    return float((answer_predictions(model, eqs, row_len, fill) == eqs[:, -1]).mean())


def most_frequent_answer_accuracy(split: GroupSplit, pairs: np.ndarray) -> float:
    """The trivial rule: always answer the commonest c among the training pairs, scored on `pairs`."""
    train_answers = split.group.answers(split.train)
    commonest = np.bincount(train_answers, minlength=split.group.p).argmax()
    return float((split.group.answers(pairs) == commonest).mean())
