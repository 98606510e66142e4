"""The tabular prior, the PFN's attention mask and the scikit-learn classifier (lablib.experiments.tabular_icl)."""

import atexit
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from lablib.checkpoints import save_checkpoint
from lablib.config import ConfigError, TrainConfig
from lablib.runs import create_run
from lablib.experiments.tabular_icl import InContextClassification, InContextClassifier, TabularICLConfig, build_pfn
from lablib.models import TabularPFN, TabularPFNConfig
from lablib.tasks.scm_prior import TabularPrior
from lablib.train import train


def tiny_pfn(seed: int = 0, max_features: int = 6, max_classes: int = 4) -> TabularPFN:
    torch.manual_seed(seed)
    return TabularPFN(TabularPFNConfig(n_layer=2, n_head=2, d_model=16, max_features=max_features,
                                       max_classes=max_classes)).eval()


def rows(n_rows=12, n_features=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((1, n_rows, n_features), generator=gen), torch.randint(0, 3, (1, n_rows), generator=gen)


# --- the prior ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["scm", "mlp"])
def test_prior_batch_is_a_pure_function_of_index_and_seed(kind):
    prior = TabularPrior(kind=kind, n_rows=64, max_features=8, max_classes=5)
    first, again, other = prior.batch(3, 4, seed=1), prior.batch(3, 4, seed=1), prior.batch(4, 4, seed=1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["x"], other["x"])


@pytest.mark.parametrize("kind", ["scm", "mlp"])
def test_prior_labels_and_padding_respect_each_tasks_sizes(kind):
    prior = TabularPrior(kind=kind, n_rows=64, max_features=8, max_classes=5)
    batch = prior.batch(0, 16, seed=0)
    assert batch["x"].shape == (16, 64, 8) and batch["y"].shape == (16, 64)
    assert bool((batch["y"] < batch["n_classes"][:, None]).all())
    padded = torch.arange(8)[None, :] >= batch["n_features"][:, None]  # (B, F)
    assert bool((batch["x"].abs().sum(1)[padded] == 0).all())
    assert torch.isfinite(batch["x"]).all()


def test_prior_refuses_too_few_rows():
    with pytest.raises(ValueError, match="n_rows"):
        TabularPrior(n_rows=10)


# --- the attention mask: what a query row can see ---------------------------------------------

@torch.no_grad()
def test_perturbing_one_query_row_leaves_every_other_row_unchanged():
    model, (x, y) = tiny_pfn(), rows()
    n_train, victim = 6, 9
    before = model(x, y, n_train)
    x2 = x.clone()
    x2[0, victim] += 5.0
    after = model(x2, y, n_train)
    others = [i for i in range(x.shape[1]) if i != victim]
    torch.testing.assert_close(after[0, others], before[0, others], rtol=0, atol=1e-6)
    assert not torch.allclose(after[0, victim], before[0, victim])


@torch.no_grad()
def test_query_labels_are_never_visible():
    model, (x, y) = tiny_pfn(), rows()
    n_train = 6
    y2 = y.clone()
    y2[0, n_train:] = (y2[0, n_train:] + 1) % 3
    torch.testing.assert_close(model(x, y2, n_train), model(x, y, n_train), rtol=0, atol=0)


@torch.no_grad()
def test_training_labels_are_read():
    model, (x, y) = tiny_pfn(), rows()
    n_train = 6
    y2 = y.clone()
    y2[0, 0] = (y2[0, 0] + 1) % 3
    assert not torch.allclose(model(x, y2, n_train)[0, n_train:], model(x, y, n_train)[0, n_train:])


# --- the objective and the run folder --------------------------------------------------------------

def tiny_config(**overrides) -> TabularICLConfig:
    return TabularICLConfig.resolve("smoke", n_layer=1, d_model=16, n_head=2, max_features=6, max_classes=10,
                                    seq_len=32, batch_size=2, steps=2, warmup_steps=1, checkpoint_every=2,
                                    device="cpu", **overrides)


def test_objective_scores_query_rows_only():
    cfg = tiny_config()
    batch = cfg.prior_source("scm").batch(0, 2, seed=0)
    loss, metrics = InContextClassification()(build_pfn(cfg), batch, torch.Generator())
    assert torch.isfinite(loss)
    assert metrics["tokens_scored"] == 2 * (32 - int(batch["n_train"]))


def test_classifier_rebuilds_the_model_from_its_run_folder(tmp_path):
    cfg = tiny_config()
    run = create_run("tabular_icl_test", cfg.to_dict(), tmp_path / "run")
    model = build_pfn(cfg)
    train(model, InContextClassification(), cfg.prior_source("scm"), cfg.project(TrainConfig), run, progress=False)
    X, y = np.random.default_rng(0).normal(size=(30, 4)), np.arange(30) % 3
    from_folder = InContextClassifier(run.path).fit(X[:20], y[:20]).predict_proba(X[20:])
    in_memory = InContextClassifier(model).fit(X[:20], y[:20]).predict_proba(X[20:])
    np.testing.assert_allclose(from_folder, in_memory, rtol=0, atol=1e-6)


# --- the scikit-learn classifier -------------------------------------------------------------------

def test_classifier_subsamples_features_and_remaps_classes():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 11)), np.array(["cat", "dog", "eel", "fox"] * 10)  # 11 features > max_features=6
    clf = InContextClassifier(tiny_pfn(), n_ensemble=3).fit(X[:30], y[:30])
    proba = clf.predict_proba(X[30:])
    assert proba.shape == (10, 4)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert set(clf.predict(X[30:])) <= {"cat", "dog", "eel", "fox"}
    assert clf.feature_orders_.shape == (3, 6)


def test_classifier_refuses_more_classes_than_the_model_has():
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 5
    with pytest.raises(ValueError, match="at most 4"):
        InContextClassifier(tiny_pfn()).fit(X, y)


@pytest.mark.parametrize("bad", [{"n_ensemble": 0}, {"scaling": "minmax"}, {"model": None}])
def test_classifier_names_a_bad_parameter(bad):
    name = next(iter(bad))
    params = {"model": tiny_pfn(), **bad}
    with pytest.raises(ValueError, match=name):
        InContextClassifier(**params).fit(np.zeros((4, 2)), [0, 1, 0, 1])


def test_config_refuses_unknown_datasets():
    with pytest.raises(ConfigError, match="datasets"):
        TabularICLConfig.resolve("smoke", datasets=["titanic"])


def untrained_run_folder() -> str:
    """A run folder holding an untrained tiny PFN: a path is a plain, hashable estimator parameter
    (a torch module is not: two deep copies pickle, and so hash, differently)."""
    folder = Path(tempfile.mkdtemp(prefix="lablib-tabular-test-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    run = create_run("tabular_icl_test", {}, folder)
    model = tiny_pfn(max_classes=10)
    run.save_model_spec(model)
    save_checkpoint(run.path, 0, model)
    return str(run.path)


# Accuracy on scikit-learn's blob problem needs a pretrained model; an untrained one guesses.
# The notebook measures accuracy of a pretrained model on real tables.
EXPECTED_FAILURES = {
    "check_classifiers_train": "needs a pretrained model to beat 83% accuracy; measured in notebooks/04_tabular_icl",
}


@parametrize_with_checks([InContextClassifier(untrained_run_folder(), n_ensemble=2)],
                         expected_failed_checks=lambda est: EXPECTED_FAILURES)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)
