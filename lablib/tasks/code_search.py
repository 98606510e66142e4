"""Downstream evaluation without a network, and the objectives experiment that uses it.

Notable here:
- `function_pairs(documents)`: (docstring summary, function source without its
  docstring, stdlib package) for every documented function, found with `ast`.
- Held out by construction: a seeded draw by file name picks `eval_fraction` of all
  stdlib .py files for evaluation (`evaluation_documents`), and the pretraining
  corpus is the configured corpus without them (`pretraining_documents`, then
  `lablib.data`'s split, tokenizer and packing), so no scored function is trained
  on; the contrastive objective's pairs come only from the training documents (or, with
  `contrastive_pairs='all'`, from every file that is neither held out nor LM validation).
- Frozen-embedding evaluations: text->code retrieval (MRR, recall@k; mean-pooled,
  centred, cosine) and a scikit-learn logistic-regression probe predicting a
  function's stdlib package, repeated over probe seeds (its spread is the probe's
  stability). Two poolings, 'first_last' (input and top layer; the headline) and
  'top' (`_top`), and two similarities, BERT-whitened cosine (the headline) and
  mean-centred cosine (`_centred`). `heldout_next_token_loss` for models that predict
  the next token. `reevaluate_run` re-scores a finished run from its checkpoint.
- `ObjectivesRunConfig` and `run_objective(cfg, run)`: one (architecture, objective,
  seed) run at a fixed budget of training tokens; training FLOPs are counted by
  torch's `FlopCounterMode` on real micro-batches (SDPA's CPU kernel included), and
  every evaluation is also run on the untrained initialisation for the margin.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import math
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import numpy as np
import torch

from lablib.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import (LMData, TokenBlocks, Tokenizer, load_corpus, pack, split_documents, tokenize_corpus,
                         train_tokenizer)
from lablib.models import (EncoderDecoder, EncoderDecoderConfig, FutureTokenConfig, FutureTokenTransformer,
                           MultiTokenConfig, MultiTokenTransformer, Transformer)
from lablib.objectives import (Mixture, ObjectiveBatches, ObjectiveConfig, Schedule, build_objective,
                               pooled_embeddings, token_cross_entropy)
from lablib.train import grad_accum_steps, policy_record, resolve_hardware, train


# --- docstring / function pairs -----------------------------------------------------------

@dataclass(frozen=True)
class FunctionPair:
    doc: str  # the docstring's first paragraph: the query
    code: str  # the function's source, docstring removed, dedented: the target
    package: str  # top-level stdlib name: 'asyncio' for asyncio/events.py, 'argparse' for argparse.py
    source: str  # the document (file) it came from


def package_of(source: str) -> str:
    return source.split("/")[0].removesuffix(".py")


def _pairs_in(text: str, source: str, min_doc_chars: int) -> Iterable[FunctionPair]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few stdlib test files are deliberately invalid
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or len(node.body) < 2 or first.lineno == node.lineno:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if len(summary) < min_doc_chars:
            continue
        kept = lines[node.lineno - 1: first.lineno - 1] + lines[first.end_lineno: node.end_lineno]
        yield FunctionPair(summary, textwrap.dedent("\n".join(kept)), package_of(source), source)


def function_pairs(documents: Iterable[dict[str, str]], min_doc_chars: int = 20) -> list[FunctionPair]:
    """Every documented function (and method) of the Python documents, deduplicated."""
    seen, out = set(), []
    for d in documents:
        if not d["source"].endswith(".py"):
            continue
        for pair in _pairs_in(d["text"], d["source"], min_doc_chars):
            if (pair.doc, pair.code) not in seen:
                seen.add((pair.doc, pair.code))
                out.append(pair)
    return out


def is_evaluation_document(source: str, eval_fraction: float, seed: int) -> bool:
    """A seeded draw by file name (stable across machines): is this stdlib .py file held out for evaluation?"""
    draw = int(hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return source.endswith(".py") and draw < eval_fraction


def evaluation_documents(eval_fraction: float, seed: int):
    """The held-out stdlib files (drawn from the whole standard library, whatever prefix pretrains)."""
    ds = load_corpus("stdlib")
    return ds.select([i for i, src in enumerate(ds["source"]) if is_evaluation_document(src, eval_fraction, seed)])


def pretraining_documents(corpus: str, max_chars: int | None, eval_fraction: float, seed: int):
    """The corpus without the evaluation files: nothing the downstream tasks score is ever trained on."""
    ds = load_corpus(corpus, max_chars)
    return ds.select([i for i, src in enumerate(ds["source"]) if not is_evaluation_document(src, eval_fraction, seed)])


def prepare_pretraining_data(cfg: "ObjectivesRunConfig", tokenizer: str | Tokenizer):
    """(LMData, training documents): `lablib.data.prepare_lm_data`'s pipeline over `pretraining_documents`."""
    docs = pretraining_documents(cfg.corpus, cfg.corpus_max_chars, cfg.eval_fraction, cfg.split_seed)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else train_tokenizer(
        tokenizer, (t for t in train_docs["text"]), cfg.bpe_vocab_size)
    train_blocks = TokenBlocks(pack(tokenize_corpus(train_docs, tok), cfg.seq_len + 1))
    val_blocks = TokenBlocks(pack(tokenize_corpus(val_docs, tok), cfg.seq_len + 1))
    return LMData(tok, train_blocks, val_blocks, (len(train_docs), len(val_docs))), train_docs


def contrastive_documents(cfg: "ObjectivesRunConfig", train_docs):
    """The documents whose functions are the contrastive objective's training pairs (see `contrastive_pairs`):
    never an evaluation file, never a document of the LM validation split."""
    if cfg.contrastive_pairs == "pretraining":
        return train_docs
    capped = pretraining_documents(cfg.corpus, cfg.corpus_max_chars, cfg.eval_fraction, cfg.split_seed)
    lm_val = set(capped["source"]) - set(train_docs["source"])
    every = pretraining_documents(cfg.corpus, None, cfg.eval_fraction, cfg.split_seed)
    return every.select([i for i, src in enumerate(every["source"]) if src not in lm_val])


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    """(N, <= max_tokens) ids, right-padded with <pad>; every row keeps at least one token."""
    rows = [(ids[:max_tokens] or [tokenizer.eos_id]) for ids in tokenizer.encode_batch(texts)]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


# --- frozen-embedding evaluations -------------------------------------------------------------

@torch.no_grad()
def embed(model, ids: torch.Tensor, pad_id: int, mask: str, pooling: str = "first_last",
          batch_size: int = 64) -> np.ndarray:
    """Mean-pooled embeddings of padded ids, in eval mode: pooling 'top' (top layer, (N, d_model))
    or 'first_last' (input and top layer, each unit-normalised, (N, 2*d_model))."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [pooled_embeddings(model, ids[i:i + batch_size].to(device), pad_id, mask,
                             with_input_layer=POOLINGS[pooling]).float().cpu()
           for i in range(0, len(ids), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


POOLINGS = {"top": False, "first_last": True}  # pooling name -> whether the input layer is pooled too


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centred(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Subtract x's own mean (LM embeddings share a large common direction; docstrings and code
    each have their own), then L2-normalise."""
    return _unit(x - x.mean(0, keepdims=True))


def _whitened(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """BERT-whitening (Su et al. 2021): map the pool's covariance to the identity, then L2-normalise.
    Unsupervised (no labels, no pairing); it undoes the anisotropy of trained LM embeddings."""
    mean = pool.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(pool - mean, full_matrices=False)
    return _unit((x - mean) @ (vt.T / (singular / np.sqrt(len(pool)) + 1e-6)))


SIMILARITY_TRANSFORMS = {"whitened": _whitened, "centred": _centred}


def retrieval_scores(query_emb: np.ndarray, target_emb: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
                     transform: str = "whitened") -> dict[str, float]:
    """Query i's match is target i. MRR and recall@k of cosine ranking over the whole pool, after
    `transform`: 'whitened' (fitted on all query and target embeddings together) or 'centred'."""
    pool = np.concatenate([query_emb, target_emb])
    prepare = SIMILARITY_TRANSFORMS[transform]
    sims = prepare(query_emb, pool) @ prepare(target_emb, pool).T
    true = np.diag(sims)[:, None]
    ranks = 1 + (sims > true).sum(1)  # ties count in the query's favour
    out = {"mrr": float(np.mean(1.0 / ranks))}
    out.update({f"recall@{k}": float(np.mean(ranks <= k)) for k in ks})
    return out


def probe_dataset(pairs: list[FunctionPair], n_classes: int, min_per_class: int, max_per_class: int,
                  seed: int = 0) -> tuple[list[FunctionPair], np.ndarray, list[str]]:
    """Pairs of the n_classes most common packages (each with >= min_per_class functions), at most
    max_per_class each (a seeded draw), and their integer labels."""
    counts = Counter(p.package for p in pairs)
    classes = [c for c, n in counts.most_common() if n >= min_per_class][:n_classes]
    if len(classes) < 2:
        raise ValueError(f"probe: fewer than 2 packages have >= {min_per_class} held-out functions "
                         f"({dict(counts.most_common(5))}); use a larger corpus or val_fraction")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = [p for p in pairs if p.package == c]
        take = rng.permutation(len(members))[:max_per_class]
        chosen += [members[i] for i in sorted(take)]
    labels = np.array([classes.index(p.package) for p in chosen])
    return chosen, labels, classes


def probe_scores(features: np.ndarray, labels: np.ndarray, seeds: int = 5, test_fraction: float = 0.3) -> dict[str, float]:
    """Logistic-regression probe on frozen features: test accuracy over `seeds` stratified splits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accs = []
    for s in range(seeds):
        x_tr, x_te, y_tr, y_te = train_test_split(features, labels, test_size=test_fraction, random_state=s,
                                                  stratify=labels)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        accs.append(float(probe.fit(x_tr, y_tr).score(x_te, y_te)))
    majority = float(np.bincount(labels).max() / len(labels))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "majority": majority}


@torch.no_grad()
def heldout_next_token_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy on held-out blocks, read causally (the model's own
    `next_token_logits` where it has one, e.g. the future-token decoder's first slot)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predict = getattr(model, "next_token_logits", None) or (lambda x: model(x, mask="causal"))
    total, count = 0.0, 0
    for batch in batches:
        tokens = batch["tokens"].to(device)
        loss, n = token_cross_entropy(predict(tokens[:, :-1]), tokens[:, 1:])
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


# --- FLOPs -----------------------------------------------------------------------------------

def _flop_mapping() -> dict:
    """Count SDPA's CPU kernel too (torch's counter only knows the GPU ones); same formulas."""
    from torch.utils import flop_counter as fc

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)

    ops = torch.ops.aten
    if not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {ops._scaled_dot_product_flash_attention_for_cpu: forward,
            ops._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def training_flops_per_batch(model, objective, batch: dict[str, torch.Tensor], seed: int = 0) -> float:
    """FLOPs of one forward + backward of `objective` on `batch`, counted by FlopCounterMode.

    Mixtures count the weight-averaged cost of their components, schedules the
    fraction-weighted cost of their phases (the expected cost of a micro-batch).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(objective, Mixture):
        total = sum(objective.weights.values())
        return sum(w / total * training_flops_per_batch(model, objective.components[n], batch, seed)
                   for n, w in objective.weights.items())
    if isinstance(objective, Schedule):
        return sum(f * training_flops_per_batch(model, o, batch, seed) for o, f in objective.phases)
    gen = torch.Generator().manual_seed(seed)
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        loss, _ = objective(model, batch, gen)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# --- the objectives experiment -----------------------------------------------------------------

CAUSAL_READERS = ("clm", "multi_token", "future_token")  # objectives whose model reads text causally
NEXT_TOKEN_PREDICTORS = ("clm", "prefix_lm", "multi_token", "future_token", "gpt_bert")
ENCODER_DECODER_OBJECTIVES = ("span_corruption", "prefix_lm", "contrastive")


@dataclass
class ObjectivesRunConfig(ModelConfig, TrainConfig, DataConfig, ObjectiveConfig):
    """One (architecture, objective, seed) run of notebooks/02a_objectives_run.ipynb."""

    architecture: Literal["decoder", "encdec"] = knob(
        "decoder", "decoder-only (mask per objective) or T5-shaped encoder-decoder (n_layer encoder blocks)")
    decoder_layers: int | None = knob(None, "encdec: decoder blocks; None: n_layer (FLOP-matched, as Wang et al.)",
                                      min=1)
    split_seed: int = knob(0, "seed of the evaluation-file draw and the document split (fixed across seeds)", min=0)
    eval_fraction: float = knob(0.1, "fraction of all stdlib .py files held out for the downstream evaluation",
                                min=0.0, max=0.5, min_exclusive=True)
    contrastive_pairs: Literal["pretraining", "all"] = knob(
        "all", "contrastive: where its (docstring, function) training pairs come from. all: every file of the corpus "
        "that is neither held out for evaluation nor in the LM validation split (6,933 pairs at cpu); pretraining: "
        "the LM training documents only, so corpus_max_chars caps them too (1,392 at cpu, which 400 steps of 16 "
        "overfit: held-out InfoNCE loss 4.4, above the untrained model's 3.75)")
    eval_pairs: int = knob(300, "docstring->function pairs in the retrieval pool", min=2)
    eval_doc_tokens: int = knob(48, "tokens kept of each docstring query", min=1)
    eval_code_tokens: int = knob(128, "tokens kept of each function", min=1)
    probe_classes: int = knob(6, "packages the probe tells apart (the most common held-out ones)", min=2)
    probe_min_per_class: int = knob(12, "a package needs this many held-out functions to be a probe class", min=2)
    probe_max_per_class: int = knob(60, "functions per package in the probe (balances classes)", min=2)
    probe_seeds: int = knob(5, "probe train/test splits (their spread is the probe's stability)", min=1)

    presets: ClassVar[dict] = {
        # seconds: plumbing only
        "smoke": dict(corpus_max_chars=1_600_000, contrastive_pairs="pretraining", val_fraction=0.3, tokenizer="char",
                      n_layer=2, n_head=2, d_model=32,
                      seq_len=64, max_seq_len=160, batch_size=8, steps=6, warmup_steps=2, eval_every=6,
                      eval_batches=1, log_every=2, checkpoint_every=6, eval_pairs=40, eval_code_tokens=64,
                      eval_doc_tokens=32, probe_classes=3, probe_min_per_class=4, probe_max_per_class=20,
                      probe_seeds=2, n_future=2),
        # ~1.5-3 minutes per run on 2 cores: 400 steps x 16 x 128 = 819,200 training tokens per run
        "cpu": dict(corpus_max_chars=6_000_000, val_fraction=0.1, tokenizer="bpe", bpe_vocab_size=2048, n_layer=4,
                    n_head=4, d_model=128, seq_len=128, max_seq_len=256, batch_size=16, steps=400, warmup_steps=40,
                    learning_rate=2e-3, eval_every=100, eval_batches=8, log_every=20, checkpoint_every=400,
                    keep_last=1),
        # closer to the papers' scale: the whole stdlib, GPT-2-small width
        "gpu": dict(corpus_max_chars=None, val_fraction=0.05, tokenizer="bpe", bpe_vocab_size=8192, n_layer=12,
                    n_head=12, d_model=768, seq_len=512, max_seq_len=1024, batch_size=32, batch_tokens=131_072,
                    steps=3000, warmup_steps=200, learning_rate=6e-4, eval_every=250, eval_batches=20,
                    log_every=20, checkpoint_every=1000, keep_last=2, eval_pairs=1000, eval_code_tokens=256),
    }

    def validate(self) -> None:
        super().validate()
        parts = self.components()
        if self.architecture == "encdec":
            bad = [p for p in parts if p not in ENCODER_DECODER_OBJECTIVES]
            if bad:
                raise ConfigError(f"parameter 'objective': the encoder-decoder trains with "
                                  f"{', '.join(ENCODER_DECODER_OBJECTIVES)} (or a mixture of them), got {bad}")
        if "multi_token" in parts and "future_token" in parts:
            raise ConfigError("parameter 'objective': multi_token and future_token need different heads; "
                              "use one of them")
        if "multi_token" in parts and self.n_layer < 2:
            raise ConfigError(f"parameter 'n_layer': multi_token needs a trunk and a head block, expected >= 2, "
                              f"got {self.n_layer}")
        longest = self.seq_len + 2 * math.ceil(self.seq_len * self.noise_density / self.mean_span_length) + 2
        need = max(self.eval_code_tokens, self.eval_doc_tokens,
                   longest if "span_corruption" in parts and self.architecture == "decoder" else self.seq_len)
        if self.max_seq_len < need:
            raise ConfigError(f"parameter 'max_seq_len': expected >= {need} (seq_len, evaluation lengths and "
                              f"span-corruption rows must fit), got {self.max_seq_len}")

    def embedding_mask(self) -> str:
        """How the trained model reads a text for its embedding: as its objective taught it."""
        if self.objective == "biphasic":
            return "causal" if self.biphasic_second in CAUSAL_READERS else "bidirectional"
        return "causal" if all(p in CAUSAL_READERS for p in self.components()) else "bidirectional"

    def predicts_next_token(self) -> bool:
        return self.architecture == "decoder" and any(p in NEXT_TOKEN_PREDICTORS for p in self.components())


def build_model(cfg: ObjectivesRunConfig, vocab_size: int) -> torch.nn.Module:
    """The architecture the config asks for, with the heads its objective needs; seeded by cfg.seed."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
    base["vocab_size"] = vocab_size
    parts = cfg.components()
    torch.manual_seed(cfg.seed)
    if cfg.architecture == "encdec":
        return EncoderDecoder(EncoderDecoderConfig(**base, n_decoder_layer=cfg.decoder_layers))
    if "multi_token" in parts:
        return MultiTokenTransformer(MultiTokenConfig(**base, n_future=cfg.n_future))
    if "future_token" in parts:
        return FutureTokenTransformer(FutureTokenConfig(**base, n_future=cfg.n_future))
    return Transformer(ModelConfig(**base))


@dataclass
class EvalSet:
    """Held-out evaluation data, tokenized once."""

    doc_ids: torch.Tensor
    code_ids: torch.Tensor
    probe_ids: torch.Tensor
    probe_labels: np.ndarray
    probe_classes: list[str]
    lm_batches: list[dict[str, torch.Tensor]]
    pad_id: int


def make_eval_set(cfg: ObjectivesRunConfig, pairs: list[FunctionPair], tokenizer: Tokenizer,
                  lm_batches: list[dict[str, torch.Tensor]]) -> EvalSet:
    order = np.random.default_rng(cfg.split_seed).permutation(len(pairs))[: cfg.eval_pairs]
    pool = [pairs[i] for i in order]
    probe_pairs, labels, classes = probe_dataset(pairs, cfg.probe_classes, cfg.probe_min_per_class,
                                                 cfg.probe_max_per_class, cfg.split_seed)
    return EvalSet(encode_texts(tokenizer, [p.doc for p in pool], cfg.eval_doc_tokens),
                   encode_texts(tokenizer, [p.code for p in pool], cfg.eval_code_tokens),
                   encode_texts(tokenizer, [p.code for p in probe_pairs], cfg.eval_code_tokens),
                   labels, classes, lm_batches, tokenizer.pad_id)


def evaluate_downstream(model, ev: EvalSet, mask: str, next_token: bool, probe_seeds: int) -> dict[str, Any]:
    """Retrieval and probe of a frozen model, and held-out next-token loss where defined.

    Headline names use first-last pooling and whitened cosine; suffixes mark the variants:
    `_top` (top layer only) and `_centred` (mean-centred cosine instead of whitening).
    """
    out: dict[str, Any] = {}
    for pooling in POOLINGS:
        pool_suffix = "" if pooling == "first_last" else f"_{pooling}"
        docs, code, probe_code = (embed(model, ids, ev.pad_id, mask, pooling)
                                  for ids in (ev.doc_ids, ev.code_ids, ev.probe_ids))
        for transform in SIMILARITY_TRANSFORMS:
            suffix = pool_suffix + ("" if transform == "whitened" else f"_{transform}")
            out.update({f"retrieval_{k}{suffix}": v for k, v in retrieval_scores(docs, code, transform=transform).items()})
        probe = probe_scores(probe_code, ev.probe_labels, probe_seeds)
        out.update({f"probe_accuracy{pool_suffix}": probe["accuracy"],
                    f"probe_accuracy_std{pool_suffix}": probe["accuracy_std"]})
        out["probe_majority"] = probe["majority"]
    out["heldout_loss"] = heldout_next_token_loss(model, ev.lm_batches) if next_token else None
    return out


def margins(final: dict[str, Any], init: dict[str, Any]) -> dict[str, float]:
    """Trained minus untrained initialisation for every retrieval MRR and probe accuracy."""
    names = [k for k in final if k.startswith(("retrieval_mrr", "probe_accuracy")) and "_std" not in k]
    return {k.replace("retrieval_mrr", "retrieval_mrr_margin").replace("probe_accuracy", "probe_accuracy_margin"):
            final[k] - init[k] for k in names}


def reevaluate_run(path) -> dict[str, Any]:
    """Score a finished run again with the current evaluation (from its final checkpoint and its
    seed's initialisation) without retraining; training numbers in results.json are kept."""
    from lablib.runs import open_run

    run = open_run(path)
    cfg = ObjectivesRunConfig.from_dict(run.params)
    model, tok = run.load_model()
    data, _ = prepare_pretraining_data(cfg, tok)
    ev = make_eval_set(cfg, function_pairs(evaluation_documents(cfg.eval_fraction, cfg.split_seed)), tok,
                       data.val.eval_batches(cfg.eval_batches, cfg.batch_size))
    mask, next_token = cfg.embedding_mask(), cfg.predicts_next_token()
    init = evaluate_downstream(build_model(cfg, tok.vocab_size + cfg.n_sentinels), ev, mask, next_token, cfg.probe_seeds)
    final = evaluate_downstream(model, ev, mask, next_token, cfg.probe_seeds)
    results = {**run.results, **final, **{f"init_{k}": v for k, v in init.items()}, **margins(final, init)}
    run.write_results(results)
    return results


def run_objective(cfg: ObjectivesRunConfig, run, *, progress: bool = True) -> dict[str, Any]:
    """Train one (architecture, objective, seed) at the config's token budget and evaluate it
    before and after; returns the results (also written to the run's results.json)."""
    saved = run.tokenizer() if run is not None else None
    data, train_docs = prepare_pretraining_data(cfg, saved or cfg.tokenizer)
    tok = data.tokenizer
    if run is not None and saved is None:
        tok.save(run.path / "tokenizer.json")
    heldout_docs = evaluation_documents(cfg.eval_fraction, cfg.split_seed)
    eval_pairs = function_pairs(heldout_docs)
    ev = make_eval_set(cfg, eval_pairs, tok, data.val.eval_batches(cfg.eval_batches, cfg.batch_size))

    train_cfg = cfg.project(TrainConfig)
    accum = grad_accum_steps(train_cfg)
    objective = build_objective(cfg, tok, cfg.steps * accum)
    model = build_model(cfg, tok.vocab_size + cfg.n_sentinels)
    mask, next_token = cfg.embedding_mask(), cfg.predicts_next_token()
    policy = resolve_hardware(train_cfg)
    model.to(policy.device)
    init = evaluate_downstream(model, ev, mask, next_token, cfg.probe_seeds)

    pairs = val_pairs = None
    if "contrastive" in cfg.components():
        train_pairs = function_pairs(contrastive_documents(cfg, train_docs))
        pairs = {"doc_ids": encode_texts(tok, [p.doc for p in train_pairs], cfg.eval_doc_tokens),
                 "code_ids": encode_texts(tok, [p.code for p in train_pairs], cfg.eval_code_tokens)}
        val_pairs = {"doc_ids": ev.doc_ids, "code_ids": ev.code_ids}
    source = ObjectiveBatches(data.train, pairs)
    val = [{**b, **({k: v[: cfg.batch_size] for k, v in val_pairs.items()} if val_pairs else {})}
           for b in data.val.eval_batches(cfg.eval_batches, cfg.batch_size)]
    flops_batch = training_flops_per_batch(model, objective, {k: v.to(policy.device) for k, v in
                                                               source.batch(0, cfg.batch_size, cfg.seed).items()})
    result = train(model, objective, source, train_cfg, run, val=val, progress=progress, policy=policy)
    final = evaluate_downstream(model, ev, mask, next_token, cfg.probe_seeds)

    results = {
        "experiment": "objectives", "preset": cfg.preset, "architecture": cfg.architecture,
        "objective": cfg.objective, "components": ",".join(cfg.components()), "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters()), "train_tokens": result.tokens,
        "train_flops": flops_batch * cfg.steps * accum, "flops_per_token": flops_batch / (cfg.batch_size * cfg.seq_len),
        "train_seconds": result.seconds, "seconds_per_step": result.seconds / max(1, cfg.steps - (result.resumed_from or 0)),
        "embedding_mask": mask, "final_objective_val_loss": result.final.get("val_loss"),
        "heldout_documents": len(heldout_docs), "heldout_function_pairs": len(eval_pairs),
        "retrieval_pool": len(ev.doc_ids), "probe_examples": len(ev.probe_labels),
        "probe_classes": ",".join(ev.probe_classes),
        **final, **{f"init_{k}": v for k, v in init.items()},
        **margins(final, init),
        "hardware": policy_record(policy)["device"],
    }
    if run is not None:
        run.write_results(results)
    return results


def hardware_record(cfg: ObjectivesRunConfig) -> dict:
    return policy_record(resolve_hardware(cfg.project(TrainConfig)))


DECODER_OBJECTIVES = ("clm", "prefix_lm", "mlm", "span_corruption", "multi_token", "future_token", "gpt_bert",
                      "contrastive", "mixture", "biphasic")


@dataclass
class ObjectivesSweepConfig(Config):
    """The driver notebook 02_objectives: which (architecture, objective, seed) runs to sweep, and
    the multi-token induction check."""

    decoder_objectives: list[str] = knob(list(DECODER_OBJECTIVES), "objectives trained on the decoder-only model")
    encdec_objectives: list[str] = knob(["span_corruption", "prefix_lm", "mixture"],
                                        "objectives trained on the encoder-decoder")
    seeds: list[int] = knob([0, 1], "seeds of every (architecture, objective)")
    jobs: int = knob(2, "runs in parallel (threads are split between them)", min=1)
    induction_n_future: list[int] = knob([1, 2, 4], "induction check: tokens predicted per position (1 = next-token)")
    induction_seeds: list[int] = knob([0, 1], "induction check: seeds per n_future")
    induction_steps: int = knob(400, "induction check: training steps per model", min=1)
    induction_vocab: int = knob(32, "induction check: vocabulary of the random strings", min=3)
    induction_half_len: int = knob(24, "induction check: length of the string that is repeated", min=2)

    presets: ClassVar[dict] = {
        "smoke": dict(decoder_objectives=["clm"], encdec_objectives=["span_corruption"], seeds=[0], jobs=2,
                      induction_n_future=[1, 2], induction_seeds=[0], induction_steps=10),
        "cpu": dict(),
        "gpu": dict(seeds=[0, 1, 2], jobs=1, induction_seeds=[0, 1, 2], induction_steps=1000),
    }

    def validate(self) -> None:
        super().validate()
        for name, allowed in (("decoder_objectives", DECODER_OBJECTIVES),
                              ("encdec_objectives", ENCODER_DECODER_OBJECTIVES + ("mixture",))):
            bad = [o for o in getattr(self, name) if o not in allowed]
            if bad:
                raise ConfigError(f"parameter {name!r}: expected names among {', '.join(allowed)}, got {bad}")
        if not self.seeds:
            raise ConfigError("parameter 'seeds': expected at least one seed, got []")
        bad_n = [n for n in self.induction_n_future if n < 1]
        if bad_n:
            raise ConfigError(f"parameter 'induction_n_future': expected integers >= 1, got {bad_n}")
