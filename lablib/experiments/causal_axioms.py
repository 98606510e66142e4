"""The causal-axioms experiment (notebooks/03_causal_axioms.ipynb, one run per 03a_causal_axioms_run.ipynb):
transitivity learnt from axiom demonstrations (Vashishtha et al., 2024, arXiv:2407.07612).

Notable here:
- `CausalAxiomsConfig` is one run: a transformer trained on fresh transitivity questions
  (`lablib.tasks.causal_axioms` holds the graphs, the text interface and the scoring) and
  scored on the evaluation sets; `CausalAxiomsStudyConfig` is the positional-encoding study,
  which `run_study` runs inside one process: per encoding a learning-rate x warm-up search on
  the dev split (seed 0), then `seeds` runs at the chosen recipe, scored once on test.
- Training data (the paper's "linear chains with noisy variations"): chains of
  train_min_nodes..train_max_nodes whose edges each point backwards with `flip_prob` and whose
  statements are shuffled with `shuffle_prob`; per batch exactly half the answers are `Yes`.
  Questions are drawn by `plan_question`: a Yes is multi-hop (>= 2 edges, hop count uniform
  over those the graph has) with `multi_hop_share` where the graph has one, else a stated
  edge; a No is a hard negative (`reversed`: B reaches A) or an `unrelated` pair, half and
  half where the graph has both. BOS starts every sequence when `bos` is on.
- Two training-side departures from the paper, never touching evaluation: `questions_per_graph`
  packs several questions about one graph into one sequence (`encode_packed`: each question
  computed exactly as if alone), and `curriculum_fraction` grows the largest training chain
  from 2 nodes to `train_max_nodes` over that share of training, with `curriculum_names`
  growing names from 1 character to 3 along with it (a function of the micro-batch index).
- `TransitivityBatches.batch(index, batch_size, seed)` is a pure function of its arguments;
  `AnswerLoss` puts the loss on the answer tokens only.
- Evaluation sets (`evaluation_sets`): `in_distribution` (3-6 nodes, the training
  distribution), `chain` (longer chains), `reversed` (unflipped chains stated last edge first)
  and `branch_<factor>` (Erdos-Renyi DAGs); each size has a `dev` and a `test` split of
  `eval_examples` questions each, split by graph (`lablib.evidence.split_of` of the graph's
  key), with exact quotas: half Yes, of which `multi_hop_share` multi-hop, and the No half
  split between reversed and unrelated pairs (all reversed where a graph has no unrelated pair).
- `score` gives accuracy per set and size and by hop count and negative kind;
  `reference_scores` the baselines on the same items (chance, majority, edge lookup, mention
  order); the untrained model is each run's step-0 model on the same items.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import Tokenizer
from lablib.evidence import SPLITS, Baselines, Headline, aggregate_seeds, mean_interval, paired_difference, split_of
from lablib.models import Transformer
from lablib.objectives import IGNORE, token_cross_entropy
from lablib.seeding import seeded_transformer
from lablib.tasks.causal_axioms import (LONGEST_NAME, NEGATIVE_KINDS, RULES, CausalGraph, Example, ask,
                                        balanced_labels, branching_dag, candidate_pairs, encode_answered,
                                        encode_packed, linear_chain, longest_tokens, random_names, rule_answers,
                                        task_tokenizer, trim_padding, yes_probabilities, is_evaluation_graph)
from lablib.train import grad_accum_steps, train

EXPERIMENT = "causal_axioms"
ENCODINGS = ("none", "learned", "sinusoidal", "rope")


@dataclass
class CausalAxiomsConfig(ModelConfig, TrainConfig):
    """One transformer trained on transitivity demonstrations and scored on the evaluation sets."""

    tokenizer: Literal["char", "paper"] = knob("char", "char: one token per character; paper: keywords as single "
                                               "tokens, names by character, no spaces (the paper's scheme)")
    bos: bool = knob(True, "start every sequence with a <bos> token (an anchor for NoPE's implicit positions)")
    train_min_nodes: int = knob(3, "fewest nodes in a training chain", min=2)
    train_max_nodes: int = knob(6, "most nodes in a training chain", min=2)
    multi_hop_share: float = knob(2 / 3, "share of Yes questions that need two or more hops (exact in every "
                                  "evaluation split; a probability in training, where the graph has such a pair)",
                                  min=0.5, max=1.0)
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
    eval_chain_lengths: list[int] = knob([7, 8, 9, 10, 11, 12, 13, 14, 15], "nodes of the longer `chain` set")
    reversed_lengths: list[int] = knob([3, 4, 5, 6, 8, 10], "nodes of the `reversed` chains")
    branching_nodes: list[int] = knob([6, 8, 10, 12], "nodes of the branching graphs")
    branching_factors: list[float] = knob([1.4, 2.0], "edges per node of the branching graphs")
    eval_examples: int = knob(120, "questions per evaluation set, size and split (even: half Yes, half No)", min=4)
    eval_seed: int = knob(2024, "seed of the evaluation sets (the same for every run)", min=0)
    eval_batch_size: int = knob(128, "questions per forward pass when evaluating", min=1)
    accuracy_every: int = knob(200, "steps between dev in-distribution accuracy checks while training", min=1)
    seq_len: int = knob(104, "training sequences are padded to seq_len + 1 tokens", min=2)
    max_seq_len: int = knob(416, "longest sequence the model accepts", min=1)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # seconds: plumbing only
        "smoke": dict(tokenizer="paper", n_layer=1, n_head=2, d_model=32, steps=12, batch_size=8, warmup_steps=2,
                      questions_per_graph=4, curriculum_fraction=0.5, seq_len=100, max_seq_len=208,
                      eval_examples=8, eval_chain_lengths=[7, 15], reversed_lengths=[4], branching_nodes=[6, 10],
                      eval_every=10, eval_batches=1, log_every=5, checkpoint_every=10, accuracy_every=10),
        # sized for the whole study (4 encodings x (3 learning rates + 2 more seeds)) in ~30 min on one core:
        # the paper's tokenizer, 8 questions packed per graph, a curriculum over the first 60% of training
        "cpu": dict(tokenizer="paper", seq_len=120, max_seq_len=208, questions_per_graph=8, curriculum_fraction=0.6,
                    curriculum_names=True, n_layer=4, n_head=4, d_model=64, steps=300, batch_size=32,
                    warmup_steps=30, learning_rate=3e-3, eval_every=100, eval_batches=2, log_every=25,
                    checkpoint_every=300, accuracy_every=100, eval_examples=60),
        # a GPU's budget with the paper's shape
        "gpu": dict(tokenizer="paper", seq_len=120, max_seq_len=208, questions_per_graph=8, n_layer=12, n_head=8,
                    d_model=512, steps=20000, batch_size=64, warmup_steps=1000, learning_rate=3e-4,
                    curriculum_fraction=0.3, eval_examples=250, eval_every=1000, eval_batches=8, log_every=50,
                    checkpoint_every=2000, accuracy_every=1000),
        # the paper's recipe: 12 layers x 512 x 8 heads, constant lr 1e-4, ~175k training instances
        # (2,734 steps x 64 single questions), loss on the answer token; not run yet (benchmarks/causal_axioms_paper.sh)
        "paper": dict(tokenizer="paper", seq_len=50, max_seq_len=208, questions_per_graph=1, n_layer=12, n_head=8,
                      d_model=512, steps=2734, batch_size=64, warmup_steps=0, learning_rate=1e-4,
                      schedule="constant", weight_decay=0.0, eval_examples=250, eval_every=500, eval_batches=8,
                      log_every=50, checkpoint_every=1000, accuracy_every=500),
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
            small = [n for n in getattr(self, name) if n < 3]
            if small:
                raise ConfigError(f"parameter {name!r}: expected node counts >= 3 (a multi-hop question needs "
                                  f"three nodes), got {getattr(self, name)}")
        bad_factors = [f for f in self.branching_factors if f <= 0]
        if bad_factors:
            raise ConfigError(f"parameter 'branching_factors': expected positive numbers, got {self.branching_factors}")
        tokenizer = task_tokenizer(self.tokenizer, self.bos)
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


@dataclass
class CausalAxiomsStudyConfig(CausalAxiomsConfig):
    """The positional-encoding study: per encoding, a recipe search on dev (seed 0), then `seeds` at the recipe."""

    encodings: list[Literal["none", "learned", "sinusoidal", "rope"]] = knob(list(ENCODINGS),
                                                                           "positional encodings to compare")
    seeds: list[int] = knob([0, 1, 2], "training seeds per encoding at its chosen recipe (the first one is the "
                            "search's seed, whose run is reused)")
    learning_rates: list[float] = knob([1e-3, 3e-3, 1e-2], "peak learning rates searched on dev per encoding")
    warmups: list[int] = knob([30], "warm-up steps searched on dev per encoding (with every learning rate)")

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {**CausalAxiomsConfig.presets["smoke"], "encodings": ["none", "rope"], "seeds": [0, 1],
                  "learning_rates": [1e-3, 3e-3], "warmups": [2]},
        "cpu": {**CausalAxiomsConfig.presets["cpu"]},
        "gpu": {**CausalAxiomsConfig.presets["gpu"], "learning_rates": [1e-4, 3e-4, 1e-3], "warmups": [1000]},
        "paper": {**CausalAxiomsConfig.presets["paper"], "learning_rates": [1e-4], "warmups": [0]},
    }

    def validate(self) -> None:
        super().validate()
        if not self.encodings or not self.seeds or not self.learning_rates or not self.warmups:
            raise ConfigError(f"parameters 'encodings', 'seeds', 'learning_rates', 'warmups': expected non-empty "
                              f"lists, got {self.encodings!r}, {self.seeds!r}, {self.learning_rates!r}, {self.warmups!r}")

    def recipes(self) -> list[dict[str, Any]]:
        return [{"learning_rate": lr, "warmup_steps": w} for lr in self.learning_rates for w in self.warmups]

    def run_config(self, pos: str, seed: int, recipe: dict[str, Any]) -> CausalAxiomsConfig:
        values = {name: getattr(self, name) for name in CausalAxiomsConfig.fields_by_name()}
        return CausalAxiomsConfig(**{**values, "pos": pos, "seed": seed, **recipe})


def evaluation_edge_counts(cfg: CausalAxiomsConfig) -> list[int]:
    chains = [n - 1 for n in (*cfg.eval_chain_lengths, *cfg.reversed_lengths)]
    branches = [min(int(f * n), n * (n - 1) // 2) for f in cfg.branching_factors for n in cfg.branching_nodes]
    return chains + branches


# --- questions --------------------------------------------------------------------------------

def plan_question(rng: np.random.Generator, graph: CausalGraph, label: bool, multi_hop_share: float) -> Example:
    """A training question: a Yes is multi-hop with `multi_hop_share` where the graph has such a pair
    (hop count uniform over the graph's), else a stated edge; a No is reversed or unrelated, half and
    half where the graph has both."""
    if label:
        counts = graph.hop_counts()
        longer = sorted(set(counts[counts >= 2].tolist()))
        hops = int(rng.choice(longer)) if longer and rng.random() < multi_hop_share else 1
        return ask(rng, graph, True, hops=hops)
    kinds = [k for k in NEGATIVE_KINDS if len(candidate_pairs(graph, False, negative=k))]
    return ask(rng, graph, False, negative=str(kinds[rng.integers(len(kinds))]))


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
        while any(not len(candidate_pairs(graph, bool(label))) for label in row):  # a 2-node chain has no No
            row = [True] * len(row) if not len(candidate_pairs(graph, False)) else row
            if all(len(candidate_pairs(graph, bool(label))) for label in row):
                break
            graph = training_chain(rng, cfg, size, evaluation, longest)
        groups.append([plan_question(rng, graph, bool(label), cfg.multi_hop_share) for label in row])
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


# --- evaluation sets ---------------------------------------------------------------------------

def evaluation_makers(cfg: CausalAxiomsConfig) -> dict[str, tuple[list[int], Callable[[np.random.Generator, int], CausalGraph]]]:
    """Set name -> (sizes in nodes, maker(rng, nodes) of unnamed-split graphs: names are drawn later)."""
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


def graph_split(graph: CausalGraph) -> str:
    """'dev' or 'test' for an evaluation graph, by a stable hash of its key (lablib.evidence.split_of)."""
    return split_of(graph.key())


def renamed_into(rng: np.random.Generator, graph: CausalGraph, split: str) -> CausalGraph:
    """The same edges under new names, redrawn until the graph is an evaluation graph of `split`."""
    while True:
        named = CausalGraph(random_names(rng, graph.n_nodes), graph.edges)
        if is_evaluation_graph(named) and graph_split(named) == split:
            return named


def quotas(cfg: CausalAxiomsConfig) -> dict[str, int]:
    """Questions of each category in one evaluation split of one size."""
    yes = cfg.eval_examples // 2
    multi = math.ceil(cfg.multi_hop_share * yes)
    return {"multi_hop": multi, "direct": yes - multi, "reversed": (yes + 1) // 2, "unrelated": yes // 2}


def category_question(rng: np.random.Generator, graph: CausalGraph, category: str) -> Example | None:
    """A question of `category` (multi_hop: hop count uniform over the graph's >= 2, then a pair), or None."""
    if category == "multi_hop":
        counts = graph.hop_counts()
        longer = sorted(set(counts[counts >= 2].tolist()))
        return ask(rng, graph, True, hops=int(rng.choice(longer))) if longer else None
    if category == "direct":
        return ask(rng, graph, True, hops=1) if graph.edges else None
    return ask(rng, graph, False, negative=category) if len(candidate_pairs(graph, False, negative=category)) else None


def split_questions(rng: np.random.Generator, make: Callable[[np.random.Generator, int], CausalGraph], n: int,
                    cfg: CausalAxiomsConfig, split: str, max_tries: int = 300) -> list[Example]:
    """One split's questions about fresh graphs of `n` nodes, with the exact category quotas; a category
    no graph of this kind has (unrelated pairs of an unflipped chain) goes to the other negative."""
    wanted = quotas(cfg)
    out: list[Example] = []
    impossible: set[str] = set()
    for category in ("multi_hop", "direct", "reversed", "unrelated"):
        for _ in range(wanted[category]):
            question = None
            for kind in (category, {"unrelated": "reversed", "reversed": "unrelated"}.get(category)):
                if kind is None or kind in impossible:
                    continue
                for _ in range(max_tries):
                    question = category_question(rng, make(rng, n), kind)
                    if question is not None:
                        break
                if question is not None:
                    break
                impossible.add(kind)
            if question is None:
                raise ValueError(f"no {n}-node graph of this kind has a {category} question in {max_tries} draws")
            graph = renamed_into(rng, question.graph, split)
            out.append(Example(graph, question.a, question.b, question.label))
    return [out[i] for i in rng.permutation(len(out))]


def evaluation_sets(cfg: CausalAxiomsConfig) -> dict[str, dict[int, dict[str, list[Example]]]]:
    """Set name -> nodes -> split ('dev', 'test') -> eval_examples questions, on evaluation-share graphs
    whose split is a hash of their key (so no graph is in both). Seeded by (eval_seed, set, size) only."""
    sets: dict[str, dict[int, dict[str, list[Example]]]] = {}
    for set_index, (name, (sizes, make)) in enumerate(evaluation_makers(cfg).items()):
        sets[name] = {}
        for n in sizes:
            sets[name][n] = {split: split_questions(np.random.default_rng([cfg.eval_seed, set_index, n, k]), make, n,
                                                    cfg, split) for k, split in enumerate(SPLITS)}
    return sets


def items(sets, split: str, set_name: str | None = None) -> list[Example]:
    return [e for name, by_size in sets.items() if set_name in (None, name)
            for n in by_size for e in by_size[n][split]]


# --- scoring ---------------------------------------------------------------------------------

def breakdown(examples: list[Example], correct: np.ndarray) -> dict[str, Any]:
    """Accuracy overall, by hop count of the Yes questions, multi-hop Yes, and by negative kind."""
    hops = np.array([e.hops for e in examples])
    kinds = np.array([e.kind for e in examples])
    mean = lambda m: float(correct[m].mean()) if m.any() else None  # noqa: E731
    return {"accuracy": float(correct.mean()), "n": len(examples),
            "yes_direct": mean(hops == 1), "yes_multi_hop": mean(hops >= 2),
            "reversed": mean(kinds == "reversed"), "unrelated": mean(kinds == "unrelated"),
            "by_hops": {int(h): mean(hops == h) for h in sorted(set(hops[hops > 0].tolist()))}}


def score_answers(sets, split: str, says_yes: Callable[[list[Example]], np.ndarray]) -> dict[str, Any]:
    """Per set: pooled breakdown and per-size accuracy for answers `says_yes(examples)` (bool array)."""
    out = {}
    for name, by_size in sets.items():
        pooled, right = [], []
        per_size = {}
        for n, splits in by_size.items():
            examples = splits[split]
            correct = says_yes(examples) == np.array([e.label for e in examples])
            per_size[int(n)] = float(correct.mean())
            pooled += examples
            right.append(correct)
        out[name] = {**breakdown(pooled, np.concatenate(right)), "by_size": per_size}
    return out


def score(model: Transformer, tokenizer: Tokenizer, sets, split: str, batch_size: int = 128) -> dict[str, Any]:
    """The model's answers (P(Yes) > 0.5) on one split of every set: `score_answers` breakdowns."""
    def says_yes(examples):
        return yes_probabilities(model, tokenizer, [e.prompt for e in examples], batch_size) > 0.5
    return score_answers(sets, split, says_yes)


def reference_scores(sets, split: str) -> dict[str, dict[str, Any]]:
    """Baselines on the same items: chance (a fair coin, its expected accuracy), majority (the dev
    split's majority label of each set; the sets are balanced, so Yes on a tie), and the task's rules."""
    refs = {"chance": {name: {"accuracy": 0.5} for name in sets}}
    majority = {name: np.mean([e.label for e in items(sets, "dev", name)]) >= 0.5 for name in sets}
    refs["majority"] = {name: v for name, v in score_answers(
        sets, split, lambda ex: np.full(len(ex), majority[_set_of(sets, ex[0])])).items()}
    for rule in RULES:
        refs[rule] = score_answers(sets, split, lambda ex, r=rule: rule_answers(r, ex))
    return refs


def _set_of(sets, example: Example) -> str:
    return next(name for name, by_size in sets.items() for splits in by_size.values()
                for examples in splits.values() if any(e is example for e in examples))


# --- runs -------------------------------------------------------------------------------------

def build_model(cfg: CausalAxiomsConfig, tokenizer: Tokenizer) -> Transformer:
    return seeded_transformer(cfg, tokenizer.vocab_size, mask="causal")


def dev_probe(cfg: CausalAxiomsConfig, sets) -> list[Example]:
    """The dev in-distribution questions read while training (choosing a recipe reads them too)."""
    return items({"in_distribution": sets["in_distribution"]}, "dev")


def train_model(cfg: CausalAxiomsConfig, run=None, *, sets=None, progress: bool = True):
    """Tokenizer (saved to the run), model and training on fresh chains; returns (model, tokenizer, TrainResult).

    While training, metrics.jsonl gets val_loss on fixed held-out batches (evaluation-share
    graphs of the training distribution) and `val_accuracy` on the dev in-distribution set.
    """
    tokenizer = task_tokenizer(cfg.tokenizer, cfg.bos)
    if run is not None:
        tokenizer.save(run.path / "tokenizer.json")
    model = build_model(cfg, tokenizer)
    rng = np.random.default_rng([cfg.eval_seed, 999])
    held_out = training_examples(rng, cfg, cfg.eval_batches * cfg.batch_size, evaluation=True)
    val = [encode_answered(tokenizer, held_out[i * cfg.batch_size:(i + 1) * cfg.batch_size], cfg.seq_len + 1)
           for i in range(cfg.eval_batches)]
    probe = dev_probe(cfg, sets if sets is not None else evaluation_sets(cfg))
    labels = np.array([e.label for e in probe])

    def val_accuracy(step: int, m: Transformer) -> dict[str, float]:
        p = yes_probabilities(m, tokenizer, [e.prompt for e in probe], cfg.eval_batch_size)
        return {"val_accuracy": float(np.mean((p > 0.5) == labels))}

    result = train(model, AnswerLoss(), TransitivityBatches(cfg, tokenizer), cfg.project(TrainConfig), run,
                   val=val, callbacks=[(cfg.accuracy_every, val_accuracy)], progress=progress)
    return model, tokenizer, result


def model_run(run, name: str, cfg: CausalAxiomsConfig):
    """A sub-run folder models/<name>/ of the study's run (its own metrics and checkpoints), or None."""
    if run is None:
        return None
    from lablib.runs import start_run

    return start_run(EXPERIMENT, cfg, run.path / "models" / name, model=name)


def run_study(cfg: CausalAxiomsStudyConfig, run=None, *, sets=None, progress: bool = False, log=print) -> dict[str, Any]:
    """The encoding study in one process. Per encoding: every recipe at seed `seeds[0]`, scored on dev;
    the recipe with the best dev in-distribution accuracy is kept; the remaining seeds train at it;
    only then are the kept runs (and their untrained step-0 models) scored on test."""
    sets = sets if sets is not None else evaluation_sets(cfg)
    tokenizer = task_tokenizer(cfg.tokenizer, cfg.bos)
    search, chosen, test, untrained, seconds = [], {}, {}, {}, {}
    first = cfg.seeds[0]
    for pos in cfg.encodings:
        kept = {}
        for recipe in cfg.recipes():
            run_cfg = cfg.run_config(pos, first, recipe)
            name = f"{pos}-lr{recipe['learning_rate']:g}-w{recipe['warmup_steps']}-seed{first}"
            model, _, result = train_model(run_cfg, model_run(run, name, run_cfg), sets=sets, progress=progress)
            dev = score(model, tokenizer, sets, "dev", cfg.eval_batch_size)
            search.append({"pos": pos, **recipe, "seed": first, "seconds": result.seconds,
                           "dev_in_distribution": dev["in_distribution"]["accuracy"],
                           "dev_multi_hop": dev["in_distribution"]["yes_multi_hop"],
                           "dev_reversed": dev["in_distribution"]["reversed"],
                           "dev_chain": dev["chain"]["accuracy"]})
            kept[name] = (search[-1]["dev_in_distribution"], recipe, model, result.seconds)
            log(f"{name}: dev in-distribution {search[-1]['dev_in_distribution']:.3f} ({result.seconds:.0f} s)")
        best = max(kept.values(), key=lambda v: v[0])
        chosen[pos] = best[1]
        models = {first: best[2]}
        seconds[pos] = {first: best[3]}
        for seed in cfg.seeds[1:]:
            run_cfg = cfg.run_config(pos, seed, chosen[pos])
            name = f"{pos}-lr{chosen[pos]['learning_rate']:g}-w{chosen[pos]['warmup_steps']}-seed{seed}"
            models[seed], _, result = train_model(run_cfg, model_run(run, name, run_cfg), sets=sets, progress=progress)
            seconds[pos][seed] = result.seconds
            log(f"{name}: trained ({result.seconds:.0f} s)")
        test[pos] = {seed: score(m, tokenizer, sets, "test", cfg.eval_batch_size) for seed, m in models.items()}
        untrained[pos] = {seed: score(build_model(cfg.run_config(pos, seed, chosen[pos]), tokenizer), tokenizer, sets,
                                      "test", cfg.eval_batch_size) for seed in cfg.seeds}
        log(f"{pos}: chose {chosen[pos]}; test in-distribution "
            f"{[round(test[pos][s]['in_distribution']['accuracy'], 3) for s in cfg.seeds]}")
    return {"sets": sets, "search": search, "chosen": chosen, "test": test, "untrained": untrained,
            "references": reference_scores(sets, "test"), "seconds": seconds}


# --- tables -------------------------------------------------------------------------------------

MEASURES = ("accuracy", "yes_direct", "yes_multi_hop", "reversed", "unrelated")


def interval(values) -> dict[str, Any] | None:
    values = [v for v in values if v is not None]
    return mean_interval(values).to_dict() if values else None


def encoding_table(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (encoding, set, measure): mean and 95% t interval over seeds, the untrained model's."""
    rows = []
    for pos, per_seed in study["test"].items():
        for set_name in next(iter(per_seed.values())):
            for measure in MEASURES:
                rows.append({"pos": pos, "set": set_name, "measure": measure,
                             "model": interval(per_seed[s][set_name][measure] for s in per_seed),
                             "untrained": interval(study["untrained"][pos][s][set_name][measure] for s in per_seed)})
    return rows


def size_table(study: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (encoding, set, nodes): accuracy over seeds with its interval."""
    rows = []
    for pos, per_seed in study["test"].items():
        for set_name, scores in next(iter(per_seed.values())).items():
            for n in scores["by_size"]:
                rows.append({"pos": pos, "set": set_name, "nodes": n,
                             **interval(per_seed[s][set_name]["by_size"][n] for s in per_seed)})
    return rows


def hop_table(study: dict[str, Any], set_name: str) -> list[dict[str, Any]]:
    rows = []
    for pos, per_seed in study["test"].items():
        hops = sorted({h for s in per_seed for h in per_seed[s][set_name]["by_hops"]})
        for h in hops:
            rows.append({"pos": pos, "set": set_name, "hops": h,
                         **interval(per_seed[s][set_name]["by_hops"].get(h) for s in per_seed)})
    return rows


def reference_rows(study: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for ref, by_set in study["references"].items():
        for set_name, scores in by_set.items():
            rows.append({"reference": ref, "set": set_name, **{m: scores.get(m) for m in MEASURES}})
    return rows


def headlines(study: dict[str, Any], set_name: str = "in_distribution", measure: str = "accuracy",
              per_seed_too: bool = False) -> dict[str, Any]:
    """Per encoding: test `measure` on `set_name` over seeds beside chance, the untrained model and
    edge lookup (trivial), with majority and mention order as further points; paired over seeds."""
    refs = study["references"]
    out = {}
    for pos, per_seed in study["test"].items():
        per = {}
        for seed, scores in per_seed.items():
            value = lambda d: d[set_name].get(measure, d[set_name]["accuracy"])  # noqa: E731
            baselines = Baselines.of(refs["chance"][set_name]["accuracy"], value(study["untrained"][pos][seed]),
                                     value(refs["edge lookup"]), "edge lookup (Yes iff 'A causes B.' is a premise)",
                                     majority=value(refs["majority"]), **{"mention order": value(refs["mention order"])})
            per[seed] = Headline.of(f"test {measure} ({set_name})", value(scores), baselines, "test")
        out[pos] = (aggregate_seeds(per), per) if per_seed_too else aggregate_seeds(per)
    return out


def bar_reached(study: dict[str, Any], pos: str) -> dict[str, Any]:
    """The target per encoding: in distribution >= 0.95, multi-hop Yes >= 0.90 and reversed (hard)
    negatives >= 0.90 (means over seeds, test), and above edge lookup with an interval over zero."""
    per_seed = study["test"][pos]
    ind = lambda m: float(np.mean([per_seed[s]["in_distribution"][m] for s in per_seed]))  # noqa: E731
    edge = study["references"]["edge lookup"]["in_distribution"]["accuracy"]
    above = paired_difference({s: per_seed[s]["in_distribution"]["accuracy"] for s in per_seed},
                              {s: edge for s in per_seed})
    checks = {"in_distribution>=0.95": ind("accuracy") >= 0.95, "multi_hop_yes>=0.90": ind("yes_multi_hop") >= 0.90,
              "hard_negatives>=0.90": ind("reversed") >= 0.90,
              "above_edge_lookup": bool(not math.isnan(above.low) and above.low > 0)}
    return {**checks, "all": all(checks.values()), "minus_edge_lookup": above.to_dict()}


def results_dict(cfg: CausalAxiomsStudyConfig, study: dict[str, Any], wall_seconds: float,
                 command: str) -> dict[str, Any]:
    """The study's results.json: the headline (the dev-chosen encoding's in-distribution test accuracy),
    per-encoding headlines for every set and measure, the tables and the recipe search."""
    dev_best = max(study["chosen"], key=lambda pos: max(r["dev_in_distribution"] for r in study["search"]
                                                          if r["pos"] == pos))
    measured = [(s, m) for s in study["references"]["chance"] for m in MEASURES
                if all(scores[s][m] is not None for per in study["test"].values() for scores in per.values())]
    per_encoding = {pos: {f"{s}/{m}": headlines(study, s, m)[pos].to_dict() for s, m in measured}
                    for pos in study["test"]}
    over, per_seed = headlines(study, per_seed_too=True)[dev_best]
    return {"experiment": EXPERIMENT, "preset": cfg.preset, "seeds": list(cfg.seeds), "split": "test",
            "headline": over.to_dict(), "headline_encoding": dev_best,
            "per_seed": {str(seed): {"headline": h.to_dict(), "encoding": dev_best} for seed, h in per_seed.items()},
            "encoding_chosen_on": "dev", "recipes_chosen_on": "dev", "commands": [command],
            "chosen_recipes": study["chosen"], "recipe_search": study["search"],
            "per_encoding": per_encoding, "by_size": size_table(study),
            "by_hops": {s: hop_table(study, s) for s in study["references"]["chance"]},
            "references": reference_rows(study), "bar": {pos: bar_reached(study, pos) for pos in study["test"]},
            "train_seconds": study["seconds"], "wall_seconds": wall_seconds,
            "questions_per_split_and_size": cfg.eval_examples, "multi_hop_share": cfg.multi_hop_share}


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    import json

    extra = "".join(f" -p {k} '{json.dumps(v)}'" for k, v in parameters.items())
    return f"lablib run notebooks/03_causal_axioms.ipynb --preset {preset}{extra}"
