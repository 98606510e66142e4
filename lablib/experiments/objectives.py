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
- Notebook 02 is `ObjectivesGridConfig`: every objective x seed on the decoder-only model in one run
  (sub-runs `models/<objective>-seed<S>/`), trained for the same FLOPs (`compute_matched_steps`: as
  many steps as `steps` of clm cost). `prepare_grid` builds what every point shares once: the
  tokenizer and LM data, the held-out minimal pairs (`lablib.tasks.minimal_pairs`), token probes
  (`lablib.tasks.code_tokens`), the fine-tuning task (which corruption a held-out snippet carries,
  trained on dev files, scored on test files) and the retrieval pool, and the baselines that need no
  model: a token trigram on the pairs, TF-IDF on retrieval and on the fine-tuning task.
  `evaluate_model` scores a model as its objective reads (`likelihood_reading`: log-likelihood or
  pseudo-log-likelihood; `embedding_mask` for features); the untrained model of a seed is shared
  by every objective, so each of its readings is scored once. `grid_summary` gives intervals over
  seeds and paired differences to the untrained model and to clm.
- `train_induction` is notebook 02's induction check: a small `MultiTokenTransformer` per n_future
  on `lablib.tasks.induction`, with the step at which induction formed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lablib.config import ConfigError, DataConfig, ModelConfig, TrainConfig, knob
from lablib.data import LMData, TokenBlocks, Tokenizer, pack, split_documents, tokenize_corpus, train_tokenizer
from lablib.evidence import SPLITS, mean_interval, paired_difference
from lablib.models import EncoderDecoder, EncoderDecoderConfig, MultiTokenConfig, MultiTokenTransformer
from lablib.objectives import (OBJECTIVES, Mixture, MultiTokenPrediction, ObjectiveBatches, ObjectiveConfig, Schedule,
                               build_objective, pooled_embeddings)
from lablib.seeding import seeded_model, torch_generator
from lablib.tasks.code_search import (POOLINGS, SIMILARITY_TRANSFORMS, FunctionPair, embed, encode_texts,
                                      evaluation_documents, function_pairs, heldout_next_token_loss,
                                      pretraining_documents, probe_dataset, probe_scores, retrieval_scores)
from lablib.tasks.code_tokens import PROBE_TASKS, probe_segments, probe_selectivity
from lablib.tasks.minimal_pairs import (PHENOMENA, encode_pairs, log_likelihood, minimal_pairs, pair_accuracy,
                                        pseudo_log_likelihood)
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
class ObjectivesGridConfig(ObjectivesRunConfig):
    """Notebook 02: every objective of `objectives` x `seeds` on the decoder-only model, trained for the
    same FLOPs (`steps` of clm's cost) and scored on held-out code: minimal pairs, token probes with
    control tasks, a short fine-tuning and retrieval; then the induction check."""

    objectives: list[str] = knob(list(DECODER_OBJECTIVES), "objectives trained on the decoder-only model")
    seeds: list[int] = knob([0, 1, 2], "seeds of every objective (initialisation, data order, masks)")
    pairs_per_phenomenon: int = knob(1000, "minimal pairs drawn per phenomenon from the held-out files", min=10)
    pair_window: int = knob(1, "tokens scored either side of a minimal pair's edit", min=0)
    probe_functions: int = knob(120, "held-out functions whose tokens the probes read", min=4)
    probe_tokens: int = knob(64, "tokens kept of each probed function", min=8)
    finetune_steps: int = knob(200, "fine-tuning steps (the same for every objective)", min=1)
    finetune_batch: int = knob(16, "fine-tuning examples per step", min=1)
    finetune_learning_rate: float = knob(1e-3, "fine-tuning peak learning rate", min=0.0, min_exclusive=True)
    finetune_tokens: int = knob(48, "tokens kept of each fine-tuning example", min=4)
    induction_n_future: list[int] = knob([1, 2, 4], "induction check: tokens predicted per position (1 = next-token)")
    induction_seeds: list[int] = knob([0, 1], "induction check: seeds per n_future")
    induction_steps: int = knob(400, "induction check: training steps per model", min=1)
    induction_vocab: int = knob(32, "induction check: vocabulary of the random strings", min=3)
    induction_half_len: int = knob(24, "induction check: length of the string that is repeated", min=2)

    presets: ClassVar[dict] = {
        "smoke": {**ObjectivesRunConfig.presets["smoke"], "tokenizer": "bpe", "bpe_vocab_size": 400,
                  "objectives": ["clm", "mlm"], "seeds": [0, 1], "pairs_per_phenomenon": 20, "probe_functions": 12,
                  "probe_tokens": 32, "finetune_steps": 4, "finetune_tokens": 24, "eval_pairs": 30,
                  "induction_n_future": [1, 2], "induction_seeds": [0], "induction_steps": 10},
        # one core, about half an hour: six objectives x three seeds of 4 x 64 models, 0.66M tokens each
        "cpu": {**ObjectivesRunConfig.presets["cpu"], "n_layer": 4, "n_head": 4, "d_model": 64, "seq_len": 64,
                "max_seq_len": 160, "steps": 640, "warmup_steps": 40, "eval_every": 640, "checkpoint_every": 640,
                "eval_batches": 4, "objectives": ["clm", "prefix_lm", "mlm", "span_corruption", "gpt_bert", "biphasic"],
                "seeds": [0, 1, 2], "finetune_steps": 150, "induction_seeds": [0], "induction_steps": 300},
        "gpu": {**ObjectivesRunConfig.presets["gpu"], "seeds": [0, 1, 2], "pairs_per_phenomenon": 2000,
                "pair_window": 1000, "probe_functions": 400, "finetune_steps": 500, "induction_seeds": [0, 1, 2],
                "induction_steps": 1000},
    }

    def validate(self) -> None:
        super().validate()
        if self.architecture != "decoder":
            raise ConfigError(f"parameter 'architecture': the grid trains the decoder-only model, got "
                              f"{self.architecture!r}")
        bad = [o for o in self.objectives if o not in DECODER_OBJECTIVES]
        if bad or not self.objectives:
            raise ConfigError(f"parameter 'objectives': expected names among {', '.join(DECODER_OBJECTIVES)}, "
                              f"got {self.objectives}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        bad_n = [n for n in self.induction_n_future if n < 1]
        if bad_n:
            raise ConfigError(f"parameter 'induction_n_future': expected integers >= 1, got {bad_n}")
        for name in self.objectives:
            self.point(name, self.seeds[0])  # each point's own checks (span rows fit, heads), before any work

    def point(self, objective: str, seed: int) -> "ObjectivesRunConfig":
        """The run config of one (objective, seed) of the grid."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ObjectivesRunConfig)}
        cfg = ObjectivesRunConfig(**{**values, "objective": objective, "seed": seed})
        cfg.preset = self.preset
        cfg.validate()
        return cfg


# --- the grid's evaluation data (notebook 02) ------------------------------------------------------

@dataclass
class GridData:
    """Everything the grid trains on and is scored on, built once: the LM data, the held-out evaluation
    sets (tokenized) and the baselines that need no model."""

    lm: LMData
    train_docs: Any
    pairs: list  # lablib.tasks.minimal_pairs.MinimalPair
    encoded_pairs: Any  # lablib.tasks.minimal_pairs.EncodedPairs
    probe_ids: torch.Tensor  # (N, probe_tokens) padded
    probe_rows: list[tuple[int, int]]  # (segment, position) of each labelled token
    probe_token_ids: np.ndarray
    probe_labels: dict[str, np.ndarray]
    probe_is_test: np.ndarray
    finetune: dict[str, Any]  # train / test ids and labels, and the fine-tuning knobs
    retrieval: EvalSet
    baselines: dict[str, Any]


FINETUNE_CLASSES = ("clean",) + tuple(PHENOMENA)  # the fine-tuning task: which corruption, or none


def finetune_examples(pairs, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One snippet per minimal pair: its good member (label 'clean') with probability 1/7, else its bad member
    (label its phenomenon), so the seven classes are about equally common; and each snippet's split."""
    rng = np.random.default_rng(seed)
    take_good = rng.random(len(pairs)) < 1 / len(FINETUNE_CLASSES)
    texts = [p.good if g else p.bad for p, g in zip(pairs, take_good)]
    labels = np.array([0 if g else FINETUNE_CLASSES.index(p.phenomenon) for p, g in zip(pairs, take_good)])
    return texts, labels, np.array([p.split for p in pairs])


def tfidf_retrieval_mrr(docs: list[str], code: list[str]) -> float:
    """The lexical baseline of retrieval: TF-IDF over identifier-like words, cosine ranking."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(token_pattern=r"[A-Za-z_][A-Za-z0-9_]*|\d+", sublinear_tf=True).fit(docs + code)
    q, t = vec.transform(docs), vec.transform(code)
    sims = (q @ t.T).toarray()
    ranks = 1 + (sims > np.diag(sims)[:, None]).sum(1)
    return float(np.mean(1.0 / ranks))


def tfidf_finetune_accuracy(texts_train, y_train, texts_test, y_test) -> float:
    """The trivial rule of the fine-tuning task: character 1-3-gram TF-IDF and logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True).fit(texts_train)
    clf = LogisticRegression(max_iter=1000, C=10.0).fit(vec.transform(texts_train), y_train)
    return float(clf.score(vec.transform(texts_test), y_test))


def trigram_pair_scores(trigram, encoded) -> tuple[np.ndarray, np.ndarray]:
    good = np.array([trigram.log_prob_at(ids, pos) for ids, pos in zip(encoded.good, encoded.good_positions)])
    bad = np.array([trigram.log_prob_at(ids, pos) for ids, pos in zip(encoded.bad, encoded.bad_positions)])
    return good, bad


def prepare_grid(cfg: ObjectivesGridConfig) -> GridData:
    """The pretraining data (one tokenizer for every point), the held-out evaluation sets and the model-free
    baselines: the trigram on the minimal pairs, TF-IDF on retrieval and on the fine-tuning task."""
    from lablib.ngram import fit_trigram_on_dev

    lm, train_docs = prepare_pretraining_data(cfg, cfg.tokenizer)
    tok = lm.tokenizer
    heldout = evaluation_documents(cfg.eval_fraction, cfg.split_seed)
    pairs = minimal_pairs(heldout, cfg.pairs_per_phenomenon, cfg.split_seed)
    encoded = encode_pairs(pairs, tok, cfg.pair_window)

    segments = probe_segments(heldout, tok, cfg.probe_functions, cfg.probe_tokens, cfg.split_seed)
    width = max(len(s.ids) for s in segments)
    probe_ids = torch.tensor([s.ids + [tok.pad_id] * (width - len(s.ids)) for s in segments], dtype=torch.long)
    rows = [(i, j) for i, s in enumerate(segments) for j in range(len(s.ids))]
    labels = {t: np.array([segments[i].labels[t][j] for i, j in rows], dtype=object) for t in PROBE_TASKS}

    texts, y, split = finetune_examples(pairs, cfg.split_seed)
    train_mask, test_mask = split == "dev", split == "test"
    ft = {"train_ids": encode_texts(tok, [t for t, m in zip(texts, train_mask) if m], cfg.finetune_tokens),
          "train_labels": torch.tensor(y[train_mask]), "test_labels": y[test_mask],
          "test_ids": encode_texts(tok, [t for t, m in zip(texts, test_mask) if m], cfg.finetune_tokens),
          "steps": cfg.finetune_steps, "batch": cfg.finetune_batch, "learning_rate": cfg.finetune_learning_rate,
          "tokens": cfg.finetune_tokens}

    fn_pairs = function_pairs(heldout)
    retrieval = make_eval_set(cfg, fn_pairs, tok, lm.val.eval_batches(cfg.eval_batches, cfg.batch_size))
    trigram, smoothing = fit_trigram_on_dev(lm.train.blocks.numpy(), tok.vocab_size)
    tri_good, tri_bad = trigram_pair_scores(trigram, encoded)
    pool = np.random.default_rng(cfg.split_seed).permutation(len(fn_pairs))[: cfg.eval_pairs]
    baselines = {
        "trigram_pairs": {s: pair_accuracy(tri_good[encoded.split == s], tri_bad[encoded.split == s],
                                           encoded.phenomenon[encoded.split == s]) for s in SPLITS},
        "ngram_smoothing": smoothing,
        "tfidf_retrieval_mrr": tfidf_retrieval_mrr([fn_pairs[i].doc for i in pool], [fn_pairs[i].code for i in pool]),
        "tfidf_finetune_accuracy": tfidf_finetune_accuracy([t for t, m in zip(texts, train_mask) if m], y[train_mask],
                                                           [t for t, m in zip(texts, test_mask) if m], y[test_mask]),
        "finetune_majority": float(np.mean(y[test_mask] == np.bincount(y[train_mask]).argmax())),
        "finetune_chance": 1 / len(FINETUNE_CLASSES),
        "pairs": {s: {name: int(((encoded.split == s) & (encoded.phenomenon == name)).sum()) for name in PHENOMENA}
                  for s in SPLITS},
        "probe_tokens": {s: int((np.array([segments[i].split for i, _ in rows]) == s).sum()) for s in SPLITS},
        "finetune_examples": {"train": int(train_mask.sum()), "test": int(test_mask.sum())},
    }
    return GridData(lm, train_docs, pairs, encoded, probe_ids, rows, np.array([segments[i].ids[j] for i, j in rows]),
                    labels, np.array([segments[i].split == "test" for i, _ in rows]), ft, retrieval, baselines)


# --- scoring one model -------------------------------------------------------------------------

def score_pairs(model, encoded, reading: str, hidden_ids: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Both members' scores: log-likelihood ('causal') or pseudo-log-likelihood ('mask', 'sentinel')."""
    if reading == "causal":
        return (log_likelihood(model, encoded.good, encoded.good_positions),
                log_likelihood(model, encoded.bad, encoded.bad_positions))
    return tuple(pseudo_log_likelihood(model, rows, pos, reading, hidden_ids[reading])
                 for rows, pos in ((encoded.good, encoded.good_positions), (encoded.bad, encoded.bad_positions)))


@torch.no_grad()
def token_features(model, ids: torch.Tensor, pad_id: int, mask: str) -> torch.Tensor:
    """(N, T, d_model) final-normed top-layer states, read causally or bidirectionally (pads never attended)."""
    from lablib.models import padding_mask

    was_training = model.training
    model.eval()
    valid = ids != pad_id
    if mask == "causal":
        h = model.trunk(ids, mask="causal")
    else:
        h = model.trunk(ids, mask="custom", attn_mask=padding_mask(valid))
    model.train(was_training)
    return model.ln_final(h)


class SequenceClassifier(torch.nn.Module):
    """A pretrained model with a linear head on its mean-pooled top layer (read as its objective taught it)."""

    def __init__(self, base: torch.nn.Module, n_classes: int, pad_id: int, mask: str, seed: int = 0):
        super().__init__()
        self.base, self.pad_id, self.mask = base, pad_id, mask
        with torch.random.fork_rng(devices=[]):  # the head's initialisation: a function of the seed alone
            torch.manual_seed(seed)
            self.head = torch.nn.Linear(base.cfg.d_model, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_embeddings(self.base, ids, self.pad_id, self.mask))


@dataclass
class ClassificationBatches:
    ids: torch.Tensor
    labels: torch.Tensor

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        rows = torch.randint(len(self.ids), (batch_size,), generator=torch_generator(seed, "finetune", index))
        return {"ids": self.ids[rows], "labels": self.labels[rows]}


@dataclass
class ClassificationLoss:
    name: str = "classification"

    def __call__(self, model, batch, generator):
        loss = torch.nn.functional.cross_entropy(model(batch["ids"]), batch["labels"])
        return loss, {"tokens_scored": len(batch["ids"])}


def finetune_accuracy(model, cfg: TrainConfig, data: GridData, mask: str, seed: int) -> float:
    """Fine-tune a copy of the model (every weight, and a new head) for the grid's `finetune_steps` on the dev
    files' snippets, then its accuracy on the test files' snippets (cfg: the hardware and optimiser knobs)."""
    import copy

    clf = SequenceClassifier(copy.deepcopy(model), len(FINETUNE_CLASSES), data.lm.tokenizer.pad_id, mask, seed)
    steps, batch, lr, tokens = (data.finetune[k] for k in ("steps", "batch", "learning_rate", "tokens"))
    ft_cfg = dataclasses.replace(cfg.project(TrainConfig), steps=steps, batch_size=batch, seq_len=tokens,
                                 batch_tokens=None, learning_rate=lr, warmup_steps=min(10, steps), seed=seed,
                                 eval_every=steps, log_every=steps, checkpoint_every=steps, loggers=[])
    train(clf, ClassificationLoss(), ClassificationBatches(data.finetune["train_ids"], data.finetune["train_labels"]),
          ft_cfg, None, progress=False)
    clf.eval()
    device = next(clf.parameters()).device
    with torch.no_grad():
        pred = torch.cat([clf(data.finetune["test_ids"][i:i + 256].to(device)).argmax(-1).cpu()
                          for i in range(0, len(data.finetune["test_ids"]), 256)]).numpy()
    return float(np.mean(pred == data.finetune["test_labels"]))


def evaluate_model(model, point: ObjectivesRunConfig, data: GridData, seed: int, memo: dict | None = None,
                   key: Any = None) -> dict[str, Any]:
    """Minimal pairs (dev and test), probe selectivity, fine-tuning accuracy, retrieval MRR and (where the
    objective predicts the next token) held-out loss of one model, read as `point`'s objective reads.
    memo/key: an untrained model is the same for every objective of a seed, so each reading of it is
    scored once (key names the weights; None: do not memoise)."""
    memo = {} if memo is None else memo
    tok = data.lm.tokenizer
    reading, mask = point.likelihood_reading(), point.embedding_mask()
    hidden = {"mask": tok.mask_id, "sentinel": tok.vocab_size}  # the first sentinel id follows the vocabulary

    def once(name, arg, fn):
        if key is None:
            return fn()
        if (key, name, arg) not in memo:
            memo[(key, name, arg)] = fn()
        return memo[(key, name, arg)]

    out: dict[str, Any] = {"pair_reading": reading, "feature_mask": mask}
    good, bad = once("pairs", reading, lambda: score_pairs(model, data.encoded_pairs, reading, hidden))
    enc = data.encoded_pairs
    for split in SPLITS:
        acc = pair_accuracy(good[enc.split == split], bad[enc.split == split], enc.phenomenon[enc.split == split])
        out.update({f"pairs_{split}_{k}": v for k, v in acc.items()})

    def probe():
        feats = token_features(model, data.probe_ids.to(next(model.parameters()).device), tok.pad_id, mask)
        rows = torch.tensor(data.probe_rows)
        x = feats[rows[:, 0], rows[:, 1]].float().cpu().numpy()
        return probe_selectivity(x, data.probe_token_ids, data.probe_labels, data.probe_is_test, seed)

    out.update({f"probe_{k}": v for k, v in once("probe", mask, probe).items()})
    out["probe_selectivity"] = float(np.mean([out[f"probe_{t}_selectivity"] for t in PROBE_TASKS]))
    out["finetune_accuracy"] = once("finetune", mask, lambda: finetune_accuracy(model, point, data, mask, seed))

    def retrieval():
        ev = data.retrieval
        docs, code = (embed(model, ids, ev.pad_id, mask, "first_last") for ids in (ev.doc_ids, ev.code_ids))
        return retrieval_scores(docs, code)["mrr"]

    out["retrieval_mrr"] = once("retrieval", mask, retrieval)
    out["heldout_loss"] = (once("heldout", None, lambda: heldout_next_token_loss(model, data.retrieval.lm_batches))
                           if point.predicts_next_token() else None)
    return out


# --- training one point of the grid ---------------------------------------------------------------

def compute_matched_steps(cfg: ObjectivesGridConfig, data: GridData, objective: str) -> tuple[int, float, float]:
    """(steps, FLOPs per micro-batch, the budget): the objective trains for as many steps as fit in the FLOPs
    that `cfg.steps` of clm cost (counted by FlopCounterMode on the first micro-batch of each)."""
    accum = grad_accum_steps(cfg.project(TrainConfig))

    def per_batch(name):
        point = cfg.point(name, 0)
        model = build_model(point, data.lm.tokenizer.vocab_size + point.n_sentinels)
        batch = ObjectiveBatches(data.lm.train, contrastive_pairs(point, data)).batch(0, cfg.batch_size, 0)
        return training_flops_per_batch(model, build_objective(point, data.lm.tokenizer, cfg.steps * accum), batch)

    budget = per_batch("clm") * cfg.steps * accum
    own = per_batch(objective)
    return max(1, round(budget / (own * accum))), own, budget


def train_point(cfg: ObjectivesGridConfig, objective: str, seed: int, data: GridData, run=None, *,
                steps: int | None = None, progress: bool = False):
    """Train one (objective, seed) in sub-run models/<objective>-seed<seed>/ of `run` (resumed from its
    checkpoint when rerun); returns (model, point config, training record)."""
    from lablib.runs import start_run

    point = cfg.point(objective, seed)
    if steps is not None:
        point = dataclasses.replace(point, steps=steps, eval_every=min(point.eval_every, steps),
                                    checkpoint_every=min(point.checkpoint_every, steps))
        point.preset = cfg.preset
    sub = None if run is None else start_run("objectives_run", point, run.path / "models" / f"{objective}-seed{seed}")
    tok = data.lm.tokenizer
    train_cfg = point.project(TrainConfig)
    accum = grad_accum_steps(train_cfg)
    model = build_model(point, tok.vocab_size + point.n_sentinels)
    objective_fn = build_objective(point, tok, point.steps * accum)
    val = data.lm.val.eval_batches(point.eval_batches, point.batch_size)
    pairs = contrastive_pairs(point, data)
    if pairs is not None:  # contrastive's held-out loss reads the retrieval pool's pairs
        val = [{**b, "doc_ids": data.retrieval.doc_ids[:point.batch_size],
                "code_ids": data.retrieval.code_ids[:point.batch_size]} for b in val]
    result = train(model, objective_fn, ObjectiveBatches(data.lm.train, pairs), train_cfg, sub, val=val,
                   progress=progress)
    if sub is not None:
        sub.set_status("done")
    record = {"steps": point.steps, "train_tokens": result.tokens, "train_seconds": result.seconds,
              "final_objective_val_loss": result.final.get("val_loss"),
              "parameters": sum(p.numel() for p in model.parameters()),
              "run_dir": None if sub is None else str(sub.path)}
    return model, point, record


def contrastive_pairs(point: ObjectivesRunConfig, data: GridData) -> dict[str, torch.Tensor] | None:
    """The (docstring, code) rows a contrastive component trains on (None when the objective has none)."""
    if not any(s.pairs for s in point.specs()):
        return None
    tok = data.lm.tokenizer
    train_pairs = function_pairs(contrastive_documents(point, data.train_docs))
    return {"doc_ids": encode_texts(tok, [p.doc for p in train_pairs], point.eval_doc_tokens),
            "code_ids": encode_texts(tok, [p.code for p in train_pairs], point.eval_code_tokens)}


# --- aggregating the grid ------------------------------------------------------------------------

GRID_METRICS = {  # results name -> (what it is, the notebook's label)
    "pairs_test_all": "minimal-pair accuracy (test files, mean over phenomena)",
    "probe_selectivity": "probe selectivity (accuracy - control accuracy, mean over the four tasks)",
    "finetune_accuracy": f"fine-tuning accuracy ({len(FINETUNE_CLASSES)}-way corruption type, test files)",
    "retrieval_mrr": "docstring -> code retrieval MRR (whitened first-last pooling)",
}


def grid_summary(points: list[dict[str, Any]], reference: str = "clm") -> dict[str, Any]:
    """Per objective and metric: the mean over seeds with its interval, the paired difference to the untrained
    model of the same seeds (`init_<metric>`), and the paired difference to `reference`; and a ranking by mean."""
    by_objective: dict[str, dict[int, dict[str, Any]]] = {}
    for p in points:
        by_objective.setdefault(p["objective"], {})[p["seed"]] = p
    out: dict[str, Any] = {"objectives": {}, "ranking": {}}
    for name, seeds in by_objective.items():
        entry = {}
        for metric in [*GRID_METRICS, *(f"pairs_test_{ph}" for ph in PHENOMENA), "heldout_loss",
                       *(f"probe_{t}_selectivity" for t in PROBE_TASKS)]:
            value = {s: r[metric] for s, r in seeds.items() if r.get(metric) is not None}
            if not value:
                continue
            init = {s: r[f"init_{metric}"] for s, r in seeds.items() if r.get(f"init_{metric}") is not None}
            entry[metric] = mean_interval(list(value.values())).to_dict()
            if init and metric != "heldout_loss":
                entry[f"{metric}_minus_untrained"] = paired_difference(value, init).to_dict()
            ref = by_objective.get(reference, {})
            ref_value = {s: r[metric] for s, r in ref.items() if r.get(metric) is not None}
            if name != reference and set(ref_value) & set(value):
                entry[f"{metric}_minus_{reference}"] = paired_difference(value, ref_value).to_dict()
        entry["train_flops"] = float(np.mean([r["train_flops"] for r in seeds.values()]))
        entry["steps"] = int(next(iter(seeds.values()))["steps"])
        entry["seeds"] = sorted(seeds)
        out["objectives"][name] = entry
    for metric in GRID_METRICS:
        have = [n for n, e in out["objectives"].items() if metric in e]
        out["ranking"][metric] = sorted(have, key=lambda n: -out["objectives"][n][metric]["mean"])
    return out


def beats_untrained(summary: dict[str, Any], metric: str = "pairs_test_all") -> dict[str, bool | None]:
    """Per objective: whether the paired difference to the untrained model excludes zero upwards (None: no interval)."""
    out = {}
    for name, entry in summary["objectives"].items():
        diff = entry.get(f"{metric}_minus_untrained")
        out[name] = None if diff is None or diff["low"] is None else bool(diff["low"] > 0)
    return out


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
