"""Code search and the objectives run: docstring/function pairs, the held-out guarantee, retrieval, probe, FLOPs."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from lablib.config import ModelConfig
from lablib.data import load_corpus
from lablib.experiments.objectives import (ObjectivesRunConfig, contrastive_documents, prepare_pretraining_data,
                                           training_flops_per_batch)
from lablib.models import Transformer
from lablib.objectives import CausalLM, MaskedLM, Mixture
from lablib.tasks.code_search import (embed, evaluation_documents, function_pairs, heldout_next_token_loss,
                                      is_evaluation_document, package_of, pretraining_documents, probe_dataset,
                                      probe_scores, retrieval_scores)

SOURCE = '''
import os


def documented(path, mode="r"):
    """Open the file at path and return its first line.

    More text that is not part of the summary.
    """
    with open(path, mode) as f:
        return f.readline()


def undocumented(x):
    return x + 1


def only_a_docstring():
    """This function has nothing but a docstring in its body."""


class Reader:
    def read_all(self, stream):
        """Read every chunk of the stream into one string."""
        return "".join(stream)
'''


def test_function_pairs_take_the_docstring_summary_and_the_code_without_it():
    pairs = function_pairs([{"source": "email/reader.py", "text": SOURCE}])
    assert [p.doc for p in pairs] == ["Open the file at path and return its first line.",
                                      "Read every chunk of the stream into one string."]
    assert pairs[0].code == 'def documented(path, mode="r"):\n    with open(path, mode) as f:\n        return f.readline()'
    assert pairs[1].code.startswith("def read_all(self, stream):\n    return")  # methods are dedented
    assert {p.package for p in pairs} == {"email"}


def test_function_pairs_skip_unparseable_and_non_python_documents():
    docs = [{"source": "broken.py", "text": "def f(:\n"}, {"source": "pydoc_data/x", "text": SOURCE}]
    assert function_pairs(docs) == []


def test_package_is_the_top_level_stdlib_name():
    assert package_of("asyncio/events.py") == "asyncio" and package_of("argparse.py") == "argparse"


def test_evaluation_files_never_reach_the_pretraining_corpus():
    heldout = evaluation_documents(0.1, seed=0)
    pretraining = pretraining_documents("stdlib", 2_000_000, 0.1, seed=0)
    everything = load_corpus("stdlib", 2_000_000)
    assert set(pretraining["source"]).isdisjoint(heldout["source"])
    assert set(everything["source"]) == set(pretraining["source"]) | (set(everything["source"]) & set(heldout["source"]))
    pairs = function_pairs(heldout)
    assert pairs and {p.source for p in pairs} <= set(heldout["source"])


def test_contrastive_pairs_can_come_from_past_the_corpus_cap_but_never_from_held_out_documents():
    cfg = ObjectivesRunConfig.resolve("smoke", corpus_max_chars=400_000, val_fraction=0.3)
    _, train_docs = prepare_pretraining_data(cfg, "char")
    assert cfg.contrastive_pairs == "pretraining"  # smoke: the LM training documents only
    assert contrastive_documents(cfg, train_docs) is train_docs
    every = contrastive_documents(dataclasses.replace(cfg, contrastive_pairs="all"), train_docs)
    capped = pretraining_documents("stdlib", 400_000, cfg.eval_fraction, cfg.split_seed)
    lm_val = set(capped["source"]) - set(train_docs["source"])
    sources = set(every["source"])
    assert lm_val and sources.isdisjoint(lm_val)
    assert sources.isdisjoint(evaluation_documents(cfg.eval_fraction, cfg.split_seed)["source"])
    assert set(train_docs["source"]) < sources and len(sources) > 3 * len(capped)


def test_the_evaluation_draw_is_seeded_and_takes_only_python_files():
    names = [f"pkg/m{i}.py" for i in range(2000)]
    drawn = [n for n in names if is_evaluation_document(n, 0.1, seed=0)]
    assert 150 < len(drawn) < 250 and drawn == [n for n in names if is_evaluation_document(n, 0.1, seed=0)]
    assert drawn != [n for n in names if is_evaluation_document(n, 0.1, seed=1)]
    assert not is_evaluation_document("pydoc_data/if", 1.0, seed=0)


def test_retrieval_is_perfect_when_each_query_equals_its_target():
    x = np.random.default_rng(0).normal(size=(20, 8))
    assert retrieval_scores(x, x) == {"mrr": 1.0, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}


def test_retrieval_mrr_matches_ranks_computed_by_hand():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    targets = queries[[1, 0, 2, 3]]  # queries 0 and 1 rank their true target second, 2 and 3 first
    scores = retrieval_scores(queries, targets, ks=(1,))
    assert math.isclose(scores["mrr"], (0.5 + 0.5 + 1 + 1) / 4) and scores["recall@1"] == 0.5


def test_probe_reaches_full_accuracy_on_separable_features_and_reports_the_majority_rate():
    labels = np.repeat([0, 1, 2], 20)
    features = np.eye(3)[labels] * 5 + np.random.default_rng(0).normal(scale=0.1, size=(60, 3))
    out = probe_scores(features, labels, seeds=3)
    assert out["accuracy"] == 1.0 and out["accuracy_std"] == 0.0 and math.isclose(out["majority"], 1 / 3)


def test_probe_dataset_keeps_common_packages_and_caps_each_class():
    # identical functions are deduplicated, so each file gets its own names
    pairs = function_pairs([{"source": f"{pkg}/m{i}.py", "text": SOURCE.replace("documented", f"doc{pkg}{i}")}
                            for pkg, n in (("a", 6), ("b", 3), ("c", 1)) for i in range(n)])
    # one distinct function per file, plus the shared method once: a has 7, b 3, c 1
    chosen, labels, classes = probe_dataset(pairs, n_classes=5, min_per_class=3, max_per_class=5)
    assert classes == ["a", "b"] and np.bincount(labels).tolist() == [5, 3]


def test_probe_dataset_needs_two_classes():
    pairs = function_pairs([{"source": "a/m.py", "text": SOURCE}])
    with pytest.raises(ValueError, match="fewer than 2 packages"):
        probe_dataset(pairs, n_classes=3, min_per_class=1, max_per_class=5)


def test_heldout_next_token_loss_is_the_causal_lm_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    batch = {"tokens": torch.randint(0, 30, (3, 9))}
    expected, _ = CausalLM()(model.eval(), batch, torch.Generator())
    assert math.isclose(heldout_next_token_loss(model, [batch]), float(expected.detach()), rel_tol=1e-6)


def test_first_last_pooling_concatenates_two_unit_vectors():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    e = embed(model, torch.tensor([[5, 6, 0], [7, 8, 9]]), pad_id=0, mask="causal")
    assert e.shape == (2, 32) and np.allclose(np.linalg.norm(e[:, :16], axis=1), 1) and np.allclose(
        np.linalg.norm(e[:, 16:], axis=1), 1)


def test_flops_of_a_mixture_are_the_weighted_flops_of_its_components():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=16))
    batch = {"tokens": torch.randint(4, 30, (2, 9))}
    clm, mlm = CausalLM(), MaskedLM(2, 30)
    f_clm, f_mlm = training_flops_per_batch(model, clm, batch), training_flops_per_batch(model, mlm, batch)
    mix = Mixture({"clm": clm, "mlm": mlm}, {"clm": 3.0, "mlm": 1.0})
    assert f_clm > 0 and math.isclose(training_flops_per_batch(model, mix, batch), 0.75 * f_clm + 0.25 * f_mlm)


def test_flops_count_the_attention_kernel():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=64))
    short, long = ({"tokens": torch.randint(4, 30, (1, n + 1))} for n in (16, 64))
    per_token = [training_flops_per_batch(model, CausalLM(), b) / (b["tokens"].shape[1] - 1) for b in (short, long)]
    assert per_token[1] > per_token[0]  # attention's cost per token grows with the sequence


def test_run_config_picks_the_embedding_read_that_the_objective_trained():
    assert ObjectivesRunConfig.resolve("smoke", objective="clm").embedding_mask() == "causal"
    assert ObjectivesRunConfig.resolve("smoke", objective="mlm").embedding_mask() == "bidirectional"
    assert ObjectivesRunConfig.resolve("smoke", objective="biphasic").embedding_mask() == "bidirectional"
    assert not ObjectivesRunConfig.resolve("smoke", objective="mlm").predicts_next_token()


def test_whitened_retrieval_does_not_depend_on_a_linear_change_of_basis():
    rng = np.random.default_rng(0)
    queries, targets = rng.normal(size=(30, 6)), rng.normal(size=(30, 6))
    basis = rng.normal(size=(6, 6))
    assert math.isclose(retrieval_scores(queries, targets)["mrr"], retrieval_scores(queries @ basis, targets @ basis)["mrr"],
                        rel_tol=1e-9)
