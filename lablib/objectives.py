"""Pretraining objectives: a batch and a model in, a loss and metrics out.

Notable here:
- The interface is one call, `objective(model, batch, generator) -> (loss, metrics)`,
  where `batch["tokens"]` is a (B, T+1) block of token ids and `generator` is the
  seeded torch.Generator the training loop owns (so masking is reproducible and a
  resumed run draws the same masks). New objectives plug in by implementing it;
  the training loop never changes.
- `OBJECTIVES` is the one table of objectives: each `ObjectiveSpec` holds its builder and
  what it needs (causal or bidirectional reading, next-token prediction, the model class
  with its heads, the encoder-decoder, contrastive pairs, extra ids, config checks).
  Config choices and validation are derived from it, so a new objective is one
  `register_objective` entry; modules named in $LABLIB_PLUGINS (comma-separated) are
  imported before the table is read, so an objective defined outside the lab can register.
- Losses are mean token cross-entropy over the positions the objective scores;
  `metrics["tokens_scored"]` says how many that was.
- The suite: T5 span corruption with sentinels (encoder-decoder, or one
  non-causal decoder row), multi-token prediction (Gloeckle et al. 2024), future-token
  prediction (Walker 2024), the GPT-BERT hybrid (masked next-token + causal rows),
  contrastive docstring<->code InfoNCE (CodeT5+), per-batch `Mixture`s and mid-run
  `Schedule`s (biphasic CLM->MLM). Every masking draw uses the loop's generator.
- Pretraining with feedback (Korbak et al. 2023), on batches that carry a per-row preference
  score (`batch["score"]`, lower is better; `ObjectiveSpec.scores`): filtering, conditional
  training with `<|good|>` / `<|bad|>` control tokens in each row's first (start) position,
  unlikelihood on bad rows, reward-weighted regression, and MLE then conditional training.
- `ObjectiveConfig` holds every objective knob; `build_objective(cfg, tokenizer, total_batches)`
  builds one from it and `decoder_model` names the model it trains. `ObjectiveBatches` adds what schedules (`index`) and contrastive
  (`doc_ids`, `code_ids`) need to the LM batches, so the training loop stays as it is.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F

from lablib.checkpoints import unwrap  # extra methods (encode, multi_token_logits) live on the plain module
from lablib.config import Config, ConfigError, ModelConfig, knob
from lablib.models import (FutureTokenConfig, FutureTokenTransformer, MultiTokenConfig, MultiTokenTransformer,
                           Transformer)
from lablib.seeding import torch_generator

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
    lies inside the prefix carry no loss (they could see it). On an encoder-decoder
    the encoder reads the prefix and the decoder predicts the rest of the row (one
    cut per micro-batch, the first row's draw, so no row is padded).
    """

    min_prefix: int = 1
    pad_id: int = 0  # encoder-decoders only: padding and decoder start token
    name: str = "prefix_lm"

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        x, y = tokens[:, :-1], tokens[:, 1:].clone()
        B, T = x.shape
        prefix = torch.randint(self.min_prefix, T, (B,), generator=generator).to(x.device)
        if is_encoder_decoder(model):  # seq2seq LM: the encoder reads the prefix, the decoder writes the rest
            cut = int(prefix[0])  # one cut per micro-batch: rows stay equal-length, no padding to pay for
            loss, n = seq2seq_loss(model, tokens[:, :cut].tolist(), tokens[:, cut:].tolist(), self.pad_id,
                                   tokens.device)
            return loss, {"tokens_scored": n, "mean_prefix": float(cut)}
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


# --- the objectives suite: span corruption, multi-token, future-token, GPT-BERT, contrastive, mixtures, schedules ---

def is_encoder_decoder(model: torch.nn.Module) -> bool:
    return hasattr(unwrap(model), "encode")


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-pad lists of ids to one (len(rows), longest) tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def seq2seq_loss(model, sources: list[list[int]], targets: list[list[int]], pad_id: int,
                 device) -> tuple[torch.Tensor, int]:
    """Encoder reads `sources`, decoder predicts `targets` after a start token (T5: the pad id)."""
    src = pad_rows(sources, pad_id).to(device)
    src_valid = pad_rows([[1] * len(s) for s in sources], 0).bool().to(device)
    dec_in = pad_rows([[pad_id] + t[:-1] for t in targets], pad_id).to(device)
    labels = pad_rows(targets, IGNORE).to(device)
    return token_cross_entropy(model(src, dec_in, src_valid), labels)


def prefix_sequence_loss(model, prefixes: list[list[int]], targets: list[list[int]], pad_id: int,
                         device) -> tuple[torch.Tensor, int]:
    """Decoder-only view of seq2seq: one row = prefix + target, bidirectional over the prefix,
    loss on the target tokens only (Wang et al.'s non-causal decoder)."""
    rows = [p + t for p, t in zip(prefixes, targets)]
    seq = pad_rows(rows, pad_id)
    labels = pad_rows([[IGNORE] * len(p) + t for p, t in zip(prefixes, targets)], IGNORE)
    prefix_len = torch.tensor([len(p) for p in prefixes])
    logits = model(seq[:, :-1].to(device), mask="prefix", prefix_len=prefix_len.to(device))
    return token_cross_entropy(logits, labels[:, 1:].to(device))


def random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """Split n_items into n_segments non-empty runs, uniformly over such splits (T5's helper)."""
    cuts = (torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1).sort().values.tolist()
    edges = [0, *cuts, n_items]
    return [b - a for a, b in zip(edges, edges[1:])]


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            generator: torch.Generator) -> torch.Tensor:
    """T5's noise mask: round(length * density) noise tokens in round(noise / mean_span) spans.

    Non-noise and noise runs alternate, starting with non-noise (as in T5), so a span
    never touches the first token.
    """
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span_length), 1), n_noise, length - n_noise)
    noise = random_segmentation(n_noise, n_spans, generator)
    keep = random_segmentation(length - n_noise, n_spans, generator)
    mask = []
    for k, s in zip(keep, noise):
        mask += [False] * k + [True] * s
    return torch.tensor(mask)


def span_corrupt(tokens: list[int], noise_mask: list[bool], sentinel_ids: list[int],
                 eos_id: int) -> tuple[list[int], list[int]]:
    """(inputs, targets): each noise span becomes one sentinel in the inputs; the targets list
    every sentinel followed by the tokens it replaced, then <eos> (T5's format)."""
    inputs, targets, span = [], [], -1
    for i, (tok, noisy) in enumerate(zip(tokens, noise_mask)):
        if noisy and (i == 0 or not noise_mask[i - 1]):
            span += 1
            if span >= len(sentinel_ids):
                raise ValueError(f"n_sentinels: a row needs more than {len(sentinel_ids)} sentinels; "
                                 "raise n_sentinels or lower noise_density")
            inputs.append(sentinel_ids[span])
            targets.append(sentinel_ids[span])
        (targets if noisy else inputs).append(tok)
    return inputs, targets + [eos_id]


@dataclass
class SpanCorruption:
    """T5's span corruption: noise spans replaced by sentinels, the model writes them back.

    Sentinel k is token id `sentinel_base + k` (the model's vocabulary holds
    `n_sentinels` extra ids after the tokenizer's). On an `EncoderDecoder` the encoder
    reads the corrupted text and the decoder writes the targets; on a decoder-only
    model the two are one row, bidirectional over the inputs (non-causal decoder).
    """

    sentinel_base: int
    n_sentinels: int
    eos_id: int
    pad_id: int = 0
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    name: str = "span_corruption"

    def __post_init__(self):
        if not 0.0 < self.noise_density < 1.0:
            raise ValueError(f"noise_density: expected a number in (0, 1), got {self.noise_density!r}")
        if self.mean_span_length < 1.0:
            raise ValueError(f"mean_span_length: expected a number >= 1, got {self.mean_span_length!r}")

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
        sentinels = [self.sentinel_base + k for k in range(self.n_sentinels)]
        inputs, targets = [], []
        for row in tokens.tolist():
            mask = random_spans_noise_mask(len(row), self.noise_density, self.mean_span_length, generator).tolist()
            i, t = span_corrupt(row, mask, sentinels, self.eos_id)
            inputs.append(i)
            targets.append(t)
        return inputs, targets

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"][:, :-1]
        inputs, targets = self.corrupt(tokens.cpu(), generator)
        pair_loss = seq2seq_loss if is_encoder_decoder(model) else prefix_sequence_loss
        loss, n = pair_loss(model, inputs, targets, self.pad_id, tokens.device)
        return loss, {"tokens_scored": n, "input_tokens": sum(map(len, inputs)) / len(inputs)}


@dataclass
class MultiTokenPrediction:
    """Gloeckle et al. 2024: head k predicts token t+k+1 from position t; the loss is the
    mean of the heads' losses (their sum, up to a constant Adam does not see).
    Needs a `MultiTokenTransformer`; head 0 alone is next-token prediction."""

    name: str = "multi_token"

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        x = tokens[:, :-1]
        T = x.shape[1]
        per_head = unwrap(model).multi_token_logits(x)
        losses, metrics = [], {}
        for k, logits in enumerate(per_head):
            labels = F.pad(tokens[:, 1 + k:], (0, k), value=IGNORE)[:, :T]
            loss_k, n_k = token_cross_entropy(logits, labels)
            losses.append(loss_k)
            metrics[f"loss_head_{k + 1}"] = float(loss_k.detach())
            metrics.setdefault("tokens_scored", n_k)
        return torch.stack(losses).mean(), metrics


def future_token_targets(tokens: torch.Tensor, n_future: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_tokens, labels), each (B, T, n_future) for inputs tokens[:, :-1]:
    slot j at position t reads token t+j and is labelled with token t+j+1 (IGNORE past the end)."""
    T = tokens.shape[1] - 1
    slots = F.pad(tokens, (0, n_future), value=pad_id).unfold(1, n_future, 1)[:, :T]
    labels = F.pad(tokens, (0, n_future), value=IGNORE).unfold(1, n_future, 1)[:, 1:T + 1]
    return slots, labels


@dataclass
class FutureTokenPrediction:
    """Walker 2024: a small decoder over the expanded top-layer state predicts the next
    n_future tokens; slot j's loss is weighted gamma**j (weights normalised to sum 1).
    Needs a `FutureTokenTransformer`."""

    gamma: float = 0.8
    pad_id: int = 0
    name: str = "future_token"

    def __post_init__(self):
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma: expected a number in (0, 1], got {self.gamma!r}")

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        net = unwrap(model)
        slots, labels = future_token_targets(tokens, net.cfg.n_future, self.pad_id)
        logits = net.future_logits(tokens[:, :-1], slots)
        weights = self.gamma ** torch.arange(net.cfg.n_future, dtype=torch.float32)
        weights = weights / weights.sum()
        total, metrics = torch.zeros((), device=tokens.device), {}
        for j in range(net.cfg.n_future):
            loss_j, n_j = token_cross_entropy(logits[:, :, j], labels[:, :, j])
            total = total + weights[j] * loss_j
            metrics[f"loss_slot_{j + 1}"] = float(loss_j.detach())
            metrics.setdefault("tokens_scored", n_j)
        return total, metrics


def masked_next_token(tokens: torch.Tensor, mask_ratio: float, mask_id: int, vocab_size: int,
                      generator: torch.Generator, special_ids: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-BERT's masked next-token prediction on inputs tokens[:, :-1]: tokens 1.. are masked
    BERT-style, and a masked token at position i+1 is predicted at position i (the place a
    causal model would predict it), so both objectives share one output alignment."""
    x = tokens[:, :-1]
    corrupted, chosen = mask_tokens(x[:, 1:], mask_ratio, mask_id, vocab_size, generator, special_ids)
    inputs = torch.cat([x[:, :1], corrupted], dim=1)
    labels = F.pad(chosen, (0, 1), value=IGNORE)
    return inputs, labels


@dataclass
class GPTBERT:
    """Charpentier & Samuel 2024 (BabyLM winner): each micro-batch's first rows train causal LM,
    the rest masked next-token prediction with bidirectional attention; rows weigh equally."""

    mask_id: int
    vocab_size: int
    mask_ratio: float = 0.15
    causal_fraction: float = 0.25
    special_ids: tuple[int, ...] = ()
    name: str = "gpt_bert"

    def __post_init__(self):
        if not 0.0 <= self.causal_fraction <= 1.0:
            raise ValueError(f"causal_fraction: expected a number in [0, 1], got {self.causal_fraction!r}")

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        B = tokens.shape[0]
        n_causal = round(B * self.causal_fraction)
        parts, metrics = [], {"tokens_scored": 0, "causal_rows": n_causal}
        if n_causal:
            causal_rows = tokens[:n_causal]
            loss_c, n_c = token_cross_entropy(model(causal_rows[:, :-1], mask="causal"), causal_rows[:, 1:])
            parts.append(loss_c * n_causal / B)
            metrics.update(loss_causal=float(loss_c.detach()), tokens_scored=metrics["tokens_scored"] + n_c)
        if n_causal < B:
            inputs, labels = masked_next_token(tokens[n_causal:], self.mask_ratio, self.mask_id, self.vocab_size,
                                               generator, self.special_ids)
            loss_m, n_m = token_cross_entropy(model(inputs, mask="bidirectional"), labels)
            parts.append(loss_m * (B - n_causal) / B)
            metrics.update(loss_masked=float(loss_m.detach()), tokens_scored=metrics["tokens_scored"] + n_m)
        return sum(parts), metrics


def pooled_embeddings(model, ids: torch.Tensor, pad_id: int, mask: str = "bidirectional",
                      with_input_layer: bool = False) -> torch.Tensor:
    """Mean over real (non-pad) tokens of the final-normed top layer: (B, d_model).

    Encoder-decoders use the encoder's output; decoder-only models read the text with
    `mask` ('causal' or 'bidirectional'; pads are never attended to).
    with_input_layer: also pool the input embeddings (token + position) and return
    [unit(input mean), unit(top mean)] (B, 2*d_model): "first-last" pooling, which keeps
    the lexical signal that a top layer trained for prediction may drop.
    """
    from lablib.models import padding_mask

    net = unwrap(model)
    valid = ids != pad_id
    reader = net.encoder if is_encoder_decoder(net) else net
    if is_encoder_decoder(net):
        h = net.encode(ids, valid)
    elif mask == "causal":  # pads sit at the end, so a causal read never sees them
        h = net.ln_final(net.trunk(ids, mask="causal"))
    else:
        h = net.ln_final(net.trunk(ids, mask="custom", attn_mask=padding_mask(valid)))
    weights = valid.to(h.dtype)[..., None]

    def mean(states):
        return (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    if not with_input_layer:
        return mean(h)
    return torch.cat([F.normalize(mean(reader.embed_tokens(ids)), dim=-1), F.normalize(mean(h), dim=-1)], dim=-1)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching pairs (row i of each is a pair)."""
    logits = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / temperature
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class Contrastive:
    """Text-code matching (CodeT5+'s contrastive stage): InfoNCE between the pooled embedding
    of a docstring and of its function, other pairs in the batch as negatives.
    Batches need `doc_ids` and `code_ids` (see `ObjectiveBatches`)."""

    pad_id: int = 0
    temperature: float = 0.05
    name: str = "contrastive"

    def __call__(self, model, batch, generator):
        if "doc_ids" not in batch or "code_ids" not in batch:
            raise ValueError("contrastive: expected batches with 'doc_ids' and 'code_ids'; "
                             "wrap the data with ObjectiveBatches(lm_blocks, pairs)")
        docs = pooled_embeddings(model, batch["doc_ids"], self.pad_id)
        code = pooled_embeddings(model, batch["code_ids"], self.pad_id)
        loss = info_nce(docs, code, self.temperature)
        with torch.no_grad():
            sims = F.normalize(docs.float(), dim=-1) @ F.normalize(code.float(), dim=-1).T
            accuracy = float((sims.argmax(1) == torch.arange(len(sims), device=sims.device)).float().mean())
        return loss, {"tokens_scored": len(docs), "in_batch_accuracy": accuracy}


@dataclass
class Mixture:
    """UL2 / CodeT5+ style: each micro-batch draws one component objective with probability
    proportional to its weight (from the loop's seeded generator, so the draw is reproducible)."""

    components: dict[str, Objective]
    weights: dict[str, float]
    name: str = "mixture"

    def __post_init__(self):
        if set(self.components) != set(self.weights) or not self.components:
            raise ValueError(f"mixture: expected one weight per component, got components {sorted(self.components)} "
                             f"and weights {sorted(self.weights)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"mixture weights: expected non-negative numbers with a positive sum, got {self.weights}")

    def __call__(self, model, batch, generator):
        names = list(self.components)
        probs = torch.tensor([float(self.weights[n]) for n in names])
        choice = int(torch.multinomial(probs, 1, generator=generator))
        loss, metrics = self.components[names[choice]](model, batch, generator)
        return loss, {**metrics, "component": choice, f"loss_{names[choice]}": float(loss.detach())}


@dataclass
class Schedule:
    """Switch objective mid-run: phase k trains on micro-batches [start_k, start_k+1).

    `phases` is [(objective, fraction of the run)], e.g. biphasic CLM->MLM with the split
    as a parameter. The phase comes from `batch["index"]` (the micro-batch number, see
    `ObjectiveBatches`), so a resumed run switches at the same place; batches without an
    index (held-out evaluation) use the last phase.
    """

    phases: list[tuple[Objective, float]]
    total_batches: int
    name: str = "schedule"

    def __post_init__(self):
        fractions = [f for _, f in self.phases]
        if not self.phases or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"schedule: expected phase fractions >= 0 that sum to 1, got {fractions}")

    def phase_of(self, index: int | None) -> int:
        if index is None:
            return len(self.phases) - 1
        ends = torch.tensor([f for _, f in self.phases]).cumsum(0) * self.total_batches
        return min(int((ends <= index).sum()), len(self.phases) - 1)

    def __call__(self, model, batch, generator):
        index = batch.get("index")
        phase = self.phase_of(None if index is None else int(index))
        loss, metrics = self.phases[phase][0](model, batch, generator)
        return loss, {**metrics, "phase": phase}


@dataclass
class ObjectiveBatches:
    """A training-loop batch source that adds what some objectives need to the LM blocks:
    `index` (the micro-batch number, for schedules) and, given `pairs` (tensors of equal
    length such as doc_ids / code_ids), a reproducible draw of pair rows (for contrastive)."""

    lm: Any  # a BatchSource, e.g. lablib.data.TokenBlocks
    pairs: dict[str, torch.Tensor] | None = None

    def n_pairs(self) -> int:
        return len(next(iter(self.pairs.values()))) if self.pairs else 0

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        out = {**self.lm.batch(index, batch_size, seed), "index": torch.tensor(index)}
        if self.pairs:
            if self.n_pairs() < batch_size:  # a repeated pair would be its own negative
                raise ValueError(f"pairs: expected at least batch_size={batch_size} pairs, got {self.n_pairs()}")
            rows = torch.randperm(self.n_pairs(), generator=torch_generator(seed, "pairs", index))[:batch_size]
            out.update({name: t[rows] for name, t in self.pairs.items()})
        return out


# --- pretraining with feedback: objectives that read a preference score per row (Korbak et al. 2023) ---

CONTROL_TOKENS = ("<|good|>", "<|bad|>")  # conditional training's control tokens, special tokens of the tokenizer


def add_control_tokens(tokenizer):
    """The tokenizer with `<|good|>` and `<|bad|>` added as special tokens (ids after its vocabulary);
    a tokenizer that has them already is returned as it is."""
    backend = tokenizer.backend
    missing = [t for t in CONTROL_TOKENS if backend.token_to_id(t) is None]
    if missing:
        backend.add_special_tokens(missing)
    return tokenizer


def control_ids(tokenizer) -> tuple[int, int]:
    """(good id, bad id) of a tokenizer with the control tokens; one line when it lacks them."""
    ids = tuple(tokenizer.backend.token_to_id(t) for t in CONTROL_TOKENS)
    if None in ids:
        raise ValueError(f"conditional: the tokenizer has no {' / '.join(CONTROL_TOKENS)} tokens; add them with "
                         "lablib.objectives.add_control_tokens(tokenizer) before building the model")
    return ids


def scored_rows(batch: dict[str, torch.Tensor], objective: str) -> torch.Tensor:
    """The per-row preference scores of a batch (lower is better); one line when the batch has none."""
    if "score" not in batch:
        raise ValueError(f"{objective}: expected batches with a per-row 'score' (a preference score, lower is "
                         "better), such as lablib.experiments.preferences.ScoredBatches gives")
    return batch["score"].to(batch["tokens"].device).float()


def row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) token cross-entropy (0 where labels == IGNORE)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE,
                         reduction="none")
    return ce.view(labels.shape)


def _check_threshold(name: str, threshold: float | None) -> float:
    if threshold is None or not math.isfinite(threshold):
        raise ValueError(f"{name}: expected a finite preference_threshold (score above it = bad segment), "
                         f"got {threshold!r}")
    return float(threshold)


@dataclass
class Filtering:
    """Next-token loss on the segments whose score is at most `threshold`; rows above it carry no loss.
    (The training data should hold good segments only, so a filtered run keeps MLE's token budget.)"""

    threshold: float
    name: str = "filtering"

    def __post_init__(self):
        self.threshold = _check_threshold(self.name, self.threshold)

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        labels = tokens[:, 1:].clone()
        keep = scored_rows(batch, self.name) <= self.threshold
        labels[~keep] = IGNORE
        loss, n = token_cross_entropy(model(tokens[:, :-1], mask="causal"), labels)
        return loss, {"tokens_scored": n, "rows_kept": float(keep.float().mean())}


@dataclass
class ConditionalTraining:
    """Each row's first token (its start token) becomes `<|good|>` when its score is at most `threshold`,
    else `<|bad|>`; a random `unconditional_fraction` of rows keeps its start token (the paper's small
    share of segments without a control token). Next-token loss on every later token: a control token
    is read, never predicted. Sampling then starts from `<|good|>`."""

    threshold: float
    good_id: int
    bad_id: int
    unconditional_fraction: float = 0.01
    name: str = "conditional"

    def __post_init__(self):
        self.threshold = _check_threshold(self.name, self.threshold)
        if not 0.0 <= self.unconditional_fraction < 1.0:
            raise ValueError(f"unconditional_fraction: expected a number in [0, 1), got {self.unconditional_fraction!r}")

    def rows(self, tokens: torch.Tensor, score: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The rows with their control tokens in position 0."""
        control = torch.where(score.to(tokens.device) <= self.threshold, self.good_id, self.bad_id)
        plain = (torch.rand(len(tokens), generator=generator) < self.unconditional_fraction).to(tokens.device)
        out = tokens.clone()
        out[:, 0] = torch.where(plain, tokens[:, 0], control.to(tokens.dtype))
        return out

    def __call__(self, model, batch, generator):
        tokens = self.rows(batch["tokens"], scored_rows(batch, self.name), generator)
        loss, n = token_cross_entropy(model(tokens[:, :-1], mask="causal"), tokens[:, 1:])
        return loss, {"tokens_scored": n, "good_rows": float((tokens[:, 0] == self.good_id).float().mean())}


def unlikelihood_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T) -log(1 - p(label)) (Welleck et al. 2020), 0 where labels == IGNORE; stable near p = 1."""
    logp = torch.log_softmax(logits.float(), -1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).clamp(max=-1e-6)
    out = -torch.log(-torch.expm1(picked))  # log(1 - p) = log(-expm1(log p))
    return torch.where(labels == IGNORE, torch.zeros_like(out), out)


@dataclass
class Unlikelihood:
    """Likelihood on good segments (score <= threshold), `alpha` x unlikelihood on bad ones: every
    token of a bad segment is pushed down (Korbak et al.'s unlikelihood objective)."""

    threshold: float
    alpha: float = 1.0
    name: str = "unlikelihood"

    def __post_init__(self):
        self.threshold = _check_threshold(self.name, self.threshold)
        if not self.alpha > 0:
            raise ValueError(f"unlikelihood_alpha: expected a number > 0, got {self.alpha!r}")

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        labels = tokens[:, 1:]
        bad = scored_rows(batch, self.name) > self.threshold
        logits = model(tokens[:, :-1], mask="causal")
        per_token = torch.where(bad[:, None], self.alpha * unlikelihood_loss(logits, labels),
                                row_cross_entropy(logits, labels))
        n = int((labels != IGNORE).sum())
        return per_token.sum() / max(1, n), {"tokens_scored": n, "bad_rows": float(bad.float().mean())}


@dataclass
class RewardWeighted:
    """Reward-weighted regression: each row's next-token loss weighted by exp(-score / beta), the
    weights normalised to mean 1 over the batch (so the learning rate means what it means for MLE)."""

    beta: float
    name: str = "rwr"

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"rwr_beta: expected a number > 0, got {self.beta!r}")

    def __call__(self, model, batch, generator):
        tokens = batch["tokens"]
        labels = tokens[:, 1:]
        score = scored_rows(batch, self.name)
        weight = torch.softmax(-score / self.beta, 0) * len(score)
        ce = row_cross_entropy(model(tokens[:, :-1], mask="causal"), labels)
        n = int((labels != IGNORE).sum())
        return (ce * weight[:, None]).sum() / max(1, n), {"tokens_scored": n, "max_weight": float(weight.max())}


# --- the objective registry: one entry per objective, everything else derived from it ------------

@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective's builder and what it needs from the model, the data and the evaluation."""

    name: str
    build: Callable[[Any, Any, int], Objective]  # (config, tokenizer, total micro-batches) -> objective
    reads: Literal["causal", "bidirectional"]  # how a model trained with it reads a text (embeddings)
    next_token: bool  # its model predicts the next token (held-out next-token loss is defined)
    model: str = "transformer"  # the decoder-only model it needs: a key of DECODER_MODELS (each one is a Transformer)
    encoder_decoder: bool = False  # it also trains the T5-shaped encoder-decoder
    pairs: bool = False  # its batches need (doc_ids, code_ids) pairs, see ObjectiveBatches
    combines: bool = False  # built from other objectives (mixture, biphasic)
    scores: bool = False  # its batches need a per-row preference score, batch["score"] (pretraining with feedback)
    fills: Literal["mask", "sentinel"] = "mask"  # how its bidirectional reader predicts a hidden token
    extra_ids: Callable[[Any], int] = lambda cfg: 0  # ids the model needs beyond the tokenizer's
    check: Callable[[Any], None] = lambda cfg: None  # raises ConfigError when the config cannot train it


OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, *, reads: str, next_token: bool, **needs: Any):
    """Decorator: register `build(cfg, tokenizer, total_batches) -> Objective` as objective `name`."""
    def add(build):
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} is registered twice")
        OBJECTIVES[name] = ObjectiveSpec(name, build, reads, next_token, **needs)
        return build
    return add


def _span_rows_fit(cfg) -> None:
    """A decoder-only model reads span corruption's inputs and targets as one row: it must fit."""
    longest = cfg.seq_len + 2 * math.ceil(cfg.seq_len * cfg.noise_density / cfg.mean_span_length) + 2
    if getattr(cfg, "architecture", "decoder") == "decoder" and cfg.max_seq_len < longest:
        raise ConfigError(f"parameter 'max_seq_len': span_corruption rows on a decoder need >= {longest}, "
                          f"got {cfg.max_seq_len}")


def _trunk_and_head(cfg) -> None:
    if cfg.n_layer < 2:
        raise ConfigError(f"parameter 'n_layer': multi_token needs a trunk and a head block, expected >= 2, "
                          f"got {cfg.n_layer}")


register_objective("clm", reads="causal", next_token=True)(lambda cfg, tok, n: CausalLM())
register_objective("prefix_lm", reads="bidirectional", next_token=True, encoder_decoder=True)(
    lambda cfg, tok, n: PrefixLM(pad_id=tok.pad_id))
register_objective("mlm", reads="bidirectional", next_token=False)(
    lambda cfg, tok, n: MaskedLM(tok.mask_id, tok.vocab_size, cfg.mask_ratio, tok.special_ids))
register_objective("span_corruption", reads="bidirectional", next_token=False, encoder_decoder=True, fills="sentinel",
                   extra_ids=lambda cfg: cfg.n_sentinels, check=_span_rows_fit)(
    lambda cfg, tok, n: SpanCorruption(tok.vocab_size, cfg.n_sentinels, tok.eos_id, tok.pad_id, cfg.noise_density,
                                       cfg.mean_span_length))
register_objective("multi_token", reads="causal", next_token=True, model="multi_token", check=_trunk_and_head)(
    lambda cfg, tok, n: MultiTokenPrediction())
register_objective("future_token", reads="causal", next_token=True, model="future_token")(
    lambda cfg, tok, n: FutureTokenPrediction(cfg.future_gamma, tok.pad_id))
register_objective("gpt_bert", reads="bidirectional", next_token=True)(
    lambda cfg, tok, n: GPTBERT(tok.mask_id, tok.vocab_size, cfg.mask_ratio, cfg.causal_fraction, tok.special_ids))
register_objective("contrastive", reads="bidirectional", next_token=False, encoder_decoder=True, pairs=True)(
    lambda cfg, tok, n: Contrastive(tok.pad_id, cfg.contrastive_temperature))
register_objective("mixture", reads="bidirectional", next_token=False, encoder_decoder=True, combines=True)(
    lambda cfg, tok, n: Mixture({name: build_objective_named(name, cfg, tok, n) for name in cfg.mixture_weights},
                                dict(cfg.mixture_weights)))
register_objective("biphasic", reads="bidirectional", next_token=False, combines=True)(
    lambda cfg, tok, n: Schedule([(build_objective_named(cfg.biphasic_first, cfg, tok, n), cfg.biphasic_split),
                                  (build_objective_named(cfg.biphasic_second, cfg, tok, n), 1.0 - cfg.biphasic_split)],
                                 n, name="biphasic"))

register_objective("filtering", reads="causal", next_token=True, scores=True)(
    lambda cfg, tok, n: Filtering(cfg.preference_threshold))
register_objective("conditional", reads="causal", next_token=True, scores=True)(
    lambda cfg, tok, n: ConditionalTraining(cfg.preference_threshold, *control_ids(tok), cfg.unconditional_fraction))
register_objective("unlikelihood", reads="causal", next_token=True, scores=True)(
    lambda cfg, tok, n: Unlikelihood(cfg.preference_threshold, cfg.unlikelihood_alpha))
register_objective("rwr", reads="causal", next_token=True, scores=True)(
    lambda cfg, tok, n: RewardWeighted(cfg.rwr_beta))
register_objective("mle_then_conditional", reads="causal", next_token=True, scores=True, combines=True)(
    lambda cfg, tok, n: Schedule([(CausalLM(), 1.0 - cfg.feedback_fraction),
                                  (build_objective_named("conditional", cfg, tok, n), cfg.feedback_fraction)],
                                 n, name="mle_then_conditional"))

for _plugin in filter(None, os.environ.get("LABLIB_PLUGINS", "").split(",")):  # modules that register objectives
    importlib.import_module(_plugin.strip())

SIMPLE_OBJECTIVES = tuple(name for name, spec in OBJECTIVES.items() if not spec.combines)
ObjectiveName = Literal[tuple(OBJECTIVES)]
SimpleObjectiveName = Literal[SIMPLE_OBJECTIVES]

DECODER_MODELS = {  # ObjectiveSpec.model -> (model class, its config class, extra config knobs it reads)
    "transformer": (Transformer, ModelConfig, ()),
    "multi_token": (MultiTokenTransformer, MultiTokenConfig, ("n_future",)),
    "future_token": (FutureTokenTransformer, FutureTokenConfig, ("n_future",)),
}


# --- building an objective from a config ---------------------------------------------------------

@dataclass
class ObjectiveConfig(Config):
    """The knobs of every objective in this module (one flat group; each objective reads its own)."""

    objective: ObjectiveName = knob("clm", "pretraining objective; 'mixture' and 'biphasic' combine the others")
    mask_ratio: float = knob(0.15, "mlm, gpt_bert: fraction of tokens chosen for prediction", min=0.0, max=1.0,
                             min_exclusive=True)
    noise_density: float = knob(0.15, "span_corruption: fraction of tokens in noise spans", min=0.0, max=1.0,
                                min_exclusive=True)
    mean_span_length: float = knob(3.0, "span_corruption: mean noise-span length in tokens", min=1.0)
    n_sentinels: int = knob(64, "span_corruption: sentinel ids added after the tokenizer's vocabulary", min=1)
    n_future: int = knob(4, "multi_token, future_token: tokens predicted from each position", min=1)
    future_gamma: float = knob(0.8, "future_token: loss weight of slot j is gamma**j", min=0.0, max=1.0,
                               min_exclusive=True)
    causal_fraction: float = knob(0.25, "gpt_bert: fraction of each batch trained causally", min=0.0, max=1.0)
    contrastive_temperature: float = knob(0.05, "contrastive: softmax temperature of InfoNCE", min=0.0,
                                          min_exclusive=True)
    mixture_weights: dict = knob({"span_corruption": 1.0, "prefix_lm": 1.0, "contrastive": 1.0},
                                 "mixture: objective name -> sampling weight (CodeT5+: denoising, LM, matching)")
    biphasic_first: SimpleObjectiveName = knob("clm", "biphasic: objective of the first phase")
    biphasic_second: SimpleObjectiveName = knob("mlm", "biphasic: objective of the second phase")
    biphasic_split: float = knob(0.5, "biphasic: fraction of the steps spent in the first phase", min=0.0, max=1.0)
    preference_threshold: float | None = knob(
        None, "filtering, conditional, unlikelihood: preference score above which a segment is bad (lower is "
        "better; the preferences experiment sets it from bad_fraction)")
    unconditional_fraction: float = knob(0.01, "conditional: share of rows trained without a control token",
                                         min=0.0, max=1.0)
    unlikelihood_alpha: float = knob(1.0, "unlikelihood: weight of the unlikelihood term on bad segments", min=0.0,
                                     min_exclusive=True)
    rwr_beta: float = knob(0.01, "rwr: temperature of the weights exp(-score / beta), in score units", min=0.0,
                           min_exclusive=True)
    feedback_fraction: float = knob(0.25, "mle_then_conditional: fraction of the steps, at the end, trained with "
                                    "conditional training after MLE", min=0.0, max=1.0, min_exclusive=True)

    def validate(self) -> None:
        super().validate()
        unknown = [n for n in self.mixture_weights if n not in SIMPLE_OBJECTIVES]
        if unknown:
            raise ConfigError(f"parameter 'mixture_weights': expected names among {', '.join(SIMPLE_OBJECTIVES)}, "
                              f"got {unknown}")
        bad = {n: w for n, w in self.mixture_weights.items() if not isinstance(w, (int, float)) or w < 0}
        if bad or not self.mixture_weights or sum(self.mixture_weights.values()) <= 0:
            raise ConfigError(f"parameter 'mixture_weights': expected non-negative numbers with a positive sum, "
                              f"got {self.mixture_weights}")
        heads = sorted({s.model for s in self.specs()} - {"transformer"})  # every model is also a plain transformer
        if len(heads) > 1:
            raise ConfigError(f"parameter 'objective': its parts need different models ({', '.join(heads)}); "
                              "combine objectives that train the same one")
        for part in self.components():
            OBJECTIVES[part].check(self)

    def components(self) -> list[str]:
        """The simple objectives this config trains with."""
        return {"mixture": list(self.mixture_weights),
                "biphasic": [self.biphasic_first, self.biphasic_second]}.get(self.objective, [self.objective])

    def specs(self) -> list[ObjectiveSpec]:
        return [OBJECTIVES[p] for p in self.components()]

    def embedding_mask(self) -> str:
        """How the trained model reads a text: as its objective taught it (biphasic: its last phase)."""
        last = [OBJECTIVES[self.biphasic_second]] if self.objective == "biphasic" else self.specs()
        return "causal" if all(s.reads == "causal" for s in last) else "bidirectional"

    def likelihood_reading(self) -> str:
        """How the trained model scores a text (minimal pairs): 'causal' (log-likelihood) when every objective
        of its last phase predicts the next token, else pseudo-log-likelihood with the hidden token as its
        objectives fill one: 'sentinel' if any of them fills spans with sentinels, else 'mask'."""
        last = [OBJECTIVES[self.biphasic_second]] if self.objective == "biphasic" else self.specs()
        if all(s.next_token for s in last):
            return "causal"
        return "sentinel" if any(s.fills == "sentinel" for s in last) else "mask"

    def extra_ids(self) -> int:
        """Token ids the model needs beyond the tokenizer's (span corruption's sentinels)."""
        return max(s.extra_ids(self) for s in self.specs())

    def decoder_model(self, vocab_size: int) -> tuple[type, ModelConfig]:
        """(class, config) of the decoder-only model this objective trains, over `vocab_size` ids."""
        heads = [s.model for s in self.specs() if s.model != "transformer"]
        cls, cfg_cls, extra = DECODER_MODELS[heads[0] if heads else "transformer"]
        names = [f.name for f in dataclasses.fields(ModelConfig)] + list(extra)
        return cls, cfg_cls(**{**{n: getattr(self, n) for n in names}, "vocab_size": vocab_size})


def build_objective_named(name: str, cfg: ObjectiveConfig, tokenizer, total_batches: int) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name].build(cfg, tokenizer, total_batches)


def build_objective(cfg: ObjectiveConfig, tokenizer, total_batches: int) -> Objective:
    """The objective `cfg.objective` for data from `tokenizer`; `total_batches` is the run's
    number of micro-batches (schedules switch phase by it). Sentinel ids start at
    tokenizer.vocab_size, so the model needs vocab_size + cfg.extra_ids() ids."""
    return build_objective_named(cfg.objective, cfg, tokenizer, total_batches)
