"""Corpora, tokenizers and packing into training blocks.

Notable here:
- The offline default corpus is the Python standard library's own source plus the
  `pydoc_data` topic texts: present on every machine with Python, no download.
  Other sources: a local file or folder of text (`datasets`' "text" builder) and
  any `datasets` name written `hf:NAME[:CONFIG]` (needs the network).
- Tokenizers come from the `tokenizers` library: character-level (a WordLevel model
  over single characters) and byte-level BPE. Both save to one `tokenizer.json`.
- The held-out split is by document, so no held-out text leaks into training. A corpus
  too small for that (one file, or a held-out document shorter than a block) is split
  by blocks of its token stream instead, and a corpus of exactly one block trains and
  evaluates on that block (saying so in one line).
- `check_corpus(...)` finds what would stop a local corpus before any work (missing,
  empty, binary or not UTF-8, fewer characters than one block) and says it in one line;
  `lablib run` calls it before the kernel starts.
- Tokenized corpora are cached through `datasets` with an explicit fingerprint
  (corpus + tokenizer), so a second run with the same settings reads the cache.
- `TokenBlocks.batch(index, ...)` is a pure function of (seed, index): the data
  order is reproducible and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from lablib.seeding import torch_generator

SPECIAL_TOKENS = ("<pad>", "<unk>", "<mask>", "<eos>")
BOS_TOKEN = "<bos>"  # optional: a tokenizer that has it starts every sequence of its task with it


def cache_dir() -> Path:
    """Where tokenized corpora are cached: $LABLIB_CACHE or ~/.cache/lablib."""
    return Path(os.environ.get("LABLIB_CACHE") or Path.home() / ".cache" / "lablib")


# --- corpora -------------------------------------------------------------------------

STDLIB_CORPUS_VERSION = 2  # bump when the document order or content below changes (invalidates caches)


def _stable_order(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def stdlib_documents(max_chars: int | None = None) -> Iterator[dict[str, str]]:
    """The standard library's .py files (tests included) and the pydoc topic texts.

    Both lists are put in a fixed pseudo-random order (by a hash of the name) and
    interleaved, so any prefix (max_chars) is a fair sample of code and prose.
    Yields {"source": name, "text": text} until max_chars characters were yielded.
    """
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.rglob("*.py") if "site-packages" not in p.parts),
                   key=lambda p: _stable_order(str(p.relative_to(root))))
    topic_names = sorted(topics, key=_stable_order)

    def source_docs():
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                yield {"source": str(path.relative_to(root)), "text": text}

    def topic_docs():
        for name in topic_names:
            yield {"source": f"pydoc_data/{name}", "text": topics[name]}

    total = 0
    for pair in itertools.zip_longest(source_docs(), topic_docs()):
        for doc in pair:
            if doc is None:
                continue
            yield doc
            total += len(doc["text"])
            if max_chars is not None and total >= max_chars:
                return


def _stdlib_generator(max_chars, python_version, corpus_version):  # both versions are part of the fingerprint
    yield from stdlib_documents(max_chars)


class CorpusError(ValueError):
    """A corpus that cannot be trained on; the message is one line naming the file and the reason."""


def corpus_files(corpus: str) -> list[Path] | None:
    """The files of a local corpus (None for 'stdlib' and 'hf:' names); FileNotFoundError when it does not exist."""
    if corpus == "stdlib" or corpus.startswith("hf:"):
        return None
    path = Path(corpus).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {corpus!r}: expected 'stdlib', 'hf:NAME' or an existing file or folder")
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    if not files:
        raise CorpusError(f"corpus {corpus!r}: the folder holds no files")
    return files


def check_corpus(corpus: str, seq_len: int | None = None, max_chars: int | None = None) -> dict[str, int] | None:
    """Check a local corpus without loading it: every file readable, non-empty UTF-8 text; enough for one block.

    Reads each file in chunks (stopping after max_chars characters in all), so huge files
    and single huge lines cost no more memory than a chunk. The stdlib corpus is counted
    when cut at max_chars; `hf:` corpora are not checked (None). Returns {"files", "chars"};
    raises FileNotFoundError / CorpusError (one line).
    """
    import codecs

    if corpus == "stdlib" and max_chars is not None and seq_len is not None:  # small prefixes only: cheap to count
        docs = [len(d["text"]) for d in stdlib_documents(max_chars)]
        if sum(docs) + len(docs) < seq_len + 1:
            raise CorpusError(f"corpus 'stdlib' cut at corpus_max_chars={max_chars} holds {sum(docs)} characters, "
                              f"fewer than one training block of seq_len+1={seq_len + 1} tokens; use a larger "
                              "corpus_max_chars or a shorter seq_len")
        return {"files": len(docs), "chars": sum(docs)}
    files = corpus_files(corpus)
    if files is None:
        return None
    chars = 0
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, blank = 0, True
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    if (nul := chunk.find(b"\0")) >= 0:
                        raise CorpusError(f"corpus file {str(path)!r} is binary (a NUL byte at offset "
                                          f"{offset + nul}); expected UTF-8 text")
                    try:
                        text = decoder.decode(chunk)
                    except UnicodeDecodeError as e:
                        raise CorpusError(f"corpus file {str(path)!r} is not UTF-8 text (undecodable byte at offset "
                                          f"{offset + e.start}); expected UTF-8 text") from None
                    offset += len(chunk)
                    blank = blank and not text.strip()
                    chars += len(text)
                    if max_chars is not None and chars >= max_chars:
                        break
                else:
                    decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CorpusError(f"corpus file {str(path)!r} ends inside a UTF-8 character; expected UTF-8 text") from None
        except OSError as e:
            raise CorpusError(f"corpus file {str(path)!r} cannot be read: {e.strerror or e}") from None
        if blank:
            raise CorpusError(f"corpus file {str(path)!r} is empty; expected text to train on")
        if max_chars is not None and chars >= max_chars:
            chars = max_chars
            break
    if seq_len is not None and chars + len(files) < seq_len + 1:  # char tokens: one per character, <eos> per file
        raise CorpusError(f"corpus {corpus!r} holds {chars} characters, fewer than one training block of "
                          f"seq_len+1={seq_len + 1} tokens; use a larger corpus or a shorter seq_len")
    return {"files": len(files), "chars": chars}


def load_corpus(corpus: str = "stdlib", max_chars: int | None = None, cache: Path | None = None):
    """A `datasets.Dataset` with columns "source" and "text", one row per document."""
    import datasets

    cache = str(cache or cache_dir() / "datasets")
    if corpus == "stdlib":
        ds = datasets.Dataset.from_generator(
            _stdlib_generator, gen_kwargs={"max_chars": max_chars, "python_version": sys.version,
                        "corpus_version": STDLIB_CORPUS_VERSION},
            cache_dir=cache)
    elif corpus.startswith("hf:"):
        name, _, config = corpus[3:].partition(":")
        ds = datasets.load_dataset(name, config or None, split="train", cache_dir=cache)
        if "text" not in ds.column_names:
            raise ValueError(f"corpus {corpus!r}: expected a 'text' column, found {ds.column_names}")
        ds = ds.select_columns(["text"]).map(lambda row, i: {"source": f"{name}/{i}"}, with_indices=True)
    else:
        check_corpus(corpus, max_chars=max_chars)  # one line for a binary or empty file, not a DatasetGenerationError
        path = Path(corpus).expanduser()
        files = [str(p) for p in corpus_files(corpus)]
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=cache)
        ds = ds.map(lambda row, i: {"source": f"{path.name}/{i}"}, with_indices=True)
    if max_chars is not None and corpus != "stdlib":
        lengths = np.cumsum([len(t) for t in ds["text"]])
        # documents up to the one that reaches max_chars (all of them when the corpus is smaller)
        keep = min(len(ds), int(np.searchsorted(lengths, max_chars)) + 1)
        ds = ds.select(range(keep))
        if keep and lengths[keep - 1] > max_chars:  # the last document is cut: at most max_chars in all
            last, room = keep - 1, max_chars - (int(lengths[keep - 2]) if keep > 1 else 0)
            ds = ds.map(lambda row, i: {"text": row["text"][:room] if i == last else row["text"]}, with_indices=True)
    return ds


def split_documents(ds, val_fraction: float, seed: int = 0):
    """(train, val) by whole documents, shuffled with `seed`; val gets at least one document."""
    if len(ds) < 2:
        raise ValueError(f"the corpus has {len(ds)} document(s); a held-out split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(ds))
    n_val = max(1, int(round(len(ds) * val_fraction)))
    return ds.select(np.sort(order[n_val:])), ds.select(np.sort(order[:n_val]))


# --- tokenizers ------------------------------------------------------------------------

class Tokenizer:
    """A `tokenizers.Tokenizer` with the lab's special tokens and a small, plain interface."""

    def __init__(self, backend):
        self.backend = backend
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; expected all of {SPECIAL_TOKENS}")
        self.pad_id, self.unk_id, self.mask_id, self.eos_id = (backend.token_to_id(t) for t in SPECIAL_TOKENS)
        self.bos_id: int | None = backend.token_to_id(BOS_TOKEN)  # None: this tokenizer has no BOS

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.unk_id, self.mask_id, self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """How each token reads on its own (for tables and plots)."""
        return [self.backend.decode([i], skip_special_tokens=False) for i in ids]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        from lablib.checkpoints import atomic_write_text

        atomic_write_text(Path(path), self.backend.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_file(str(path)))


def char_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """One token per character seen in `texts` (sorted), plus the special tokens."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(chars):
        vocab.setdefault(ch, len(vocab))
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(backend)


def bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2's scheme) trained on `texts` with the `tokenizers` library."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def train_tokenizer(kind: str, texts: Iterable[str], bpe_vocab_size: int = 2048) -> Tokenizer:
    if kind == "char":
        return char_tokenizer(texts)
    if kind == "bpe":
        return bpe_tokenizer(texts, bpe_vocab_size)
    raise ValueError(f"tokenizer: expected 'char' or 'bpe', got {kind!r}")


# --- tokenize, cache, pack ----------------------------------------------------------------

def tokenize_corpus(ds, tokenizer: Tokenizer, cache: Path | None = None):
    """Add an "ids" column (each document's tokens followed by <eos>), cached by fingerprint."""
    fingerprint = hashlib.sha256(f"{ds._fingerprint}-{tokenizer.fingerprint()}".encode()).hexdigest()[:16]
    eos = tokenizer.eos_id

    def encode(batch):
        return {"ids": [ids + [eos] for ids in tokenizer.encode_batch(batch["text"])]}

    return ds.map(encode, batched=True, batch_size=256, new_fingerprint=fingerprint,
                  desc="tokenizing", load_from_cache_file=True)


def pack(ds, block_len: int) -> torch.Tensor:
    """Concatenate the "ids" column and cut it into (N, block_len) non-overlapping blocks."""
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in ds["ids"]]) if len(ds) else np.zeros(0, np.int64)
    n = len(flat) // block_len
    if n == 0:
        raise ValueError(f"the corpus has {len(flat)} tokens, fewer than one block of {block_len}; "
                         "use a larger corpus_max_chars or a shorter seq_len")
    return torch.from_numpy(flat[: n * block_len].reshape(n, block_len).copy())


@functools.lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of n blocks in `epoch`; cached, because drawing it costs O(n) and a batch reads O(batch_size) of it
    (uncached, 10^6 blocks cost 240 ms per micro-batch: benchmarks/README.md, data pipeline)."""
    return torch.randperm(n, generator=torch_generator(seed, "epoch_order", epoch))


@dataclass
class TokenBlocks:
    """Fixed-length blocks of token ids with a reproducible order.

    `batch(index, batch_size, seed)` returns micro-batch number `index` of an endless
    stream that walks a fresh permutation of the blocks each epoch.
    """

    blocks: torch.Tensor  # (N, seq_len + 1) int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.blocks.numel()

    def batch(self, index: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        n = len(self)
        start = index * batch_size
        rows = []
        while len(rows) < batch_size:
            epoch, offset = divmod(start + len(rows), n)
            perm = epoch_permutation(n, seed, epoch)
            take = min(batch_size - len(rows), n - offset)
            rows.extend(perm[offset: offset + take].tolist())
        return {"tokens": self.blocks[rows]}

    def eval_batches(self, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """A fixed set of held-out micro-batches: the first blocks in order (wrapping if few)."""
        idx = torch.arange(n_batches * batch_size) % len(self)
        return [{"tokens": self.blocks[idx[i * batch_size:(i + 1) * batch_size]]} for i in range(n_batches)]


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: TokenBlocks
    val: TokenBlocks
    n_documents: tuple[int, int]

    def summary(self) -> dict[str, int]:
        return {"vocab_size": self.tokenizer.vocab_size, "train_tokens": self.train.n_tokens,
                "val_tokens": self.val.n_tokens, "train_documents": self.n_documents[0],
                "val_documents": self.n_documents[1]}


def prepare_lm_data(corpus: str, tokenizer: str | Tokenizer, seq_len: int, *, bpe_vocab_size: int = 2048,
                    max_chars: int | None = None, val_fraction: float = 0.05, seed: int = 0) -> LMData:
    """Corpus -> document split -> tokenizer (trained on the train split unless given) -> packed blocks."""
    ds = load_corpus(corpus, max_chars)
    if len(ds) == 0:
        raise CorpusError(f"corpus {corpus!r} holds no documents")
    if len(ds) >= 2:
        train_docs, val_docs = split_documents(ds, val_fraction, seed)
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else train_tokenizer(
            tokenizer, (t for t in train_docs["text"]), bpe_vocab_size)
        try:
            train = TokenBlocks(pack(tokenize_corpus(train_docs, tok), seq_len + 1))
            val = TokenBlocks(pack(tokenize_corpus(val_docs, tok), seq_len + 1))
            return LMData(tok, train, val, (len(train_docs), len(val_docs)))
        except ValueError:  # one side holds less than a block: split the token stream instead
            pass
    return _split_blocks(ds, tokenizer, seq_len, bpe_vocab_size, val_fraction)


def _split_blocks(ds, tokenizer: str | Tokenizer, seq_len: int, bpe_vocab_size: int, val_fraction: float) -> LMData:
    """The held-out split of a corpus too small to split by document: the last blocks of its token stream.

    The tokenizer is trained on the whole corpus (there is no training-only text to train
    it on). With a single block, training and val_loss both use it, and a line says so.
    """
    import sys

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else train_tokenizer(
        tokenizer, (t for t in ds["text"]), bpe_vocab_size)
    blocks = pack(tokenize_corpus(ds, tok), seq_len + 1)
    n = len(blocks)
    if n == 1:
        print(f"lablib: the corpus holds one block of {seq_len + 1} tokens: training on it, and val_loss is measured "
              "on the same text", file=sys.stderr)
        return LMData(tok, TokenBlocks(blocks), TokenBlocks(blocks), (len(ds), 0))
    n_val = max(1, int(round(n * val_fraction)))
    return LMData(tok, TokenBlocks(blocks[: n - n_val]), TokenBlocks(blocks[n - n_val:]), (len(ds), 0))
