"""Honest evaluation: subject-wise folds, metrics, bootstrap confidence intervals.

gaitpdb has several walks per subject, so every split here keeps all recordings
(and windows) of a subject on one side. Folds are stratified by study x group so
each fold sees every study's controls and patients.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.model_selection import StratifiedGroupKFold

__all__ = [
    "METRICS",
    "binary_metrics",
    "bootstrap_ci",
    "check_disjoint",
    "evaluation_table",
    "subject_folds",
]

METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")


def subject_folds(meta: pd.DataFrame, n_splits: int = 5, seed: int = 0,
                  index: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Subject-grouped folds over the rows of ``meta`` (columns subject, study, label).

    Stratified by ``study + label`` and grouped by ``subject``. ``index`` restricts
    the split to those rows and the returned indices are positions into ``meta``.
    Every fold is checked: no subject on both sides.
    """
    idx = np.arange(len(meta)) if index is None else np.asarray(index)
    sub = meta.iloc[idx]
    labels = sub["label"].to_numpy()
    groups = sub["subject"].to_numpy()
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise ValueError(f"{n_groups} subjects cannot make {n_splits} subject-wise folds")
    # study x group strata; with very few subjects that can leave a training side
    # with one class, then fall back to the group alone
    for strata in ((sub["study"].astype(str) + sub["label"].astype(str)).to_numpy(), labels):
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class" on tiny sets
            splits = list(cv.split(np.zeros(len(idx)), strata, groups))
        if all(len(set(labels[tr])) == 2 for tr, _ in splits):
            break
    else:
        raise ValueError(f"too few subjects of each group for {n_splits} subject-wise folds")
    folds = []
    for tr, te in splits:
        tr_i, te_i = idx[tr], idx[te]
        check_disjoint(meta, tr_i, te_i)
        folds.append((tr_i, te_i))
    return folds


def check_disjoint(meta: pd.DataFrame, train: np.ndarray, test: np.ndarray) -> None:
    """Raise if any subject has rows in both ``train`` and ``test``."""
    both = set(meta["subject"].iloc[train]) & set(meta["subject"].iloc[test])
    if both:
        raise AssertionError(f"subjects on both sides of a split: {sorted(both)}")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, balanced accuracy, sensitivity (patients found) and specificity.

    ``p >= threshold`` is a Parkinson's call. AUC is NaN when only one class is
    present.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else np.nan
    spec = float((~pred[neg]).mean()) if neg.any() else np.nan
    auc = _auc(y, p) if pos.any() and neg.any() else np.nan
    bal = float(np.nanmean([sens, spec])) if pos.any() and neg.any() else np.nan
    return {
        "auc": auc,
        "balanced_accuracy": bal,
        "sensitivity": sens,
        "specificity": spec,
        "n": int(y.size),
        "n_parkinson": int(pos.sum()),
    }


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half); fast for bootstraps."""
    r = rankdata(p)
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def bootstrap_ci(y: np.ndarray, p: np.ndarray, groups: np.ndarray, threshold: float,
                 n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Percentile confidence intervals of :data:`METRICS`, resampling subjects.

    A subject is drawn with all its recordings (the unit of independence), and
    resamples with a single class are skipped for the AUC.
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    uniq, inv = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(uniq.size)]
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_boot):
        pick = rng.integers(0, uniq.size, uniq.size)
        rows = np.concatenate([members[g] for g in pick])
        m = binary_metrics(y[rows], p[rows], threshold)
        for k in METRICS:
            if np.isfinite(m[k]):
                draws[k].append(m[k])
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {
        k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else (np.nan, np.nan)
        for k, v in draws.items()
    }


def _slices(meta: pd.DataFrame, fold_of: np.ndarray) -> Iterator[tuple[str, str, np.ndarray]]:
    yield "overall", "all", np.ones(len(meta), dtype=bool)
    for f in np.unique(fold_of[fold_of >= 0]):
        yield "fold", str(int(f)), fold_of == f
    for s in sorted(meta["study"].unique()):
        yield "study", str(s), (meta["study"] == s).to_numpy()
    if "dual_task" in meta:
        dual = meta["dual_task"].to_numpy(dtype=bool)
        yield "walk", "dual_task", dual
        yield "walk", "usual", ~dual


def evaluation_table(meta: pd.DataFrame, p: np.ndarray, threshold: float | np.ndarray,
                     fold_of: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     slices: Sequence[str] = ("overall", "fold", "study", "walk"),
                     ) -> pd.DataFrame:  # fmt: skip
    """Metrics (with subject-bootstrap CIs) overall, per fold, per study, per walk type.

    ``threshold`` may be one value or one per row (each fold's own threshold).
    Rows: one per slice; columns: slice, name, the metrics and ``<metric>_lo/_hi``.
    """
    y = meta["label"].to_numpy()
    groups = meta["subject"].to_numpy()
    thr = np.broadcast_to(np.asarray(threshold, dtype=float), p.shape)
    # Per-row thresholds: compare the margin p - thr against 0 instead.
    margin = p - thr + 0.5
    rows = []
    for kind, name, mask in _slices(meta, fold_of):
        if kind not in slices or not mask.any():
            continue
        m = binary_metrics(y[mask], p[mask], 0.5)
        hard = binary_metrics(y[mask], margin[mask], 0.5)
        m |= {k: hard[k] for k in ("balanced_accuracy", "sensitivity", "specificity")}
        m["n_subjects"] = len(set(groups[mask]))
        ci_auc = bootstrap_ci(y[mask], p[mask], groups[mask], 0.5, n_boot, seed)
        ci_hard = bootstrap_ci(y[mask], margin[mask], groups[mask], 0.5, n_boot, seed)
        for k in METRICS:
            lo, hi = (ci_auc if k == "auc" else ci_hard)[k]
            m[f"{k}_lo"], m[f"{k}_hi"] = lo, hi
        rows.append({"slice": kind, "name": name, **m})
    return pd.DataFrame(rows)
