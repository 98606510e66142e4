"""Minimal pairs, their scoring, the token probes' labels and control task, and the trigram baseline."""

import io
import math
import tokenize

import numpy as np
import pytest
import torch

from lablib.config import ModelConfig
from lablib.models import Transformer
from lablib.ngram import BigramLM, TrigramLM
from lablib.seeding import seeded_model
from lablib.tasks.code_tokens import control_labels, probe_selectivity, token_labels
from lablib.tasks.minimal_pairs import (PHENOMENA, is_valid_pair, log_likelihood, minimal_pairs, pair_accuracy,
                                        pairs_in_document, parses, pseudo_log_likelihood, scored_positions)

SOURCE = '''
import os
from collections import OrderedDict


def first(items, default=None):
    result = default
    for item in items:
        value = item.strip()
        return value
    if items is not None:
        total = len(items)
    try:
        count = int(default)
    except ValueError:
        count = 0
    if count > 1:
        label = "many"
    else:
        label = 'one'
    return result


def second(path):
    parts = os.path.split(path)
    joined = "/".join(parts)
    return (joined, [parts[0]], {"key": parts[-1]})
'''


@pytest.fixture(scope="module")
def pairs():
    return pairs_in_document(SOURCE, "fake/module.py", seed=0)


def test_every_phenomenon_yields_pairs_from_real_code(pairs):
    assert set(pairs) == set(PHENOMENA)
    assert all(pairs[name] for name in PHENOMENA), {k: len(v) for k, v in pairs.items()}


@pytest.mark.parametrize("name", [n for n in PHENOMENA if n != "undefined_name"])
def test_a_syntax_corruption_fails_to_parse_where_the_real_snippet_parses(pairs, name):
    for p in pairs[name]:
        assert parses(p.good), p.good
        assert not parses(p.bad), p.bad


def test_an_undefined_name_pair_parses_and_differs_in_exactly_one_name(pairs):
    for p in pairs["undefined_name"]:
        assert parses(p.good) and parses(p.bad)
        good = [t for t in tokenize.generate_tokens(io.StringIO(p.good).readline)]
        bad = [t for t in tokenize.generate_tokens(io.StringIO(p.bad).readline)]
        changed = [(a, b) for a, b in zip(good, bad) if a.string != b.string]
        assert len(good) == len(bad) and len(changed) == 1
        old, new = changed[0]
        assert old.type == new.type == tokenize.NAME
        assert old.string in p.good.split("\n")[0]  # the real member reads the name its first line assigns
        assert new.string not in p.good  # the corrupted one reads a name the snippet never defines


def test_each_corruption_is_the_one_its_phenomenon_names(pairs):
    for p in pairs["colon"]:
        assert p.good.split("\n")[0].rstrip().endswith(":") and p.bad.split("\n")[0] == p.good.split("\n")[0][:-1]
    for p in pairs["indentation"]:
        assert p.bad.split("\n")[1] == p.good.split("\n")[1].lstrip()
    for p in pairs["bracket"]:
        diff = [(a, b) for a, b in zip(p.good, p.bad) if a != b]
        assert len(p.good) == len(p.bad) and len(diff) == 1 and set(diff[0]) <= set(")]}")
    for p in pairs["quotes"]:
        diff = [(a, b) for a, b in zip(p.good, p.bad) if a != b]
        assert len(p.good) == len(p.bad) and len(diff) == 1 and set(diff[0]) == {"'", '"'}
    for p in pairs["keyword_order"]:
        assert sorted(p.good.split()) == sorted(p.bad.split())  # the same words, reordered


def test_is_valid_pair_refuses_a_corruption_that_still_parses():
    assert not is_valid_pair("colon", "x = 1\n", "x = 2\n")
    assert not is_valid_pair("undefined_name", "a = 1\nb = a\n", "a = 1\nb = (\n")
    assert is_valid_pair("undefined_name", "a = 1\nb = a\n", "a = 1\nb = c\n")


def test_pairs_come_only_from_files_no_run_trained_on():
    from lablib.experiments.objectives import ObjectivesGridConfig
    from lablib.tasks.code_search import evaluation_documents, is_evaluation_document, pretraining_documents

    cfg = ObjectivesGridConfig.resolve("smoke")
    heldout = evaluation_documents(cfg.eval_fraction, cfg.split_seed)
    pairs = minimal_pairs(heldout, 5, cfg.split_seed)
    trained = set(pretraining_documents(cfg.corpus, cfg.corpus_max_chars, cfg.eval_fraction, cfg.split_seed)["source"])
    sources = {p.source for p in pairs}
    assert pairs and not sources & trained
    assert all(is_evaluation_document(s, cfg.eval_fraction, cfg.split_seed) for s in sources)
    assert {p.phenomenon for p in pairs} == set(PHENOMENA)
    assert minimal_pairs(heldout, 5, cfg.split_seed) == pairs  # seeded (and read back from the cache)


def test_scored_positions_cover_the_edit_and_the_window():
    a, b = [9, 1, 2, 3, 4, 5], [9, 1, 2, 7, 4, 5]
    assert scored_positions(a, b, 0) == ([3], [3])
    assert scored_positions(a, b, 1) == ([2, 3, 4], [2, 3, 4])
    assert scored_positions([9, 1, 2], [9, 1, 2, 3], 0) == ([], [3])
    assert scored_positions([9, 5, 1], [9, 6, 1], 5)[0][0] == 1  # the start token is never scored


def tiny_model(vocab=12):
    return seeded_model(Transformer, ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=16, max_seq_len=16), 0)


def test_log_likelihood_sums_next_token_log_probabilities_at_the_positions():
    model = tiny_model()
    rows, positions = [[1, 5, 6, 7], [1, 5, 8], [2, 3, 4, 5]], [[1, 3], [2], [1, 2, 3]]
    got = log_likelihood(model, rows, positions)
    for row, pos, value in zip(rows, positions, got):
        logp = torch.log_softmax(model(torch.tensor([row]), mask="causal")[0].detach(), -1)
        assert math.isclose(value, float(sum(logp[p - 1, row[p]] for p in pos)), rel_tol=1e-5)


def test_pseudo_log_likelihood_matches_masking_each_token_by_hand():
    model = tiny_model()
    rows, positions = [[1, 5, 6, 7], [1, 5, 8], [2, 3, 4, 5]], [[1, 2, 3], [1, 2], [2]]
    got = pseudo_log_likelihood(model, rows, positions, "mask", hidden_id=11, batch_size=2)
    for row, pos, value in zip(rows, positions, got):
        direct = 0.0
        for p in pos:
            hidden = list(row)
            hidden[p] = 11
            logits = model(torch.tensor([hidden]), mask="bidirectional")[0, p].detach()
            direct += float(torch.log_softmax(logits, -1)[row[p]])
        assert math.isclose(value, direct, rel_tol=1e-5)


def test_sentinel_pseudo_log_likelihood_reads_the_appended_sentinel_under_a_prefix_mask():
    model = tiny_model()
    row = [1, 5, 6, 7]
    got = pseudo_log_likelihood(model, [row], [[2]], "sentinel", hidden_id=10)
    seq = torch.tensor([[1, 5, 10, 7, 10]])
    logits = model(seq, mask="prefix", prefix_len=torch.tensor([4]))[0, -1]
    assert math.isclose(got[0], float(torch.log_softmax(logits, -1)[6]), rel_tol=1e-5)


def test_pair_accuracy_averages_phenomena_and_counts_ties_half():
    acc = pair_accuracy(np.array([1.0, 0.0, 2.0, 1.0]), np.array([0.0, 1.0, 2.0, 0.0]),
                        np.array(["colon", "colon", "quotes", "quotes"]))
    assert acc == {"all": 0.625, "colon": 0.5, "quotes": 0.75}


def test_token_labels_come_from_tokenize_and_ast():
    code = "def f(a):\n    b = g(a, [1])\n    return b\n"
    pieces = ["def", " f", "(", "a", "):", "\n   ", " b", " =", " g", "(", "a", ",", " [", "1", "])", "\n   ",
              " return", " b", "\n"]
    assert "".join(pieces) == code
    ends = np.cumsum([len(p) for p in pieces])
    labels = token_labels(code, list(zip(ends - [len(p) for p in pieces], ends)))
    at = lambda i: {t: labels[t][i] for t in labels}  # noqa: E731
    assert at(0)["token_type"] == "keyword" and at(1)["definition"] == "definition"
    assert at(3)["definition"] == "definition" and at(3)["bracket_depth"] == 1  # the parameter
    assert at(10)["definition"] == "use" and at(10)["bracket_depth"] == 1  # read in the call
    assert at(6)["definition"] == "definition" and at(6)["indent_level"] == 1
    assert at(13)["token_type"] == "number" and at(13)["bracket_depth"] == 2
    assert at(5)["token_type"] == "whitespace" and at(5)["definition"] is None
    assert at(16)["token_type"] == "keyword" and at(16)["indent_level"] == 1 and at(0)["indent_level"] == 0
    assert at(17)["definition"] == "use"


def test_control_task_gives_each_token_id_one_label_with_the_label_distribution():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 400, 20_000)
    labels = rng.choice(np.array(["a", "b", "c"]), size=20_000, p=[0.6, 0.3, 0.1])
    control = control_labels(ids, labels, seed=1)
    for token in np.unique(ids):
        assert len(set(control[ids == token])) == 1
    share = {v: np.mean(control == v) for v in "abc"}
    assert abs(share["a"] - 0.6) < 0.1 and abs(share["c"] - 0.1) < 0.07
    assert np.array_equal(control, control_labels(ids, labels, seed=1))


def test_selectivity_is_high_for_features_that_encode_the_label_and_not_the_token():
    rng = np.random.default_rng(0)
    n = 2000
    ids = rng.integers(0, 200, n)
    y = rng.choice(np.array(["x", "y"]), size=n)
    features = np.stack([(y == "x").astype(float) + 0.1 * rng.normal(size=n), rng.normal(size=n)], 1)
    out = probe_selectivity(features, ids, {"task": y.astype(object)}, np.arange(n) % 2 == 0, seed=0)
    assert out["task_accuracy"] > 0.95 and out["task_control_accuracy"] < 0.7
    assert math.isclose(out["task_selectivity"], out["task_accuracy"] - out["task_control_accuracy"])


def test_trigram_probabilities_sum_to_one_and_fall_back_to_the_bigram():
    stream = np.random.default_rng(0).integers(0, 6, 500)
    bigram = BigramLM.fit(stream, 6, lam=0.8, k=0.5)
    trigram = TrigramLM.fit(stream, bigram, lam=0.6)
    for u, v in ((0, 1), (3, 3)):
        assert math.isclose(trigram.prob([u] * 6, [v] * 6, range(6)).sum(), 1.0, rel_tol=1e-9)
    unseen = TrigramLM.fit(np.array([0, 1, 2]), bigram, lam=0.6)
    assert np.allclose(unseen.prob([5] * 6, [4] * 6, range(6)), bigram.prob([4] * 6, range(6)))
    ids = [0, 1, 2, 3]
    expected = math.log(bigram.prob([0], [1])[0]) + math.log(trigram.prob([1], [2], [3])[0])
    assert math.isclose(trigram.log_prob_at(ids, [1, 3]), expected)
