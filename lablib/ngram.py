"""Unigram, bigram and trigram language models: the trivial baselines a token-level loss stands beside.

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
- `TrigramLM` interpolates the trigram relative frequency with that bigram the same way;
  `fit_trigram_on_dev` chooses its weight after the lower orders'.
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


@dataclass
class TrigramLM:
    """Interpolated trigram: p(w | u, v) = lam c(u, v, w) / c(u, v) + (1 - lam) p_bigram(w | v);
    a context pair never seen in training falls back to the bigram. Counts sparse, like `BigramLM`'s."""

    bigram: BigramLM
    triple_codes: np.ndarray  # sorted distinct (u * V + v) * V + w
    triple_counts: np.ndarray
    context_codes: np.ndarray  # sorted distinct u * V + v that precede a token
    context_counts: np.ndarray
    lam: float = 0.7

    @classmethod
    def fit(cls, tokens, bigram: BigramLM, lam: float = 0.7) -> "TrigramLM":
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"interpolation weight: expected 0 <= lam <= 1, got {lam}")
        V = bigram.vocab_size
        x = _tokens(tokens, V).ravel()
        ctx = x[:-2] * V + x[1:-1]
        triples, counts = np.unique(ctx * V + x[2:], return_counts=True)
        contexts, ctx_counts = np.unique(ctx, return_counts=True)
        return cls(bigram, triples, counts.astype(np.float64), contexts, ctx_counts.astype(np.float64), float(lam))

    @staticmethod
    def _lookup(codes: np.ndarray, counts: np.ndarray, query: np.ndarray) -> np.ndarray:
        where = np.searchsorted(codes, query)
        found = where < codes.size
        found[found] = codes[where[found]] == query[found]
        return np.where(found, counts[np.minimum(where, codes.size - 1)], 0.0)

    def prob(self, u, v, w) -> np.ndarray:
        V = self.bigram.vocab_size
        u, v, w = (np.asarray(a, dtype=np.int64) for a in (u, v, w))
        triple = self._lookup(self.triple_codes, self.triple_counts, (u * V + v) * V + w)
        context = self._lookup(self.context_codes, self.context_counts, u * V + v)
        relative = np.divide(triple, context, out=np.zeros_like(triple), where=context > 0)
        lam = np.where(context > 0, self.lam, 0.0)
        return lam * relative + (1 - lam) * self.bigram.prob(v, w)

    def nll_stream(self, tokens) -> float:
        """Mean NLL of tokens[2:] each given the two tokens before it."""
        x = _tokens(tokens, self.bigram.vocab_size).ravel()
        return float(-np.log(self.prob(x[:-2], x[1:-1], x[2:])).mean())

    def log_prob_at(self, ids, positions) -> float:
        """Sum of log p(ids[p] | the two tokens before it) over positions (>= 1; position 1 has one token
        of context and is scored by the bigram)."""
        ids = np.asarray(ids, dtype=np.int64)
        p = np.asarray(positions, dtype=np.int64)
        first = p == 1
        p2 = p[~first]
        total = float(np.log(self.prob(ids[p2 - 2], ids[p2 - 1], ids[p2])).sum()) if p2.size else 0.0
        if first.any():
            total += float(np.log(self.bigram.prob(ids[:1], ids[1:2])).sum())
        return total


def fit_trigram_on_dev(train_tokens, vocab_size: int, dev_fraction: float = 0.1, lams=LAMBDA_GRID) -> tuple[TrigramLM, dict]:
    """The unigram and bigram as `fit_on_dev` chooses them, then the trigram's lam chosen the same way (on the
    last `dev_fraction` of the stream, counts from the rest), refit on the whole stream."""
    lower = fit_on_dev(train_tokens, vocab_size, dev_fraction)
    x = _tokens(train_tokens, vocab_size).ravel()
    fit_part, dev = x[:-lower.dev_tokens], x[-lower.dev_tokens:]
    bigram_fit = BigramLM.fit(fit_part, vocab_size, lower.bigram.lam, lower.unigram.k)
    trigram_fit = TrigramLM.fit(fit_part, bigram_fit)
    dev_losses = {}
    for lam in lams:
        trigram_fit.lam = float(lam)
        dev_losses[float(lam)] = trigram_fit.nll_stream(dev)
    lam = min(dev_losses, key=dev_losses.get)
    return TrigramLM.fit(x, lower.bigram, lam), {**lower.smoothing(), "trigram": f"interpolated with the bigram, lam={lam:g}"}
