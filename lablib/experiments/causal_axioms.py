"""The causal-axioms experiment (notebooks/03_causal_axioms.ipynb, one run per 03a_causal_axioms_run.ipynb):
transitivity learnt from axiom demonstrations (Vashishtha et al., 2024, arXiv:2407.07612).

Notable here:
- `CausalAxiomsConfig` is one run: a transformer trained on fresh transitivity questions
  (`lablib.tasks.causal_axioms` holds the graphs, the text interface and the scoring) and
  scored on the evaluation sets; `CausalAxiomsStudyConfig` is the positional-encoding study.
- Training data (the paper's "linear chains with noisy variations"): chains of
  train_min_nodes..train_max_nodes whose edges each point backwards with `flip_prob` and whose
  statements are shuffled with `shuffle_prob`; per batch exactly half the answers are `Yes`.
- Two training-side departures from the paper, never touching evaluation, both on in the
  `cpu` preset (without them the `cpu`-size model sits at chance): `questions_per_graph`
  packs several questions about one graph into one sequence (`encode_packed`: each question
  computed exactly as if alone), and `curriculum_fraction` grows the largest training chain
  from 2 nodes (the axiom's base case) to `train_max_nodes` over that share of training, with
  `curriculum_names` growing names from 1 character to 3 along with it. The curriculum is a
  function of the micro-batch index alone.
- `TransitivityBatches.batch(index, batch_size, seed)` is a pure function of its arguments;
  `AnswerLoss` puts the loss on the answer tokens only.
- Evaluation sets (`evaluation_sets`), each with `eval_examples` questions per size, half
  `Yes`, seeded by (eval_seed, set, size) only: `in_distribution`, `chain` (longer chains),
  `reversed` (statements in reverse order) and `branch_<factor>` (Erdos-Renyi DAGs).
- `summarize_seeds` / `headline_table` are the study's tables over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal

import numpy as np
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import Tokenizer
from lablib.models import Transformer
from lablib.objectives import IGNORE, token_cross_entropy
from lablib.seeding import seeded_transformer
from lablib.tasks.causal_axioms import (LONGEST_NAME, CausalGraph, Example, accuracy, ask, balanced_labels,
                                        branching_dag, encode_answered, encode_packed, linear_chain, longest_tokens,
                                        task_tokenizer, trim_padding)
from lablib.train import grad_accum_steps, train


@dataclass
class CausalAxiomsConfig(ModelConfig, TrainConfig):
    """One transformer trained on transitivity demonstrations and scored on the evaluation sets."""

    tokenizer: Literal["char", "paper"] = knob("char", "char: one token per character; paper: keywords as single "
                                               "tokens, names by character, no spaces (the paper's scheme)")
    train_min_nodes: int = knob(3, "fewest nodes in a training chain", min=2)
    train_max_nodes: int = knob(6, "most nodes in a training chain", min=2)
    questions_per_graph: int = knob(1, "training questions asked about each graph in one sequence: the premises "
                                    "once, then every question with its answer, each question attending only to "
                                    "the premises and itself at the positions it would have alone (so each is "
                                    "exactly a one-question example, at a fraction of the compute)", min=1)
    curriculum_fraction: float = knob(0.0, "share of training over which the largest training chain grows "
                                      "linearly from 2 nodes to train_max_nodes (0: the paper's sizes from the "
                                      "first step); evaluation never changes", min=0.0, max=1.0)
    curriculum_names: bool = knob(False, "names grow with the curriculum too: 1 character in its first third, "
                                  "up to 2 in the second, up to 3 (the paper's) afterwards")
    flip_prob: float = knob(0.5, "chance that an edge of a training (and `chain` eval) chain points backwards",
                            min=0.0, max=1.0)
    shuffle_prob: float = knob(0.5, "chance that a training chain's statements come in random order",
                               min=0.0, max=1.0)
    eval_chain_lengths: list[int] = knob([7, 8, 9, 10, 11, 12, 13, 14, 15, 20], "nodes of the longer `chain` set")
    reversed_lengths: list[int] = knob([3, 4, 5, 6, 7, 8, 9, 10], "nodes of the `reversed` chains")
    branching_nodes: list[int] = knob([5, 8, 10, 12], "nodes of the branching graphs")
    branching_factors: list[float] = knob([1.4, 2.0], "edges per node of the branching graphs")
    eval_examples: int = knob(200, "questions per evaluation set and size (even: half Yes, half No)", min=2)
    eval_seed: int = knob(2024, "seed of the evaluation sets (the same for every run)", min=0)
    eval_batch_size: int = knob(128, "questions per forward pass when evaluating", min=1)
    accuracy_every: int = knob(200, "steps between in-distribution accuracy checks while training", min=1)
    seq_len: int = knob(104, "training sequences are padded to seq_len + 1 tokens (char: the longest 6-node chain "
                        "+ answer)", min=2)
    max_seq_len: int = knob(416, "longest sequence the model accepts (char: a 12-node graph with 24 statements "
                            "+ answer)", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(n_layer=1, n_head=2, d_model=32, steps=20, batch_size=16, warmup_steps=2,
                      questions_per_graph=2, curriculum_fraction=0.5, seq_len=130,
                      eval_examples=8, eval_chain_lengths=[7, 20], reversed_lengths=[4], branching_nodes=[5, 12],
                      eval_every=10, eval_batches=1, log_every=5, checkpoint_every=10, accuracy_every=10),
        # ~9 minutes per run on one core of a 2-core machine (two runs side by side, 0.19 s per
        # RoPE step): the paper's tokenizer (50 tokens for the longest training chain, 202 for a
        # 12-node graph with 24 statements), 8 questions packed per graph (256 answers per step
        # for ~2.4x the tokens of 32 single questions), 6 layers of width 64, and a curriculum
        # over the first 60% of training, chains from 2 nodes up to 6 and names from 1 character
        # up to 3 (the measurements behind it: docs/LOG.md and notebooks/03_causal_axioms.ipynb).
        "cpu": dict(tokenizer="paper", seq_len=120, max_seq_len=208, questions_per_graph=8, curriculum_fraction=0.6,
                    curriculum_names=True, n_layer=6, n_head=4, d_model=64, steps=3000, batch_size=32,
                    warmup_steps=50, learning_rate=3e-3, eval_every=250, eval_batches=2, log_every=50,
                    checkpoint_every=500, accuracy_every=250),
        # the paper's shape (12 layers, width 512, 8 heads) at a GPU's budget
        "gpu": dict(tokenizer="paper", seq_len=50, max_seq_len=208, n_layer=12, n_head=8, d_model=512, steps=20000,
                    batch_size=128, warmup_steps=1000, learning_rate=3e-4, eval_examples=500, eval_every=1000,
                    eval_batches=8, log_every=50, checkpoint_every=2000, accuracy_every=1000),
    }

    def validate(self) -> None:
        super().validate()
        if self.train_max_nodes < self.train_min_nodes:
            raise ConfigError(f"parameter 'train_max_nodes': expected at least train_min_nodes={self.train_min_nodes}, "
                              f"got {self.train_max_nodes}")
        if self.eval_examples % 2:
            raise ConfigError(f"parameter 'eval_examples': expected an even number (half Yes, half No), "
                              f"got {self.eval_examples}")
        for name in ("eval_chain_lengths", "reversed_lengths", "branching_nodes"):
            small = [n for n in getattr(self, name) if n < 2]
            if small:
                raise ConfigError(f"parameter {name!r}: expected node counts >= 2, got {getattr(self, name)}")
        bad_factors = [f for f in self.branching_factors if f <= 0]
        if bad_factors:
            raise ConfigError(f"parameter 'branching_factors': expected positive numbers, got {self.branching_factors}")
        tokenizer = task_tokenizer(self.tokenizer)
        need_train = longest_tokens(tokenizer, self.train_max_nodes - 1, self.questions_per_graph)
        if self.seq_len + 1 < need_train:
            what = "its answer" if self.questions_per_graph == 1 else f"{self.questions_per_graph} questions with answers"
            raise ConfigError(f"parameter 'seq_len': expected at least {need_train - 1} (the longest "
                              f"{self.train_max_nodes}-node chain and {what}), got {self.seq_len}")
        if self.seq_len > self.max_seq_len:
            raise ConfigError(f"parameter 'seq_len': expected at most max_seq_len={self.max_seq_len} (the model reads "
                              f"seq_len tokens of every training row), got {self.seq_len}")
        need_eval = max(need_train, *(longest_tokens(tokenizer, n_edges) for n_edges in evaluation_edge_counts(self)))
        if self.max_seq_len < need_eval:
            raise ConfigError(f"parameter 'max_seq_len': expected at least {need_eval} (the longest evaluation "
                              f"question), got {self.max_seq_len}")



ENCODINGS = ("none", "learned", "sinusoidal", "rope")



@dataclass
class CausalAxiomsStudyConfig(CausalAxiomsConfig):
    """The positional-encoding study: one CausalAxiomsConfig run per (encoding, seed), through lablib.sweep."""

    encodings: list[Literal["none", "learned", "sinusoidal", "rope"]] = knob(list(ENCODINGS), "positional encodings to compare")
    seeds: list[int] = knob([0, 1, 2], "training seeds per encoding")
    jobs: int | None = knob(None, "runs in parallel (None: lablib.sweep's choice)", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**CausalAxiomsConfig.presets["smoke"], "encodings": ["none", "rope"], "seeds": [0], "jobs": 2},
        "cpu": {**CausalAxiomsConfig.presets["cpu"], "jobs": 2},  # 2 one-thread jobs beat 1 two-thread job on small models
        "gpu": {**CausalAxiomsConfig.presets["gpu"], "seeds": [0, 1, 2], "jobs": 1},
    }

    def validate(self) -> None:
        super().validate()
        if not self.encodings or not self.seeds:
            raise ConfigError(f"parameters 'encodings' and 'seeds': expected non-empty lists, got "
                              f"{self.encodings!r} and {self.seeds!r}")

    def run_overrides(self) -> dict[str, Any]:
        """The per-run knobs that differ from their preset's values (pos and seed come from the grid)."""
        base = CausalAxiomsConfig.resolve(self.preset)
        return {name: getattr(self, name) for name in CausalAxiomsConfig.fields_by_name()
                if name not in ("pos", "seed") and getattr(self, name) != getattr(base, name)}



def evaluation_edge_counts(cfg: CausalAxiomsConfig) -> list[int]:
    chains = [n - 1 for n in (*cfg.eval_chain_lengths, *cfg.reversed_lengths)]
    branches = [min(int(f * n), n * (n - 1) // 2) for f in cfg.branching_factors for n in cfg.branching_nodes]
    return chains + branches



def training_chain(rng: np.random.Generator, cfg: CausalAxiomsConfig, n_nodes: int, evaluation: bool,
                   longest_name: int = LONGEST_NAME) -> CausalGraph:
    """A chain from the training distribution: flipped edges, statements shuffled with shuffle_prob."""
    order = "shuffled" if rng.random() < cfg.shuffle_prob else "chain"
    return linear_chain(rng, n_nodes, cfg.flip_prob, order, evaluation, longest_name)



def largest_chain(cfg: CausalAxiomsConfig, progress: float | None) -> int:
    """The largest training chain at `progress` (0..1 of training) under the curriculum."""
    if progress is None or cfg.curriculum_fraction == 0 or progress >= cfg.curriculum_fraction:
        return cfg.train_max_nodes
    return min(cfg.train_max_nodes, 2 + int((cfg.train_max_nodes - 1) * progress / cfg.curriculum_fraction))



def longest_name(cfg: CausalAxiomsConfig, progress: float | None) -> int:
    """The longest training name at `progress`: with curriculum_names, 1 character in the first
    third of the curriculum, 2 in the second, 3 (the paper's) afterwards."""
    if progress is None or not cfg.curriculum_names or progress >= cfg.curriculum_fraction:
        return LONGEST_NAME
    return min(LONGEST_NAME, 1 + int(LONGEST_NAME * progress / cfg.curriculum_fraction))



def chain_sizes(rng: np.random.Generator, cfg: CausalAxiomsConfig, n: int, evaluation: bool,
                progress: float | None = None) -> np.ndarray:
    """Nodes of n training chains: uniform over train_min..train_max_nodes (capped, and the floor
    lowered with it, by the curriculum at `progress`)."""
    if evaluation:
        return rng.integers(cfg.train_min_nodes, cfg.train_max_nodes + 1, n)
    top = largest_chain(cfg, progress)
    return rng.integers(min(cfg.train_min_nodes, top), top + 1, n)



def training_examples(rng: np.random.Generator, cfg: CausalAxiomsConfig, n: int, evaluation: bool = False,
                      progress: float | None = None) -> list[Example]:
    """n questions from the training distribution (from the evaluation share when evaluation=True)."""
    return [group[0] for group in training_groups(rng, cfg, n, 1, progress, evaluation)]



def training_groups(rng: np.random.Generator, cfg: CausalAxiomsConfig, n_graphs: int, questions: int,
                    progress: float | None = None, evaluation: bool = False) -> list[list[Example]]:
    """n_graphs graphs from the training distribution (from the evaluation share when
    evaluation=True) with `questions` questions each; exactly half of all the answers are Yes."""
    sizes = chain_sizes(rng, cfg, n_graphs, evaluation, progress).tolist()
    labels = balanced_labels(rng, n_graphs * questions).reshape(n_graphs, questions).tolist()
    longest = LONGEST_NAME if evaluation else longest_name(cfg, progress)
    groups = []
    for size, row in zip(sizes, labels):
        graph = training_chain(rng, cfg, size, evaluation, longest)
        groups.append([ask(rng, graph, bool(label)) for label in row])
    return groups



@dataclass
class TransitivityBatches:
    """Fresh training questions: micro-batch `index` is a pure function of (seed, index).

    With questions_per_graph > 1 a row packs that many questions about one graph (`encode_packed`).
    The curriculum reads training progress as index / (steps x micro-batches per step) of one process.
    """

    cfg: CausalAxiomsConfig
    tokenizer: Tokenizer

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([seed, index])
        progress = index / (self.cfg.steps * grad_accum_steps(self.cfg))
        if self.cfg.questions_per_graph == 1:
            return encode_answered(self.tokenizer, training_examples(rng, self.cfg, batch_size, progress=progress),
                                   self.cfg.seq_len + 1)
        groups = training_groups(rng, self.cfg, batch_size, self.cfg.questions_per_graph, progress)
        return trim_padding(encode_packed(self.tokenizer, groups, self.cfg.seq_len + 1), self.tokenizer.pad_id)



@dataclass
class AnswerLoss:
    """Cross-entropy on the answer tokens only; reports how often the first one (Y or N, or the whole word) is right."""

    name: str = "answer"

    def __call__(self, model, batch, generator):
        tokens, answer = batch["tokens"], batch["answer_mask"]
        if "attn_mask" in batch:  # packed questions (encode_packed)
            logits = model(tokens[:, :-1], attn_mask=batch["attn_mask"][:, :-1, :-1],
                           positions=batch["positions"][:, :-1])
        else:
            logits = model(tokens[:, :-1], mask="causal")
        labels = tokens[:, 1:].masked_fill(~answer[:, 1:], IGNORE)  # input position i predicts token i+1
        loss, n = token_cross_entropy(logits, labels)
        first = answer[:, 1:] & ~answer[:, :-1]  # the position that decides Yes or No
        first_right = float((logits.argmax(-1) == labels)[first].float().mean())
        return loss, {"tokens_scored": n, "answer_accuracy": first_right}



def evaluation_makers(cfg: CausalAxiomsConfig) -> dict[str, tuple[list[int], Callable[[np.random.Generator, int], CausalGraph]]]:
    """Set name -> (sizes in nodes, maker(rng, nodes) of evaluation-share graphs)."""
    train_sizes = list(range(cfg.train_min_nodes, cfg.train_max_nodes + 1))
    makers = {
        "in_distribution": (train_sizes, lambda rng, n: training_chain(rng, cfg, n, evaluation=True)),
        "chain": (list(cfg.eval_chain_lengths),
                  lambda rng, n: linear_chain(rng, n, cfg.flip_prob, "chain", evaluation=True)),
        "reversed": (list(cfg.reversed_lengths), lambda rng, n: linear_chain(rng, n, 0.0, "reversed", evaluation=True)),
    }
    for factor in cfg.branching_factors:
        makers[f"branch_{factor:g}"] = (list(cfg.branching_nodes),
                                        lambda rng, n, f=factor: branching_dag(rng, n, f, evaluation=True))
    return makers



def evaluation_sets(cfg: CausalAxiomsConfig) -> dict[str, dict[int, list[Example]]]:
    """Set name -> nodes -> eval_examples questions (half Yes), all on evaluation-share graphs.

    Seeded by (eval_seed, set, size) only, so every run of a sweep sees the same questions.
    """
    sets: dict[str, dict[int, list[Example]]] = {}
    for set_index, (name, (sizes, make)) in enumerate(evaluation_makers(cfg).items()):
        sets[name] = {}
        for n in sizes:
            rng = np.random.default_rng([cfg.eval_seed, set_index, n])
            sets[name][n] = [ask(rng, make(rng, n), bool(label)) for label in balanced_labels(rng, cfg.eval_examples)]
    return sets



def build_model(cfg: CausalAxiomsConfig, tokenizer: Tokenizer) -> Transformer:
    return seeded_transformer(cfg, tokenizer.vocab_size, mask="causal")



def train_model(cfg: CausalAxiomsConfig, run=None, *, progress: bool = True):
    """Tokenizer (saved to the run), model and training on fresh chains; returns (model, tokenizer, TrainResult).

    While training, metrics.jsonl gets val_loss on fixed held-out batches and
    `val_accuracy` on in-distribution evaluation-share questions every accuracy_every steps.
    """
    tokenizer = task_tokenizer(cfg.tokenizer)
    if run is not None:
        tokenizer.save(run.path / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    rng = np.random.default_rng([cfg.eval_seed, 999])
    held_out = training_examples(rng, cfg, cfg.eval_batches * cfg.batch_size + cfg.eval_examples, evaluation=True)
    val = [encode_answered(tokenizer, held_out[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.seq_len + 1)
           for i in range(cfg.eval_batches)]
    probe = held_out[cfg.eval_batches * cfg.batch_size:]

    def val_accuracy(step: int, m: Transformer) -> dict[str, float]:
        return {"val_accuracy": accuracy(m, tokenizer, probe, cfg.eval_batch_size)}

    result = train(model, AnswerLoss(), TransitivityBatches(cfg, tokenizer), cfg.project(TrainConfig), run,
                   val=val, callbacks=[(cfg.accuracy_every, val_accuracy)], progress=progress)
    return model, tokenizer, result



def summarize_seeds(table, encodings: Iterable[str]):
    """Long table (one row per encoding x set x nodes) of mean / std / min / max accuracy over seeds.

    `table`: one row per run with columns `pos`, `seed` and the flat `acc/<set>/<nodes>` numbers.
    """
    import pandas as pd

    rows = []
    for column in [c for c in table.columns if c.startswith("acc/") and c.count("/") == 2]:
        _, name, n = column.split("/")
        for pos in encodings:
            values = table.loc[table["pos"] == pos, column].dropna().to_numpy(dtype=float)
            if len(values):
                rows.append({"pos": pos, "set": name, "nodes": int(n), "mean": values.mean(),
                             "std": values.std(ddof=1) if len(values) > 1 else 0.0,
                             "min": values.min(), "max": values.max(), "seeds": len(values)})
    return pd.DataFrame(rows)



def headline_groups(cfg: CausalAxiomsConfig) -> dict[str, tuple[str, list[int]]]:
    """The study's headline numbers: name -> (evaluation set, sizes averaged over)."""
    chains = list(cfg.eval_chain_lengths)
    groups = {"in_distribution": ("in_distribution", list(range(cfg.train_min_nodes, cfg.train_max_nodes + 1))),
              "chain_7_10": ("chain", [n for n in chains if 7 <= n <= 10]),
              "chain_11_15": ("chain", [n for n in chains if 11 <= n <= 15]),
              "chain_20": ("chain", [n for n in chains if n == 20]),
              "reversed": ("reversed", list(cfg.reversed_lengths))}
    groups.update({f"branch_{f:g}": (f"branch_{f:g}", list(cfg.branching_nodes)) for f in cfg.branching_factors})
    return {name: (set_name, sizes) for name, (set_name, sizes) in groups.items() if sizes}



def headline_table(table, cfg: CausalAxiomsConfig, encodings: Iterable[str]):
    """One row per (encoding, headline group): accuracy averaged over the group's sizes for each
    seed, then mean / std / min / max over seeds, and the per-seed values."""
    import pandas as pd

    rows = []
    for group, (set_name, sizes) in headline_groups(cfg).items():
        columns = [f"acc/{set_name}/{n}" for n in sizes]
        if not all(c in table.columns for c in columns):
            continue
        for pos in encodings:
            per_seed = table.loc[table["pos"] == pos].dropna(subset=columns)
            values = per_seed[columns].to_numpy(dtype=float).mean(axis=1)
            if len(values):
                rows.append({"pos": pos, "group": group, "mean": values.mean(),
                             "std": values.std(ddof=1) if len(values) > 1 else 0.0, "min": values.min(),
                             "max": values.max(), "per_seed": dict(zip(per_seed["seed"].tolist(), values.round(4).tolist()))})
    return pd.DataFrame(rows)
