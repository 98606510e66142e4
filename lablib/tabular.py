"""In-context tabular classification: a prior-data fitted network (TabPFN) from the lab's blocks.

Notable here:
- `TabularPFN` is `lablib.models.Transformer` with no positional encoding, fed
  ready-made row embeddings: a linear encoder of a row's features plus the
  embedding of its label. Labels are the transformer's tokens: ids 0..max_classes-1
  are classes and id `max_classes` means "label hidden", so a query row carries the
  same features-only embedding whatever its true label; the transformer's own head
  gives the class logits.
- One custom attention mask (True = may attend) does the in-context learning:
  every row attends to the training rows only, so training rows see each other and
  a query row sees the training rows and nothing else; no query row sees another
  query row or any label but the training rows'. Hook points keep their dotted names
  under `transformer.` (e.g. `transformer.blocks.0.attn.hook_pattern`).
- A variable number of features (zero-padded up to `max_features`, rescaled by
  max_features / used as in TabPFN) and of classes (logits of absent classes masked).
- `InContextClassification` is the training objective (cross-entropy on the query
  rows of prior tasks) for `lablib.train.train`.
- `InContextClassifier` is a scikit-learn classifier built from a run folder or a
  model: `fit` only stores the (preprocessed) context, `predict_proba` is one forward
  pass whose batch holds an ensemble of feature orders and class relabelings.
  Preprocessing lives inside it: scaling fitted on the context, clipping, feature
  subsampling (more features than the model takes) or padding, class remapping.
- `TabularICLConfig` is the config of notebooks/04_tabular_icl.ipynb; `table_split`,
  `BASELINES`, `score_method`, `evaluate_on_tables` and `many_shot_curve` are its
  evaluation: scikit-learn's own tables, stratified splits, ROC AUC (one-vs-one for
  several classes, as in the TabPFN paper), accuracy and fit+predict seconds.
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

from lablib.config import ConfigError, ModelConfig, TrainConfig, knob
from lablib.models import Transformer, register_model
from lablib.tasks.scm_prior import FEATURE_CLIP, TabularPrior
from lablib.train import TrainResult, policy_record, resolve_hardware, train


@dataclass
class TabularPFNConfig(ModelConfig):
    """The transformer knobs plus the largest table the network takes."""

    max_features: int = knob(16, "features per row the network takes (fewer are zero-padded)", min=1)
    max_classes: int = knob(10, "classes the network can tell apart", min=2)
    vocab_size: int = knob(11, "label tokens: max_classes classes + 1 'label hidden' (set from max_classes)", min=3)
    mask: Literal["causal", "prefix", "bidirectional", "custom"] = knob("custom", "rows attend to training rows only")
    pos: Literal["learned", "sinusoidal", "rope", "none"] = knob("none", "rows are a set: no positions")
    tie_embeddings: bool = knob(False, "label embeddings and class head are separate, as in TabPFN")

    def __post_init__(self):
        self.vocab_size = self.max_classes + 1


@register_model
class TabularPFN(nn.Module):
    """Rows in, class logits out: (B, N, F) features and (B, N) labels -> (B, N, max_classes)."""

    config_class = TabularPFNConfig

    def __init__(self, cfg: TabularPFNConfig):
        super().__init__()
        self.cfg = cfg
        self.row_encoder = nn.Linear(cfg.max_features, cfg.d_model)
        self.transformer = Transformer(cfg)
        self.hidden_label = cfg.max_classes  # the token of a row whose label the model may not see

    def attention_mask(self, n_rows: int, n_train: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n_rows, n_rows) boolean, True = may attend: every row attends to the training rows only."""
        keys = torch.arange(n_rows, device=device) < n_train
        return keys[None, :].expand(n_rows, n_rows)

    def embed_rows(self, x: torch.Tensor, y: torch.Tensor, n_train: int,
                   n_features: torch.Tensor | None = None) -> torch.Tensor:
        B, N, F_in = x.shape
        if F_in > self.cfg.max_features:
            raise ValueError(f"x has {F_in} features; this model takes at most max_features={self.cfg.max_features}")
        used = torch.full((B,), F_in, device=x.device) if n_features is None else n_features.to(x.device)
        x = F.pad(x, (0, self.cfg.max_features - F_in)) * (self.cfg.max_features / used.clamp(min=1))[:, None, None]
        is_query = torch.arange(N, device=x.device)[None, :] >= n_train
        tokens = torch.where(is_query, torch.full_like(y, self.hidden_label), y)  # query labels never enter
        return self.row_encoder(x) + self.transformer.embed(tokens)

    def forward(self, x: torch.Tensor, y: torch.Tensor, n_train: int | torch.Tensor,
                n_features: torch.Tensor | None = None, n_classes: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits for every row (B, N, max_classes); classes >= n_classes (per task) get -inf.

        x: (B, N, F<=max_features) standardised features; y: (B, N) labels, of which only
        the first n_train rows' are read; n_features: (B,) features actually used when x
        is zero-padded per task.
        """
        n_train = int(n_train)
        h = self.transformer.trunk(embeds=self.embed_rows(x, y, n_train, n_features),
                                   attn_mask=self.attention_mask(x.shape[1], n_train, x.device))
        logits = self.transformer.head(h)[..., : self.cfg.max_classes]
        if n_classes is not None:
            absent = torch.arange(self.cfg.max_classes, device=x.device)[None, :] >= n_classes.to(x.device)[:, None]
            logits = logits.masked_fill(absent[:, None, :], float("-inf"))
        return logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per row (the training loop's 'token'); see Transformer.flops_per_token."""
        return self.transformer.flops_per_token(seq_len) + 6 * self.row_encoder.weight.numel()


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

    presets: ClassVar[dict] = {
        # seconds: plumbing only
        "smoke": dict(n_layer=1, n_head=2, d_model=32, max_features=8, max_classes=10, seq_len=64, batch_size=4,
                      steps=10, warmup_steps=2, log_every=5, eval_every=5, eval_batches=1, checkpoint_every=10,
                      datasets=["iris", "wine"], n_splits=1, n_ensemble=2, curve_max_rows=32, curve_repeats=1,
                      compare_prior="mlp"),
        # minutes on 2 cores: pretraining of both priors and the evaluation well within 30 minutes
        "cpu": dict(n_layer=4, n_head=4, d_model=64, max_features=16, max_classes=10, seq_len=128, batch_size=16,
                    steps=2000, warmup_steps=100, learning_rate=2e-3, log_every=25, eval_every=250, eval_batches=4,
                    checkpoint_every=500,
                    num_threads=1),  # at width 64 a second thread mostly waits (and wastes a shared machine)
        # closer to TabPFN (12 layers, width 512, 1024 rows, 100 features; about 20 hours on 8 GPUs there)
        "gpu": dict(n_layer=12, n_head=8, d_model=512, max_features=32, max_classes=10, seq_len=1024, batch_size=64,
                    steps=20000, warmup_steps=500, learning_rate=3e-4, log_every=50, eval_every=1000, eval_batches=8,
                    checkpoint_every=2000, n_ensemble=16),
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

    def prior_source(self, kind: str) -> TabularPrior:
        return TabularPrior(kind=kind, n_rows=self.seq_len, max_features=self.max_features,
                            max_classes=self.max_classes)


def build_pfn(cfg: TabularICLConfig) -> TabularPFN:
    torch.manual_seed(cfg.seed)
    return TabularPFN(cfg.project(TabularPFNConfig))


@dataclass
class Pretrained:
    kind: str
    model: TabularPFN
    result: TrainResult
    folder: Path


def pretrain_pfn(cfg: TabularICLConfig, folder: str | Path, kind: str, progress: bool = True) -> Pretrained:
    """Train a PFN on prior `kind` into `folder` (a run folder; resumes from its newest checkpoint).

    Held-out loss is measured on fixed prior batches drawn with another seed than training's.
    """
    from lablib.runs import Run

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prior = cfg.prior_source(kind)
    val = [prior.batch(i, cfg.batch_size, seed=cfg.seed + 1_000) for i in range(cfg.eval_batches)]
    model = build_pfn(cfg)
    result = train(model, InContextClassification(), prior, cfg.project(TrainConfig), Run(folder), val=val,
                   progress=progress)
    return Pretrained(kind, model.eval(), result, folder)


def prior_throughput(prior: TabularPrior, batch_size: int, batches: int = 20, seed: int = 0) -> float:
    """Prior tasks generated per second in this process (after one warm-up batch)."""
    prior.batch(0, batch_size, seed)
    start = time.perf_counter()
    for i in range(1, batches + 1):
        prior.batch(i, batch_size, seed)
    return batches * batch_size / (time.perf_counter() - start)


def hardware_record(cfg: TabularICLConfig) -> dict:
    return policy_record(resolve_hardware(cfg.project(TrainConfig)))


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
