"""A support vector machine over *sets of windows*: the multiple-instance member.

A recording is the set of its windows' feature vectors. Two recordings ``A`` and
``B`` are compared with the set kernel (the inner product of their kernel mean
embeddings)::

    K(A, B) = mean over a in A, b in B of exp(-gamma * |a - b|^2)

on window features that were median-imputed and standardised with the training
windows (``gamma`` = 1 / number of features, scikit-learn's ``"scale"`` for
standardised inputs). An SVM with this kernel is trained on *recordings*, one
sample each, so a subject's 7 walks weigh 7 recordings whatever their length.
Because ``K`` is a mean over windows, the SVM's decision for a recording is the
mean of its decisions for each window taken as a one-window set::

    f(A) = sum_i alpha_i y_i K(A, B_i) + b = mean over a in A of f({a})

so every window gets its own score and the recording's score is their mean
(with the summary members, a percentile of a window feature is not the mean of
anything, and a one-window "recording" is only an approximation).

Calibration mirrors ``CalibratedClassifierCV(method="sigmoid", cv=folds)``: one
SVM per subject-wise fold, fitted on the fold's training recordings and Platt
scaled on its held-out recordings; the probability is the mean over the folds.

Fitting needs the ``n_windows x n_windows`` kernel (computed in row blocks, so
memory stays at ``block x n_windows``); scoring ``k`` new windows needs their
kernel with the training windows that carry a support vector's weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

__all__ = ["SetKernelSVM", "bag_kernel", "rbf"]

_BLOCK = 1024  # kernel rows computed at once


def rbf(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """``exp(-gamma * |a_i - b_j|^2)`` for rows of ``a`` (n, d) and ``b`` (m, d)."""
    sq = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-gamma * np.maximum(sq, 0.0))


def _bounds(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def bag_kernel(z: np.ndarray, sizes: np.ndarray, gamma: float) -> np.ndarray:
    """The set kernel between all bags of ``z`` (windows of bag ``i`` are the
    ``sizes[i]`` consecutive rows after those of bags ``< i``): ``(n_bags, n_bags)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if (sizes < 1).any() or sizes.sum() != len(z):
        raise ValueError("every bag needs at least one window, and sizes must cover z")
    starts = _bounds(sizes)[:-1]
    # per window, mean kernel with every bag: (n_windows, n_bags), in row blocks
    per_bag = np.empty((len(z), len(sizes)))
    for a in range(0, len(z), _BLOCK):
        per_bag[a : a + _BLOCK] = np.add.reduceat(rbf(z[a : a + _BLOCK], z, gamma), starts, axis=1)
    per_bag /= sizes[None, :]
    return np.add.reduceat(per_bag, starts, axis=0) / sizes[:, None]


class SetKernelSVM:
    """Calibrated set-kernel SVM on window features (see the module docstring).

    ``columns`` picks the window features it reads (all when ``None``); ``C`` is
    the SVM's penalty (classes balanced); ``gamma`` defaults to 1 / n_columns.
    """

    def __init__(self, columns: np.ndarray | None = None, C: float = 1.0,
                 gamma: float | None = None) -> None:  # fmt: skip
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.C = C
        self.gamma = gamma

    # ------------------------------------------------------------------ preparation

    def _select(self, windows: np.ndarray) -> np.ndarray:
        x = np.asarray(windows, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected (k, n_features) windows, got {x.shape}")
        return x if self.columns is None else x[:, self.columns]

    def _fit_scaler(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        counts = finite.sum(axis=0)
        med = np.zeros(x.shape[1])
        ok = counts > 0
        med[ok] = np.nanmedian(x[:, ok], axis=0)  # a feature NaN everywhere imputes 0
        z = np.where(finite, x, med)
        sd = z.std(axis=0)
        self.median_, self.mean_ = med, z.mean(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        self.gamma_ = float(self.gamma if self.gamma is not None else 1.0 / x.shape[1])

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        z = np.where(np.isfinite(x), x, self.median_)
        return (z - self.mean_) / self.scale_

    def _prepare(self, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Standardised windows, bag sizes and the bag kernel of training ``bags``."""
        xs = [self._select(b) for b in bags]
        sizes = np.array([len(x) for x in xs], dtype=np.int64)
        if len(xs) == 0 or (sizes < 1).any():
            raise ValueError("every recording needs at least one window")
        x = np.concatenate(xs)
        self._fit_scaler(x)
        z = self._standardise(x)
        return z, sizes, bag_kernel(z, sizes, self.gamma_)

    def _svm(self) -> SVC:
        return SVC(kernel="precomputed", C=self.C, class_weight="balanced")

    # ------------------------------------------------------------------ fitting

    def oof_decisions(self, bags: Sequence[np.ndarray], y: np.ndarray,
                      folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:  # fmt: skip
        """Uncalibrated out-of-fold decisions (for comparing candidates): the SVM of
        each fold scores its held-out bags. ``folds`` index into ``bags``."""
        y = np.asarray(y, dtype=int)
        _, _, k = self._prepare(bags)
        out = np.full(len(y), np.nan)
        for tr, te in folds:
            svm = self._svm().fit(k[np.ix_(tr, tr)], y[tr])
            out[te] = svm.decision_function(k[np.ix_(te, tr)])
        return out

    def fit(self, bags: Sequence[np.ndarray], y: np.ndarray,
            folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> SetKernelSVM:  # fmt: skip
        """One SVM per fold (trained on its training bags) with Platt scaling fitted on
        its held-out bags. ``folds`` index into ``bags`` (subject-wise, by the caller)."""
        y = np.asarray(y, dtype=int)
        if len(y) != len(bags):
            raise ValueError(f"{len(bags)} recordings but {len(y)} labels")
        if len(folds) == 0:
            raise ValueError("need at least one calibration fold")
        z, sizes, k = self._prepare(bags)
        bounds = _bounds(sizes)
        weights = np.zeros((len(z), len(folds)))  # per training window, per fold
        intercepts, platt = [], []
        for f, (tr, te) in enumerate(folds):
            tr, te = np.asarray(tr), np.asarray(te)
            if len(set(y[tr])) < 2:
                raise ValueError("a calibration fold's training side has one class only")
            svm = self._svm().fit(k[np.ix_(tr, tr)], y[tr])
            # f(A) = sum_j coef_j K(A, B_j) + b; K(A, B_j) is a mean over B_j's windows,
            # so spread coef_j evenly over the windows of bag j.
            for j, c in zip(svm.support_, svm.dual_coef_[0], strict=True):
                i = tr[j]
                weights[bounds[i] : bounds[i + 1], f] += c / sizes[i]
            intercepts.append(float(svm.intercept_[0]))
            platt.append(_platt(svm.decision_function(k[np.ix_(te, tr)]), y[te]))
        keep = np.flatnonzero(np.any(weights != 0.0, axis=1))
        self.support_windows_ = z[keep]
        self.weights_ = weights[keep]
        self.intercepts_ = np.array(intercepts)
        self.platt_ = np.array(platt)  # (n_folds, 2): slope, offset
        return self

    # ------------------------------------------------------------------ scoring

    def window_decisions(self, windows: np.ndarray) -> np.ndarray:
        """Each window's decision as a one-window set, per fold: ``(k, n_folds)``."""
        z = self._standardise(self._select(windows))
        out = np.empty((len(z), self.weights_.shape[1]))
        for a in range(0, len(z), _BLOCK):
            kz = rbf(z[a : a + _BLOCK], self.support_windows_, self.gamma_)
            out[a : a + _BLOCK] = kz @ self.weights_ + self.intercepts_
        return out

    def proba_from_decisions(self, d: np.ndarray) -> np.ndarray:
        """Calibrated probability from per-fold decisions ``(n, n_folds)``: mean over folds."""
        a, b = self.platt_[:, 0], self.platt_[:, 1]
        return (1.0 / (1.0 + np.exp(-(d * a + b)))).mean(axis=1)

    def decisions(self, bags: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Per-fold decisions of every window of ``bags`` (concatenated, in order) and of
        each whole bag (the mean of its windows'), each window scored once."""
        sizes = np.array([len(b) for b in bags], dtype=np.int64)
        if (sizes < 1).any():
            raise ValueError("every recording needs at least one window")
        d = self.window_decisions(np.concatenate([np.asarray(b) for b in bags]))
        return d, np.add.reduceat(d, _bounds(sizes)[:-1], axis=0) / sizes[:, None]

    def bag_decisions(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """Per-fold decisions of whole bags: the mean of their windows' decisions."""
        return self.decisions(bags)[1]

    def predict_proba_bags(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        """P(parkinson) of each bag (recording)."""
        return self.proba_from_decisions(self.bag_decisions(bags))


def _platt(d: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Sigmoid calibration ``p = 1 / (1 + exp(-(a d + b)))`` by maximum likelihood
    (a practically unpenalised logistic regression on the decision value)."""
    if len(set(y)) < 2:  # cannot calibrate on one class: keep the SVM's sign
        return 1.0, 0.0
    lr = LogisticRegression(C=1e6, max_iter=1000).fit(d[:, None], y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])
