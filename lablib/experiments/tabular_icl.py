"""The tabular in-context-learning experiment (notebooks/04_tabular_icl.ipynb): a prior-data fitted
network (TabPFN, `lablib.models.TabularPFN`) pretrained on a synthetic prior, used as a classifier.

Notable here:
- `InContextClassification` is the training objective (cross-entropy on the query
  rows of prior tasks) for `lablib.train.train`.
- `InContextClassifier` is a scikit-learn classifier built from a run folder or a
  model: `fit` only stores the (preprocessed) context, `predict_proba` is one forward
  pass whose batch holds an ensemble of feature orders and class relabelings.
  Preprocessing lives inside it: scaling fitted on the context, clipping, feature
  subsampling (more features than the model takes) or padding, class remapping.
- `TabularICLConfig` is the config of notebooks/04_tabular_icl.ipynb; `pretrain_pfn` trains
  one PFN per prior and seed and keeps its untrained copy (the step-0 baseline).
- The comparison runs on the harder synthetic tables of `lablib.tasks.synthetic_tables`:
  `TUNED_GRIDS` (logistic regression's C, k-NN's k, forest and boosting depth) and the
  in-context classifier's scaling are chosen per family on dev tables only
  (`evaluate_tuned`, `choose_on_dev`), then scored on test tables; `OneFeatureRule` is the
  strongest trivial rule; `comparison` gives paired ROC AUC differences (over tables and
  over seeds, `lablib.evidence`) and win/tie/loss counts.
- `table_split`, `BASELINES` (untuned defaults), `evaluate_on_tables` and `many_shot_curve`
  are the sanity check on scikit-learn's real tables, where every method is near the
  ceiling; `score_method` is ROC AUC (one-vs-one for several classes, as in the TabPFN
  paper), accuracy and fit+predict seconds of one fresh classifier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import PowerTransformer, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from lablib.config import ConfigError, TrainConfig, knob
from lablib.models import TabularPFN, TabularPFNConfig
from lablib.seeding import seeded_model
from lablib.tasks.scm_prior import FEATURE_CLIP, TabularPrior
from lablib.tasks.synthetic_tables import FAMILIES, SIZES, TEST_ROWS
from lablib.train import TrainResult, train


@dataclass
class InContextClassification:
    """Cross-entropy on the query rows of prior tasks: the PFN's training objective."""

    name: str = "icl_classification"

    def __call__(self, model, batch, generator):
        n_train = int(batch["n_train"])
        logits = model(batch["x"], batch["y"], n_train, n_features=batch["n_features"], n_classes=batch["n_classes"])
        query_logits, query_labels = logits[:, n_train:].float(), batch["y"][:, n_train:]
        loss = F.cross_entropy(query_logits.reshape(-1, query_logits.shape[-1]), query_labels.reshape(-1))
        accuracy = (query_logits.argmax(-1) == query_labels).float().mean()
        return loss, {"tokens_scored": query_labels.numel(), "query_accuracy": float(accuracy)}


# --- the scikit-learn classifier ---------------------------------------------------------

SCALERS = {  # a transform applied before standardising (None: standardise only)
    "standard": lambda: None,
    "power": lambda: PowerTransformer(method="yeo-johnson", standardize=False),
}


def load_pfn(source: Any, step: int | None = None, device: str = "cpu") -> TabularPFN:
    """A TabularPFN from a model object, a `Run`, or a run folder path (its checkpoint `step`, default latest)."""
    from lablib.runs import Run, open_run

    if isinstance(source, TabularPFN):
        return source.to(device).eval()
    if isinstance(source, (str, Path, Run)):
        run = source if isinstance(source, Run) else open_run(source)
        model, _ = run.load_model(step, device=device)
        if not isinstance(model, TabularPFN):
            raise ValueError(f"run {run.path} holds a {type(model).__name__}, expected a TabularPFN")
        return model
    raise ValueError(f"model: expected a TabularPFN, a Run or a run folder path, got {type(source).__name__}")


class InContextClassifier(ClassifierMixin, BaseEstimator):
    """Classify with a pretrained TabularPFN: no gradient step, the training set is the context.

    model: a TabularPFN, a `lablib.runs.Run` or a run folder path; step: its checkpoint
    (None: the latest). n_ensemble: members of one batched forward pass, each with its
    own feature order (and subset, when the table has more than max_features columns)
    and class relabeling; their probabilities are averaged. scaling: 'power'
    (Yeo-Johnson, as in TabPFN's ensembles) or 'standard'; fitted on the context only.
    """

    def __init__(self, model: Any = None, step: int | None = None, n_ensemble: int = 4,
                 scaling: str = "power", random_state: int = 0, device: str = "cpu"):
        self.model = model
        self.step = step
        self.n_ensemble = n_ensemble
        self.scaling = scaling
        self.random_state = random_state
        self.device = device

    def _check_params(self) -> None:
        if self.model is None:
            raise ValueError("model: expected a TabularPFN, a Run or a run folder path, got None")
        if not (isinstance(self.n_ensemble, int) and self.n_ensemble >= 1):
            raise ValueError(f"n_ensemble: expected an integer >= 1, got {self.n_ensemble!r}")
        if self.scaling not in SCALERS:
            raise ValueError(f"scaling: expected one of {', '.join(SCALERS)}, got {self.scaling!r}")

    def fit(self, X, y):
        """Store the context: scaler fitted on X, classes remapped to 0..k-1, ensemble layouts drawn."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, y_encoded = np.unique(y, return_inverse=True)
        self.model_ = load_pfn(self.model, self.step, self.device)
        max_features, max_classes = self.model_.cfg.max_features, self.model_.cfg.max_classes
        if len(self.classes_) > max_classes:
            raise ValueError(f"y has {len(self.classes_)} classes; this model tells apart at most {max_classes}")
        self.transform_ = SCALERS[self.scaling]()
        if self.transform_ is not None:
            self.transform_.fit(X)
        self.scaler_ = StandardScaler().fit(self._transform(X))
        self.context_x_ = self._scale(X)
        self.context_y_ = y_encoded
        rng = np.random.default_rng(self.random_state)
        n_used = min(self.n_features_in_, max_features)
        k = len(self.classes_)
        self.feature_orders_ = np.stack([rng.permutation(self.n_features_in_)[:n_used] for _ in range(self.n_ensemble)])
        self.class_maps_ = np.stack([rng.permutation(k) for _ in range(self.n_ensemble)])  # member's id of class c
        return self

    def _transform(self, X: np.ndarray) -> np.ndarray:
        """The power transform, kept finite: a lambda fitted on a few rows can overflow on new ones."""
        if self.transform_ is None:
            return X
        with np.errstate(all="ignore"):
            out = self.transform_.transform(X)
        return np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)

    def _scale(self, X: np.ndarray) -> np.ndarray:
        """Standardised with the context's statistics and clipped like the prior's features."""
        return np.clip(self.scaler_.transform(self._transform(X)), -FEATURE_CLIP, FEATURE_CLIP)

    @torch.no_grad()
    def predict_proba(self, X) -> np.ndarray:
        """(n_samples, n_classes) probabilities from one forward pass over context + queries."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        k = len(self.classes_)
        if k == 1:
            return np.ones((X.shape[0], 1))
        rows = np.concatenate([self.context_x_, self._scale(X)])  # (N, F)
        x = torch.as_tensor(rows[:, self.feature_orders_], dtype=torch.float32).permute(1, 0, 2)  # (E, N, F_used)
        labels = np.concatenate([self.class_maps_[:, self.context_y_], np.zeros((self.n_ensemble, X.shape[0]), int)], 1)
        y = torch.as_tensor(labels, dtype=torch.long)
        n_train = len(self.context_y_)
        logits = self.model_(x.to(self.device), y.to(self.device), n_train)[:, n_train:, :k].float()
        probs = torch.softmax(logits, -1).cpu().numpy()  # (E, n_queries, k) in each member's class ids
        members = [probs[m][:, self.class_maps_[m]] for m in range(self.n_ensemble)]  # back to original order
        return np.mean(members, axis=0)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]


# --- the experiment's config -------------------------------------------------------------

DATASETS = ("breast_cancer", "iris", "wine", "digits")


@dataclass
class TabularICLConfig(TabularPFNConfig, TrainConfig):
    """notebooks/04_tabular_icl.ipynb: pretrain a PFN on a prior, evaluate on scikit-learn's tables."""

    prior: Literal["scm", "mlp"] = knob("scm", "prior of the main model")
    compare_prior: Literal["scm", "mlp", "none"] = knob("mlp", "second prior to pretrain for comparison ('none': skip)")
    datasets: list[str] = knob(list(DATASETS), "scikit-learn tables to evaluate on")
    digits_features: int = knob(8, "digits: PCA components kept (fitted on each split's training rows)", min=1)
    n_splits: int = knob(5, "random stratified train/test splits per table", min=1)
    test_fraction: float = knob(0.5, "fraction of each table held out for testing", min=0.0, max=1.0,
                                min_exclusive=True)
    n_ensemble: int = knob(4, "feature-order / class-relabel members in the classifier's forward pass", min=1)
    scaling: Literal["power", "standard"] = knob("power", "the classifier's feature scaling")
    curve_max_rows: int = knob(1024, "largest context in the many-shot curve (powers of 2 from 8)", min=8)
    curve_test_fraction: float = knob(0.25, "many-shot curve: held-out fraction (small, so digits reaches 1024 rows)",
                                      min=0.0, max=1.0, min_exclusive=True)
    curve_repeats: int = knob(3, "random contexts per point of the many-shot curve", min=1)
    seeds: list[int] = knob([0, 1, 2], "pretraining seeds (initialisation and prior draws) of every PFN")
    table_families: list[str] = knob(list(FAMILIES), "families of the harder synthetic tables")
    table_sizes: list[int] = knob(list(SIZES), "training rows of the harder tables (small-n regimes)")
    tables_per_cell: int = knob(10, "harder tables per (family, training rows), split into dev and test", min=1)
    table_test_rows: int = knob(TEST_ROWS, "held-out rows of every harder table", min=4)
    tie_margin: float = knob(0.01, "win/tie/loss: a table is a tie when |ROC AUC difference| < this", min=0.0)

    presets: ClassVar[dict] = {
        # seconds: plumbing only
        "smoke": dict(n_layer=1, n_head=2, d_model=32, max_features=8, max_classes=10, seq_len=64, batch_size=4,
                      steps=10, warmup_steps=2, log_every=5, eval_every=5, eval_batches=1, checkpoint_every=10,
                      datasets=["iris", "wine"], n_splits=1, n_ensemble=2, curve_max_rows=32, curve_repeats=1,
                      compare_prior="mlp", seeds=[0, 1], table_sizes=[16, 32], tables_per_cell=2, table_test_rows=64),
        # one core: 3 seeds x 2 priors of pretraining and every evaluation in about 20 minutes
        "cpu": dict(n_layer=4, n_head=4, d_model=64, max_features=16, max_classes=10, seq_len=128, batch_size=16,
                    steps=1500, warmup_steps=100, learning_rate=2e-3, log_every=25, eval_every=250, eval_batches=4,
                    checkpoint_every=500,
                    num_threads=1),  # at width 64 a second thread mostly waits (and wastes a shared machine)
        # closer to TabPFN (12 layers, width 512, 1024 rows, 100 features; about 20 hours on 8 GPUs there)
        "gpu": dict(n_layer=12, n_head=8, d_model=512, max_features=32, max_classes=10, seq_len=1024, batch_size=64,
                    steps=20000, warmup_steps=500, learning_rate=3e-4, log_every=50, eval_every=1000, eval_batches=8,
                    checkpoint_every=2000, n_ensemble=16, seeds=[0, 1, 2, 3, 4], tables_per_cell=20),
    }

    def validate(self) -> None:
        super().validate()
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ConfigError(f"parameter 'datasets': expected a non-empty list from {', '.join(DATASETS)}, "
                              f"got {self.datasets!r}")
        if "digits" in self.datasets and self.max_classes < 10:
            raise ConfigError(f"parameter 'max_classes': digits has 10 classes, expected >= 10, got {self.max_classes}")
        if self.seq_len < 32:
            raise ConfigError(f"parameter 'seq_len': rows per prior task, expected >= 32, got {self.seq_len}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"parameter 'seeds': expected distinct seeds, got {self.seeds}")
        unknown = [f for f in self.table_families if f not in FAMILIES]
        if unknown or not self.table_families:
            raise ConfigError(f"parameter 'table_families': expected a non-empty list from {', '.join(FAMILIES)}, "
                              f"got {self.table_families!r}")
        if not self.table_sizes or min(self.table_sizes) < 4:
            raise ConfigError(f"parameter 'table_sizes': expected training rows >= 4, got {self.table_sizes!r}")

    def prior_source(self, kind: str) -> TabularPrior:
        return TabularPrior(kind=kind, n_rows=self.seq_len, max_features=self.max_features,
                            max_classes=self.max_classes)


def build_pfn(cfg: TabularICLConfig, seed: int | None = None) -> TabularPFN:
    """The PFN of cfg's architecture, initialised from `seed` (default cfg.seed)."""
    return seeded_model(TabularPFN, cfg.project(TabularPFNConfig), cfg.seed if seed is None else seed)


@dataclass
class Pretrained:
    kind: str
    seed: int
    model: TabularPFN
    untrained: TabularPFN  # the same initialisation before any step (the step-0 baseline)
    result: TrainResult
    folder: Path


def pretrain_pfn(cfg: TabularICLConfig, folder: str | Path, kind: str, seed: int | None = None,
                 progress: bool = True) -> Pretrained:
    """Train a PFN on prior `kind` with `seed` (default cfg.seed) into `folder` (a run folder; resumes
    from its newest checkpoint).

    Held-out loss is measured on fixed prior batches drawn with another seed than training's.
    """
    import copy
    import dataclasses

    from lablib.runs import Run

    seed = cfg.seed if seed is None else seed
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prior = cfg.prior_source(kind)
    val = [prior.batch(i, cfg.batch_size, seed=seed + 1_000) for i in range(cfg.eval_batches)]
    model = build_pfn(cfg, seed)
    untrained = copy.deepcopy(model).eval()
    train_cfg = dataclasses.replace(cfg.project(TrainConfig), seed=seed)
    result = train(model, InContextClassification(), prior, train_cfg, Run(folder), val=val, progress=progress)
    return Pretrained(kind, seed, model.eval(), untrained, result, folder)


def prior_throughput(prior: TabularPrior, batch_size: int, batches: int = 20, seed: int = 0) -> float:
    """Prior tasks generated per second in this process (after one warm-up batch)."""
    prior.batch(0, batch_size, seed)
    start = time.perf_counter()
    for i in range(1, batches + 1):
        prior.batch(i, batch_size, seed)
    return batches * batch_size / (time.perf_counter() - start)


# --- evaluation on scikit-learn's tables ------------------------------------------------------

def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loaders = {"breast_cancer": datasets.load_breast_cancer, "iris": datasets.load_iris,
               "wine": datasets.load_wine, "digits": datasets.load_digits}
    data = loaders[name]()
    return data.data.astype(np.float64), data.target


def table_split(name: str, split: int, test_fraction: float, digits_features: int = 8, train_rows: int | None = None):
    """(X_train, X_test, y_train, y_test) of a stratified split; digits is reduced by PCA fitted on X_train.

    train_rows: keep only this many (stratified) training rows, for the many-shot curve.
    """
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    X, y = _load(name)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=test_fraction, stratify=y, random_state=split)
    if train_rows is not None and train_rows < len(y_train):
        stratify = y_train if train_rows >= len(np.unique(y_train)) else None
        X_train, _, y_train, _ = train_test_split(X_train, y_train, train_size=train_rows, stratify=stratify,
                                                  random_state=split)
    if name == "digits":
        pca = PCA(n_components=min(digits_features, len(y_train), X.shape[1]), random_state=0).fit(X_train)
        X_train, X_test = pca.transform(X_train), pca.transform(X_test)
    return X_train, X_test, y_train, y_test


def _scaled(model):
    from sklearn.pipeline import make_pipeline

    return make_pipeline(StandardScaler(), model)


def _baselines() -> dict[str, Any]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    return {  # scikit-learn's defaults, untuned (TabPFN's paper tuned its baselines for up to an hour)
        "logreg": lambda seed, n: _scaled(LogisticRegression(max_iter=2000)),
        "knn": lambda seed, n: _scaled(KNeighborsClassifier(n_neighbors=min(5, n))),
        "random_forest": lambda seed, n: RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1),
        "gradient_boosting": lambda seed, n: GradientBoostingClassifier(random_state=seed),
    }


BASELINES = _baselines()  # name -> make(seed, n_train_rows) -> a fresh scikit-learn classifier


def score_method(make, X_train, y_train, X_test, y_test, seed: int = 0) -> dict[str, float]:
    """ROC AUC, accuracy and wall seconds of fit + predict_proba for one fresh classifier."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    labels = np.unique(np.concatenate([y_train, y_test]))
    start = time.perf_counter()
    clf = make(seed, len(y_train)).fit(X_train, y_train)
    known = clf.predict_proba(X_test)
    seconds = time.perf_counter() - start
    proba = np.zeros((len(y_test), len(labels)))  # classes absent from a small context get probability 0
    proba[:, np.searchsorted(labels, clf.classes_)] = known
    auc = (roc_auc_score(y_test, proba[:, 1]) if len(labels) == 2 else
           roc_auc_score(y_test, proba, multi_class="ovo", labels=labels))
    return {"roc_auc": float(auc), "accuracy": float(accuracy_score(y_test, labels[proba.argmax(1)])),
            "seconds": float(seconds)}


def evaluate_on_tables(methods: dict[str, Any], datasets: list[str], n_splits: int, test_fraction: float,
                       digits_features: int, progress: bool = True) -> list[dict[str, Any]]:
    """One row per (dataset, split, method) with roc_auc, accuracy, seconds and the table's sizes."""
    from tqdm.auto import tqdm

    rows = []
    jobs = [(d, s) for d in datasets for s in range(n_splits)]
    for name, split in tqdm(jobs, desc="tables", disable=not progress):
        X_train, X_test, y_train, y_test = table_split(name, split, test_fraction, digits_features)
        for method, make in methods.items():
            scores = score_method(make, X_train, y_train, X_test, y_test, seed=split)
            rows.append({"dataset": name, "split": split, "method": method, **scores, "train_rows": len(y_train),
                         "test_rows": len(y_test), "features": X_train.shape[1]})
    return rows


def many_shot_curve(methods: dict[str, Any], datasets: list[str], max_rows: int, repeats: int, test_fraction: float,
                    digits_features: int, progress: bool = True) -> list[dict[str, Any]]:
    """Scores with 8, 16, ... context rows (as many as each table's training part allows), `repeats` draws each."""
    from tqdm.auto import tqdm

    jobs = []
    for name in datasets:
        available = len(_load(name)[1]) - int(np.ceil(len(_load(name)[1]) * test_fraction))
        sizes = [2 ** p for p in range(3, int(np.log2(max_rows)) + 1) if 2 ** p <= available]
        jobs += [(name, n, r) for n in sizes for r in range(repeats)]
    rows = []
    for name, n, repeat in tqdm(jobs, desc="many-shot", disable=not progress):
        X_train, X_test, y_train, y_test = table_split(name, repeat, test_fraction, digits_features, train_rows=n)
        for method, make in methods.items():
            rows.append({"dataset": name, "context_rows": n, "repeat": repeat, "method": method,
                         **score_method(make, X_train, y_train, X_test, y_test, seed=repeat)})
    return rows


# --- the harder synthetic tables: tuned baselines, choices on dev, paired differences ----------------

class OneFeatureRule(ClassifierMixin, BaseEstimator):
    """The strongest trivial rule of a binary table: score every row by the one feature (and sign)
    whose ROC AUC on the training rows is furthest from 0.5."""

    def fit(self, X, y):
        from sklearn.metrics import roc_auc_score

        X, y = validate_data(self, X, y, dtype=np.float64)
        self.classes_, y_encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) != 2:
            raise ValueError(f"OneFeatureRule: expected two classes, got {len(self.classes_)}")
        aucs = np.array([roc_auc_score(y_encoded, X[:, j]) for j in range(X.shape[1])])
        self.feature_ = int(np.argmax(np.abs(aucs - 0.5)))
        self.sign_ = 1.0 if aucs[self.feature_] >= 0.5 else -1.0
        return self

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        p = 1.0 / (1.0 + np.exp(-np.clip(self.sign_ * X[:, self.feature_], -50, 50)))  # monotone: AUC is the rule's
        return np.stack([1 - p, p], axis=1)

    def predict(self, X) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] > 0.5).astype(int)]


def _tuned_grids() -> dict[str, tuple[Any, list[dict[str, Any]]]]:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    return {  # name -> (make(seed, n_train_rows, **point), grid points); chosen per family on dev tables
        "logreg": (lambda seed, n, C: _scaled(LogisticRegression(C=C, max_iter=2000)),
                   [{"C": c} for c in (0.01, 0.1, 1.0, 10.0, 100.0)]),
        "knn": (lambda seed, n, k: _scaled(KNeighborsClassifier(n_neighbors=min(k, n))),
                [{"k": k} for k in (1, 3, 5, 9, 15)]),
        "random_forest": (lambda seed, n, max_depth: RandomForestClassifier(n_estimators=100, max_depth=max_depth,
                                                                            random_state=seed, n_jobs=1),
                          [{"max_depth": d} for d in (2, 4, None)]),
        "gradient_boosting": (lambda seed, n, max_depth: GradientBoostingClassifier(max_depth=max_depth,
                                                                                    random_state=seed),
                              [{"max_depth": d} for d in (1, 2, 3)]),
    }


TUNED_GRIDS = _tuned_grids()


def point_name(point: dict[str, Any]) -> str:
    """A grid point as text: 'C=0.1', 'max_depth=None', '' for no knobs."""
    return ",".join(f"{k}={v}" for k, v in point.items())


def score_tables(make, points: list[dict[str, Any]], tables, method: str, seed: int | None = None,
                 progress: bool = False) -> list[dict[str, Any]]:
    """One row per (table, grid point): the method's ROC AUC on the table's held-out rows.

    make(seed, n_train_rows, **point) builds a fresh classifier; seed None uses each table's own
    seed (deterministic baselines), an int is the model's seed (in-context models)."""
    from tqdm.auto import tqdm

    from lablib.tasks.synthetic_tables import table_seed

    rows = []
    for t in tqdm(tables, desc=method, disable=not progress):
        run_seed = table_seed(t.key) % 2**31 if seed is None else seed
        for point in points:
            scores = score_method(lambda s, n: make(s, n, **point), t.X_train, t.y_train, t.X_test, t.y_test,
                                  seed=run_seed)
            rows.append({"table": t.key, "family": t.family, "n_train": t.n_train, "split": t.split,
                         "method": method, "seed": seed, "point": point_name(point), **scores})
    return rows


def choose_on_dev(rows: list[dict[str, Any]], by: str = "family") -> dict[tuple[str, str], str]:
    """(method, family) -> the grid point with the highest mean ROC AUC over that family's dev tables.

    Only rows with split 'dev' are read; ties go to the point listed first."""
    means: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        if r["split"] == "dev":
            means.setdefault((r["method"], r[by]), {}).setdefault(r["point"], []).append(r["roc_auc"])
    if not means:
        raise ValueError("choose_on_dev: expected rows of dev tables, got none")
    return {cell: max(points, key=lambda p: (np.mean(points[p]), -list(points).index(p)))
            for cell, points in means.items()}


def evaluate_tuned(name: str, make, points: list[dict[str, Any]], tables, seed: int | None = None,
                   progress: bool = False) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Tune `points` on the dev tables (one choice per family), then score only the chosen point on
    the test tables. Returns (family -> chosen point, rows of the dev grid and of the test tables)."""
    dev = [t for t in tables if t.split == "dev"]
    test = [t for t in tables if t.split == "test"]
    dev_rows = score_tables(make, points, dev, name, seed, progress)
    chosen = {family: point for (_, family), point in choose_on_dev(dev_rows).items()}
    missing = sorted({t.family for t in test} - set(chosen))
    if missing:
        raise ValueError(f"{name}: no dev table of {', '.join(missing)} to choose its grid point on")
    by_name = {point_name(p): p for p in points}
    test_rows = []
    for family, point in chosen.items():
        test_rows += score_tables(make, [by_name[point]], [t for t in test if t.family == family], name, seed,
                                  progress)
    return chosen, dev_rows + test_rows


def per_table(rows: list[dict[str, Any]], method: str, split: str = "test") -> dict[str, float]:
    """table -> ROC AUC of `method` on `split`, averaged over its seeds (in-context models) if several."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == method and r["split"] == split:
            out.setdefault(r["table"], []).append(r["roc_auc"])
    return {t: float(np.mean(v)) for t, v in out.items()}


def win_tie_loss(a: dict[str, float], b: dict[str, float], margin: float) -> dict[str, int]:
    """Counts over the tables both score: a wins when a - b >= margin, loses when <= -margin, else a tie."""
    diffs = [a[t] - b[t] for t in sorted(set(a) & set(b))]
    tie = [abs(d) < margin or d == 0 for d in diffs]
    return {"wins": sum(d > 0 and not t for d, t in zip(diffs, tie)), "ties": sum(tie),
            "losses": sum(d < 0 and not t for d, t in zip(diffs, tie))}


def paired_comparison(a: dict[str, float], b: dict[str, float], margin: float) -> dict[str, Any]:
    """a minus b over the tables both score: the paired mean difference with its 95% t interval over
    tables (`lablib.evidence.paired_difference`) and the win/tie/loss counts."""
    from lablib.evidence import paired_difference

    return {"difference": paired_difference(a, b).to_dict(), **win_tie_loss(a, b, margin), "tie_margin": margin}


def family_means(rows: list[dict[str, Any]], method: str, seed: int | None, split: str = "test") -> dict[str, float]:
    """family -> mean ROC AUC of `method` (one seed of it) over the family's tables of `split`, plus 'all'."""
    picked = [r for r in rows if r["method"] == method and r["split"] == split and r["seed"] == seed]
    if not picked:
        raise ValueError(f"no {split} rows of method {method!r} with seed {seed!r}")
    out = {f: float(np.mean([r["roc_auc"] for r in picked if r["family"] == f]))
           for f in sorted({r["family"] for r in picked})}
    out["all"] = float(np.mean([r["roc_auc"] for r in picked]))
    return out


def comparison(rows: list[dict[str, Any]], model: str, seeds: list[int], references: dict[str, int | None],
               margin: float) -> list[dict[str, Any]]:
    """Rows (group, reference): `model` minus each reference on the test tables, per family and over all.

    references maps a method to its seed (None for deterministic baselines, "paired" for a model
    with the same seeds). Each row holds the model's mean ROC AUC over seeds (t interval), the
    reference's, the difference paired over tables (the model's seed-mean per table; t interval over
    tables) and paired over seeds (family means; t interval over seeds), and win/tie/loss over tables."""
    from lablib.evidence import mean_interval, paired_difference

    mine = {s: family_means(rows, model, s) for s in seeds}
    groups = list(mine[seeds[0]])
    out = []
    for ref, ref_seed in references.items():
        theirs = {s: family_means(rows, ref, s if ref_seed == "paired" else ref_seed) for s in seeds}
        for g in groups:
            in_group = lambda table: g == "all" or table.split("/")[0] == g  # noqa: E731
            a = {t: v for t, v in per_table(rows, model).items() if in_group(t)}
            b = {t: v for t, v in per_table(rows, ref).items() if in_group(t)}
            over_tables = paired_comparison(a, b, margin)
            out.append({"group": g, "reference": ref, "tables": len(set(a) & set(b)),
                        "model_roc_auc": mean_interval([mine[s][g] for s in seeds]).to_dict(),
                        "reference_roc_auc": mean_interval([theirs[s][g] for s in seeds]).to_dict(),
                        "difference_over_tables": over_tables["difference"],
                        "difference_over_seeds": paired_difference({s: mine[s][g] for s in seeds},
                                                                   {s: theirs[s][g] for s in seeds}).to_dict(),
                        **{k: over_tables[k] for k in ("wins", "ties", "losses", "tie_margin")}})
    return out


def icl_grid() -> list[dict[str, Any]]:
    """The in-context classifier's choices made on dev (per family, like the baselines'): its scaling."""
    return [{"scaling": s} for s in SCALERS]


def best_on_dev(rows: list[dict[str, Any]], chosen: dict[str, dict[str, str]]) -> str:
    """The baseline whose chosen grid points score the highest mean ROC AUC over all dev tables.

    chosen: method -> family -> its chosen point (from `evaluate_tuned`)."""
    def dev_mean(method: str) -> float:
        picked = [r["roc_auc"] for r in rows if r["method"] == method and r["split"] == "dev"
                  and r["point"] == chosen[method][r["family"]]]
        return float(np.mean(picked))

    return max(chosen, key=dev_mean)


def headline_over_seeds(metric: str, value: dict[int, float], references: dict[str, dict[int, float]],
                        trivial_rule: str, split: str = "test") -> dict[str, Any]:
    """The lab's headline (`lablib.evidence.aggregate_seeds`): value and each reference point (chance,
    untrained, trivial, then others) over seeds with 95% t intervals, and paired differences."""
    from lablib.evidence import Baselines, Headline, aggregate_seeds

    names = ("chance", "untrained", "trivial")
    per_seed = {s: Headline.of(metric, value[s], Baselines.of(*(references[n][s] for n in names), trivial_rule,
                                                             **{k: v[s] for k, v in references.items() if k not in names}),
                               split) for s in value}
    return aggregate_seeds(per_seed).to_dict()


def run_command(preset: str, parameters: dict[str, Any]) -> str:
    """The `lablib run` command line of notebooks/04_tabular_icl.ipynb with these parameters."""
    from lablib.report import lablib_run_command

    return lablib_run_command("notebooks/04_tabular_icl.ipynb", preset, parameters)
