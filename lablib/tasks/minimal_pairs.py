"""Minimal pairs of Python code (the BLiMP / BabyLM method): a real snippet and the same snippet with
one grammatical error, built with `tokenize` and `ast` from held-out standard-library files.

Notable here:
- Six phenomena (`PHENOMENA`), each a builder over one parsed file: `bracket` (a closing bracket
  swapped for another kind), `colon` (the colon after a block opener deleted), `indentation` (the
  first line of a block not indented), `undefined_name` (a use of a local name just assigned,
  replaced by a name the function never defines), `quotes` (a string closed with the other quote)
  and `keyword_order` (an `else` / `except` block moved before its `if` / `try`, or
  `from m import n` written `import n from m`). The good member always parses (`ast.parse`); every
  corruption but `undefined_name` makes it fail; `undefined_name` changes one name token.
- `minimal_pairs(documents, per_phenomenon, seed)`: a seeded draw of sites over the documents,
  at most `per_phenomenon` pairs each, split into dev and test by file (`lablib.evidence.split_of`
  of the source), cached on disk (`lablib.data.cache_dir()/minimal_pairs`). Callers pass the
  evaluation files (`lablib.tasks.code_search.evaluation_documents`), which no run trains on.
- Scoring, one scale for every objective: the summed log-probability of the tokens around the
  edit (`encode_pairs`: from `window` tokens before the first differing token to `window` after
  the last, in each member; positions before the edit cancel exactly for a causal reader).
  `log_likelihood` reads causally (causal and prefix models); `pseudo_log_likelihood` (Salazar et
  al. 2020) hides each scored token in turn, batched, and reads bidirectionally, with `<mask>` for
  masked LMs or a sentinel followed by the sentinel again for span-corruption models (the way they
  were trained to fill a span). `pair_accuracy`: the share of pairs whose good member scores higher,
  per phenomenon and overall.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import keyword
import sys
import textwrap
import tokenize
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from lablib.evidence import split_of

PAIRS_VERSION = 1  # bump when a builder changes (invalidates the cache)
MAX_SNIPPET_LINES = 6
MAX_LINE_CHARS = 88


@dataclass(frozen=True)
class MinimalPair:
    phenomenon: str
    good: str
    bad: str
    source: str  # the stdlib file it came from
    line: int  # first line of the snippet in that file
    split: str  # dev or test (by file)


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _tokens(code: str) -> list[tokenize.TokenInfo]:
    """Python tokens of a snippet; none when it does not tokenize (an unterminated statement)."""
    try:
        return list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return []


def _snippet(lines: list[str], first: int, last: int) -> str:
    """Lines first..last (1-based, inclusive), dedented, with a final newline."""
    return textwrap.dedent("\n".join(lines[first - 1:last])) + "\n"


def _one_line(node: ast.AST) -> bool:
    return node.lineno == node.end_lineno


def _short(lines: list[str], first: int, last: int) -> bool:
    block = lines[first - 1:last]
    return (0 < len(block) <= MAX_SNIPPET_LINES and all(len(l) <= MAX_LINE_CHARS for l in block)
            and not any(l.strip().startswith("#") or "\\" in l or not l.strip() for l in block))


SIMPLE = (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Expr, ast.Return, ast.Raise, ast.Assert, ast.Delete,
          ast.Pass, ast.Break, ast.Continue, ast.Import, ast.ImportFrom, ast.Global, ast.Nonlocal)
OPENERS = (ast.If, ast.For, ast.While, ast.With, ast.FunctionDef, ast.ClassDef, ast.AsyncFor, ast.AsyncWith,
           ast.AsyncFunctionDef)


def _simple_lines(tree, lines) -> Iterator[ast.stmt]:
    for node in ast.walk(tree):
        if isinstance(node, SIMPLE) and _one_line(node) and _short(lines, node.lineno, node.lineno):
            yield node


def _block_sites(tree, lines) -> Iterator[tuple[int, int]]:
    """(header line, body line): a one-line block opener ending in ':' and its one-line simple first statement."""
    for node in ast.walk(tree):
        if not isinstance(node, OPENERS):
            continue
        body = node.body[0]
        if (body.lineno == node.lineno + 1 and isinstance(body, SIMPLE) and _one_line(body)
                and _short(lines, node.lineno, body.lineno) and lines[node.lineno - 1].rstrip().endswith(":")
                and "#" not in lines[node.lineno - 1]):
            yield node.lineno, body.lineno


# --- the six builders: (tree, lines, rng) -> candidate (good, bad, first line) -------------------

def bracket_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    other = {")": "]}", "]": ")}", "}": ")]"}
    for node in _simple_lines(tree, lines):
        good = _snippet(lines, node.lineno, node.lineno)
        closing = [t for t in _tokens(good) if t.type == tokenize.OP and t.string in other]
        if not closing:
            continue
        tok = closing[rng.integers(len(closing))]
        row, col = tok.start
        swapped = other[tok.string][rng.integers(2)]
        good_lines = good.split("\n")
        good_lines[row - 1] = good_lines[row - 1][:col] + swapped + good_lines[row - 1][col + 1:]
        yield good, "\n".join(good_lines), node.lineno


def colon_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    for header, body in _block_sites(tree, lines):
        good = _snippet(lines, header, body)
        first, rest = good.split("\n", 1)
        yield good, first.rstrip()[:-1] + "\n" + rest, header


def indentation_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    for header, body in _block_sites(tree, lines):
        good = _snippet(lines, header, body)
        first, second, _ = good.split("\n", 2)
        yield good, first + "\n" + second.lstrip() + "\n", header


def _defined_names(func) -> set[str]:
    names = {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)}
    for node in ast.walk(func):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


def undefined_name_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    """`x = ...` then a statement that reads x: that read replaced by a local of another function of the
    file (a plausible identifier, of similar length) that this function never names and the module
    never defines."""
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    module_names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                    and n.col_offset == 0}
    module_names |= {(a.asname or a.name).split(".")[0] for a in ast.walk(tree) if isinstance(a, ast.alias)}
    module_names |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))}
    locals_of = {id(f): {n.id for n in ast.walk(f) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
                 for f in funcs}
    builtin = set(dir(builtins))
    for func in funcs:
        named = _defined_names(func)
        foreign = sorted({n for f in funcs if f is not func for n in locals_of[id(f)]}
                         - named - module_names - builtin - set(keyword.kwlist))
        if not foreign:
            continue
        for block in (getattr(n, "body", None) for n in ast.walk(func)):
            if not isinstance(block, list):
                continue
            for a, b in zip(block, block[1:]):
                if not (isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Name)
                        and isinstance(b, SIMPLE) and _one_line(a) and _one_line(b) and b.lineno == a.lineno + 1
                        and _short(lines, a.lineno, b.lineno)):
                    continue
                name = a.targets[0].id
                good = _snippet(lines, a.lineno, b.lineno)
                first, second, _ = good.split("\n", 2)
                uses = [t for t in _tokens(second + "\n") if t.type == tokenize.NAME and t.string == name]
                if len(uses) != 1:
                    continue
                close = [n for n in foreign if abs(len(n) - len(name)) <= 2] or foreign
                new = close[rng.integers(len(close))]
                col = uses[0].start[1]
                yield good, first + "\n" + second[:col] + new + second[col + len(name):] + "\n", a.lineno


def quote_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    for node in _simple_lines(tree, lines):
        good = _snippet(lines, node.lineno, node.lineno)
        strings = [t for t in _tokens(good) if t.type == tokenize.STRING and t.start[0] == t.end[0]
                   and t.string[-1] in "'\"" and not t.string.endswith(t.string[-1] * 3) and len(t.string) >= 2]
        if not strings:
            continue
        tok = strings[rng.integers(len(strings))]
        row, end = tok.end
        other = "'" if tok.string[-1] == '"' else '"'
        good_lines = good.split("\n")
        good_lines[row - 1] = good_lines[row - 1][:end - 1] + other + good_lines[row - 1][end:]
        yield good, "\n".join(good_lines), node.lineno


def keyword_order_pairs(tree, lines, rng) -> Iterator[tuple[str, str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and node.orelse and node.body[0].lineno == node.lineno + 1:
            body_end = node.body[-1].end_lineno
            is_else = (lines[body_end].strip() == "else:" and node.orelse[0].lineno == body_end + 2)
            if is_else and _short(lines, node.lineno, node.end_lineno):
                first = lines[node.lineno - 1: body_end]
                second = lines[body_end: node.end_lineno]
                good = _snippet(lines, node.lineno, node.end_lineno)
                yield good, textwrap.dedent("\n".join(second + first)) + "\n", node.lineno
            is_elif = (lines[body_end].lstrip().startswith("elif ") and len(node.orelse) == 1
                       and isinstance(node.orelse[0], ast.If) and node.orelse[0].lineno == body_end + 1)
            if is_elif:
                end = node.orelse[0].body[-1].end_lineno
                if node.orelse[0].body[0].lineno == body_end + 2 and _short(lines, node.lineno, end):
                    first = lines[node.lineno - 1: body_end]
                    second = lines[body_end: end]
                    good = _snippet(lines, node.lineno, end)
                    yield good, textwrap.dedent("\n".join(second + first)) + "\n", node.lineno
        elif (isinstance(node, ast.Try) and len(node.handlers) == 1 and not node.orelse and not node.finalbody
              and node.body[0].lineno == node.lineno + 1):
            handler = node.handlers[0]
            body_end = node.body[-1].end_lineno
            if handler.lineno == body_end + 1 and _short(lines, node.lineno, node.end_lineno):
                first = lines[node.lineno - 1: body_end]
                second = lines[body_end: node.end_lineno]
                good = _snippet(lines, node.lineno, node.end_lineno)
                yield good, textwrap.dedent("\n".join(second + first)) + "\n", node.lineno
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _one_line(node)
              and _short(lines, node.lineno, node.lineno)):
            good = _snippet(lines, node.lineno, node.lineno)
            head, sep, names = good.rstrip("\n").partition(" import ")
            if sep and head.startswith("from ") and "(" not in names:
                yield good, f"import {names} from {head[5:]}\n", node.lineno
    sites = [(n.lineno, n.lineno) for n in _simple_lines(tree, lines)] + list(_block_sites(tree, lines))
    for first, last in sites:
        good = _snippet(lines, first, last)
        head, sep, rest = good.partition("\n")
        if head.count(" is not ") == 1 and "#" not in head:
            yield good, head.replace(" is not ", " not is ") + sep + rest, first


PHENOMENA: dict[str, Callable] = {
    "bracket": bracket_pairs,
    "colon": colon_pairs,
    "indentation": indentation_pairs,
    "undefined_name": undefined_name_pairs,
    "quotes": quote_pairs,
    "keyword_order": keyword_order_pairs,
}


def is_valid_pair(phenomenon: str, good: str, bad: str) -> bool:
    """The good member parses and differs from the bad one; the bad one fails to parse, except for
    undefined_name, where it parses and differs in exactly one name token."""
    if good == bad or not parses(good):
        return False
    if phenomenon != "undefined_name":
        return not parses(bad)
    if not parses(bad):
        return False
    a, b = [t.string for t in _tokens(good)], [t.string for t in _tokens(bad)]
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1


def pairs_in_document(text: str, source: str, seed: int) -> dict[str, list[MinimalPair]]:
    """Every valid candidate pair of one file, by phenomenon (a file that does not parse gives none)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    lines = text.splitlines()
    split = split_of(source, 0.5, seed)
    out: dict[str, list[MinimalPair]] = {}
    for name, build in PHENOMENA.items():
        rng = np.random.default_rng([seed, int(hashlib.sha256(f"{name}:{source}".encode()).hexdigest()[:8], 16)])
        seen, found = set(), []
        for good, bad, line in build(tree, lines, rng):
            if good not in seen and is_valid_pair(name, good, bad):
                seen.add(good)
                found.append(MinimalPair(name, good, bad, source, line, split))
        out[name] = found
    return out


def _cache_path(sources: list[str], per_phenomenon: int, seed: int):
    from lablib.data import STDLIB_CORPUS_VERSION, cache_dir

    key = json.dumps({"sources": sources, "n": per_phenomenon, "seed": seed, "version": PAIRS_VERSION,
                      "python": sys.version, "corpus": STDLIB_CORPUS_VERSION})
    return cache_dir() / "minimal_pairs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def minimal_pairs(documents: Iterable[dict[str, str]], per_phenomenon: int, seed: int = 0,
                  cache: bool = True) -> list[MinimalPair]:
    """At most `per_phenomenon` pairs of each phenomenon from the Python documents (a seeded draw over
    every file's candidates), in a stable order; cached on disk by the documents' names and the draw."""
    docs = [d for d in documents if d["source"].endswith(".py")]
    path = _cache_path(sorted(d["source"] for d in docs), per_phenomenon, seed)
    if cache and path.exists():
        return [MinimalPair(**row) for row in json.loads(path.read_text())]
    by_phenomenon: dict[str, list[MinimalPair]] = defaultdict(list)
    for d in docs:
        for name, found in pairs_in_document(d["text"], d["source"], seed).items():
            by_phenomenon[name] += found
    rng = np.random.default_rng(seed)
    out = []
    for name in PHENOMENA:
        found = by_phenomenon[name]
        out += [found[i] for i in sorted(rng.permutation(len(found))[:per_phenomenon])]
    if cache:
        from lablib.checkpoints import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps([asdict(p) for p in out]))
    return out


# --- scoring ---------------------------------------------------------------------------------

@dataclass
class EncodedPairs:
    """Token ids of both members (each starting with a start token that is never scored) and the
    positions scored in each: the edit and `window` tokens either side."""

    good: list[list[int]]
    bad: list[list[int]]
    good_positions: list[list[int]]
    bad_positions: list[list[int]]
    phenomenon: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return len(self.good)


def scored_positions(a: list[int], b: list[int], window: int) -> tuple[list[int], list[int]]:
    """Positions around the edit in each of two id lists (position 0, the start token, never)."""
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1

    def span(ids):
        return list(range(max(1, prefix - window), min(len(ids), len(ids) - suffix + window)))

    return span(a), span(b)


def encode_pairs(pairs: list[MinimalPair], tokenizer, window: int, start_id: int | None = None) -> EncodedPairs:
    """Tokenize both members after a start token (default <eos>: documents follow one in training)."""
    start = tokenizer.eos_id if start_id is None else start_id
    good = [[start] + ids for ids in tokenizer.encode_batch([p.good for p in pairs])]
    bad = [[start] + ids for ids in tokenizer.encode_batch([p.bad for p in pairs])]
    positions = [scored_positions(g, b, window) for g, b in zip(good, bad)]
    return EncodedPairs(good, bad, [p[0] for p in positions], [p[1] for p in positions],
                        np.array([p.phenomenon for p in pairs]), np.array([p.split for p in pairs]))


def _by_length(rows: list[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[len(r)].append(i)
    return groups


@torch.no_grad()
def log_likelihood(model, rows: list[list[int]], positions: list[list[int]], batch_size: int = 256) -> np.ndarray:
    """Sum over `positions` of log p(token | the tokens before it), read causally (the model's own
    `next_token_logits` where it has one). Rows of one length run together, so nothing is padded."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predict = getattr(model, "next_token_logits", None) or (lambda x: model(x, mask="causal"))
    out = np.zeros(len(rows))
    for length, idx in _by_length(rows).items():
        for i in range(0, len(idx), batch_size):
            chunk = idx[i:i + batch_size]
            ids = torch.tensor([rows[j] for j in chunk], device=device)
            logp = torch.log_softmax(predict(ids[:, :-1]).float(), -1)
            token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1).cpu().numpy()  # [:, p-1] scores token p
            for k, j in enumerate(chunk):
                out[j] = token_logp[k, [p - 1 for p in positions[j]]].sum()
    model.train(was_training)
    return out


@torch.no_grad()
def pseudo_log_likelihood(model, rows: list[list[int]], positions: list[list[int]], fill: str, hidden_id: int,
                          batch_size: int = 512) -> np.ndarray:
    """Salazar et al.'s pseudo-log-likelihood: sum over `positions` of log p(token | every other token),
    each token hidden in its own copy of the row, copies batched, read bidirectionally.

    fill 'mask': the token becomes `hidden_id` (<mask>) and the logit at its position is read.
    fill 'sentinel': the token becomes sentinel `hidden_id` and the sentinel is appended, read with a
    prefix mask over the row (span corruption's decoder-only format: the appended sentinel predicts
    the span's first token).
    """
    if fill not in ("mask", "sentinel"):
        raise ValueError(f"fill: expected 'mask' or 'sentinel', got {fill!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros(len(rows))
    copies = [(j, p) for j in range(len(rows)) for p in positions[j]]
    by_len: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for j, p in copies:
        by_len[len(rows[j])].append((j, p))
    for length, items in by_len.items():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            ids = torch.tensor([rows[j] for j, _ in chunk], device=device)
            at = torch.tensor([p for _, p in chunk], device=device)
            target = ids[torch.arange(len(chunk), device=device), at]
            hidden = ids.clone()
            hidden[torch.arange(len(chunk), device=device), at] = hidden_id
            if fill == "mask":  # the head runs at the hidden position only: most of the unembedding's cost saved
                h = model.trunk(hidden, mask="bidirectional")[torch.arange(len(chunk), device=device), at]
            else:
                row = torch.cat([hidden, torch.full((len(chunk), 1), hidden_id, device=device)], 1)
                prefix = torch.full((len(chunk),), length, device=device)
                h = model.trunk(row, mask="prefix", prefix_len=prefix)[:, -1]
            read = model.head(h)
            logp = torch.log_softmax(read.float(), -1).gather(-1, target[:, None]).squeeze(-1).cpu().numpy()
            for (j, _), v in zip(chunk, logp):
                out[j] += v
    model.train(was_training)
    return out


def pair_accuracy(good_scores: np.ndarray, bad_scores: np.ndarray, phenomenon: np.ndarray) -> dict[str, float]:
    """Share of pairs whose good member scores strictly higher (a tie counts half), per phenomenon, and
    their mean over phenomena ('all', BLiMP's average)."""
    win = (good_scores > bad_scores) + 0.5 * (good_scores == bad_scores)
    out = {name: float(win[phenomenon == name].mean()) for name in PHENOMENA if (phenomenon == name).any()}
    return {"all": float(np.mean(list(out.values()))), **out}
