"""The set-kernel SVM (multiple-instance member) and a model that uses it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.svm import SVC

from ml import features as F
from ml.model import GaitModel, Member, make_set_svm, window_columns
from ml.setkernel import SetKernelSVM, bag_kernel, rbf
from ml.synthetic import synthetic_recording


def _bags(n: int = 24, d: int = 5, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Bags of 3-9 windows; in label-1 bags the first feature is shifted for half
    the windows (a difference of distributions, not of every window)."""
    rng = np.random.default_rng(seed)
    bags, y = [], np.arange(n) % 2
    for label in y:
        k = int(rng.integers(3, 10))
        x = rng.standard_normal((k, d))
        if label:
            x[: (k + 1) // 2, 0] += 2.5
        bags.append(x)
    return bags, y


def _folds(n: int, k: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds of consecutive pairs (labels alternate, so each side has both)."""
    idx = np.arange(n)
    fold = (idx // 2) % k
    return [(idx[fold != f], idx[fold == f]) for f in range(k)]


def test_bag_kernel_is_the_mean_window_kernel() -> None:
    bags, _ = _bags(6)
    z = np.concatenate(bags)
    k = bag_kernel(z, np.array([len(b) for b in bags]), gamma=0.3)
    for i in range(6):
        for j in range(6):
            brute = np.mean([[np.exp(-0.3 * np.sum((a - b) ** 2)) for b in bags[j]] for a in bags[i]])
            assert k[i, j] == pytest.approx(brute, rel=1e-12)
    np.testing.assert_allclose(rbf(z[:2], z[:2], 0.3).diagonal(), 1.0)
    with pytest.raises(ValueError, match="at least one window"):
        bag_kernel(z, np.array([len(z), 0]), 0.3)


def test_decisions_match_the_svm_on_the_set_kernel() -> None:
    bags, y = _bags()
    folds = _folds(len(bags))
    svm = SetKernelSVM(C=1.0).fit(bags, y, folds)
    # the same kernel by hand: standardise with the training windows, gamma = 1 / d
    z = np.concatenate(bags)
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    k = bag_kernel(z, np.array([len(b) for b in bags]), 1.0 / z.shape[1])
    got = svm.bag_decisions(bags)
    for f, (tr, _) in enumerate(folds):
        ref = SVC(kernel="precomputed", C=1.0, class_weight="balanced").fit(k[np.ix_(tr, tr)], y[tr])
        np.testing.assert_allclose(got[:, f], ref.decision_function(k[:, tr]), atol=1e-9)
    # a bag's decision is the mean of its windows' decisions
    np.testing.assert_allclose(got[3], svm.window_decisions(bags[3]).mean(axis=0), atol=1e-12)
    # only windows of support-vector bags are kept
    assert len(svm.support_windows_) <= len(z) and svm.weights_.shape[1] == len(folds)


def test_it_learns_a_difference_of_distributions() -> None:
    bags, y = _bags(40, seed=1)
    svm = SetKernelSVM().fit(bags[:30], y[:30], _folds(30))
    test, yt = _bags(40, seed=2)
    p = svm.predict_proba_bags(test)
    assert ((p >= 0) & (p <= 1)).all()
    # rank-based AUC on fresh bags
    pos, neg = p[yt == 1], p[yt == 0]
    assert (pos[:, None] > neg[None, :]).mean() > 0.9
    oof = SetKernelSVM().oof_decisions(bags, y, _folds(40))
    assert np.isfinite(oof).all()
    assert (oof[y == 1][:, None] > oof[y == 0][None, :]).mean() > 0.8


def test_missing_features_are_imputed_and_columns_selected() -> None:
    bags, y = _bags(18)
    bags = [np.hstack([b, np.full((len(b), 1), np.nan)]) for b in bags]  # a column NaN everywhere
    bags[0][0, 1] = np.nan
    svm = SetKernelSVM(columns=np.array([0, 1, 5])).fit(bags, y, _folds(18))
    assert svm.gamma_ == pytest.approx(1 / 3)
    p = svm.predict_proba_bags([np.full((2, 6), np.nan), bags[1]])
    assert np.isfinite(p).all()
    with pytest.raises(ValueError, match="at least one window"):
        svm.predict_proba_bags([np.zeros((0, 6))])
    with pytest.raises(ValueError, match="labels"):
        SetKernelSVM().fit(bags, y[:-1], _folds(17))


def test_a_model_with_a_set_member_scores_rows_and_windows_alike() -> None:
    rng = np.random.default_rng(0)
    bags, y = [], []
    for i in range(16):
        x = synthetic_recording(float(rng.uniform(0.9, 1.3)), 22.0, parkinsonian=bool(i % 2), seed=i)
        bags.append(F.recording_features(x)[1])
        y.append(i % 2)
    svm = make_set_svm("core").fit(bags, np.array(y), _folds(16, 4))
    np.testing.assert_array_equal(svm.columns, window_columns("core"))
    model = GaitModel(version="t", candidate="set_svm", members=[Member("set_svm", "set", svm)],
                      threshold=0.5)  # fmt: skip
    assert model.feature_members  # a set member reads feature windows
    x = synthetic_recording(1.1, 31.0, parkinsonian=True, seed=99)
    by_rows = model.predict_rows(x)
    by_windows = model.predict_windows(F.recording_features(x)[1])
    assert by_rows.probability == pytest.approx(by_windows.probability)
    np.testing.assert_allclose(by_rows.window_probabilities, by_windows.window_probabilities)
    assert len(by_rows.window_probabilities) == len(F.window_starts(len(x)))
    # the recording's probability is calibrated from the mean of its windows' decisions
    d = svm.window_decisions(F.recording_features(x)[1]).mean(axis=0, keepdims=True)
    assert by_rows.probability == pytest.approx(float(svm.proba_from_decisions(d)[0]))
    # a batch answers like one recording at a time
    batch = model.predict_batch([("rows", x), ("windows", bags[0]), ("rows", x[:1400])])
    assert batch[0].probability == pytest.approx(by_rows.probability)
    assert batch[1].probability == pytest.approx(model.predict_windows(bags[0]).probability)
    assert len(batch[2].window_probabilities) == 1
