"""The Corr2Cause experiment (notebooks/07_corr2cause.ipynb): can a transformer infer causation from
correlation (Jin et al., 2023, arXiv:2306.05836)? The task (classes, text, PC route, scoring) is
`lablib.tasks.corr2cause`.

Notable here:
- `Corr2CauseConfig`: the model knobs are the from-scratch transformer's; `finetune_*` are the
  fine-tuning of the quickstart's pretrained causal LM (`lablib.experiments.quickstart`), which
  is pretrained in the run folder from the row of `PRETRAIN` for the preset, or read from
  `pretrained_run`. Both train through `lablib.train.train` with the run's checkpoints.
- Training rows (`ClassBatches.batch(index, ...)`, a pure function of (seed, index)): one size per
  micro-batch from `train_sizes` (weight sqrt(training classes), so rows have similar lengths;
  the first `curriculum_steps` steps draw from the short-premise `curriculum_sizes` only),
  then per row a training class of that size and `hypotheses_per_row` of its hypotheses packed
  after one premise, half of them valid where the class has enough (the test stays at its
  natural ~16% valid; the F1 threshold is chosen on dev).
- `AnswerLoss`: cross-entropy of the answer token (` Yes` / ` No`) at each hypothesis.
- `evaluate_model` picks the P(valid) threshold with the best dev F1 and scores the test split
  and its renamed and paraphrased versions with it; `reference_scores` gives the baselines
  on the same items (chance, majority class, always valid, hypothesis-only, PC oracle).
- `headline_dict` writes the seeds' numbers in the lab's results format (headline with 95% t
  intervals over seeds and paired differences to each reference point); provenance and load
  come from `lablib.provenance`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import Tokenizer
from lablib.evidence import Baselines, headline_over_seeds, mean_interval
from lablib.models import Transformer
from lablib.objectives import IGNORE, token_cross_entropy
from lablib.seeding import numpy_rng, seeded_transformer
from lablib.tasks import corr2cause as task
from lablib.train import global_batch_split, train

EXPERIMENT = "corr2cause"
EVAL_SETS = ("test", "test_renamed", "test_paraphrased")

# The quickstart's LM as this experiment pretrains it: quickstart preset and overrides. RoPE and a
# longer max_seq_len let the fine-tuned model read premises longer than its 128-token pretraining rows.
PRETRAIN: dict[str, dict[str, Any]] = {
    "smoke": dict(preset="smoke", pos="rope", max_seq_len=4096, steps=20),
    "cpu": dict(preset="cpu", pos="rope", max_seq_len=4096, steps=300, warmup_steps=30, checkpoint_every=300),
    "gpu": dict(preset="gpu", pos="rope", max_seq_len=8192),
}


@dataclass
class Corr2CauseConfig(ModelConfig, TrainConfig):
    """A transformer from scratch and the quickstart's LM fine-tuned, over `seeds`, on Corr2Cause."""

    train_sizes: list[int] = knob([2, 3, 4, 5], "variables N of the training and evaluation classes (2..6)")
    n6_classes: int = knob(2000, "classes sampled for N = 6 (the smaller sizes are enumerated)", min=1)
    curriculum_sizes: list[int] = knob([3, 4], "the sizes the first curriculum_steps steps train on (short premises)")
    curriculum_steps: int = knob(0, "steps at the start that train on curriculum_sizes only (0: none)", min=0)
    hypotheses_per_row: int = knob(12, "training hypotheses packed after one premise (half valid where possible)",
                                   min=1)
    eval_classes: int | None = knob(100, "dev and test classes per size (None: all)", min=1)
    eval_per_row: int = knob(20, "hypotheses packed per row when evaluating", min=1)
    eval_batch_size: int = knob(8, "rows per forward pass when evaluating", min=1)
    curve_classes: int = knob(30, "dev classes per size behind the training curves' dev F1", min=1)
    f1_every: int = knob(100, "steps between dev F1 points of the training curves", min=1)
    pc_check_classes: int = knob(300, "classes per size whose every item the PC route re-labels", min=1)
    seeds: list[int] = knob([0, 1, 2], "training seeds of both models")
    train_scratch_model: bool = knob(True, "train the transformer from scratch")
    train_finetuned_model: bool = knob(True, "fine-tune the quickstart's pretrained LM")
    pretrained_run: str | None = knob(None, "a quickstart run folder to fine-tune (None: pretrain one in this run "
                                      "from PRETRAIN[preset]); its max_seq_len must hold a packed row")
    finetune_steps: int = knob(100, "fine-tuning optimizer steps", min=1)
    finetune_batch_size: int = knob(4, "fine-tuning rows per step", min=1)
    finetune_learning_rate: float = knob(1e-3, "fine-tuning peak learning rate", min=0.0, min_exclusive=True)
    finetune_warmup_steps: int = knob(15, "fine-tuning warm-up steps", min=0)
    finetune_hypotheses_per_row: int = knob(6, "fine-tuning hypotheses packed after one premise", min=1)
    seq_len: int = knob(400, "typical packed row length (for tokens/s and FLOPs logging only)", min=2)
    max_seq_len: int = knob(2048, "longest row the from-scratch model accepts", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(train_sizes=[2, 3, 4], n_layer=1, n_head=2, d_model=32, steps=12, batch_size=4, warmup_steps=2,
                      hypotheses_per_row=6, eval_classes=6, eval_per_row=36, curve_classes=4, f1_every=6,
                      pc_check_classes=20, seeds=[0], curriculum_steps=4, finetune_steps=4, finetune_batch_size=2,
                      finetune_warmup_steps=1, eval_every=6, eval_batches=1, log_every=3, checkpoint_every=6),
        # ~20 minutes on 2 shared cores: N = 2..5 (an N = 6 premise averages ~600 task tokens),
        # 3 seeds of a 3-layer width-64 transformer (~0.16M parameters, 700 steps of 8 rows x 12
        # hypotheses, the first 300 on N = 3-4 only; the dev search behind it is in docs/LOG.md)
        # and of the fine-tuned quickstart LM (1.06M parameters; its stdlib BPE spends
        # ~1.6x the task tokenizer's tokens on this text)
        "cpu": dict(n_layer=3, n_head=4, d_model=64, pos="rope", steps=700, curriculum_steps=300, batch_size=8,
                    warmup_steps=30, learning_rate=3e-3, eval_classes=50, curve_classes=15, eval_every=100,
                    eval_batches=2, log_every=20, checkpoint_every=200, keep_last=2, finetune_steps=100,
                    finetune_batch_size=4, finetune_warmup_steps=10),
        # the paper's sizes N = 2..6 and a wider model
        "gpu": dict(train_sizes=[2, 3, 4, 5, 6], n6_classes=20000, n_layer=8, n_head=8, d_model=256, pos="rope",
                    steps=20000, batch_size=64, hypotheses_per_row=24, warmup_steps=500, learning_rate=5e-4,
                    eval_classes=None, eval_batch_size=32, max_seq_len=4096, curve_classes=100, f1_every=1000,
                    pc_check_classes=2000, seeds=[0, 1, 2, 3, 4], finetune_steps=4000, finetune_batch_size=32,
                    finetune_learning_rate=3e-4, finetune_warmup_steps=200, eval_every=1000, eval_batches=8,
                    log_every=50, checkpoint_every=2000, keep_last=2),
    }

    def validate(self) -> None:
        super().validate()
        bad = [n for n in self.train_sizes if n not in task.SIZES]
        if bad or not self.train_sizes:
            raise ConfigError(f"parameter 'train_sizes': expected a non-empty list of sizes in {list(task.SIZES)}, "
                              f"got {self.train_sizes}")
        bad = [n for n in self.curriculum_sizes if n not in self.train_sizes]
        if self.curriculum_steps and (bad or not self.curriculum_sizes):
            raise ConfigError(f"parameter 'curriculum_sizes': expected a non-empty subset of train_sizes="
                              f"{self.train_sizes}, got {self.curriculum_sizes}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        if self.finetune_warmup_steps > self.finetune_steps:
            raise ConfigError(f"parameter 'finetune_warmup_steps': expected at most finetune_steps="
                              f"{self.finetune_steps}, got {self.finetune_warmup_steps}")
        if not (self.train_scratch_model or self.train_finetuned_model):
            raise ConfigError("parameters 'train_scratch_model' / 'train_finetuned_model': expected at least one True")


# --- data --------------------------------------------------------------------------------------

@dataclass
class Corr2CauseData:
    """The training classes per size and the evaluation sets (lists of per-class item groups)."""

    train_classes: dict[int, np.ndarray]
    sets: dict[str, list[list[task.Item]]]  # dev, test, test_renamed, test_paraphrased, curve

    def flat(self, name: str) -> list[task.Item]:
        return task.flatten(self.sets[name])

    def summary(self) -> dict[str, dict[str, int]]:
        return {name: {"classes": len(groups), "items": sum(map(len, groups)),
                       "valid": sum(it.label for g in groups for it in g)} for name, groups in self.sets.items()}


def prepare_data(cfg: Corr2CauseConfig) -> Corr2CauseData:
    """Classes of every size in train_sizes, split by class; the evaluation sets are the same for every seed."""
    train = {n: task.class_indices(task.equivalence_classes(n, cfg.n6_classes), "train") for n in cfg.train_sizes}
    empty = [n for n, idx in train.items() if len(idx) == 0]
    if empty:
        raise ConfigError(f"parameter 'train_sizes': sizes {empty} have no training class; drop them")
    sets = {"dev": task.items(cfg.train_sizes, "dev", max_classes=cfg.eval_classes, sample=cfg.n6_classes),
            "curve": task.items(cfg.train_sizes, "dev", max_classes=cfg.curve_classes, seed=1, sample=cfg.n6_classes)}
    for name, style in zip(EVAL_SETS, task.STYLES):
        sets[name] = task.items(cfg.train_sizes, "test", style, max_classes=cfg.eval_classes, sample=cfg.n6_classes)
    return Corr2CauseData(train, sets)


def training_row(rng: np.random.Generator, classes: task.EquivalenceClasses, m: int, k: int) -> list[task.Item]:
    """k hypotheses about class m, half valid where it has that many valid ones, in random order."""
    group = task.class_items(classes, m)
    valid = [it for it in group if it.label]
    invalid = [it for it in group if not it.label]
    n_valid = min(len(valid), k // 2, k)
    n_invalid = min(len(invalid), k - n_valid)
    chosen = [valid[i] for i in rng.choice(len(valid), n_valid, replace=False)] + \
             [invalid[i] for i in rng.choice(len(invalid), n_invalid, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


@dataclass
class ClassBatches:
    """Training rows from the training classes: micro-batch `index` is a pure function of (seed, index)."""

    cfg: Corr2CauseConfig
    data: Corr2CauseData
    tokenizer: Tokenizer

    def rows(self, rng: np.random.Generator, batch_size: int, step: int = 0) -> list[list[task.Item]]:
        """One size per micro-batch (rows of similar length), drawn with weight sqrt(training classes)
        among curriculum_sizes before curriculum_steps, among train_sizes after."""
        sizes = list(self.cfg.curriculum_sizes if step < self.cfg.curriculum_steps else self.cfg.train_sizes)
        weights = np.sqrt([len(self.data.train_classes[n]) for n in sizes])
        n = int(rng.choice(sizes, p=weights / weights.sum()))
        classes = task.equivalence_classes(n, self.cfg.n6_classes)
        return [training_row(rng, classes, int(rng.choice(self.data.train_classes[n])), self.cfg.hypotheses_per_row)
                for _ in range(batch_size)]

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        step = index // global_batch_split(self.cfg)[0]
        return task.pack(self.tokenizer, self.rows(numpy_rng(seed, "corr2cause", index), batch_size, step))


@dataclass
class AnswerLoss:
    """Cross-entropy of the answer token at each packed hypothesis; reports how often Yes/No is right."""

    name: str = "answer"

    def __call__(self, model, batch, generator):
        logits = model(batch["tokens"], attn_mask=batch["attn_mask"], positions=batch["positions"])
        labels = torch.full_like(batch["tokens"], IGNORE)
        targets = batch["tokens"][batch["answer_row"], batch["answer_pos"] + 1]
        labels[batch["answer_row"], batch["answer_pos"]] = targets
        loss, n = token_cross_entropy(logits, labels)
        right = logits[batch["answer_row"], batch["answer_pos"]].argmax(-1) == targets
        return loss, {"tokens_scored": n, "answer_accuracy": float(right.float().mean())}


def validation_batches(cfg: Corr2CauseConfig, data: Corr2CauseData,
                       tokenizer: Tokenizer) -> list[dict[str, torch.Tensor]]:
    """Fixed dev rows (natural label share) for the val_loss curve."""
    rows = task.chunked(data.sets["curve"], cfg.hypotheses_per_row)
    rng = np.random.default_rng([cfg.seeds[0], 97])
    picked = [rows[i] for i in rng.choice(len(rows), min(len(rows), cfg.eval_batches * cfg.batch_size), replace=False)]
    return [task.pack(tokenizer, picked[k:k + cfg.batch_size]) for k in range(0, len(picked), cfg.batch_size)]


def dev_f1_callback(cfg: Corr2CauseConfig, data: Corr2CauseData, tokenizer: Tokenizer):
    """(every, fn) for `train`: dev F1 at its best threshold on the curve classes (a training curve, dev only)."""
    labels = np.array([it.label for it in data.flat("curve")])

    def dev_f1(step: int, model) -> dict[str, float]:
        p = task.valid_probabilities(model, tokenizer, data.sets["curve"], cfg.eval_batch_size, cfg.eval_per_row)
        t = task.best_threshold(labels, p)
        return {"dev_f1": task.binary_scores(labels, p >= t)["f1"]}

    return (cfg.f1_every, dev_f1)


# --- training ----------------------------------------------------------------------------------

def model_run(run, name: str, cfg: TrainConfig | Corr2CauseConfig):
    """The sub-folder run of one trained model inside the notebook's run: models/<name>/."""
    from lablib.runs import start_run

    if run is None:
        return None
    return start_run(EXPERIMENT, cfg, run.path / "models" / name, model=name)


def train_scratch(cfg: Corr2CauseConfig, seed: int, data: Corr2CauseData, run=None, *, progress: bool = True):
    """The transformer from scratch over the task tokenizer; returns (model, tokenizer, TrainResult,
    untrained model's dev/test probabilities, sub-run)."""
    seed_cfg = dataclasses.replace(cfg, seed=seed)
    seed_cfg.preset = cfg.preset
    tokenizer = task.task_tokenizer()
    sub = model_run(run, f"scratch-seed{seed}", seed_cfg)
    if sub is not None:
        tokenizer.save(sub.path / "tokenizer.json")
    model = seeded_transformer(seed_cfg, tokenizer.vocab_size)
    untrained = evaluate_probabilities(model, tokenizer, data, cfg)
    result = train(model, AnswerLoss(), ClassBatches(seed_cfg, data, tokenizer), seed_cfg.project(TrainConfig), sub,
                   val=validation_batches(cfg, data, tokenizer), callbacks=[dev_f1_callback(cfg, data, tokenizer)],
                   progress=progress)
    return model, tokenizer, result, untrained, sub


def pretrained_lm(cfg: Corr2CauseConfig, run=None, *, progress: bool = True) -> tuple[Transformer, Tokenizer]:
    """The quickstart's causal LM: read from cfg.pretrained_run, or pretrained here (models/pretrained)
    by `lablib.experiments.quickstart.pretrain` with the PRETRAIN row of the preset."""
    from lablib.experiments.quickstart import LMConfig, pretrain
    from lablib.runs import open_run

    if cfg.pretrained_run is not None:
        model, tokenizer = open_run(cfg.pretrained_run).load_model()
        return model, tokenizer
    row = dict(PRETRAIN[cfg.preset or "cpu"])
    lm_cfg = LMConfig.resolve(row.pop("preset"), **row)
    sub = model_run(run, "pretrained", lm_cfg)
    out = pretrain(lm_cfg, sub, progress=progress)
    if sub is not None:
        sub.set_status("done")
    return out.model.eval(), out.data.tokenizer


def finetune_config(cfg: Corr2CauseConfig, seed: int) -> TrainConfig:
    return dataclasses.replace(cfg.project(TrainConfig), steps=cfg.finetune_steps, batch_size=cfg.finetune_batch_size,
                               learning_rate=cfg.finetune_learning_rate, warmup_steps=cfg.finetune_warmup_steps,
                               seed=seed, eval_every=max(1, cfg.finetune_steps // 5),
                               checkpoint_every=cfg.finetune_steps, log_every=max(1, cfg.finetune_steps // 30))


def train_finetuned(cfg: Corr2CauseConfig, seed: int, data: Corr2CauseData, base: Transformer, tokenizer: Tokenizer,
                    run=None, *, progress: bool = True):
    """A copy of the pretrained LM fine-tuned on the task with its own tokenizer;
    returns (model, TrainResult, sub-run)."""
    import copy

    train_cfg = finetune_config(cfg, seed)
    train_cfg.preset = cfg.preset
    sub = model_run(run, f"finetuned-seed{seed}", train_cfg)
    if sub is not None:
        tokenizer.save(sub.path / "tokenizer.json")
    model = copy.deepcopy(base).train()
    rows_cfg = dataclasses.replace(cfg, f1_every=max(1, cfg.finetune_steps // 2), batch_size=cfg.finetune_batch_size,
                                   hypotheses_per_row=cfg.finetune_hypotheses_per_row,
                                   curriculum_steps=cfg.curriculum_steps * cfg.finetune_steps // cfg.steps)
    result = train(model, AnswerLoss(), ClassBatches(rows_cfg, data, tokenizer), train_cfg, sub,
                   val=validation_batches(rows_cfg, data, tokenizer),
                   callbacks=[dev_f1_callback(rows_cfg, data, tokenizer)], progress=progress)
    return model, result, sub


# --- evaluation --------------------------------------------------------------------------------

def evaluate_probabilities(model, tokenizer: Tokenizer, data: Corr2CauseData,
                           cfg: Corr2CauseConfig) -> dict[str, np.ndarray]:
    """P(valid) of every item of dev and of each evaluation set."""
    return {name: task.valid_probabilities(model, tokenizer, data.sets[name], cfg.eval_batch_size, cfg.eval_per_row)
            for name in ("dev", *EVAL_SETS)}


def scores_from_probabilities(data: Corr2CauseData, probabilities: dict[str, np.ndarray]) -> dict[str, Any]:
    """The dev-chosen threshold and, per evaluation set, the score table (overall, per relation, per N)."""
    dev_labels = np.array([it.label for it in data.flat("dev")])
    threshold = task.best_threshold(dev_labels, probabilities["dev"])
    out: dict[str, Any] = {"threshold": threshold}
    for name in ("dev", *EVAL_SETS):
        out[name] = task.score_table(data.flat(name), probabilities[name] >= threshold)
    return out


def evaluate_model(model, tokenizer: Tokenizer, data: Corr2CauseData, cfg: Corr2CauseConfig) -> dict[str, Any]:
    return scores_from_probabilities(data, evaluate_probabilities(model, tokenizer, data, cfg))


def reference_scores(data: Corr2CauseData, cfg: Corr2CauseConfig) -> dict[str, Any]:
    """Baselines on the same items: chance, majority class (always invalid), always valid, hypothesis-only
    (share valid of each hypothesis text among all training items, threshold chosen on dev) and the PC oracle."""
    train_items = [it for n, idx in data.train_classes.items() for m in idx
                   for it in task.class_items(task.equivalence_classes(n, cfg.n6_classes), int(m))]
    prior = float(np.mean([it.label for it in train_items]))
    rates = task.hypothesis_only_rates(train_items)
    hyp = {name: task.hypothesis_only_scores(rates, data.flat(name), prior) for name in ("dev", *EVAL_SETS)}
    out: dict[str, Any] = {"hypothesis_only": scores_from_probabilities(data, hyp), "train_valid_share": prior}
    for name in EVAL_SETS:
        flat = data.flat(name)
        labels = np.array([it.label for it in flat])
        out.setdefault("majority", {})[name] = task.score_table(flat, np.zeros(len(flat), bool))
        out.setdefault("always_valid", {})[name] = task.score_table(flat, np.ones(len(flat), bool))
        out.setdefault("chance_f1", {})[name] = task.chance_f1(float(labels.mean()))
    oracle = []
    for it in data.flat("test"):
        names, labels = task.pc_labels(it.premise)
        oracle.append(bool(labels[task.pairs(it.n).index((it.i, it.j)), it.relation]))
    out["pc_oracle"] = {"test": task.score_table(data.flat("test"), np.array(oracle))}
    return out


def pc_agreement(cfg: Corr2CauseConfig, seed: int = 0) -> dict[str, Any]:
    """Labels against the PC route on every item of up to pc_check_classes classes per size (any split)."""
    rng = np.random.default_rng([seed, 31])
    checked = disagree = 0
    for n in cfg.train_sizes:
        classes = task.equivalence_classes(n, cfg.n6_classes)
        for m in rng.choice(len(classes), min(len(classes), cfg.pc_check_classes), replace=False):
            group = task.class_items(classes, int(m))
            _, labels = task.pc_labels(group[0].premise)
            ours = np.array([it.label for it in group]).reshape(labels.shape)
            checked += ours.size
            disagree += int((ours != labels).sum())
    return {"items": checked, "disagreements": disagree}


# --- results -----------------------------------------------------------------------------------

def headline_dict(metric: str, value: dict[Any, float], references: dict[str, dict[Any, float]], trivial_rule: str,
                  split: str, better: str = "higher") -> dict[str, Any]:
    """A headline over seeds in the lab's results format (`lablib.evidence.headline_over_seeds`)."""
    return headline_over_seeds(metric, value, references, trivial_rule, split, better).to_dict()


def interval(values: Sequence[float]) -> dict[str, Any]:
    return mean_interval(values).to_dict()


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/07_corr2cause.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/07_corr2cause.ipynb", preset, parameters)


def relation_rows(per_seed_scores: dict[int, dict[str, Any]], set_name: str,
                  keys: Sequence[str]) -> list[dict[str, Any]]:
    """Rows (key, F1 / precision / recall mean over seeds with interval) from per-seed score tables."""
    rows = []
    for key in keys:
        present = [s for s in per_seed_scores if key in per_seed_scores[s][set_name]]
        if not present:
            continue
        row: dict[str, Any] = {"group": key, "items": per_seed_scores[present[0]][set_name][key]["items"]}
        for metric in ("f1", "precision", "recall", "accuracy"):
            row[metric] = interval([per_seed_scores[s][set_name][key][metric] for s in present])
        rows.append(row)
    return rows
