"""The causal-transitivity task (Vashishtha et al., 2024, arXiv:2407.07612): graphs, questions, the
text interface, tokenizers and answer scoring. The experiment is `lablib.experiments.causal_axioms`.

Notable here:
- The text interface is fixed. A causal graph is written as premises, one statement per
  edge, `"X causes Y."`, joined by single spaces; the model reads
  `"<premises> Does <A> cause <B>? "` and the answer is the continuation `Yes` or `No`.
  `answer(model, tokenizer, premises, a, b)` returns P(Yes) =
  exp(log p(Yes)) / (exp(log p(Yes)) + exp(log p(No))), where each log p sums the
  continuation's token log-probabilities. Tokenization is character-level over `ALPHABET`
  by default; `"paper"` is the paper's scheme (keywords whole, names by character, no
  spaces), which makes every sequence ~2.5x shorter.
- Format as in the paper's repository (github.com/AniketVashishtha/Causal_Axioms): node
  names are random 1-3 character alphanumeric strings (never `Yes` / `No`); the label is
  `Yes` exactly when a directed path leads from A to B (transitive closure, checked against
  networkx in tests). `ask` draws a question with a wanted label, and optionally a wanted hop
  count (the shortest path from A to B, 1 = a stated edge) or a wanted kind of negative:
  `reversed` (B reaches A, so the same two names are linked, the other way: the hard negative)
  or `unrelated` (neither reaches the other). `Example.hops` / `Example.kind` say which.
- Trivial rules, scored on the same items as the model (`rule_answers`): `edge_lookup`
  (Yes iff "A causes B." is a premise) and `mention_order` (Yes iff A is first mentioned
  before B).
- BOS: a tokenizer built with `bos=True` holds a `<bos>` token, and a model trained with it
  uses one: every encoder here (training, `answer`, `yes_probabilities`) starts each sequence
  with it exactly when the tokenizer has it, so callers never add it themselves.
- Training and evaluation graphs are disjoint by construction: a graph (its named edge set,
  whatever the statement order) belongs to evaluation when the CRC32 of its key is
  divisible by `EVAL_SHARE`; generators take `evaluation=` and redraw names until the graph
  falls on the wanted side.
- `encode_packed` writes several questions about one graph as one row (the premises once,
  then each question and its answer) with a block attention mask and the positions each
  question would have alone, so its answer is computed exactly as in a one-question row.
"""

from __future__ import annotations

import math
import string
import zlib
from dataclasses import dataclass
from typing import Callable

import networkx as nx
import numpy as np
import torch

from lablib.data import BOS_TOKEN, SPECIAL_TOKENS, Tokenizer, char_tokenizer

NAME_CHARS = string.ascii_letters + string.digits
ALPHABET = NAME_CHARS + " .?"  # every character the task's text can hold
ANSWERS = {True: "Yes", False: "No"}
NEGATIVE_KINDS = ("reversed", "unrelated")  # B reaches A (hard: same names, linked the other way); not linked
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

    def hop_counts(self) -> np.ndarray:
        """(n, n) int: the number of edges on the shortest directed path from a to b, 0 when none leads there."""
        n = self.n_nodes
        step = np.zeros((n, n), dtype=bool)
        for c, e in self.edges:
            step[c, e] = True
        hops = np.zeros((n, n), dtype=int)
        frontier = step.copy()
        for k in range(1, n):  # frontier: pairs joined by a walk of exactly k edges
            hops[frontier & (hops == 0)] = k
            frontier = (frontier.astype(np.int64) @ step.astype(np.int64)) > 0
        np.fill_diagonal(hops, 0)
        return hops

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
    def hops(self) -> int:
        """Edges on the shortest path from a to b (0 for a No question)."""
        return int(self.graph.hop_counts()[self.a, self.b])

    @property
    def kind(self) -> str:
        """'yes', or the negative's kind: 'reversed' (b reaches a) or 'unrelated'."""
        if self.label:
            return "yes"
        return "reversed" if self.graph.reachability()[self.b, self.a] else "unrelated"

    @property
    def prompt(self) -> str:
        return question_prompt(self.graph.premises(), self.graph.names[self.a], self.graph.names[self.b])

    @property
    def answer(self) -> str:
        return ANSWERS[self.label]


def question_prompt(premises: str, a: str, b: str) -> str:
    """The fixed text interface: what the model reads before it answers."""
    return f"{premises} Does {a} cause {b}? "


def candidate_pairs(graph: CausalGraph, label: bool, hops: int | tuple[int, int] | None = None,
                    negative: str | None = None) -> np.ndarray:
    """(k, 2) ordered pairs (a, b) of `graph` with answer `label`; for Yes, optionally with a hop count
    (an int, or an inclusive (low, high) range); for No, optionally of one negative kind."""
    reach = graph.reachability()
    want = (reach == label) & ~np.eye(graph.n_nodes, dtype=bool)
    if label and hops is not None:
        low, high = (hops, hops) if isinstance(hops, int) else hops
        counts = graph.hop_counts()
        want &= (counts >= low) & (counts <= high)
    if not label and negative is not None:
        if negative not in NEGATIVE_KINDS:
            raise ValueError(f"negative: expected one of {', '.join(NEGATIVE_KINDS)}, got {negative!r}")
        want &= reach.T if negative == "reversed" else ~reach.T
    return np.argwhere(want)


def ask(rng: np.random.Generator, graph: CausalGraph, label: bool, hops: int | tuple[int, int] | None = None,
        negative: str | None = None) -> Example:
    """A question about `graph` whose answer is `label`, uniform over the ordered pairs that have it
    (and the wanted hop count or negative kind, when given)."""
    candidates = candidate_pairs(graph, label, hops, negative)
    if len(candidates) == 0:
        what = f" with {hops} hops" if label and hops is not None else f" ({negative})" if negative else ""
        raise ValueError(f"graph {graph.key()!r} has no pair with answer {ANSWERS[label]}{what}")
    a, b = candidates[rng.integers(len(candidates))]
    return Example(graph, int(a), int(b), label)


# --- trivial rules ---------------------------------------------------------------------------

def edge_lookup(example: Example) -> bool:
    """Yes iff "A causes B." is one of the premises."""
    return (example.a, example.b) in set(example.graph.edges)


def mention_order(example: Example) -> bool:
    """Yes iff A is first mentioned before B in the premises."""
    order: list[int] = []
    for c, e in example.graph.edges:
        order += [x for x in (c, e) if x not in order]
    position = {node: i for i, node in enumerate(order)}  # a node no premise names comes last
    return position.get(example.a, len(order)) < position.get(example.b, len(order) + 1)


RULES: dict[str, Callable[[Example], bool]] = {"edge lookup": edge_lookup, "mention order": mention_order}


def rule_answers(rule: str, examples: list[Example]) -> np.ndarray:
    return np.array([RULES[rule](e) for e in examples], dtype=bool)


def balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """n labels, exactly half True (one more False when n is odd), in random order."""
    return rng.permutation(np.arange(n) < n // 2)


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


def task_tokenizer(kind: str = "char", bos: bool = False) -> Tokenizer:
    """The task's tokenizer; with bos=True it also holds `<bos>` (the last id), and every sequence starts with it."""
    tokenizer = TOKENIZERS[kind]()
    if bos:
        tokenizer.backend.add_special_tokens([BOS_TOKEN])
        tokenizer = Tokenizer(tokenizer.backend)
    return tokenizer


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, starting with BOS when the tokenizer has one."""
    start = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [start + ids for ids in tokenizer.encode_batch(texts)]


def longest_tokens(tokenizer: Tokenizer, n_edges: int, questions: int = 1) -> int:
    """Tokens of the longest prompt + answer with n_edges statements (all names 3 characters long),
    or of the longest packed sequence of `questions` questions with their answers."""
    name = "x" * LONGEST_NAME
    premises = " ".join([f"{name} causes {name}."] * n_edges)
    one = max(len(encode_texts(tokenizer, [question_prompt(premises, name, name) + word])[0]) for word in ANSWERS.values())
    return one + (questions - 1) * (one - len(encode_texts(tokenizer, [premises])[0]))


def encode_examples(tokenizer: Tokenizer, texts: list[str], answer_lengths: list[int],
                    length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded token ids (B, length), BOS first when the tokenizer has one, and a mask of each
    text's last answer_length tokens (its answer)."""
    ids = encode_texts(tokenizer, texts)
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
        premises = encode_texts(tokenizer, [group[0].graph.premises()])[0]
        ids, segment, positions, answer = list(premises), [0] * len(premises), list(range(len(premises))), \
            [False] * len(premises)
        for j, (e, whole) in enumerate(zip(group, encode_texts(tokenizer, [e.prompt + e.answer for e in group])), 1):
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


def trim_padding(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch cut after its longest row: padding is never attended to nor scored, so the loss is
    unchanged, and short rows (the curriculum's early chains) stop paying for seq_len + 1 tokens."""
    length = int((batch["tokens"] != pad_id).sum(1).max())
    return {k: v[:, :length, :length] if k == "attn_mask" else v[:, :length] for k, v in batch.items()}


# --- answering ---------------------------------------------------------------------------------------

@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str],
                     batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(log p(Yes | prompt), log p(No | prompt)) for each prompt: sums over the answer's tokens.
    BOS comes first when the tokenizer has one (the model was trained with it)."""
    check_vocabulary(model, tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {label: np.zeros(len(prompts)) for label in ANSWERS}
    order = np.argsort([len(p) for p in prompts])  # similar lengths share a batch: less padding
    single = {label: tokenizer.encode(word) for label, word in ANSWERS.items()}
    one_token = all(len(ids) == 1 for ids in single.values()) and all(
        encode_texts(tokenizer, [p + w])[0][-1] == single[label][0] for p in prompts[:1] for label, w in ANSWERS.items())
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        if one_token:  # both answers are one token: one pass, read at each prompt's last position
            batch = encode_examples(tokenizer, [prompts[i] for i in rows], [1] * len(rows))
            tokens, last = batch["tokens"].to(device), batch["answer_mask"].to(device).float().argmax(-1)
            logp = torch.log_softmax(model(tokens, mask="causal").float(), dim=-1)
            at_last = logp[torch.arange(len(rows), device=device), last]
            for label in ANSWERS:
                out[label][rows] = at_last[:, single[label][0]].cpu().numpy()
            continue
        for label, word in ANSWERS.items():
            batch = encode_examples(tokenizer, [prompts[i] + word for i in rows],
                                    [len(tokenizer.encode(word))] * len(rows))
            tokens, answer = batch["tokens"].to(device), batch["answer_mask"].to(device)
            logp = torch.log_softmax(model(tokens[:, :-1], mask="causal").float(), dim=-1)
            picked = logp.gather(-1, tokens[:, 1:, None])[..., 0]
            out[label][rows] = (picked * answer[:, 1:]).sum(-1).cpu().numpy()
    model.train(was_training)
    return out[True], out[False]


def check_vocabulary(model: torch.nn.Module, tokenizer: Tokenizer) -> None:
    vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {vocab}: not the tokenizer it "
                         f"was trained with (a BOS tokenizer for a model without BOS?)")


def yes_probabilities(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], batch_size: int = 128) -> np.ndarray:
    lp_yes, lp_no = answer_log_probs(model, tokenizer, prompts, batch_size)
    return 1.0 / (1.0 + np.exp(lp_no - lp_yes))


def answer(model: torch.nn.Module, tokenizer: Tokenizer, premises: str, a: str, b: str) -> float:
    """P(Yes) for "Does a cause b?" given the premises, from the Yes / No continuation log-probabilities
    (BOS added here when the model's tokenizer has one)."""
    return float(yes_probabilities(model, tokenizer, [question_prompt(premises, a, b)])[0])


def accuracy(model: torch.nn.Module, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 128) -> float:
    p_yes = yes_probabilities(model, tokenizer, [e.prompt for e in examples], batch_size)
    return float(np.mean((p_yes > 0.5) == np.array([e.label for e in examples])))


def evaluate_sets(model: torch.nn.Module, tokenizer: Tokenizer, sets: dict[str, dict[int, list[Example]]],
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


def chance_interval(n_questions: int, z: float = 1.96) -> float:
    """Half-width of the 95% band around 0.5 for an accuracy measured on n balanced questions by a coin."""
    return z * math.sqrt(0.25 / n_questions)
