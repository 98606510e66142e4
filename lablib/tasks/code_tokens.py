"""Token-level probes with control tasks (Hewitt & Liang 2019) on held-out Python code.

Notable here:
- `token_labels(text, offsets)`: four labels per model token, free from `tokenize` and `ast`:
  `token_type` (keyword, name, op, number, string, comment, whitespace), `bracket_depth` (open
  brackets around the token, 0-3, 3 meaning 3 or more), `indent_level` (enclosing indented
  blocks, 0-4) and `definition` (a name token that binds the name: an assignment target, a
  parameter, a def / class / import name; against one that reads it; other tokens carry None).
  A model token takes the labels of the Python token under its first non-space character.
- `probe_segments(documents, tokenizer, ...)`: whole functions of held-out files, tokenized
  and labelled, each with its file's dev / test split.
- `control_labels`: each vocabulary item (token id) gets one random label drawn from the task's
  label distribution, so only memorising token identity can predict it.
- `probe_selectivity(features, ...)`: a logistic-regression probe trained on dev-file tokens and
  scored on test-file tokens, for the task and for its control; selectivity is the difference.
"""

from __future__ import annotations

import ast
import io
import keyword
import textwrap
import tokenize
import warnings
from dataclasses import dataclass

import numpy as np

from lablib.evidence import split_of

PROBE_TASKS = ("token_type", "bracket_depth", "indent_level", "definition")
TOKEN_TYPES = ("keyword", "name", "op", "number", "string", "comment", "whitespace")
MAX_DEPTH, MAX_INDENT = 3, 4


def _binding_positions(tree) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(line, column) of names that bind and of names that read, from the ast."""
    binds, reads = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (reads if isinstance(node.ctx, ast.Load) else binds).add((node.lineno, node.col_offset))
        elif isinstance(node, ast.arg):
            binds.add((node.lineno, node.col_offset))
    return binds, reads


def python_token_labels(text: str) -> tuple[list[tuple[int, int, dict]], list[int]]:
    """Python tokens as (start char, end char, labels), and the char offset of each line start."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    binds, reads = _binding_positions(ast.parse(text))
    out, depth, indent, after_def = [], 0, 0, False
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.INDENT:
            indent += 1
            continue
        if tok.type == tokenize.DEDENT:
            indent -= 1
            continue
        start = line_starts[tok.start[0] - 1] + tok.start[1]
        end = line_starts[tok.end[0] - 1] + tok.end[1]
        if tok.type == tokenize.ENDMARKER or start == end:
            continue
        if tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        if tok.type == tokenize.NAME:
            kind = "keyword" if keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string) else "name"
        else:
            kind = {tokenize.OP: "op", tokenize.NUMBER: "number", tokenize.STRING: "string",
                    tokenize.COMMENT: "comment"}.get(tok.type, "whitespace")
        definition = None
        if kind == "name":
            if tok.start in binds or after_def:
                definition = "definition"
            elif tok.start in reads:
                definition = "use"
        labels = {"token_type": kind, "bracket_depth": min(max(depth, 0), MAX_DEPTH),
                  "indent_level": min(indent, MAX_INDENT), "definition": definition}
        out.append((start, end, labels))
        after_def = tok.type == tokenize.NAME and tok.string in ("def", "class")
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
    return out, line_starts


def token_labels(text: str, offsets: list[tuple[int, int]]) -> dict[str, list]:
    """Labels of each model token (given by its (start, end) character offsets in `text`)."""
    python_tokens, line_starts = python_token_labels(text)
    starts = np.array([s for s, _, _ in python_tokens])
    out: dict[str, list] = {t: [] for t in PROBE_TASKS}
    for start, end in offsets:
        piece = text[start:end]
        first = start + (len(piece) - len(piece.lstrip())) if piece.strip() else None
        if first is not None:
            i = int(np.searchsorted(starts, first, side="right")) - 1
            covered = i >= 0 and python_tokens[i][0] <= first < python_tokens[i][1]
            labels = python_tokens[i][2] if covered else None
        else:
            labels = None
        if labels is None:  # whitespace: the depth and block of the next Python token
            i = min(int(np.searchsorted(starts, start, side="left")), len(python_tokens) - 1)
            labels = {**python_tokens[i][2], "token_type": "whitespace", "definition": None}
        for task in PROBE_TASKS:
            out[task].append(labels[task])
    return out


@dataclass
class ProbeSegment:
    ids: list[int]
    labels: dict[str, list]
    source: str
    split: str


def probe_segments(documents, tokenizer, n_segments: int, max_tokens: int, seed: int = 0) -> list[ProbeSegment]:
    """`n_segments` whole functions (dedented, parsed on their own) drawn from the documents, cut to
    `max_tokens` model tokens, with their labels and their file's split (dev / test)."""
    candidates = []
    for d in documents:
        if not d["source"].endswith(".py"):
            continue
        try:
            tree = ast.parse(d["text"])
        except (SyntaxError, ValueError):
            continue
        lines = d["text"].splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 3:
                candidates.append((d["source"], "\n".join(lines[node.lineno - 1:node.end_lineno])))
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.permutation(len(candidates)):
        source, code = candidates[i]
        code = textwrap.dedent(code) + "\n"
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):
            continue
        encoding = tokenizer.backend.encode(code)
        ids, offsets = encoding.ids[:max_tokens], encoding.offsets[:max_tokens]
        out.append(ProbeSegment(ids, token_labels(code, offsets), source, split_of(source, 0.5, seed)))
        if len(out) == n_segments:
            break
    return out


def control_labels(token_ids: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """Hewitt & Liang's control task: every distinct token id gets one label drawn from the empirical
    distribution of `labels`, and each token carries its id's label."""
    rng = np.random.default_rng(seed)
    values, counts = np.unique(labels, return_counts=True)
    vocab = np.unique(token_ids)
    drawn = dict(zip(vocab.tolist(), rng.choice(values, size=len(vocab), p=counts / counts.sum()).tolist()))
    return np.array([drawn[t] for t in token_ids.tolist()])


def _fit_score(x_train, y_train, x_test, y_test, C: float) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        return float(np.mean(y_test == y_train[0]))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=C))
    with warnings.catch_warnings():  # 300 lbfgs iterations: close enough to compare probes, not always converged
        warnings.simplefilter("ignore", ConvergenceWarning)
        return float(probe.fit(x_train, y_train).score(x_test, y_test))


def probe_selectivity(features: np.ndarray, token_ids: np.ndarray, labels: dict[str, np.ndarray],
                      is_test: np.ndarray, seed: int = 0, C: float = 1.0) -> dict[str, float]:
    """Per task: probe accuracy on test-file tokens (trained on dev-file tokens), the control task's
    accuracy, the majority-label rate and selectivity = accuracy - control accuracy.

    features: (N, d) frozen token features; token_ids: (N,); labels: task -> (N,) object array
    with None where the task has no label; is_test: (N,) bool.
    """
    out: dict[str, float] = {}
    for task, y in labels.items():
        keep = np.array([v is not None for v in y])
        x, ids, y_kept, test = features[keep], token_ids[keep], y[keep].astype(str), is_test[keep]
        control = control_labels(ids, y_kept, seed)
        accuracy = _fit_score(x[~test], y_kept[~test], x[test], y_kept[test], C)
        control_accuracy = _fit_score(x[~test], control[~test], x[test], control[test], C)
        _, counts = np.unique(y_kept[~test], return_counts=True)
        majority = np.unique(y_kept[~test])[counts.argmax()]
        out.update({f"{task}_accuracy": accuracy, f"{task}_control_accuracy": control_accuracy,
                    f"{task}_majority": float(np.mean(y_kept[test] == majority)),
                    f"{task}_selectivity": accuracy - control_accuracy})
    return out
