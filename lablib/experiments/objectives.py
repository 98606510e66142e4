"""The objectives experiment (notebooks/02_objectives.ipynb, one run per notebooks/02a_objectives_run.ipynb):
pretraining objectives compared at a fixed budget of training tokens, scored on held-out code search.

Notable here:
- `ObjectivesRunConfig` and `run_objective(cfg, run)`: one (architecture, objective, seed)
  run. Objectives, their models and what they read come from `lablib.objectives.OBJECTIVES`.
- The pretraining corpus is the configured corpus without the evaluation files
  (`prepare_pretraining_data`: `lablib.tasks.code_search.pretraining_documents`, then
  `lablib.data`'s split, tokenizer and packing); the contrastive objective's pairs come from
  the training documents, or with `contrastive_pairs='all'` from every file that is neither
  held out nor LM validation (`contrastive_documents`).
- Training FLOPs are counted by torch's `FlopCounterMode` on real micro-batches (SDPA's CPU
  kernel included); every evaluation also runs on the untrained initialisation for the
  margin. `reevaluate_run` re-scores a finished run from its checkpoint.
- `ObjectivesSweepConfig` is notebook 02's config (the grid and the induction check);
  `train_induction` is that check: a small `MultiTokenTransformer` per n_future on
  `lablib.tasks.induction`, with the step at which induction formed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lablib.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import LMData, TokenBlocks, Tokenizer, pack, split_documents, tokenize_corpus, train_tokenizer
from lablib.models import EncoderDecoder, EncoderDecoderConfig, MultiTokenConfig, MultiTokenTransformer
from lablib.objectives import (OBJECTIVES, Mixture, MultiTokenPrediction, ObjectiveBatches, ObjectiveConfig, Schedule,
                               build_objective)
from lablib.seeding import seeded_model
from lablib.tasks.code_search import (POOLINGS, SIMILARITY_TRANSFORMS, FunctionPair, embed, encode_texts,
                                      evaluation_documents, function_pairs, heldout_next_token_loss,
                                      pretraining_documents, probe_dataset, probe_scores, retrieval_scores)
from lablib.tasks.induction import InductionTask, induction_accuracy
from lablib.train import grad_accum_steps, policy_record, resolve_hardware, train


# --- data ------------------------------------------------------------------------------------

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


# --- one objectives run (notebook 02a) -----------------------------------------------------------------

ENCODER_DECODER_OBJECTIVES = tuple(name for name, spec in OBJECTIVES.items() if spec.encoder_decoder)


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
        "that is neither held out for evaluation nor in the LM validation split; pretraining: the LM training "
        "documents only, so corpus_max_chars caps them too")
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
        if self.architecture == "encdec":
            bad = [s.name for s in self.specs() if not s.encoder_decoder]
            if bad:
                allowed = [n for n, s in OBJECTIVES.items() if s.encoder_decoder and not s.combines]
                raise ConfigError(f"parameter 'objective': the encoder-decoder trains with "
                                  f"{', '.join(allowed)} (or a mixture of them), got {bad}")
        need = max(self.eval_code_tokens, self.eval_doc_tokens, self.seq_len)
        if self.max_seq_len < need:
            raise ConfigError(f"parameter 'max_seq_len': expected >= {need} (seq_len and evaluation lengths "
                              f"must fit), got {self.max_seq_len}")

    def predicts_next_token(self) -> bool:
        return self.architecture == "decoder" and any(s.next_token for s in self.specs())


def build_model(cfg: ObjectivesRunConfig, vocab_size: int) -> torch.nn.Module:
    """The architecture the config asks for, with the heads its objective needs; seeded by cfg.seed."""
    if cfg.architecture == "encdec":
        base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}
        model_cfg = EncoderDecoderConfig(**{**base, "vocab_size": vocab_size}, n_decoder_layer=cfg.decoder_layers)
        return seeded_model(EncoderDecoder, model_cfg, cfg.seed)
    return seeded_model(*cfg.decoder_model(vocab_size), cfg.seed)


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


DECODER_OBJECTIVES = tuple(name for name, spec in OBJECTIVES.items() if not spec.scores)  # plain token blocks


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
                              ("encdec_objectives", ENCODER_DECODER_OBJECTIVES)):
            bad = [o for o in getattr(self, name) if o not in allowed]
            if bad:
                raise ConfigError(f"parameter {name!r}: expected names among {', '.join(allowed)}, got {bad}")
        if not self.seeds:
            raise ConfigError("parameter 'seeds': expected at least one seed, got []")
        bad_n = [n for n in self.induction_n_future if n < 1]
        if bad_n:
            raise ConfigError(f"parameter 'induction_n_future': expected integers >= 1, got {bad_n}")


# --- the induction check (notebook 02) ------------------------------------------------------------

def train_induction(n_future: int, *, seed: int = 0, steps: int = 400, task: InductionTask | None = None,
                    n_layer: int = 2, d_model: int = 64, n_head: int = 4, batch_size: int = 32,
                    learning_rate: float = 3e-3, eval_every: int = 10, progress: bool = False) -> dict:
    """Train a small causal model with n_future-token prediction on the induction task.

    Returns {"n_future", "seed", "steps": [...], "accuracy": [...], "final_accuracy", "steps_to_half"}:
    steps_to_half is the first evaluated step with accuracy >= 0.5 (None if never), i.e. when
    the induction mechanism formed.
    """
    task = task or InductionTask()
    model = seeded_model(MultiTokenTransformer, MultiTokenConfig(vocab_size=task.vocab_size, n_layer=n_layer,
                                                                 n_head=n_head, d_model=d_model,
                                                                 max_seq_len=task.seq_len, n_future=n_future), seed)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, seq_len=task.seq_len, learning_rate=learning_rate,
                      warmup_steps=min(20, steps), seed=seed, eval_every=steps, log_every=steps,
                      checkpoint_every=steps, device="cpu", compile="off",
                      num_threads=1)  # a tiny model: one thread is as fast and never waits on a busy core
    curve: dict[int, float] = {}

    def record(step, m):
        curve[step] = induction_accuracy(m, task)

    train(model, MultiTokenPrediction(), task, cfg, None, callbacks=[(eval_every, record)], progress=progress)
    steps_seen = sorted(curve)
    return {"n_future": n_future, "seed": seed, "steps": steps_seen, "accuracy": [curve[s] for s in steps_seen],
            "final_accuracy": curve[steps_seen[-1]],
            "steps_to_half": next((s for s in steps_seen if curve[s] >= 0.5), None)}
