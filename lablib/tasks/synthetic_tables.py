"""Seeded binary classification tables on which tabular methods differ, generated with scikit-learn.

Notable here:
- `FAMILIES` is a table of generators (one row per family): `make_classification` with
  few informative, some redundant and many noise features and flipped labels; XOR of the
  signs of two features among noise features; two moons and two circles with noise,
  padded with noise features. Each returns (X, y) for a number of rows and a seed.
- Every table has a small training part (`SIZES`: 16 to 64 rows, stratified, both classes
  present) and a larger held-out part, so ROC AUC on it is measured on many rows while the
  methods learn from few.
- A table is named `family/n<train rows>/<index>`; its seed is a SHA-256 hash of that name
  (the same table in every process), and its dev / test split is `lablib.evidence.split_of`
  of the name: dev tables are for choosing hyper-parameters, test tables are reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.datasets import make_circles, make_classification, make_moons
from sklearn.model_selection import train_test_split

from lablib.evidence import split_of

SIZES = (16, 32, 64)  # training rows of a table (the small-n regimes)
TEST_ROWS = 256  # held-out rows of every table
DEV_FRACTION = 0.5


def _noise_features(rng: np.random.Generator, X: np.ndarray, n_noise: int) -> np.ndarray:
    """X with n_noise standard-normal columns appended, then the columns in a random order."""
    X = np.concatenate([X, rng.normal(size=(len(X), n_noise))], axis=1)
    return X[:, rng.permutation(X.shape[1])]


def _flip(rng: np.random.Generator, y: np.ndarray, fraction: float) -> np.ndarray:
    flip = rng.random(len(y)) < fraction
    return np.where(flip, 1 - y, y)


def _linear_noisy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # 3 informative and 2 redundant (linear combinations of them) among 10 features, 2 clusters per class
    return make_classification(n_samples=n, n_features=10, n_informative=3, n_redundant=2, n_repeated=0,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.1, random_state=seed)


def _xor(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # the class is the parity of two features' signs: no single feature and no hyperplane separates it
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)
    return _noise_features(rng, X, 4), _flip(rng, y, 0.05)


def _moons(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X, y = make_moons(n_samples=n, noise=0.3, random_state=seed)
    return _noise_features(rng, X, 3), y


def _circles(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X, y = make_circles(n_samples=n, noise=0.1, factor=0.5, random_state=seed)
    return _noise_features(rng, X, 3), y


FAMILIES: dict[str, Callable[[int, int], tuple[np.ndarray, np.ndarray]]] = {
    "linear_noisy": _linear_noisy,  # make_classification: informative, redundant and noise features, 10% flipped
    "xor": _xor,  # sign parity of 2 features among 6, 5% flipped
    "moons": _moons,  # two moons (noise 0.3) among 5 features
    "circles": _circles,  # two circles (noise 0.1, radius ratio 0.5) among 5 features
}


@dataclass(frozen=True)
class Table:
    family: str
    n_train: int
    index: int
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def key(self) -> str:
        return table_key(self.family, self.n_train, self.index)

    @property
    def split(self) -> str:
        return split_of(self.key, DEV_FRACTION)


def table_key(family: str, n_train: int, index: int) -> str:
    return f"{family}/n{n_train}/{index}"


def table_seed(key: str) -> int:
    """A 32-bit seed for scikit-learn and numpy, a function of the table's name only."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big")


def make_table(family: str, n_train: int, index: int, test_rows: int = TEST_ROWS) -> Table:
    """One table: `n_train` stratified training rows (both classes present) and `test_rows` held out."""
    if family not in FAMILIES:
        raise ValueError(f"table family: expected one of {', '.join(FAMILIES)}, got {family!r}")
    if n_train < 4 or test_rows < 4:
        raise ValueError(f"table sizes: expected n_train >= 4 and test_rows >= 4, got {n_train} and {test_rows}")
    seed = table_seed(table_key(family, n_train, index))
    X, y = FAMILIES[family](n_train + test_rows, seed)
    X_train, X_test, y_train, y_test = train_test_split(X, y, train_size=n_train, stratify=y, random_state=seed % 2**31)
    return Table(family, n_train, index, X_train, y_train, X_test, y_test)


def make_tables(families: list[str] | tuple[str, ...] = tuple(FAMILIES), sizes: tuple[int, ...] = SIZES,
                per_cell: int = 10, test_rows: int = TEST_ROWS) -> list[Table]:
    """`per_cell` tables for every (family, training size), in a fixed order."""
    return [make_table(f, n, i, test_rows) for f in families for n in sizes for i in range(per_cell)]
