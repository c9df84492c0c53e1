"""A MiniRocket-style random convolution transform in numpy (scikit-learn API).

After Dempster, Schmidt & Webb, "MiniRocket" (KDD 2021), reimplemented from the
paper's description: 84 fixed kernels of length 9 whose weights are -1 except
three positions of 2, each applied at a set of exponentially spaced dilations;
the bias of each (kernel, dilation) feature is a quantile of that convolution's
output on a random training example; the feature is the proportion of positive
values (PPV) of ``conv - bias``. For several channels, each (kernel, dilation)
pair sums a random subset of channels before convolving.

The trick that keeps it cheap: with weights ``-1`` everywhere and ``+3`` added at
three positions, a kernel's output is ``-sum(all 9 shifted inputs) + 3 * (shift_i +
shift_j + shift_k)``, so each dilation needs the nine shifted inputs once and each
of the 84 kernels costs three additions.

Input of :meth:`MiniRocket.transform`: float array ``(n_series, n_channels, length)``.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

__all__ = ["KERNELS", "MiniRocket"]

#: The 84 kernels, as the positions (of 9) that carry weight 2.
KERNELS = np.array(list(combinations(range(9), 3)), dtype=np.int64)
_GOLDEN = (np.sqrt(5.0) + 1.0) / 2.0


class MiniRocket(TransformerMixin, BaseEstimator):
    """Random-convolution features (PPV) for multichannel series.

    Parameters
    ----------
    num_features:
        Approximate number of output features (rounded down to a multiple of 84).
    max_dilations_per_kernel:
        Cap on the number of dilations.
    max_channels:
        Largest channel subset summed by one (kernel, dilation) pair.
    batch_size:
        Series transformed at once (bounds memory).
    random_state:
        Seed for bias examples and channel subsets.
    """

    def __init__(self, num_features: int = 4998, max_dilations_per_kernel: int = 32,
                 max_channels: int = 3, batch_size: int = 128,
                 random_state: int | None = 0) -> None:  # fmt: skip
        self.num_features = num_features
        self.max_dilations_per_kernel = max_dilations_per_kernel
        self.max_channels = max_channels
        self.batch_size = batch_size
        self.random_state = random_state

    # -- fitting ------------------------------------------------------------------------

    def fit(self, X: np.ndarray, y: object = None) -> MiniRocket:
        X = self._check(X, fitting=True)
        n, c, length = X.shape
        rng = np.random.default_rng(self.random_state)
        dilations, per_dilation = self._dilations(length)
        n_kernels = len(KERNELS)
        # channel subsets: for every (dilation, kernel) a random subset of channels
        n_pairs = len(dilations) * n_kernels
        sizes = np.minimum(
            2 ** rng.uniform(0, np.log2(min(c, self.max_channels) + 1), n_pairs), c
        ).astype(np.int64)
        masks = np.zeros((n_pairs, c), dtype=bool)
        for p, k in enumerate(np.maximum(sizes, 1)):
            masks[p, rng.choice(c, size=k, replace=False)] = True
        # biases: quantiles of the convolution of one random training example
        total = int(per_dilation.sum()) * n_kernels
        quantiles = (np.arange(1, total + 1) * _GOLDEN) % 1.0
        biases = np.empty(total)
        pos = 0
        qpos = 0
        for di, d in enumerate(dilations):
            f = int(per_dilation[di])
            shifted = _shifted(X[rng.integers(0, n, size=n_kernels)], int(d))  # (9, k, c, L)
            for k in range(n_kernels):
                mask = masks[di * n_kernels + k]
                conv = _kernel_output(shifted[:, k : k + 1], KERNELS[k], mask)[0]
                q = quantiles[qpos : qpos + f]
                biases[pos : pos + f] = np.quantile(conv, q)
                pos += f
                qpos += f
        self.n_channels_ = c
        self.length_ = length
        self.dilations_ = dilations
        self.features_per_dilation_ = per_dilation
        self.channel_masks_ = masks
        self.biases_ = biases
        self.n_features_out_ = total
        return self

    def _dilations(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        n_kernels = len(KERNELS)
        per_kernel = max(1, self.num_features // n_kernels)
        true_max = min(per_kernel, self.max_dilations_per_kernel)
        multiplier = per_kernel / true_max
        max_exp = np.log2(max((length - 1) / (9 - 1), 1.0))
        dil, counts = np.unique(
            np.floor(np.logspace(0, max_exp, true_max, base=2)).astype(np.int64),
            return_counts=True,
        )
        per = (counts * multiplier).astype(np.int64)
        remainder = per_kernel - per.sum()
        i = 0
        while remainder > 0:
            per[i] += 1
            remainder -= 1
            i = (i + 1) % len(per)
        return dil, per

    # -- transforming -------------------------------------------------------------------

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "biases_")
        X = self._check(X, fitting=False)
        out = np.empty((X.shape[0], self.n_features_out_), dtype=np.float32)
        for s in range(0, X.shape[0], self.batch_size):
            out[s : s + self.batch_size] = self._transform_batch(X[s : s + self.batch_size])
        return out

    def _transform_batch(self, X: np.ndarray) -> np.ndarray:
        n = X.shape[0]
        out = np.empty((n, self.n_features_out_), dtype=np.float32)
        n_kernels = len(KERNELS)
        pos = 0
        for di, d in enumerate(self.dilations_):
            f = int(self.features_per_dilation_[di])
            shifted = _shifted(X, int(d))  # (9, n, c, L)
            alpha = shifted.sum(axis=0)  # (n, c, L): the -1 part, shared by all kernels
            pad = 4 * int(d)
            for k in range(n_kernels):
                mask = self.channel_masks_[di * n_kernels + k]
                i, j, m = KERNELS[k]
                conv = 3.0 * (shifted[i][:, mask] + shifted[j][:, mask] + shifted[m][:, mask])
                conv = (conv - alpha[:, mask]).sum(axis=1)
                # Alternate "same" output and the valid centre only, as MiniRocket does.
                if (di * n_kernels + k) % 2 == 1 and conv.shape[1] > 2 * pad:
                    conv = conv[:, pad : conv.shape[1] - pad]
                inv = np.float32(1.0 / conv.shape[1])
                for q in range(f):
                    out[:, pos + q] = np.count_nonzero(conv > self.biases_[pos + q], axis=1) * inv
                pos += f
        return out

    def _check(self, X: np.ndarray, fitting: bool) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 2:
            X = X[:, None, :]
        if X.ndim != 3:
            raise ValueError(f"expected (n_series, n_channels, length), got {X.shape}")
        if not fitting and (X.shape[1], X.shape[2]) != (self.n_channels_, self.length_):
            raise ValueError(
                f"fitted on {self.n_channels_} channels x {self.length_} samples, "
                f"got {X.shape[1]} x {X.shape[2]}"
            )
        if not np.isfinite(X).all():
            raise ValueError("series contain NaN or infinite values")
        return X

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        check_is_fitted(self, "biases_")
        return np.array([f"rocket{i}" for i in range(self.n_features_out_)], dtype=object)


def _shifted(X: np.ndarray, d: int) -> np.ndarray:
    """The nine inputs of a dilated length-9 kernel, zero padded: (9, n, c, L)."""
    n, c, length = X.shape
    pad = 4 * d
    xp = np.zeros((n, c, length + 2 * pad), dtype=np.float32)
    xp[:, :, pad : pad + length] = X
    return np.stack([xp[:, :, i * d : i * d + length] for i in range(9)])


def _kernel_output(shifted: np.ndarray, kernel: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Output (n, L) of the kernel with weight 2 at ``kernel`` positions, -1 elsewhere,
    applied to the sum of the channels in ``mask``."""
    s = shifted[:, :, mask].sum(axis=2)  # (9, n, L)
    return 3.0 * (s[kernel[0]] + s[kernel[1]] + s[kernel[2]]) - s.sum(axis=0)
