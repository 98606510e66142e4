"""Code search without a network: docstring/function pairs of the standard library and frozen-embedding scores.

Notable here:
- `function_pairs(documents)`: (docstring summary, function source without its
  docstring, stdlib package) for every documented function, found with `ast`.
- Held out by construction: a seeded draw by file name picks `eval_fraction` of all
  stdlib .py files for evaluation (`evaluation_documents`), and the pretraining
  corpus is the configured corpus without them (`pretraining_documents`), so no scored
  function is trained on.
- Frozen-embedding evaluations: text->code retrieval (MRR, recall@k; mean-pooled,
  centred, cosine) and a scikit-learn logistic-regression probe predicting a
  function's stdlib package, repeated over probe seeds (its spread is the probe's
  stability). Two poolings, 'first_last' (input and top layer; the headline) and
  'top' (`_top`), and two similarities, BERT-whitened cosine (the headline) and
  mean-centred cosine (`_centred`). `heldout_next_token_loss` for models that predict
  the next token.
"""

from __future__ import annotations

import ast
import hashlib
import textwrap
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from lablib.data import Tokenizer, load_corpus
from lablib.objectives import pooled_embeddings, token_cross_entropy


# --- docstring / function pairs -----------------------------------------------------------

@dataclass(frozen=True)
class FunctionPair:
    doc: str  # the docstring's first paragraph: the query
    code: str  # the function's source, docstring removed, dedented: the target
    package: str  # top-level stdlib name: 'asyncio' for asyncio/events.py, 'argparse' for argparse.py
    source: str  # the document (file) it came from


def package_of(source: str) -> str:
    return source.split("/")[0].removesuffix(".py")


def _pairs_in(text: str, source: str, min_doc_chars: int) -> Iterable[FunctionPair]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):  # a few stdlib test files are deliberately invalid
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        first = node.body[0]
        if not doc or len(node.body) < 2 or first.lineno == node.lineno:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if len(summary) < min_doc_chars:
            continue
        kept = lines[node.lineno - 1: first.lineno - 1] + lines[first.end_lineno: node.end_lineno]
        yield FunctionPair(summary, textwrap.dedent("\n".join(kept)), package_of(source), source)


def function_pairs(documents: Iterable[dict[str, str]], min_doc_chars: int = 20) -> list[FunctionPair]:
    """Every documented function (and method) of the Python documents, deduplicated."""
    seen, out = set(), []
    for d in documents:
        if not d["source"].endswith(".py"):
            continue
        for pair in _pairs_in(d["text"], d["source"], min_doc_chars):
            if (pair.doc, pair.code) not in seen:
                seen.add((pair.doc, pair.code))
                out.append(pair)
    return out


def is_evaluation_document(source: str, eval_fraction: float, seed: int) -> bool:
    """A seeded draw by file name (stable across machines): is this stdlib .py file held out for evaluation?"""
    draw = int(hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()[:12], 16) / 16 ** 12
    return source.endswith(".py") and draw < eval_fraction


def evaluation_documents(eval_fraction: float, seed: int):
    """The held-out stdlib files (drawn from the whole standard library, whatever prefix pretrains)."""
    ds = load_corpus("stdlib")
    return ds.select([i for i, src in enumerate(ds["source"]) if is_evaluation_document(src, eval_fraction, seed)])


def pretraining_documents(corpus: str, max_chars: int | None, eval_fraction: float, seed: int):
    """The corpus without the evaluation files: nothing the downstream tasks score is ever trained on."""
    ds = load_corpus(corpus, max_chars)
    return ds.select([i for i, src in enumerate(ds["source"]) if not is_evaluation_document(src, eval_fraction, seed)])


def encode_texts(tokenizer: Tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    """(N, <= max_tokens) ids, right-padded with <pad>; every row keeps at least one token."""
    rows = [(ids[:max_tokens] or [tokenizer.eos_id]) for ids in tokenizer.encode_batch(texts)]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [tokenizer.pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


# --- frozen-embedding evaluations -------------------------------------------------------------

@torch.no_grad()
def embed(model, ids: torch.Tensor, pad_id: int, mask: str, pooling: str = "first_last",
          batch_size: int = 64) -> np.ndarray:
    """Mean-pooled embeddings of padded ids, in eval mode: pooling 'top' (top layer, (N, d_model))
    or 'first_last' (input and top layer, each unit-normalised, (N, 2*d_model))."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [pooled_embeddings(model, ids[i:i + batch_size].to(device), pad_id, mask,
                             with_input_layer=POOLINGS[pooling]).float().cpu()
           for i in range(0, len(ids), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


POOLINGS = {"top": False, "first_last": True}  # pooling name -> whether the input layer is pooled too


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _centred(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Subtract x's own mean (LM embeddings share a large common direction; docstrings and code
    each have their own), then L2-normalise."""
    return _unit(x - x.mean(0, keepdims=True))


def _whitened(x: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """BERT-whitening (Su et al. 2021): map the pool's covariance to the identity, then L2-normalise.
    Unsupervised (no labels, no pairing); it undoes the anisotropy of trained LM embeddings."""
    mean = pool.mean(0, keepdims=True)
    _, singular, vt = np.linalg.svd(pool - mean, full_matrices=False)
    return _unit((x - mean) @ (vt.T / (singular / np.sqrt(len(pool)) + 1e-6)))


SIMILARITY_TRANSFORMS = {"whitened": _whitened, "centred": _centred}


def retrieval_scores(query_emb: np.ndarray, target_emb: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
                     transform: str = "whitened") -> dict[str, float]:
    """Query i's match is target i. MRR and recall@k of cosine ranking over the whole pool, after
    `transform`: 'whitened' (fitted on all query and target embeddings together) or 'centred'."""
    pool = np.concatenate([query_emb, target_emb])
    prepare = SIMILARITY_TRANSFORMS[transform]
    sims = prepare(query_emb, pool) @ prepare(target_emb, pool).T
    true = np.diag(sims)[:, None]
    ranks = 1 + (sims > true).sum(1)  # ties count in the query's favour
    out = {"mrr": float(np.mean(1.0 / ranks))}
    out.update({f"recall@{k}": float(np.mean(ranks <= k)) for k in ks})
    return out


def probe_dataset(pairs: list[FunctionPair], n_classes: int, min_per_class: int, max_per_class: int,
                  seed: int = 0) -> tuple[list[FunctionPair], np.ndarray, list[str]]:
    """Pairs of the n_classes most common packages (each with >= min_per_class functions), at most
    max_per_class each (a seeded draw), and their integer labels."""
    counts = Counter(p.package for p in pairs)
    classes = [c for c, n in counts.most_common() if n >= min_per_class][:n_classes]
    if len(classes) < 2:
        raise ValueError(f"probe: fewer than 2 packages have >= {min_per_class} held-out functions "
                         f"({dict(counts.most_common(5))}); use a larger corpus or val_fraction")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        members = [p for p in pairs if p.package == c]
        take = rng.permutation(len(members))[:max_per_class]
        chosen += [members[i] for i in sorted(take)]
    labels = np.array([classes.index(p.package) for p in chosen])
    return chosen, labels, classes


def probe_scores(features: np.ndarray, labels: np.ndarray, seeds: int = 5, test_fraction: float = 0.3) -> dict[str, float]:
    """Logistic-regression probe on frozen features: test accuracy over `seeds` stratified splits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accs = []
    for s in range(seeds):
        x_tr, x_te, y_tr, y_te = train_test_split(features, labels, test_size=test_fraction, random_state=s,
                                                  stratify=labels)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        accs.append(float(probe.fit(x_tr, y_tr).score(x_te, y_te)))
    majority = float(np.bincount(labels).max() / len(labels))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "majority": majority}


@torch.no_grad()
def heldout_next_token_loss(model, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy on held-out blocks, read causally (the model's own
    `next_token_logits` where it has one, e.g. the future-token decoder's first slot)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predict = getattr(model, "next_token_logits", None) or (lambda x: model(x, mask="causal"))
    total, count = 0.0, 0
    for batch in batches:
        tokens = batch["tokens"].to(device)
        loss, n = token_cross_entropy(predict(tokens[:, :-1]), tokens[:, 1:])
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)
