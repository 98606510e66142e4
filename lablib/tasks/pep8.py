"""PEP 8 compliance of Python code as a preference score (Korbak et al. 2023's code-style task).

Notable here:
- `violations(text)` runs `pycodestyle` (the PEP 8 reference checker, with its default selection
  of checks) on a piece of code on its own and returns the (line, code) of every violation; `violation_rate(text)` is their number
  per character, the paper's score (lower is better). A segment is cut out of a file, so the
  checks that judge a line by lines the segment may not hold are left out (`CONTEXT_CODES`:
  indentation relative to an unseen opening line, a multi-line token cut at an edge, the
  end-of-file rules); every text (corpus segment, sample, continuation) is scored the same way.
  When the checker trips over a fragment (its continuation-line check can raise on some), the
  violations found before that count.
- `continuation_rate(prompt, continuation)` (and `continuation_violations`) scores the lines a continuation wrote (its first,
  shared line included), per character of the continuation, in the context of the prompt.
- Segments are the training rows: each standard-library `.py` file's tokens cut into
  consecutive, non-overlapping blocks of `length` tokens (no block spans two files; the
  file's tail shorter than a block is dropped), each decoded and scored. `scored_segments`
  caches the table (source, ids, text, chars, violations, score) through `datasets` with a
  fingerprint of the corpus, the tokenizer, the block length and the checker's version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

# Checks whose verdict depends on lines outside a segment cut from a file (or on the file's end).
CONTEXT_CODES = ("E112", "E113", "E115", "E116",  # indentation expected / unexpected after an unseen line
                 "E901", "E902",  # a string or bracket opened before the segment's first line
                 "W291", "W293",  # trailing whitespace: a cut line ends in the blank it was cut at
                 "W391", "W292")  # blank line / no newline at the end of the file
MAX_LINE_LENGTH = 79  # PEP 8's limit (E501)


def _style_guide():
    import pycodestyle

    class Collect(pycodestyle.BaseReport):
        """Records (line, code) of each violation instead of printing it."""

        def __init__(self, options):
            super().__init__(options)
            self.found: list[tuple[int, str]] = []

        def error(self, line_number, offset, text, check):
            code = text[:4]
            if self._ignore_code(code):
                return None
            self.found.append((int(line_number), code))
            return code

    default = [c for c in pycodestyle.DEFAULT_IGNORE.split(",") if c]  # the checker's own default (E226, W503, ...)
    guide = pycodestyle.StyleGuide(quiet=True, reporter=Collect, max_line_length=MAX_LINE_LENGTH,
                                   ignore=default + list(CONTEXT_CODES))
    return guide.options, Collect


_GUIDE = None


def violations(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every PEP 8 violation pycodestyle finds in `text`, read on its own."""
    import pycodestyle

    global _GUIDE
    if _GUIDE is None:
        _GUIDE = _style_guide()
    options, Collect = _GUIDE
    report = Collect(options)
    try:
        pycodestyle.Checker(lines=text.splitlines(True), options=options, report=report).check_all()
    except (IndexError, KeyError, ValueError):  # the continuation-line check can trip over a fragment:
        pass  # what it found up to there stands (deterministic, like every other verdict)
    return report.found


def violation_rate(text: str) -> float:
    """PEP 8 violations per character (0 for an empty text)."""
    return len(violations(text)) / len(text) if text else 0.0


def continuation_violations(prompt: str, continuation: str) -> int:
    """Violations on the lines the continuation wrote (its first line, shared with the prompt, included),
    read after the prompt."""
    if not continuation:
        return 0
    first = prompt.count("\n") + 1  # the prompt's last line is the continuation's first one
    return sum(1 for line, _ in violations(prompt + continuation) if line >= first)


def continuation_rate(prompt: str, continuation: str) -> float:
    """`continuation_violations` per character of the continuation."""
    return continuation_violations(prompt, continuation) / len(continuation) if continuation else 0.0


def checker_version() -> str:
    import pycodestyle

    return pycodestyle.__version__


# --- scored segments of the standard library's code ------------------------------------------

def is_code(source: str) -> bool:
    """The corpus rows that are Python files (not the pydoc topic texts)."""
    return source.endswith(".py")


def scored_segments(ds, tokenizer, length: int, cache_fingerprint: str | None = None):
    """The `datasets.Dataset` of scored segments of the code documents of `ds` (columns
    source, ids, text, chars, violations, score), cached by fingerprint."""
    code = ds.filter(lambda row: is_code(row["source"]), desc="code files")
    key = f"{code._fingerprint}-{tokenizer.fingerprint()}-{length}-{checker_version()}-{CONTEXT_CODES}"
    fingerprint = cache_fingerprint or hashlib.sha256(key.encode()).hexdigest()[:16]

    def cut(batch):
        out = {"source": [], "ids": [], "text": [], "chars": [], "violations": [], "score": []}
        for source, ids in zip(batch["source"], tokenizer.encode_batch(batch["text"])):
            for start in range(0, len(ids) - length + 1, length):
                block = ids[start:start + length]
                text = tokenizer.decode(block)
                found = len(violations(text))
                out["source"].append(source)
                out["ids"].append(block)
                out["text"].append(text)
                out["chars"].append(len(text))
                out["violations"].append(found)
                out["score"].append(found / max(1, len(text)))
        return out

    return code.map(cut, batched=True, batch_size=32, remove_columns=code.column_names, new_fingerprint=fingerprint,
                    desc="scoring segments", load_from_cache_file=True)


@dataclass
class Segments:
    """Scored segments as arrays: ids (N, length), score (N,), and their sources and texts."""

    ids: torch.Tensor
    score: np.ndarray
    source: list[str]
    text: list[str]

    @classmethod
    def of(cls, table) -> "Segments":
        if len(table) == 0:
            raise ValueError("segments: the corpus holds no code segment of the block length; use a larger "
                             "corpus_max_chars or a shorter seq_len")
        return cls(torch.tensor(table["ids"], dtype=torch.long), np.asarray(table["score"], dtype=float),
                   list(table["source"]), list(table["text"]))

    def __len__(self) -> int:
        return len(self.score)

    def select(self, rows) -> "Segments":
        rows = np.asarray(rows, dtype=int)
        return Segments(self.ids[torch.as_tensor(rows)], self.score[rows], [self.source[i] for i in rows],
                        [self.text[i] for i in rows])

    def mean_rate(self) -> float:
        """Violations per character over all segments (total violations / total characters)."""
        chars = np.array([len(t) for t in self.text], dtype=float)
        return float((self.score * chars).sum() / chars.sum())
