"""Unigram and bigram language models: the trivial baselines a token-level loss stands beside.

Notable here:
- Losses are in nats per token, scored on exactly the targets a causal LM is scored on:
  for held-out blocks of shape (B, T+1), the targets are blocks[:, 1:] and a bigram's
  context is the token just before each target, inside the same block.
- `UnigramLM` is add-k smoothed: p(w) = (c(w) + k) / (N + k V), so no token of the
  vocabulary has probability zero.
- `BigramLM` interpolates (Jelinek-Mercer) the bigram relative frequency with that
  unigram: p(w | v) = lam c(v, w) / c(v) + (1 - lam) p(w); a context never seen in
  training falls back to p(w). Counts are kept sparse (sorted pair codes), so an 8k
  vocabulary costs memory in the number of distinct pairs, not V^2.
- `fit_on_dev` chooses k and then lam on a dev part of the training tokens (the last
  `dev_fraction` of the stream; counts from the rest), then refits the counts on every
  training token with the chosen values. The held-out tokens play no part in the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ADD_K_GRID = (0.001, 0.01, 0.1, 0.5, 1.0)
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def _tokens(tokens, vocab_size: int) -> np.ndarray:
    x = np.asarray(tokens, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got ids from {x.min()} to {x.max()}")
    return x


@dataclass
class UnigramLM:
    counts: np.ndarray  # (V,) token counts
    k: float = 1.0  # add-k pseudo-count per vocabulary entry

    @classmethod
    def fit(cls, tokens, vocab_size: int, k: float = 1.0) -> "UnigramLM":
        if k <= 0:
            raise ValueError(f"add-k: expected k > 0 (every token needs some probability), got {k}")
        x = _tokens(tokens, vocab_size).ravel()
        return cls(np.bincount(x, minlength=vocab_size).astype(np.float64), float(k))

    @property
    def vocab_size(self) -> int:
        return self.counts.size

    def probs(self) -> np.ndarray:
        return (self.counts + self.k) / (self.counts.sum() + self.k * self.vocab_size)

    def nll(self, targets) -> float:
        """Mean negative log-likelihood (nats) of the target tokens."""
        t = _tokens(targets, self.vocab_size).ravel()
        return float(-np.log(self.probs()[t]).mean())


@dataclass
class BigramLM:
    unigram: UnigramLM
    pair_codes: np.ndarray  # sorted distinct (prev * V + next)
    pair_counts: np.ndarray  # count of each code
    context_counts: np.ndarray  # (V,) how often each token is followed by another
    lam: float = 0.9  # weight of the bigram relative frequency

    @classmethod
    def fit(cls, tokens, vocab_size: int, lam: float = 0.9, k: float = 1.0) -> "BigramLM":
        """Counts from a token stream (each adjacent pair is one bigram)."""
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"interpolation weight: expected 0 <= lam <= 1, got {lam}")
        x = _tokens(tokens, vocab_size).ravel()
        codes, counts = np.unique(x[:-1] * vocab_size + x[1:], return_counts=True)
        context = np.bincount(x[:-1], minlength=vocab_size).astype(np.float64)
        return cls(UnigramLM.fit(x, vocab_size, k), codes, counts.astype(np.float64), context, float(lam))

    @property
    def vocab_size(self) -> int:
        return self.unigram.vocab_size

    def prob(self, prev, nxt) -> np.ndarray:
        prev, nxt = np.asarray(prev, dtype=np.int64), np.asarray(nxt, dtype=np.int64)
        codes = prev * self.vocab_size + nxt
        where = np.searchsorted(self.pair_codes, codes)
        found = where < self.pair_codes.size
        found[found] = self.pair_codes[where[found]] == codes[found]
        pair = np.where(found, self.pair_counts[np.minimum(where, self.pair_codes.size - 1)], 0.0)
        context = self.context_counts[prev]
        relative = np.divide(pair, context, out=np.zeros_like(pair), where=context > 0)
        lam = np.where(context > 0, self.lam, 0.0)
        return lam * relative + (1 - lam) * self.unigram.probs()[nxt]

    def nll_pairs(self, prev, nxt) -> float:
        return float(-np.log(self.prob(prev, nxt)).mean())

    def nll_stream(self, tokens) -> float:
        """Mean NLL of tokens[1:] each given the token before it."""
        x = _tokens(tokens, self.vocab_size).ravel()
        return self.nll_pairs(x[:-1], x[1:])

    def nll_blocks(self, blocks) -> float:
        """Mean NLL of blocks[:, 1:] given blocks[:, :-1], the causal LM's targets."""
        b = _tokens(blocks, self.vocab_size)
        return self.nll_pairs(b[:, :-1].ravel(), b[:, 1:].ravel())


@dataclass
class NgramBaselines:
    unigram: UnigramLM
    bigram: BigramLM
    dev_losses: dict[str, dict[float, float]] = field(default_factory=dict)  # {"unigram": {k: nll}, "bigram": {lam: nll}}
    dev_tokens: int = 0

    def smoothing(self) -> dict:
        """What was chosen and how (for results.json)."""
        return {"unigram": f"add-k, k={self.unigram.k:g}", "bigram": f"interpolated with the unigram, lam={self.bigram.lam:g}",
                "chosen_on": f"the last {self.dev_tokens:,} training tokens (dev), counts from the rest; "
                             "then refit on every training token",
                "grid": {"k": list(ADD_K_GRID), "lam": list(LAMBDA_GRID)}}


def fit_on_dev(train_tokens, vocab_size: int, dev_fraction: float = 0.1, ks=ADD_K_GRID,
               lams=LAMBDA_GRID) -> NgramBaselines:
    """Choose k (unigram) then lam (bigram, over that unigram) on the last `dev_fraction` of the
    training stream, then refit both on the whole stream."""
    x = _tokens(train_tokens, vocab_size).ravel()
    n_dev = int(round(len(x) * dev_fraction))
    if not 0.0 < dev_fraction < 1.0 or n_dev < 2 or len(x) - n_dev < 2:
        raise ValueError(f"n-gram dev split: expected 0 < dev_fraction < 1 leaving at least 2 tokens on each side, "
                         f"got {dev_fraction} of {len(x)} tokens")
    fit_part, dev = x[:-n_dev], x[-n_dev:]
    uni_dev = {float(k): UnigramLM.fit(fit_part, vocab_size, k).nll(dev) for k in ks}
    k = min(uni_dev, key=uni_dev.get)
    bi_fit = BigramLM.fit(fit_part, vocab_size, 0.0, k)
    bi_dev = {}
    for lam in lams:
        bi_fit.lam = float(lam)
        bi_dev[float(lam)] = bi_fit.nll_stream(dev)
    lam = min(bi_dev, key=bi_dev.get)
    return NgramBaselines(UnigramLM.fit(x, vocab_size, k), BigramLM.fit(x, vocab_size, lam, k),
                          {"unigram": uni_dev, "bigram": bi_dev}, n_dev)


def heldout_baselines(train_blocks, eval_blocks, vocab_size: int, dev_fraction: float = 0.1) -> dict:
    """Chance, unigram and bigram losses (nats/token) on the causal LM's held-out targets.

    train_blocks: the packed training tokens ((N, T+1) blocks cut from one stream, so
    flattening them gives the stream back); eval_blocks: the held-out blocks the model's
    `val_loss` is computed on (e.g. the concatenated `eval_batches`).
    """
    eval_blocks = _tokens(eval_blocks, vocab_size)
    if eval_blocks.ndim != 2 or eval_blocks.shape[1] < 2:
        raise ValueError(f"held-out blocks: expected shape (B, T+1) with T >= 1, got {eval_blocks.shape}")
    models = fit_on_dev(train_blocks, vocab_size, dev_fraction)
    return {"chance": math.log(vocab_size), "unigram": models.unigram.nll(eval_blocks[:, 1:]),
            "bigram": models.bigram.nll_blocks(eval_blocks), "tokens_scored": int(eval_blocks[:, 1:].size),
            "smoothing": models.smoothing()}
