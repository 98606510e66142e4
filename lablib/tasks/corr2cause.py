"""The Corr2Cause task (Jin et al., 2023, arXiv:2306.05836): from every (conditional) independence
among N variables of a causal DAG, decide whether a causal hypothesis about two of them holds.
The experiment is `lablib.experiments.corr2cause`.

Notable here:
- `equivalence_classes(n)` is the whole universe for n variables, built once per process
  (cached): every DAG for n <= 5 (enumerated over the 3^(n choose 2) edge patterns with a
  vectorised acyclicity check), a seeded sample of classes for n = 6. DAGs are grouped into
  Markov equivalence classes by skeleton and v-structures (Verma and Pearl). A class's
  d-separation statements are computed with `networkx` once per isomorphism type (the
  canonical relabelling of its representative) and mapped back through the permutation.
- Labels: a hypothesis is valid when its relation holds in *every* DAG of the class
  (faithfulness: the independencies identify the class and nothing more). The six relations,
  for the pair (A, B): Is-Parent A -> B; Is-Child B -> A; Is-Ancestor a directed path of
  length >= 2 from A to B ("A causes something else which causes B"); Is-Descendant the
  same from B to A; Has-Collider some C with A -> C <- B; Has-Confounder some C with
  C -> A and C -> B.
- Text, fixed so that outside evaluators can generate items (`premise`, `hypothesis`): the
  premise lists the marginal correlations, then (after "However,") every marginal and
  conditional independence; variables are named A, B, C, ... in order.
- `pc_labels(premise)` is the independent route: it parses the premise text, runs the PC
  algorithm on those independencies (skeleton, v-structures, Meek's rules), enumerates the
  DAGs of the resulting CPDAG and labels the hypotheses from them.
- Splits are by equivalence class (a SHA-256 hash of its key): no class is in two splits.
  `items(..., style="renamed")` names the variables with other letters and multi-character
  names; `style="paraphrased"` writes the hypotheses with templates that training never sees
  (the paper's paraphrase set rewrites the hypotheses; the premise keeps its fixed format).
- `answer(model, tokenizer, premise, hypothesis)` is P(valid): the model reads
  `"<premise> Hypothesis: <hypothesis> Valid?"` and continues ` Yes` or ` No`; P(valid) is
  P(Yes) / (P(Yes) + P(No)) of the continuation's first token. `pack` writes one class's
  premise once and several hypotheses after it, each seeing only the premise and itself at
  the positions it would have alone, so a packed answer equals the one-item answer.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import networkx as nx
import numpy as np
import torch

from lablib.data import SPECIAL_TOKENS, Tokenizer

RELATIONS = ("Is-Parent", "Is-Child", "Is-Ancestor", "Is-Descendant", "Has-Collider", "Has-Confounder")
SIZES = (2, 3, 4, 5, 6)
ENUMERATED = 5  # n up to this: every DAG; above: a sample of classes
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
ANSWERS = {True: " Yes", False: " No"}  # the continuation after the prompt
STYLES = ("original", "renamed", "paraphrased")

TEMPLATES = {  # style -> statement and hypothesis templates; `paraphrased` (hypotheses only) is never trained on
    "original": {
        "correlation": "{a} correlates with {b}.",
        "independent": "{a} is independent of {b}.",
        "conditional": "{a} and {b} are independent given {given}.",
        "hypotheses": ("{a} directly causes {b}.", "{b} directly causes {a}.",
                       "{a} causes something else which causes {b}.",
                       "{b} causes something else which causes {a}.",
                       "There exists at least one collider (i.e., common effect) of {a} and {b}.",
                       "There exists at least one confounder (i.e., common cause) of {a} and {b}."),
    },
    "paraphrased": {
        "hypotheses": ("{b} is a direct effect of {a}.", "{a} is a direct effect of {b}.",
                       "{a} influences {b} only through a mediator or more.",
                       "{b} influences {a} only through a mediator or more.",
                       "{a} and {b} have a common effect.", "{a} and {b} have a common cause."),
    },
}
RENAME_POOL = tuple("GHJKLMNPQRSTUVWXYZ") + ("Xa", "Yb", "Zc", "Vq", "Wt", "Rho", "Tau", "Kx2", "M7", "Qz")


# --- graphs -----------------------------------------------------------------------------------

def pairs(n: int) -> list[tuple[int, int]]:
    """The unordered pairs (i < j) in the order hypotheses and tables use."""
    return list(itertools.combinations(range(n), 2))


def transitive_reach(adj: np.ndarray) -> np.ndarray:
    """(..., n, n) bool: a directed path of length >= 1 leads from i to j."""
    n = adj.shape[-1]
    reach = adj.copy()
    for _ in range(max(1, math.ceil(math.log2(max(n, 2))))):  # path lengths double each squaring
        reach = reach | (np.einsum("...ik,...kj->...ij", reach.astype(np.uint8), reach.astype(np.uint8)) > 0)
    return reach


def is_acyclic(adj: np.ndarray) -> np.ndarray:
    return ~np.diagonal(transitive_reach(adj), axis1=-2, axis2=-1).any(-1)


def all_dags(n: int) -> np.ndarray:
    """Every DAG on n labelled nodes as (D, n, n) bool adjacency (adj[i, j]: i -> j)."""
    ps = pairs(n)
    codes = np.indices((3,) * len(ps)).reshape(len(ps), -1).T  # per pair: 0 none, 1 i -> j, 2 j -> i
    adj = np.zeros((len(codes), n, n), dtype=bool)
    for k, (i, j) in enumerate(ps):
        adj[:, i, j] = codes[:, k] == 1
        adj[:, j, i] = codes[:, k] == 2
    return adj[is_acyclic(adj)]


def v_structures(adj: np.ndarray) -> np.ndarray:
    """(..., n, n, n) bool: i -> k <- j with i, j not adjacent (both orders of i, j)."""
    skel = adj | np.swapaxes(adj, -1, -2)
    v = adj[..., :, None, :] & adj[..., None, :, :]  # [i, j, k]: i -> k and j -> k
    n = adj.shape[-1]
    v &= ~skel[..., :, :, None]
    v &= ~np.eye(n, dtype=bool)[:, :, None]
    return v


def class_keys(adj: np.ndarray) -> np.ndarray:
    """One bytes key per DAG, equal exactly for Markov-equivalent DAGs (skeleton + v-structures)."""
    skel = adj | np.swapaxes(adj, -1, -2)
    flat = np.concatenate([skel.reshape(len(adj), -1), v_structures(adj).reshape(len(adj), -1)], axis=1)
    packed = np.packbits(flat, axis=1)
    return np.array([row.tobytes() for row in packed], dtype=object)


def relations_of_dags(adj: np.ndarray) -> np.ndarray:
    """(D, pairs, 6) bool: each relation of RELATIONS for each pair (i < j), in each DAG."""
    n = adj.shape[-1]
    a = adj.astype(np.uint8)
    reach = transitive_reach(adj).astype(np.uint8)
    mediated = np.einsum("dik,dkj->dij", a, reach) > 0  # i -> k ~> j: a path of length >= 2
    collider = np.einsum("dik,djk->dij", a, a) > 0
    confounder = np.einsum("dki,dkj->dij", a, a) > 0
    i, j = np.array(pairs(n)).T if n > 1 else (np.zeros(0, int), np.zeros(0, int))
    return np.stack([adj[:, i, j], adj[:, j, i], mediated[:, i, j], mediated[:, j, i],
                     collider[:, i, j], confounder[:, i, j]], axis=-1)


def orientations(n: int, skeleton_edges: Sequence[tuple[int, int]], fixed: np.ndarray | None = None) -> np.ndarray:
    """Every DAG over the skeleton's undirected edges (each oriented both ways), keeping `fixed` edges."""
    m = len(skeleton_edges)
    bits = (np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1
    adj = np.zeros((2 ** m, n, n), dtype=bool)
    if fixed is not None:
        adj |= fixed[None]
    for k, (i, j) in enumerate(skeleton_edges):
        adj[:, i, j] |= bits[:, k] == 0
        adj[:, j, i] |= bits[:, k] == 1
    return adj[is_acyclic(adj)]


def random_dags(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """`count` DAGs: a random node order, each forward pair an edge with a per-graph density ~ U(0.15, 0.85)."""
    density = rng.uniform(0.15, 0.85, count)
    upper = np.triu(rng.random((count, n, n)) < density[:, None, None], 1)
    order = np.argsort(rng.random((count, n)), axis=1)
    rows = np.arange(count)[:, None, None]
    return upper[rows, order[:, :, None], order[:, None, :]]


# --- d-separation -------------------------------------------------------------------------------

def subset_masks(n: int, i: int, j: int) -> list[int]:
    """Bitmasks over the n nodes of every conditioning set that excludes i and j (smallest first)."""
    others = [k for k in range(n) if k not in (i, j)]
    sets = [c for size in range(len(others) + 1) for c in itertools.combinations(others, size)]
    return [sum(1 << k for k in s) for s in sets]


def nodes_of(mask: int) -> list[int]:
    return [k for k in range(mask.bit_length()) if mask >> k & 1]


def d_separation_table(adj: np.ndarray) -> np.ndarray:
    """(n, n, 2^n) bool: table[i, j, S] says i and j are d-separated given the node set with bitmask S
    (only S without i and j is filled), computed with networkx."""
    n = len(adj)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(*np.nonzero(adj)))
    table = np.zeros((n, n, 2 ** n), dtype=bool)
    for i, j in pairs(n):
        for mask in subset_masks(n, i, j):
            table[i, j, mask] = table[j, i, mask] = nx.is_d_separator(g, {i}, {j}, set(nodes_of(mask)))
    return table


def canonical_forms(adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per DAG, (canonical code, permutation p with canonical[p[i], p[j]] = adj[i, j]): the relabelling
    with the smallest adjacency code, so isomorphic DAGs share one code."""
    n = adj.shape[-1]
    perms = np.array(list(itertools.permutations(range(n))))
    weights = (1 << np.arange(n * n, dtype=np.int64))[::-1].reshape(n, n)
    best_code = np.full(len(adj), np.iinfo(np.int64).max)
    best_perm = np.zeros((len(adj), n), dtype=int)
    for p in perms:
        inv = np.argsort(p)  # relabelled[a, b] = adj[inv[a], inv[b]]
        code = (adj[:, inv][:, :, inv] * weights).sum((1, 2))
        better = code < best_code
        best_code[better], best_perm[better] = code[better], p
    return best_code, best_perm


def permute_table(table: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The d-separation table of a DAG whose canonical relabelling (by p) has `table`."""
    n = len(p)
    masks = np.arange(2 ** n)
    mapped = np.zeros_like(masks)
    for k in range(n):
        mapped |= ((masks >> k) & 1) << p[k]
    return table[p[:, None], p[None, :]][:, :, mapped]


# --- equivalence classes --------------------------------------------------------------------------

@dataclass(frozen=True)
class EquivalenceClasses:
    """Every Markov equivalence class (MEC) of one size n."""

    n: int
    keys: np.ndarray  # (M,) hex keys (skeleton + v-structures)
    representatives: np.ndarray  # (M, n, n) one DAG of each class
    sizes: np.ndarray  # (M,) DAGs in each class
    separated: np.ndarray  # (M, n, n, 2^n) d-separation given a node-set bitmask
    labels: np.ndarray  # (M, pairs, 6) the relation holds in every DAG of the class

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, index: int) -> str:
        return split_of(self.n, self.keys[index])


def _tables(representatives: np.ndarray) -> np.ndarray:
    codes, perms = canonical_forms(representatives)
    unique, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
    canon = [d_separation_table(representatives[f][np.argsort(perms[f])][:, np.argsort(perms[f])]) for f in first]
    return np.stack([permute_table(canon[inverse[m]], perms[m]) for m in range(len(representatives))])


def _all_hold(relations: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.ones((n_groups, *relations.shape[1:]), dtype=bool)
    np.logical_and.at(out, groups, relations)
    return out


@lru_cache(maxsize=None)
def equivalence_classes(n: int, sample: int = 2000, seed: int = 0) -> EquivalenceClasses:
    """The classes of size n: all of them for n <= ENUMERATED, else `sample` distinct classes of
    seeded random DAGs, each completed with every DAG over its skeleton that has its v-structures."""
    if n < 2 or n > max(SIZES):
        raise ValueError(f"n: expected {min(SIZES)}..{max(SIZES)} variables, got {n}")
    if n <= ENUMERATED:
        dags = all_dags(n)
        keys = class_keys(dags)
        uniq, first, member = np.unique(keys, return_index=True, return_inverse=True)
        labels = _all_hold(relations_of_dags(dags), member, len(uniq))
        reps, sizes = dags[first], np.bincount(member, minlength=len(uniq))
    else:
        rng = np.random.default_rng([seed, n])
        drawn = random_dags(rng, n, sample * 4)
        keys_drawn = class_keys(drawn)
        _, first = np.unique(keys_drawn, return_index=True)
        first = np.sort(first)[:sample]
        reps, uniq, labels, sizes = drawn[first], keys_drawn[first], [], []
        for rep, key in zip(reps, uniq):
            skel = rep | rep.T
            members = orientations(n, [(i, j) for i, j in pairs(n) if skel[i, j]])
            members = members[np.array([k == key for k in class_keys(members)])]
            labels.append(relations_of_dags(members).all(0))
            sizes.append(len(members))
        labels, sizes = np.stack(labels), np.array(sizes)
    hex_keys = np.array([f"{n}:{k.hex()}" for k in uniq])
    return EquivalenceClasses(n, hex_keys, reps, sizes, _tables(reps), labels)


def split_of(n: int, key: str) -> str:
    """'train', 'dev' or 'test' for a class, from a SHA-256 hash of its key (the same everywhere)."""
    digest = hashlib.sha256(f"corr2cause\x00{n}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS.items():
        edge += fraction
        if u < edge:
            return name
    return "test"


# --- text ------------------------------------------------------------------------------------------

def join_names(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def premise(separated: np.ndarray, names: Sequence[str]) -> str:
    """All statistical relations among the variables: marginal correlations, then every independence."""
    t = TEMPLATES["original"]
    n = len(names)
    correlated, independent = [], []
    for i, j in pairs(n):
        for mask in subset_masks(n, i, j):
            if not separated[i, j, mask]:
                if mask == 0:
                    correlated.append(t["correlation"].format(a=names[i], b=names[j]))
                continue
            given = [names[k] for k in nodes_of(mask)]
            text = t["conditional"].format(a=names[i], b=names[j], given=join_names(given)) if given else \
                t["independent"].format(a=names[i], b=names[j])
            independent.append(text)
    intro = (f"Suppose there is a closed system of {n} variables, {join_names(names)}. All the statistical "
             f"relations among these {n} variables are as follows:")
    body = " ".join(correlated)
    if independent:
        rest = " ".join(independent)
        body = f"{body} However, {rest}" if correlated else rest
    return f"{intro} {body}"


def hypothesis(a: str, b: str, relation: int, style: str = "original") -> str:
    return TEMPLATES["paraphrased" if style == "paraphrased" else "original"]["hypotheses"][relation].format(a=a, b=b)


def default_names(n: int) -> tuple[str, ...]:
    return tuple("ABCDEFGH"[:n])


def renamed(rng: np.random.Generator, n: int) -> tuple[str, ...]:
    return tuple(rng.choice(np.array(RENAME_POOL, dtype=object), n, replace=False))


@dataclass(frozen=True)
class Item:
    """One premise-hypothesis pair: class `mec` of size n, pair (i, j), relation index, label."""

    n: int
    mec: int
    i: int
    j: int
    relation: int
    label: bool
    premise: str
    hypothesis: str
    style: str = "original"

    @property
    def relation_name(self) -> str:
        return RELATIONS[self.relation]


def class_items(classes: EquivalenceClasses, m: int, style: str = "original",
                names: Sequence[str] | None = None) -> list[Item]:
    """Every hypothesis (pairs x relations) about class m, sharing one premise."""
    names = tuple(names or default_names(classes.n))
    text = premise(classes.separated[m], names)
    return [Item(classes.n, m, i, j, r, bool(classes.labels[m, p, r]), text, hypothesis(names[i], names[j], r, style),
                 style) for p, (i, j) in enumerate(pairs(classes.n)) for r in range(len(RELATIONS))]


def class_indices(classes: EquivalenceClasses, split: str) -> np.ndarray:
    if split not in SPLIT_FRACTIONS:
        raise ValueError(f"split: expected one of {', '.join(SPLIT_FRACTIONS)}, got {split!r}")
    return np.array([m for m in range(len(classes)) if classes.split(m) == split], dtype=int)


def items(sizes: Iterable[int], split: str, style: str = "original", max_classes: int | None = None,
          seed: int = 0, sample: int = 2000) -> list[list[Item]]:
    """Per class of `split` (at most max_classes per size, a seeded choice), its items; grouped by class.

    style: original (names A, B, ...), renamed (other and multi-character names) or paraphrased."""
    if style not in STYLES:
        raise ValueError(f"style: expected one of {', '.join(STYLES)}, got {style!r}")
    groups = []
    for n in sizes:
        classes = equivalence_classes(n, sample)
        chosen = class_indices(classes, split)
        if max_classes is not None and len(chosen) > max_classes:  # the same classes in every style
            chosen = np.sort(np.random.default_rng([seed, n]).choice(chosen, max_classes, replace=False))
        rng = np.random.default_rng([seed, n, STYLES.index(style)])
        for m in chosen:
            names = renamed(rng, n) if style == "renamed" else None
            groups.append(class_items(classes, int(m), style, names))
    return groups


# --- the independent route: PC on the premise's independencies ----------------------------------------

_INTRO = re.compile(r"closed system of (\d+) variables, (.+?)\. All the statistical relations")
_INDEP = re.compile(r"(\w+) is independent of (\w+)\.")
_COND = re.compile(r"(\w+) and (\w+) are independent given ([\w ,]+?)\.")


def parse_premise(text: str) -> tuple[tuple[str, ...], set[tuple[frozenset, frozenset]]]:
    """(names, independencies {({x, y}, S)}) from an original-style premise."""
    head = _INTRO.search(text)
    if head is None:
        raise ValueError("premise: expected 'Suppose there is a closed system of N variables, ...'")
    names = tuple(re.split(r", | and ", head.group(2)))
    if len(names) != int(head.group(1)):
        raise ValueError(f"premise: says {head.group(1)} variables but names {len(names)}")
    body = text[head.end():]
    facts = {(frozenset((a, b)), frozenset()) for a, b in _INDEP.findall(body)}
    facts |= {(frozenset((a, b)), frozenset(re.split(r", | and ", given))) for a, b, given in _COND.findall(body)}
    return names, facts


def pc_cpdag(names: Sequence[str], independent: Callable[[str, str, frozenset], bool]) -> np.ndarray:
    """The PC algorithm with an independence oracle: (n, n) bool, adj[i, j] & ~adj[j, i] is i -> j,
    both set is an undirected edge."""
    n = len(names)
    adj = ~np.eye(n, dtype=bool)
    sepset: dict[frozenset, frozenset] = {}
    for size in range(n - 1):
        for i, j in itertools.permutations(range(n), 2):
            if not adj[i, j]:
                continue
            neighbours = [k for k in range(n) if adj[i, k] and k != j]
            for s in itertools.combinations(neighbours, size):
                given = frozenset(names[k] for k in s)
                if independent(names[i], names[j], given):
                    adj[i, j] = adj[j, i] = False
                    sepset[frozenset((i, j))] = frozenset(s)
                    break
    skeleton = adj.copy()
    directed = np.zeros((n, n), dtype=bool)  # directed[i, j]: i -> j is compelled
    for i, j in itertools.combinations(range(n), 2):
        if skeleton[i, j]:
            continue
        for k in range(n):
            if skeleton[i, k] and skeleton[j, k] and k not in sepset.get(frozenset((i, j)), ()):
                directed[i, k] = directed[j, k] = True
    changed = True
    while changed:  # Meek's rules 1-3
        changed = False
        undirected = skeleton & ~directed & ~directed.T
        for a, b in zip(*np.nonzero(undirected)):
            rule1 = any(directed[c, a] and not skeleton[c, b] for c in range(n))
            rule2 = any(directed[a, c] and directed[c, b] for c in range(n))
            rule3 = any(undirected[a, c] and undirected[a, d] and directed[c, b] and directed[d, b]
                        and not skeleton[c, d] for c, d in itertools.combinations(range(n), 2))
            if rule1 or rule2 or rule3:
                directed[a, b] = True
                changed = True
                break
    return directed | (skeleton & ~directed.T)


def cpdag_members(cpdag: np.ndarray) -> np.ndarray:
    """Every DAG of the class a CPDAG stands for: its undirected edges oriented without a cycle
    or a v-structure the CPDAG does not have."""
    n = len(cpdag)
    fixed = cpdag & ~cpdag.T
    undirected = [(i, j) for i, j in pairs(n) if cpdag[i, j] and cpdag[j, i]]
    members = orientations(n, undirected, fixed)
    skeleton = cpdag | cpdag.T
    want = fixed[:, None, :] & fixed[None, :, :] & ~skeleton[:, :, None] & ~np.eye(n, dtype=bool)[:, :, None]
    return members[(v_structures(members) == want).all((1, 2, 3))]


def pc_labels(text: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(names, (pairs, 6) bool labels) for a premise, by PC on its stated independencies."""
    names, facts = parse_premise(text)
    cpdag = pc_cpdag(names, lambda a, b, given: (frozenset((a, b)), given) in facts)
    return names, relations_of_dags(cpdag_members(cpdag)).all(0)


# --- the model interface ----------------------------------------------------------------------------

def prompt(premise_text: str, hypothesis_text: str) -> str:
    return f"{premise_text} Hypothesis: {hypothesis_text} Valid?"


# fixed phrases of the original text that the task tokenizer reads as one token each
PHRASES = ("Suppose there is a closed system of", "All the statistical relations among these",
           "variables are as follows", "correlates with", "is independent of", "are independent given",
           "directly causes", "causes something else which causes",
           "There exists at least one collider (i.e., common effect) of",
           "There exists at least one confounder (i.e., common cause) of")


def _joined(text: str) -> str:
    for phrase in PHRASES:
        text = text.replace(phrase, phrase.replace(" ", "_"))
    return text


def task_words() -> list[str]:
    """The task tokenizer's whole-word tokens: every phrase and word of the original templates, the
    intro and the model interface."""
    t = {k: v.format(a="A", b="B", given="C") if isinstance(v, str) else [h.format(a="A", b="B") for h in v]
         for k, v in TEMPLATES["original"].items()}
    text = " ".join([t["correlation"], t["independent"], t["conditional"], *t["hypotheses"], premise(
        np.ones((2, 2, 4), dtype=bool), ("A", "B")), prompt("However,", "") + ANSWERS[True] + ANSWERS[False]])
    words = set()
    for word in _joined(text).split():
        word = word if "_" in word and not word.endswith(":") else word.rstrip(".,?:")
        if len(word) >= 2:
            words.add(word)
    return sorted(words)


NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def task_tokenizer() -> Tokenizer:
    """The from-scratch model's tokenizer: each of PHRASES and each template word is one token,
    anything else (names, words of unseen templates) goes character by character; punctuation is
    its own token and spaces are dropped."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    words = task_words()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for tok in (*words, *NAME_CHARS, ".", ",", "?", ":", "(", ")"):
        vocab.setdefault(tok, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Replace(p, p.replace(" ", "_")) for p in PHRASES])
    whole = "^(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")(?=[.,?:)]*$)"
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(
        Regex(whole + r"|[\s\S]"), behavior="isolated")])
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


@lru_cache(maxsize=8)
def _answer_tokens(tokenizer: Tokenizer) -> tuple[tuple[int, ...], int, int]:
    probe = prompt("A correlates with B.", "A directly causes B.")
    base = tokenizer.encode(probe)
    yes, no = (tokenizer.encode(probe + ANSWERS[value]) for value in (True, False))
    if yes[:len(base)] != base or no[:len(base)] != base:
        raise ValueError("tokenizer: the prompt must tokenize the same with ' Yes' or ' No' after it")
    k = len(base)
    while k < min(len(yes), len(no)) and yes[k] == no[k]:
        k += 1
    if k >= min(len(yes), len(no)):
        raise ValueError("tokenizer: ' Yes' and ' No' must differ in some token")
    return tuple(yes[len(base):k]), yes[k], no[k]


def answer_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """The token where ` Yes` and ` No` part after the prompt, for each."""
    return _answer_tokens(tokenizer)[1:]


def answer_lead(tokenizer: Tokenizer) -> list[int]:
    """Tokens both answers start with (a character tokenizer's space), read before the deciding token."""
    return list(_answer_tokens(tokenizer)[0])


def encode_group(tokenizer: Tokenizer, group: Sequence[Item],
                 with_answers: bool = True) -> tuple[list[int], list[int], list[int], list[int]]:
    """One class's premise once, then each hypothesis (and its answer token): (ids, segment, positions,
    answer position per hypothesis). Each hypothesis sees the premise and itself, at the positions it
    would have alone."""
    yes, no = answer_ids(tokenizer)
    lead = answer_lead(tokenizer)
    head = tokenizer.encode(group[0].premise)
    ids, segment, positions, answer_at = list(head), [0] * len(head), list(range(len(head))), []
    prompts = tokenizer.encode_batch([prompt(it.premise, it.hypothesis) for it in group])
    for k, (item, whole) in enumerate(zip(group, prompts), 1):
        if whole[:len(head)] != head or item.premise != group[0].premise:
            raise ValueError("encode_group: every item of a group must share the premise, tokenized alone")
        question = whole[len(head):] + lead
        tail = question + ([yes if item.label else no] if with_answers else [])
        answer_at.append(len(ids) + len(question) - 1)  # the position that predicts the answer
        ids += tail
        segment += [k] * len(tail)
        positions += range(len(head), len(head) + len(tail))
    return ids, segment, positions, answer_at


def pack(tokenizer: Tokenizer, groups: Sequence[Sequence[Item]], with_answers: bool = True) -> dict[str, torch.Tensor]:
    """A batch of packed groups: tokens, attn_mask (B, T, T), positions, and per hypothesis its row,
    answer position and label (`answer_row`, `answer_pos`, `labels`)."""
    rows = [encode_group(tokenizer, g, with_answers) for g in groups]
    length = max(len(r[0]) for r in rows)
    tokens = torch.full((len(rows), length), tokenizer.pad_id, dtype=torch.long)
    segment = torch.full((len(rows), length), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), length), dtype=torch.long)
    answer_row, answer_pos = [], []
    for b, (ids, seg, pos, at) in enumerate(rows):
        tokens[b, :len(ids)], segment[b, :len(ids)], positions[b, :len(ids)] = map(torch.tensor, (ids, seg, pos))
        answer_row += [b] * len(at)
        answer_pos += at
    idx = torch.arange(length)
    key, query = segment[:, None, :], segment[:, :, None]
    attn_mask = (idx[None, :] <= idx[:, None])[None] & ((key == 0) | (key == query))
    attn_mask |= torch.eye(length, dtype=torch.bool)[None]  # padding attends to itself
    labels = torch.tensor([it.label for g in groups for it in g])
    return {"tokens": tokens, "attn_mask": attn_mask, "positions": positions,
            "answer_row": torch.tensor(answer_row), "answer_pos": torch.tensor(answer_pos), "labels": labels}


def answer_logits(model: torch.nn.Module, tokenizer: Tokenizer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(Yes) - log p(No) at each hypothesis's answer position."""
    yes, no = answer_ids(tokenizer)
    logits = model(batch["tokens"], attn_mask=batch["attn_mask"], positions=batch["positions"])
    picked = logits[batch["answer_row"], batch["answer_pos"]].float()
    return picked[:, yes] - picked[:, no]


def chunked(groups: Sequence[Sequence[Item]], per_row: int | None) -> list[Sequence[Item]]:
    """Each group cut into consecutive rows of at most per_row items (None: as it is)."""
    if per_row is None:
        return list(groups)
    return [g[k:k + per_row] for g in groups for k in range(0, len(g), per_row)]


@torch.no_grad()
def valid_probabilities(model: torch.nn.Module, tokenizer: Tokenizer, groups: Sequence[Sequence[Item]],
                        batch_size: int = 8, per_row: int | None = None) -> np.ndarray:
    """P(valid) for every item of every group (in order), from packed forward passes of at most
    `per_row` hypotheses each (None: a whole group per row)."""
    groups = chunked(groups, per_row)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(groups), batch_size):
        batch = pack(tokenizer, groups[start:start + batch_size], with_answers=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(torch.sigmoid(answer_logits(model, tokenizer, batch)).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


@torch.no_grad()
def answer(model: torch.nn.Module, tokenizer: Tokenizer, premise_text: str, hypothesis_text: str) -> float:
    """P(valid) for one premise and hypothesis: P(Yes) / (P(Yes) + P(No)) at the token where the answers part."""
    was_training = model.training
    model.eval()
    yes, no = answer_ids(tokenizer)
    ids = torch.tensor([tokenizer.encode(prompt(premise_text, hypothesis_text)) + answer_lead(tokenizer)],
                       device=next(model.parameters()).device)
    logits = model(ids, mask="causal")[0, -1].float()
    model.train(was_training)
    return float(torch.sigmoid(logits[yes] - logits[no]))


# --- scoring --------------------------------------------------------------------------------------

def binary_scores(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """F1, precision, recall and accuracy of `predicted` (valid = True); an empty denominator scores 0."""
    labels, predicted = np.asarray(labels, bool), np.asarray(predicted, bool)
    tp = int((labels & predicted).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else 0.0
    recall = tp / int(labels.sum()) if labels.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall,
            "accuracy": float((labels == predicted).mean()) if len(labels) else 0.0, "items": int(len(labels))}


def score_table(flat: Sequence[Item], predicted: np.ndarray) -> dict[str, dict[str, float]]:
    """Scores overall, per relation and per N: {"all": ..., "Is-Parent": ..., "N=3": ...}."""
    labels = np.array([it.label for it in flat])
    predicted = np.asarray(predicted, bool)
    out = {"all": binary_scores(labels, predicted)}
    for r, name in enumerate(RELATIONS):
        keep = np.array([it.relation == r for it in flat])
        out[name] = binary_scores(labels[keep], predicted[keep])
    for n in sorted({it.n for it in flat}):
        keep = np.array([it.n == n for it in flat])
        out[f"N={n}"] = binary_scores(labels[keep], predicted[keep])
    return out


def best_threshold(labels: np.ndarray, p_valid: np.ndarray) -> float:
    """The P(valid) threshold with the highest F1 (chosen on dev; ties take the middle of the best run)."""
    labels = np.asarray(labels, bool)
    candidates = np.unique(np.concatenate([[0.5], p_valid]))
    f1 = np.array([binary_scores(labels, p_valid >= t)["f1"] for t in candidates])
    best = np.flatnonzero(f1 == f1.max())
    return float(candidates[best[len(best) // 2]])


def flatten(groups: Sequence[Sequence[Item]]) -> list[Item]:
    return [it for g in groups for it in g]


def hypothesis_only_rates(train_items: Iterable[Item]) -> dict[str, float]:
    """Share valid of each hypothesis text among the training items: a rule that never reads the premise."""
    counts: dict[str, list[int]] = {}
    for it in train_items:
        c = counts.setdefault(it.hypothesis, [0, 0])
        c[0] += it.label
        c[1] += 1
    return {h: v / t for h, (v, t) in counts.items()}


def hypothesis_only_scores(rates: dict[str, float], flat: Sequence[Item], prior: float) -> np.ndarray:
    return np.array([rates.get(it.hypothesis, prior) for it in flat])


def chance_f1(valid_share: float) -> float:
    """Expected F1 of a coin that says valid half the time: precision = share, recall = 1/2."""
    return 2 * valid_share * 0.5 / (valid_share + 0.5) if valid_share > 0 else 0.0
