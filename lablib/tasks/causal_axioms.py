"""Causal transitivity learnt from axiom demonstrations (Vashishtha et al., 2024, arXiv:2407.07612).

Notable here:
- The text interface is fixed. A causal graph is written as premises, one statement per
  edge, `"X causes Y."`, joined by single spaces; the model reads
  `"<premises> Does <A> cause <B>? "` and the answer is the continuation `Yes` or `No`.
  `answer(model, tokenizer, premises, a, b)` returns P(Yes) =
  exp(log p(Yes)) / (exp(log p(Yes)) + exp(log p(No))), where each log p sums the
  continuation's token log-probabilities. Training puts the loss on the answer tokens
  only (`AnswerLoss`). Tokenization is character-level over `ALPHABET` by default;
  `tokenizer="paper"` is the paper's scheme (keywords whole, names by character, no
  spaces), which makes every sequence ~2.5x shorter.
- Format as in the paper's repository (github.com/AniketVashishtha/Causal_Axioms): node
  names are random 1-3 character alphanumeric strings (never `Yes` / `No`); the label is `Yes` exactly when a
  directed path leads from A to B (transitive closure, checked against networkx in tests).
- Training data (the paper's "linear chains with noisy variations"): chains of 3-6 nodes
  whose edges each point backwards with probability `flip_prob` and whose statements are
  shuffled with probability `shuffle_prob`; per batch exactly half the questions are `Yes`,
  and questions are drawn uniformly over all ordered pairs with the wanted label (direct
  edges, multi-hop paths, reversed pairs, unconnected pairs).
- Two training-side departures from the paper, both knobs that never touch evaluation, and
  both on in the `cpu` preset because without them the `cpu`-size model sits at chance:
  `questions_per_graph` packs several questions about one graph into one sequence (the
  premises once, then each question and its answer; `encode_packed` gives each question a
  block attention mask and the positions it would have alone, so its answer is computed
  exactly as in a one-question example, at a fraction of the tokens), and
  `curriculum_fraction` grows the largest training chain from 2 nodes (the axiom's base case
  "A causes B. Does A cause B?") to `train_max_nodes` over that share of training, with
  `curriculum_names` growing names from 1 character to 3 along with it. With
  `curriculum_mastery` the curriculum is paced by the model instead of the step count
  (`MasteryPacing`: a stage moves on once training accuracy reaches the threshold, with
  `curriculum_fraction` as the deadline). `short_chain_fraction`
  instead mixes a fixed share of 2-node chains in throughout (measured: slower than the
  curriculum; off in every preset).
- Evaluation sets, each with exactly `eval_examples` questions per size, half `Yes`:
  `in_distribution` (training's distribution, 3-6 nodes), `chain` (7-15 and 20 nodes, edges
  flipped as in training, statements in chain order: the paper's longer chains),
  `reversed` (sequential chains with the statements in reverse order), and `branch_1.4` /
  `branch_2` (Erdos-Renyi DAGs with int(factor * nodes) edges on 5-12 nodes, statements in
  random order, as in the paper's graph generator).
- Training and evaluation graphs are disjoint by construction: a graph (its named edge set,
  whatever the statement order) belongs to evaluation when the CRC32 of its key is
  divisible by `EVAL_SHARE`; the training stream rejects those graphs and the evaluation
  sets draw only them.
- `TransitivityBatches.batch(index, batch_size, seed)` is a pure function of its arguments
  (fresh examples, never a fixed dataset): single questions are padded with the pad id to
  `seq_len + 1` tokens, packed rows (at most `seq_len + 1` tokens) to the batch's longest row.
"""

from __future__ import annotations

import dataclasses
import math
import string
import zlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Literal

import networkx as nx
import numpy as np
import torch

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.data import SPECIAL_TOKENS, Tokenizer, char_tokenizer
from lablib.models import Transformer
from lablib.objectives import IGNORE, token_cross_entropy

NAME_CHARS = string.ascii_letters + string.digits
ALPHABET = NAME_CHARS + " .?"  # every character the task's text can hold
ANSWERS = {True: "Yes", False: "No"}
KEYWORDS = ("causes", "cause", "Does", "Yes", "No")  # single tokens under the paper's tokenizer
EVAL_SHARE = 8  # one graph in 8 (by key hash) is reserved for evaluation
LONGEST_NAME = 3


# --- graphs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CausalGraph:
    """Named nodes and directed edges (cause, effect), in the order the premises state them."""

    names: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    @property
    def n_nodes(self) -> int:
        return len(self.names)

    def premises(self) -> str:
        return " ".join(f"{self.names[c]} causes {self.names[e]}." for c, e in self.edges)

    def key(self) -> str:
        """The graph's identity: its named edges, sorted, so statement order does not matter."""
        return "|".join(sorted(f"{self.names[c]}>{self.names[e]}" for c, e in self.edges))

    def reachability(self) -> np.ndarray:
        """(n, n) bool: [a, b] is True when a directed path of one or more edges leads from a to b."""
        n = self.n_nodes
        reach = np.zeros((n, n), dtype=bool)
        for c, e in self.edges:
            reach[c, e] = True
        for k in range(n):  # Warshall's transitive closure, one row-broadcast per pivot
            reach |= reach[:, k:k + 1] & reach[k:k + 1, :]
        return reach

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.names)
        g.add_edges_from((self.names[c], self.names[e]) for c, e in self.edges)
        return g


def is_evaluation_graph(graph: CausalGraph) -> bool:
    return zlib.crc32(graph.key().encode()) % EVAL_SHARE == 0


def random_names(rng: np.random.Generator, n: int, longest: int = LONGEST_NAME) -> tuple[str, ...]:
    """n distinct names of 1-`longest` (default 3) alphanumeric characters, none of them Yes / No
    (redrawn on a clash)."""
    while True:
        lengths = rng.integers(1, longest + 1, n)
        chars = rng.integers(0, len(NAME_CHARS), (n, LONGEST_NAME))
        names = tuple("".join(NAME_CHARS[c] for c in row[:k]) for row, k in zip(chars.tolist(), lengths.tolist()))
        if len(set(names)) == n and not set(names) & set(ANSWERS.values()):
            return names


def named_graph(rng: np.random.Generator, n_nodes: int, edges: list[tuple[int, int]], evaluation: bool,
                longest_name: int = LONGEST_NAME) -> CausalGraph:
    """Name the nodes of `edges`, redrawing names until the graph falls on the wanted side of the split."""
    while True:
        graph = CausalGraph(random_names(rng, n_nodes, longest_name), tuple(edges))
        if is_evaluation_graph(graph) == evaluation:
            return graph


STATEMENT_ORDERS: dict[str, Callable[[np.random.Generator, list], list]] = {
    "chain": lambda rng, edges: edges,
    "reversed": lambda rng, edges: edges[::-1],
    "shuffled": lambda rng, edges: [edges[i] for i in rng.permutation(len(edges))],
}


def linear_chain(rng: np.random.Generator, n_nodes: int, flip_prob: float = 0.0, order: str = "chain",
                 evaluation: bool = False, longest_name: int = LONGEST_NAME) -> CausalGraph:
    """Nodes 0 - 1 - ... - n-1 in a line; each edge points forwards, or backwards with flip_prob."""
    flips = rng.random(n_nodes - 1) < flip_prob
    edges = [(i + 1, i) if flip else (i, i + 1) for i, flip in enumerate(flips.tolist())]
    return named_graph(rng, n_nodes, STATEMENT_ORDERS[order](rng, edges), evaluation, longest_name)


def branching_dag(rng: np.random.Generator, n_nodes: int, factor: float, evaluation: bool = False) -> CausalGraph:
    """The paper's branching graphs: an Erdos-Renyi graph with int(factor * n) edges, each edge
    oriented along a random node order (so the graph is a DAG), statements in random order."""
    n_edges = min(int(factor * n_nodes), n_nodes * (n_nodes - 1) // 2)
    undirected = nx.gnm_random_graph(n_nodes, n_edges, seed=int(rng.integers(2**31)))
    rank = rng.permutation(n_nodes)
    edges = [(u, v) if rank[u] < rank[v] else (v, u) for u, v in undirected.edges()]
    return named_graph(rng, n_nodes, STATEMENT_ORDERS["shuffled"](rng, edges), evaluation)


# --- questions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    graph: CausalGraph
    a: int
    b: int
    label: bool  # True: a directed path leads from a to b

    @property
    def prompt(self) -> str:
        return question_prompt(self.graph.premises(), self.graph.names[self.a], self.graph.names[self.b])

    @property
    def answer(self) -> str:
        return ANSWERS[self.label]


def question_prompt(premises: str, a: str, b: str) -> str:
    """The fixed text interface: what the model reads before it answers."""
    return f"{premises} Does {a} cause {b}? "


def ask(rng: np.random.Generator, graph: CausalGraph, label: bool) -> Example:
    """A question about `graph` whose answer is `label`, uniform over the ordered pairs that have it."""
    reach = graph.reachability()
    candidates = np.argwhere((reach == label) & ~np.eye(graph.n_nodes, dtype=bool))
    if len(candidates) == 0:
        raise ValueError(f"graph {graph.key()!r} has no pair with answer {ANSWERS[label]}")
    a, b = candidates[rng.integers(len(candidates))]
    return Example(graph, int(a), int(b), label)


def balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """n labels, exactly half True (one more False when n is odd), in random order."""
    return rng.permutation(np.arange(n) < n // 2)


# --- config --------------------------------------------------------------------------------

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
    curriculum_mastery: float = knob(0.0, "0: the curriculum follows the step count; above 0 it is mastery-paced: it "
                                     "moves one of curriculum_stages on only once the training answers' accuracy over "
                                     "the last mastery_window steps reaches this, and curriculum_fraction becomes the "
                                     "deadline by which it is complete whatever the accuracy", min=0.0, max=1.0)
    curriculum_stages: int = knob(20, "mastery-paced curriculum: stages from its start to the paper's sizes", min=1)
    mastery_window: int = knob(50, "mastery-paced curriculum: training micro-batches (steps, without gradient "
                               "accumulation) whose answer accuracy is averaged", min=1)
    curriculum_names: bool = knob(False, "names grow with the curriculum too: 1 character in its first third, "
                                  "up to 2 in the second, up to 3 (the paper's) afterwards")
    short_chain_fraction: float = knob(0.0, "share of training questions asked about 2-node chains (the axiom's base "
                                       "case 'A causes B. Does A cause B?'); evaluation never uses them", min=0.0, max=1.0)
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
        # up to 3. Measured with RoPE, seeds 0-2: 0.58 / 0.81 / 0.91 in distribution; without
        # packing and curriculum the model stays at chance for 3000 steps; the other encodings
        # stay at chance (see notebooks/03_causal_axioms.ipynb).
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
        if self.curriculum_mastery and not self.curriculum_fraction:
            raise ConfigError("parameter 'curriculum_mastery': a mastery-paced curriculum needs curriculum_fraction > 0 "
                              f"(its deadline), got curriculum_fraction={self.curriculum_fraction}")
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


# --- data ------------------------------------------------------------------------------------

def paper_tokenizer() -> Tokenizer:
    """The paper's scheme: the keywords are single tokens, names go character by character, '.' and
    '?' are tokens of their own and spaces are dropped (so the text is ~2.5x shorter than with chars)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in (*KEYWORDS, *NAME_CHARS, ".", "?"):
        vocab.setdefault(tok, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    whole_keyword = "^(?:" + "|".join(KEYWORDS) + ")$"  # a word that is exactly a keyword; else one token per char
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(
        Regex(whole_keyword + r"|[\s\S]"), behavior="isolated")])
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


TOKENIZERS: dict[str, Callable[[], Tokenizer]] = {
    "char": lambda: char_tokenizer([ALPHABET]),  # one token per character of ALPHABET
    "paper": paper_tokenizer,
}


def task_tokenizer(kind: str = "char") -> Tokenizer:
    return TOKENIZERS[kind]()


def longest_tokens(tokenizer: Tokenizer, n_edges: int, questions: int = 1) -> int:
    """Tokens of the longest prompt + answer with n_edges statements (all names 3 characters long),
    or of the longest packed sequence of `questions` questions with their answers."""
    name = "x" * LONGEST_NAME
    premises = " ".join([f"{name} causes {name}."] * n_edges)
    one = max(len(tokenizer.encode(question_prompt(premises, name, name) + word)) for word in ANSWERS.values())
    return one + (questions - 1) * (one - len(tokenizer.encode(premises)))


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
    lowered with it, by the curriculum at `progress`), some swapped for 2-node base cases."""
    if evaluation:
        return rng.integers(cfg.train_min_nodes, cfg.train_max_nodes + 1, n)
    top = largest_chain(cfg, progress)
    sizes = rng.integers(min(cfg.train_min_nodes, top), top + 1, n)
    if cfg.short_chain_fraction:  # base-case demonstrations in the training stream only
        sizes = np.where(rng.random(n) < cfg.short_chain_fraction, 2, sizes)
    return sizes


def training_examples(rng: np.random.Generator, cfg: CausalAxiomsConfig, n: int, evaluation: bool = False,
                      progress: float | None = None) -> list[Example]:
    """n questions from the training distribution (from the evaluation share when evaluation=True)."""
    return [group[0] for group in training_groups(rng, cfg, n, 1, progress, evaluation)]


def encode_examples(tokenizer: Tokenizer, texts: list[str], answer_lengths: list[int],
                    length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded token ids (B, length) and a mask of each text's last answer_length tokens (its answer)."""
    ids = tokenizer.encode_batch(texts)
    longest = max(len(x) for x in ids)
    length = length or longest
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than the padded length {length}")
    tokens = torch.full((len(ids), length), tokenizer.pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(ids), length), dtype=torch.bool)
    for row, (x, n_answer) in enumerate(zip(ids, answer_lengths)):
        tokens[row, :len(x)] = torch.tensor(x)
        answer_mask[row, len(x) - n_answer:len(x)] = True
    return {"tokens": tokens, "answer_mask": answer_mask}


def encode_answered(tokenizer: Tokenizer, examples: list[Example], length: int | None = None) -> dict[str, torch.Tensor]:
    return encode_examples(tokenizer, [e.prompt + e.answer for e in examples],
                           [len(tokenizer.encode(e.answer)) for e in examples], length)


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


def encode_packed(tokenizer: Tokenizer, groups: list[list[Example]], length: int | None = None) -> dict[str, torch.Tensor]:
    """One row per group of questions about one graph: its premises once, then each question and answer.

    Beside `tokens` and `answer_mask` (as in `encode_examples`) the batch holds `attn_mask`
    (B, T, T), where a question's tokens see the premises and the earlier tokens of their own
    question only, and `positions` (B, T), where every question starts right after the
    premises: each question is computed exactly as if it were the only one.
    """
    rows = []  # per row: token ids, segment ids (0: premises, j: question j), position ids, answer flags
    for group in groups:
        if any(e.graph is not group[0].graph for e in group):
            raise ValueError("encode_packed: every question of a group must be about the same graph")
        premises = tokenizer.encode(group[0].graph.premises())
        ids, segment, positions, answer = list(premises), [0] * len(premises), list(range(len(premises))), \
            [False] * len(premises)
        for j, (e, whole) in enumerate(zip(group, tokenizer.encode_batch([e.prompt + e.answer for e in group])), 1):
            if whole[:len(premises)] != premises:
                raise ValueError("encode_packed: the tokenizer does not split the premises from the question")
            question = whole[len(premises):]
            n_answer = len(tokenizer.encode(e.answer))
            ids += question
            segment += [j] * len(question)
            positions += range(len(premises), len(whole))  # as if the question followed the premises alone
            answer += [False] * (len(question) - n_answer) + [True] * n_answer
        rows.append((ids, segment, positions, answer))
    longest = max(len(ids) for ids, *_ in rows)
    length = length or longest
    if longest > length:
        raise ValueError(f"a packed example has {longest} tokens, more than the padded length {length}")
    pad = [length - len(ids) for ids, *_ in rows]  # padding: segment -1, never scored
    tokens = torch.tensor([r[0] + [tokenizer.pad_id] * k for r, k in zip(rows, pad)])
    segment = torch.tensor([r[1] + [-1] * k for r, k in zip(rows, pad)])
    positions = torch.tensor([r[2] + list(range(k)) for r, k in zip(rows, pad)])
    answer_mask = torch.tensor([r[3] + [False] * k for r, k in zip(rows, pad)])
    idx = torch.arange(length)
    causal = idx[None, :] <= idx[:, None]
    key, query = segment[:, None, :], segment[:, :, None]
    attn_mask = causal[None] & ((key == 0) | (key == query))
    attn_mask |= torch.eye(length, dtype=torch.bool)[None]  # every row attends somewhere (padding included)
    return {"tokens": tokens, "answer_mask": answer_mask, "attn_mask": attn_mask, "positions": positions}


@dataclass
class MasteryPacing:
    """A curriculum that waits for the model (curriculum_mastery > 0).

    The curriculum is cut into `curriculum_stages` stages. After each training micro-batch the
    loss reports its answers' accuracy (`record`); once the mean over the last `mastery_window`
    of them reaches `curriculum_mastery`, the next stage starts (and the window starts afresh,
    so each stage is judged on its own data). `curriculum_fraction` is a deadline: at training
    progress p the curriculum is at least p / curriculum_fraction of the way, so a stalled run
    still ends on the paper's sizes. The stage is logged (`curriculum_stage`) and read back
    from the log when a run resumes; the accuracy window restarts empty there.
    """

    cfg: CausalAxiomsConfig
    stage: int = 0
    recent: list[float] = dataclasses.field(default_factory=list)
    progress: float = 0.0  # training progress of the newest batch

    def floor(self, progress: float) -> int:
        """The stage the deadline demands at training progress `progress`."""
        return min(self.cfg.curriculum_stages, int(self.cfg.curriculum_stages * progress / self.cfg.curriculum_fraction))

    def effective_progress(self, progress: float) -> float:
        """The training progress whose step-paced curriculum equals this one's state (called per batch)."""
        self.progress = progress
        if self.floor(progress) > self.stage:  # the deadline moved it on: judge the new stage afresh
            self.stage, self.recent = self.floor(progress), []
        return max(progress, self.stage / self.cfg.curriculum_stages * self.cfg.curriculum_fraction)

    def record(self, accuracy: float) -> None:
        self.recent = (self.recent + [accuracy])[-self.cfg.mastery_window:]
        if (self.stage < self.cfg.curriculum_stages and len(self.recent) == self.cfg.mastery_window
                and sum(self.recent) / len(self.recent) >= self.cfg.curriculum_mastery):
            self.stage, self.recent = self.stage + 1, []

    def metrics(self) -> dict[str, float]:
        return {"curriculum_stage": self.stage,
                "curriculum_nodes": largest_chain(self.cfg, self.effective_progress(self.progress))}


def resumed_stage(run, cfg: CausalAxiomsConfig) -> int:
    """The mastery curriculum's stage at the checkpoint training resumes from, from its metrics log (0 if none)."""
    from lablib.checkpoints import newest_loadable

    step = None if run is None else newest_loadable(run.path, need_optimizer=True, notice=False)
    if step is None:
        return 0
    logged = [r for r in run.log.rows() if "curriculum_stage" in r and r.get("step", 0) <= step]
    return int(logged[-1]["curriculum_stage"]) if logged else 0


@dataclass
class TransitivityBatches:
    """Fresh training questions: micro-batch `index` is a pure function of (seed, index) and, with a
    mastery-paced curriculum, of its stage (`pacing`, logged as `curriculum_stage`).

    With questions_per_graph > 1 a row packs that many questions about one graph (`encode_packed`).
    The curriculum reads training progress as index / (steps x micro-batches per step) of one process.
    """

    cfg: CausalAxiomsConfig
    tokenizer: Tokenizer
    pacing: MasteryPacing | None = None

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        from lablib.train import grad_accum_steps

        rng = np.random.default_rng([seed, index])
        progress = index / (self.cfg.steps * grad_accum_steps(self.cfg))
        if self.pacing is not None:
            progress = self.pacing.effective_progress(progress)
        if self.cfg.questions_per_graph == 1:
            return encode_answered(self.tokenizer, training_examples(rng, self.cfg, batch_size, progress=progress),
                                   self.cfg.seq_len + 1)
        groups = training_groups(rng, self.cfg, batch_size, self.cfg.questions_per_graph, progress)
        return trim_padding(encode_packed(self.tokenizer, groups, self.cfg.seq_len + 1), self.tokenizer.pad_id)


def trim_padding(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch cut after its longest row: padding is never attended to nor scored, so the loss is
    unchanged, and short rows (the curriculum's early chains) stop paying for seq_len + 1 tokens."""
    length = int((batch["tokens"] != pad_id).sum(1).max())
    return {k: v[:, :length, :length] if k == "attn_mask" else v[:, :length] for k, v in batch.items()}


@dataclass
class AnswerLoss:
    """Cross-entropy on the answer tokens only; reports how often the first one (Y or N, or the whole word) is right."""

    name: str = "answer"
    pacing: MasteryPacing | None = None  # told each training batch's accuracy

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
        metrics = {"tokens_scored": n, "answer_accuracy": first_right}
        if self.pacing is not None and model.training:  # training batches only, not val_loss batches
            self.pacing.record(first_right)
            metrics.update(self.pacing.metrics())
        return loss, metrics


# --- evaluation sets -----------------------------------------------------------------------------

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


# --- answering ---------------------------------------------------------------------------------------

@torch.no_grad()
def answer_log_probs(model: Transformer, tokenizer: Tokenizer, prompts: list[str],
                     batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(log p(Yes | prompt), log p(No | prompt)) for each prompt: sums over the answer's characters."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {label: np.zeros(len(prompts)) for label in ANSWERS}
    order = np.argsort([len(p) for p in prompts])  # similar lengths share a batch: less padding
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        for label, word in ANSWERS.items():
            batch = encode_examples(tokenizer, [prompts[i] + word for i in rows],
                                    [len(tokenizer.encode(word))] * len(rows))
            tokens, answer = batch["tokens"].to(device), batch["answer_mask"].to(device)
            logp = torch.log_softmax(model(tokens[:, :-1], mask="causal").float(), dim=-1)
            picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]
            out[label][rows] = (picked * answer[:, 1:]).sum(-1).cpu().numpy()
    model.train(was_training)
    return out[True], out[False]


def yes_probabilities(model: Transformer, tokenizer: Tokenizer, prompts: list[str], batch_size: int = 128) -> np.ndarray:
    lp_yes, lp_no = answer_log_probs(model, tokenizer, prompts, batch_size)
    return 1.0 / (1.0 + np.exp(lp_no - lp_yes))


def answer(model: Transformer, tokenizer: Tokenizer, premises: str, a: str, b: str) -> float:
    """P(Yes) for "Does a cause b?" given the premises, from the Yes / No continuation log-probabilities."""
    return float(yes_probabilities(model, tokenizer, [question_prompt(premises, a, b)])[0])


def accuracy(model: Transformer, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 128) -> float:
    p_yes = yes_probabilities(model, tokenizer, [e.prompt for e in examples], batch_size)
    return float(np.mean((p_yes > 0.5) == np.array([e.label for e in examples])))


def evaluate_sets(model: Transformer, tokenizer: Tokenizer, sets: dict[str, dict[int, list[Example]]],
                  batch_size: int = 128, progress: bool = True) -> dict[str, dict[int, float]]:
    """Accuracy per evaluation set and size."""
    from tqdm.auto import tqdm

    jobs = [(name, n) for name, by_size in sets.items() for n in by_size]
    return_value: dict[str, dict[int, float]] = {name: {} for name in sets}
    for name, n in tqdm(jobs, desc="evaluate", disable=not progress):
        return_value[name][n] = accuracy(model, tokenizer, sets[name][n], batch_size)
    return return_value


def flat_accuracies(accuracies: dict[str, dict[int, float]]) -> dict[str, float]:
    """{"acc/<set>/<nodes>": accuracy} plus "acc/<set>" (mean over sizes): flat, so sweep tables can hold it."""
    flat = {f"acc/{name}/{n}": acc for name, by_size in accuracies.items() for n, acc in by_size.items()}
    flat.update({f"acc/{name}": float(np.mean(list(by_size.values()))) for name, by_size in accuracies.items()})
    return flat


# --- one run ---------------------------------------------------------------------------------------------

def hardware_record(cfg: CausalAxiomsConfig) -> dict[str, Any]:
    from lablib.train import policy_record, resolve_hardware

    return policy_record(resolve_hardware(cfg.project(TrainConfig)))


def build_model(cfg: CausalAxiomsConfig, tokenizer: Tokenizer) -> Transformer:
    model_cfg = dataclasses.replace(cfg.project(ModelConfig), vocab_size=tokenizer.vocab_size, mask="causal")
    torch.manual_seed(cfg.seed)
    return Transformer(model_cfg)


def train_model(cfg: CausalAxiomsConfig, run=None, *, progress: bool = True):
    """Tokenizer (saved to the run), model and training on fresh chains; returns (model, tokenizer, TrainResult).

    While training, metrics.jsonl gets val_loss on fixed held-out batches and
    `val_accuracy` on in-distribution evaluation-share questions every accuracy_every steps.
    """
    from lablib.train import train

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

    pacing = MasteryPacing(cfg, stage=resumed_stage(run, cfg)) if cfg.curriculum_mastery else None
    result = train(model, AnswerLoss(pacing=pacing), TransitivityBatches(cfg, tokenizer, pacing), cfg.project(TrainConfig), run,
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


def chance_interval(n_questions: int, z: float = 1.96) -> float:
    """Half-width of the 95% band around 0.5 for an accuracy measured on n balanced questions by a coin."""
    return z * math.sqrt(0.25 / n_questions)
