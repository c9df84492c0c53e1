"""Hydra-style competing convolutional kernels over the feet's total-force series.

After Dempster, Schmidt & Webb, "Hydra: competing convolutional kernels for fast
and accurate time series classification" (2023); written here in numpy.

The kernels are random (drawn from ``random_state``, never fitted to data): for
each dilation ``d`` in 1, 2, 4, ... (while a length-9 kernel spans the window),
and for the series and for its first difference, ``groups / 2`` groups of ``k``
kernels of length 9 (zero mean, unit L1 norm). A group reads the sum of a few
random input channels. At every time step the ``k`` kernels of a group compete:
the feature of kernel ``q`` is the sum of the responses where ``q`` wins (the
largest response) and the count of the steps where it loses (the smallest), so a
window becomes ``n_dilations * 2 * 2 * (groups / 2) * k`` counts of which shape
dominates its signal at which scale.

Here the input is each 10 s window's left and right total force at 50 Hz
(:func:`foot_totals` of :func:`ml.features.sensor_series`), and a recording is
the mean of its windows' features. :class:`SparseScaler` is the paper's scaling
(square root, standardise the non-zero counts) before a ridge classifier.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = ["Hydra", "SparseScaler", "foot_totals"]

_TAPS = 9


def foot_totals(series: np.ndarray) -> np.ndarray:
    """``(k, 16, L)`` sensor series (8 left, then 8 right) -> ``(k, 2, L)`` totals."""
    s = np.asarray(series, dtype=np.float32)
    if s.ndim != 3 or s.shape[1] != 16:
        raise ValueError(f"expected (k, 16, L) sensor series, got {s.shape}")
    return np.stack([s[:, :8].sum(axis=1), s[:, 8:].sum(axis=1)], axis=1)


class Hydra(TransformerMixin, BaseEstimator):
    """Random competing-kernel features of ``(n, channels, length)`` series.

    ``fit`` only draws the kernels for the input's shape; nothing depends on the
    data, so fitting on one window or on all of them gives the same transform.
    """

    def __init__(self, k: int = 8, groups: int = 192, random_state: int = 0) -> None:
        self.k = k
        self.groups = groups
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: object = None) -> Hydra:
        x = np.asarray(X)
        if x.ndim != 3 or x.shape[2] < _TAPS + 1:
            raise ValueError(f"expected (n, channels, length >= {_TAPS + 1}) series, got {x.shape}")
        if self.groups < 2 or self.groups % 2 or self.k < 2:
            raise ValueError("groups must be an even number >= 2 and k >= 2")
        _, c, length = x.shape
        rng = np.random.default_rng(self.random_state)
        n_dil = int(np.log2((length - 1) / (_TAPS - 1))) + 1
        half = self.groups // 2
        w = rng.standard_normal((n_dil, 2, half, self.k, _TAPS)).astype(np.float32)
        w -= w.mean(axis=-1, keepdims=True)
        w /= np.abs(w).sum(axis=-1, keepdims=True)
        self.dilations_ = (2 ** np.arange(n_dil)).astype(np.int64)
        self.weights_ = w
        self.channels_ = rng.integers(0, c, size=(n_dil, 2, half, int(np.clip(c // 2, 2, 8))))
        self.n_channels_, self.length_ = c, length
        return self

    @property
    def n_features(self) -> int:
        return len(self.dilations_) * 2 * 2 * (self.groups // 2) * self.k

    def transform(self, X: np.ndarray, batch: int = 64) -> np.ndarray:
        x = np.asarray(X, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.n_channels_, self.length_):
            raise ValueError(f"expected (n, {self.n_channels_}, {self.length_}) series, got "
                             f"{x.shape}")  # fmt: skip
        if len(x) == 0:
            return np.zeros((0, self.n_features), dtype=np.float32)
        return np.concatenate([self._batch(x[a : a + batch]) for a in range(0, len(x), batch)])

    def _batch(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        out = []
        for i, d in enumerate(self.dilations_):
            for j, series in enumerate((x, np.diff(x, axis=-1))):
                s = series[:, self.channels_[i, j]].sum(axis=2)  # (n, half, L)
                length = s.shape[-1]
                pad = (_TAPS // 2) * int(d)
                sp = np.zeros((n, s.shape[1], length + 2 * pad), dtype=np.float32)
                sp[:, :, pad : pad + length] = s
                # the 9 dilated taps of every position: (n, half, 9, L)
                cols = np.stack([sp[:, :, t * d : t * d + length] for t in range(_TAPS)], axis=2)
                z = np.matmul(self.weights_[i, j][None], cols)  # (n, half, k, L)
                best, worst = z.argmax(axis=2), z.argmin(axis=2)  # (n, half, L)
                top = z.max(axis=2)
                # per (window, group, kernel): the summed wins and the count of losses
                cells = n * z.shape[1] * self.k
                row = np.arange(n * z.shape[1])[:, None] * self.k
                soft = np.bincount((row + best.reshape(-1, length)).ravel(),
                                   weights=top.ravel(), minlength=cells)  # fmt: skip
                hard = np.bincount((row + worst.reshape(-1, length)).ravel(), minlength=cells)
                out += [soft.reshape(n, -1).astype(np.float32),
                        hard.reshape(n, -1).astype(np.float32)]  # fmt: skip
        return np.concatenate(out, axis=1)


class SparseScaler(TransformerMixin, BaseEstimator):
    """Square root of the (clipped) counts, standardised; zero counts stay zero, and
    mostly-zero features get a larger divisor (Hydra's scaling before ridge)."""

    def __init__(self, exponent: float = 4.0) -> None:
        self.exponent = exponent

    def fit(self, X: np.ndarray, y: object = None) -> SparseScaler:
        x = np.sqrt(np.clip(np.asarray(X, dtype=np.float64), 0.0, None))
        eps = (x == 0).mean(axis=0) ** self.exponent + 1e-8
        self.mean_ = x.mean(axis=0)
        self.scale_ = (x.std(axis=0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1])) + eps
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        x = np.sqrt(np.clip(np.asarray(X, dtype=np.float64), 0.0, None))
        return (x - self.mean_) * (x != 0) / self.scale_
