"""The diagnosis model: window features in, a recording's probability of Parkinson's out.

A recording is cut into windows (:mod:`ml.features`). Three kinds of *members*
turn windows into a probability:

* feature members summarise a recording by the 10th, 50th and 90th percentile
  of each window feature over its windows, and classify that vector
  (logistic regression, RBF SVM, extra trees, gradient boosting);
* the set member (multiple-instance learning, :mod:`ml.setkernel`) compares
  recordings as *sets of windows* with a set kernel (mean RBF similarity of
  their windows) in an SVM; a recording's score is the mean of its windows'
  scores;
* the rocket member turns each window's 16 sensor series into MiniRocket
  features (:mod:`ml.rocket`), averages them over the windows and classifies
  with a logistic regression;
* the hydra member turns each window's left and right total force into
  competing-kernel counts (:mod:`ml.hydra`), averages them over the windows and
  classifies with a ridge classifier.

The rocket and hydra members read sensor series, so they score raw rows only;
feature windows (what the pipeline's Spark job sends) are scored by the other
members of the model.

Each member is calibrated (Platt scaling, cross-validated by subject inside
the training data). A model is one member or an ensemble (mean of the members'
calibrated probabilities). A single window is scored as a one-window recording,
which gives the per-window probabilities the server returns.

The decision threshold is the training prevalence of Parkinson's: for a
calibrated probability, ``p >= prevalence`` means the likelihood ratio favours
Parkinson's, which is the rule that maximises balanced accuracy.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import ExtraTreesClassifier, HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeClassifierCV
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from . import features as F
from .hydra import Hydra, SparseScaler, foot_totals
from .rocket import MiniRocket
from .setkernel import SetKernelSVM

__all__ = [
    "CANDIDATES",
    "DEFAULT_CANDIDATES",
    "DEFAULT_MODEL",
    "FEATURE_SETS",
    "MEMBERS",
    "QUANTILES",
    "SERIES_KINDS",
    "GaitModel",
    "Member",
    "MemberSpec",
    "Prediction",
    "aggregate",
    "aggregate_each",
    "feature_columns",
    "fit_member",
    "make_estimator",
    "make_hydra",
    "make_set_svm",
    "member_oof_scores",
    "window_columns",
]

#: Percentiles of each window feature that summarise a recording.
QUANTILES = (10.0, 50.0, 90.0)
#: Families of features (``ml.features.feature_group``) in the "core" set: how the
#: load rolls over each sensor during stance, gait timing and its variability,
#: left/right asymmetry, the stance force profile and the centre-of-pressure path.
CORE_GROUPS = ("timing", "asymmetry", "force_profile", "cop_profile_y", "sensor_profile")
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "all": F.FEATURE_NAMES,
    "core": tuple(n for n in F.FEATURE_NAMES if F.FEATURE_GROUPS[n] in CORE_GROUPS),
}


@dataclass(frozen=True)
class MemberSpec:
    # "features" (percentile summaries of window features) | "set" (the set of a
    # recording's window features) | "rocket" (sensor series) | "hydra" (the feet's
    # total-force series)
    kind: str
    estimator: str  # a make_estimator() name, or "set_svm" for "set" members
    feature_set: str = "all"  # FEATURE_SETS key, for "features" and "set" members


#: Base members.
MEMBERS: dict[str, MemberSpec] = {
    "logreg": MemberSpec("features", "logreg"),
    "svm": MemberSpec("features", "svm"),
    "extra_trees": MemberSpec("features", "extra_trees"),
    "hist_gb": MemberSpec("features", "hist_gb"),
    "logreg_core": MemberSpec("features", "logreg", "core"),
    "svm_core": MemberSpec("features", "svm", "core"),
    "rocket_logreg": MemberSpec("rocket", "rocket_logreg"),
    "set_svm": MemberSpec("set", "set_svm", "core"),
    "hydra_ridge": MemberSpec("hydra", "hydra_ridge"),
}
#: Members that read sensor series (raw rows only), and so cannot score feature windows.
SERIES_KINDS = ("rocket", "hydra")
#: Candidate models compared by (nested) cross-validation: name -> members.
CANDIDATES: dict[str, tuple[str, ...]] = {
    **{m: (m,) for m in MEMBERS},
    # Extra trees add nothing to these ensembles in our runs and cost ~1 s of CPU
    # per scored recording (1600 trees), so the ensembles leave them out.
    "ensemble_features": ("logreg", "svm"),
    "ensemble_core": ("logreg_core", "svm_core"),
    "ensemble_all": ("logreg_core", "svm_core", "rocket_logreg"),
    "ensemble_set": ("logreg_core", "set_svm"),
    "ensemble_hydra": ("logreg_core", "set_svm", "hydra_ridge"),
}
#: The model ``python -m ml.train`` evaluates and ships unless told otherwise: fixed
#: before the run, so the cross-validation selects nothing. Picking among the
#: candidates inside the inner folds (``--model auto``) is the alternative; on this
#: data the inner-CV AUCs are too noisy for that to help (the pick changes from fold
#: to fold and the nested figures drop by about 0.005 AUC and 0.005-0.01 balanced
#: accuracy against any of the good fixed ensembles). Feature windows are scored by
#: its window-feature members, ``ensemble_set``.
DEFAULT_MODEL = "ensemble_hydra"
#: What ``python -m ml.train`` reports beside the model, for comparison (extra trees
#: and the rocket members are left out by default: no better in our runs, and the
#: rocket transform is most of the training time; ``--candidates`` adds them).
#: ``ensemble_set`` is what the default model gives for feature windows.
DEFAULT_CANDIDATES = (
    "ensemble_hydra", "ensemble_set", "set_svm", "logreg_core", "svm_core", "ensemble_core",
    "logreg", "svm",
)  # fmt: skip


def window_columns(feature_set: str) -> np.ndarray:
    """Columns of a window feature row (:data:`ml.features.FEATURE_NAMES`) in ``feature_set``."""
    names = set(FEATURE_SETS[feature_set])
    return np.array([j for j, n in enumerate(F.FEATURE_NAMES) if n in names], dtype=np.int64)


def feature_columns(feature_set: str) -> np.ndarray:
    """Columns of an :func:`aggregate` vector that belong to ``feature_set``."""
    idx = window_columns(feature_set)
    nf = len(F.FEATURE_NAMES)
    return np.concatenate([q * nf + idx for q in range(len(QUANTILES))])


ROCKET_FEATURES = 1998


def make_estimator(name: str, seed: int = 0) -> Pipeline | HistGradientBoostingClassifier:
    """An unfitted scikit-learn estimator for base member ``name``."""
    imp = SimpleImputer(strategy="median")
    if name == "logreg":
        lr = LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000)
        return make_pipeline(imp, StandardScaler(), lr)
    if name == "svm":
        return make_pipeline(imp, StandardScaler(), SVC(C=1.0, class_weight="balanced"))
    if name == "extra_trees":
        et = ExtraTreesClassifier(
            n_estimators=400, min_samples_leaf=2, class_weight="balanced", n_jobs=1,
            random_state=seed,
        )  # fmt: skip
        return make_pipeline(imp, et)
    if name == "hist_gb":
        return HistGradientBoostingClassifier(
            max_iter=200, learning_rate=0.05, max_depth=3, min_samples_leaf=10,
            l2_regularization=1.0, class_weight="balanced", random_state=seed,
        )  # fmt: skip
    if name == "rocket_logreg":
        lr = LogisticRegression(C=0.01, class_weight="balanced", max_iter=5000)
        return make_pipeline(StandardScaler(), lr)
    if name == "hydra_ridge":  # the Hydra paper's classifier: ridge, alpha by leave-one-out
        return make_pipeline(SparseScaler(), RidgeClassifierCV(alphas=np.logspace(-3, 3, 10)))
    raise KeyError(f"unknown estimator {name!r}")


def make_set_svm(feature_set: str = "core") -> SetKernelSVM:
    """An unfitted set-kernel SVM over the window features of ``feature_set``
    (scikit-learn's defaults for an RBF SVM: C = 1, gamma = 1 / n_features)."""
    return SetKernelSVM(columns=window_columns(feature_set), C=1.0)


def make_rocket(seed: int = 0) -> MiniRocket:
    return MiniRocket(num_features=ROCKET_FEATURES, random_state=seed)


#: Hydra's groups of competing kernels (per dilation, half on the series, half on its
#: difference): 192 = three of the paper's default 64, so that the member does not
#: hang on one lucky draw of random kernels.
HYDRA_GROUPS = 192
#: The kernels' random draw: fixed, so the cross-validation scores the transform the
#: model ships.
HYDRA_SEED = 0


def make_hydra() -> Hydra:
    return Hydra(k=8, groups=HYDRA_GROUPS, random_state=HYDRA_SEED)


def aggregate(window_feats: np.ndarray) -> np.ndarray:
    """A recording's summary: :data:`QUANTILES` of each feature over its windows.

    ``(k, n_features) -> (len(QUANTILES) * n_features,)``, quantile-major. NaN
    features are ignored; a feature NaN in every window stays NaN (imputed later).
    """
    x = np.asarray(window_feats, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected (k >= 1, n_features) window features, got {x.shape}")
    return _nanquantiles(x, np.asarray(QUANTILES) / 100.0).reshape(-1)


def _nanquantiles(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Column quantiles ignoring NaN (linear interpolation, as ``np.nanquantile``),
    vectorised: ``np.nanpercentile`` loops over columns in Python."""
    s = np.sort(x, axis=0)  # NaN sort last
    n = np.isfinite(x).sum(axis=0)
    pos = q[:, None] * np.maximum(n - 1, 0)[None, :]  # (len(q), n_features)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[None, :])
    frac = pos - lo
    vlo = np.take_along_axis(s, lo, axis=0)
    vhi = np.take_along_axis(s, hi, axis=0)
    out = vlo + (vhi - vlo) * frac
    out[:, n == 0] = np.nan
    return out


def aggregate_each(window_feats: np.ndarray) -> np.ndarray:
    """Every window as a one-window recording: ``(k, nf) -> (k, len(QUANTILES) * nf)``."""
    x = np.asarray(window_feats, dtype=np.float64)
    return np.tile(x, (1, len(QUANTILES)))


def calibrated(estimator: object, folds: Sequence[tuple[np.ndarray, np.ndarray]]) -> CalibratedClassifierCV:
    """Platt-calibrated ``estimator`` whose calibration folds are subject-wise ``folds``."""
    return CalibratedClassifierCV(clone(estimator), method="sigmoid", cv=list(folds))


@dataclass
class Member:
    """A fitted, calibrated member: ``kind`` says what it reads."""

    name: str
    kind: str  # "features" | "set" | "rocket" | "hydra"
    estimator: CalibratedClassifierCV | SetKernelSVM
    rocket: MiniRocket | None = None
    columns: np.ndarray | None = None  # columns of the aggregated vector it reads
    hydra: Hydra | None = None

    @property
    def transform(self) -> MiniRocket | Hydra | None:
        """The series transform a rocket or hydra member's inputs come from."""
        return self.rocket if self.kind == "rocket" else self.hydra if self.kind == "hydra" else None

    def series_features(self, sensor_series: np.ndarray) -> np.ndarray:
        """Per-window input of a series member from ``(k, 16, L)`` sensor series."""
        if self.kind == "rocket":
            assert self.rocket is not None
            return self.rocket.transform(sensor_series)
        assert self.kind == "hydra" and self.hydra is not None
        return self.hydra.transform(foot_totals(sensor_series))

    def proba(self, x: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """P(parkinson) of recordings: rows of recording-level input (all aggregated
        columns, or rocket features; the member picks its own columns), or for a
        ``set`` member a sequence of window-feature matrices, one per recording."""
        if isinstance(self.estimator, SetKernelSVM):
            return self.estimator.predict_proba_bags(x)
        return self.estimator.predict_proba(_member_matrix(np.asarray(x), self.columns))[:, 1]


def _member_matrix(x: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    return x if columns is None else x[:, columns]


def _summary_columns(spec: MemberSpec) -> np.ndarray | None:
    """The aggregated columns a summary member reads (``None``: all of its input)."""
    return feature_columns(spec.feature_set) if spec.kind == "features" else None


def fit_member(name: str, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray,
               folds: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0,
               transform: MiniRocket | Hydra | None = None) -> Member:  # fmt: skip
    """Fit and calibrate base member ``name`` on recordings ``x``, taken as
    :meth:`Member.proba` takes them (all aggregated columns, rocket or hydra
    features, or a set member's window-feature matrices); ``folds`` (positions in
    ``x``, by subject) are the calibration folds. ``transform`` is the fitted series
    transform (MiniRocket or Hydra) a series member's features came from."""
    spec = MEMBERS[name]
    if spec.kind == "set":
        return Member(name, spec.kind, make_set_svm(spec.feature_set).fit(list(x), y, folds))
    columns = _summary_columns(spec)
    est = calibrated(make_estimator(spec.estimator, seed), folds)
    est.fit(_member_matrix(np.asarray(x), columns), y)
    return Member(name, spec.kind, est, columns=columns,
                  rocket=transform if spec.kind == "rocket" else None,  # type: ignore[arg-type]
                  hydra=transform if spec.kind == "hydra" else None)  # type: ignore[arg-type]


def member_oof_scores(name: str, x: np.ndarray | Sequence[np.ndarray], y: np.ndarray,
                      folds: Sequence[tuple[np.ndarray, np.ndarray]], seed: int = 0,
                      ) -> np.ndarray:  # fmt: skip
    """Uncalibrated out-of-fold scores of base member ``name`` over ``folds``
    (positions in ``x``, which is as in :func:`fit_member`): enough to rank
    candidates, which is all the inner selection does with them."""
    spec = MEMBERS[name]
    if spec.kind == "set":
        return make_set_svm(spec.feature_set).oof_decisions(list(x), y, folds)
    columns = _summary_columns(spec)
    xs = _member_matrix(np.asarray(x), columns)
    out = np.full(len(y), np.nan)
    for tr, te in folds:
        est = make_estimator(spec.estimator, seed).fit(xs[tr], y[tr])
        out[te] = _score(est, xs[te])
    return out


def _score(est: object, x: np.ndarray) -> np.ndarray:
    if hasattr(est, "predict_proba"):
        return est.predict_proba(x)[:, 1]
    return est.decision_function(x)  # type: ignore[attr-defined]


@dataclass
class Prediction:
    probability: float
    label: str
    window_probabilities: np.ndarray
    window_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class GaitModel:
    """A trained diagnosis model (what ``model.joblib`` holds)."""

    version: str
    candidate: str
    members: list[Member]
    threshold: float
    feature_names: tuple[str, ...] = F.FEATURE_NAMES
    window_s: float = F.DEFAULT_WINDOW_S
    step_s: float = F.DEFAULT_STEP_S
    fs: float = F.FS

    @property
    def window_rows(self) -> int:
        return round(self.window_s * self.fs)

    @property
    def feature_members(self) -> list[Member]:
        """The members that read window features (and so can score feature windows)."""
        return [m for m in self.members if m.kind not in SERIES_KINDS]

    def label(self, p: float) -> str:
        return "parkinson" if p >= self.threshold else "control"

    def predict_rows(self, rows: np.ndarray) -> Prediction:
        """Score a raw recording ``(n, 19)`` at :attr:`fs` Hz; uses every member."""
        return self.predict_batch([("rows", rows)])[0]

    def predict_windows(self, window_feats: np.ndarray) -> Prediction:
        """Score precomputed window features ``(k, len(feature_names))``.

        Uses the window-feature members only (rocket and hydra members need raw samples);
        a model with no such member cannot score feature windows.
        """
        return self.predict_batch([("windows", window_feats)])[0]

    def predict_batch(self, items: Sequence[tuple[str, np.ndarray]]) -> list[Prediction]:
        """Score many recordings at once: ``("rows", (n, 19))`` or ``("windows", (k, nf))``.

        Each member scores every recording and window of the batch in one call,
        which is what makes batches cheap (scikit-learn's per-call overhead
        dominates single recordings). Raw rows use every member, feature windows
        the window-feature members only.
        """
        feats: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        series: list[np.ndarray | None] = []
        needs_series = any(m.kind in SERIES_KINDS for m in self.members)
        for kind, data in items:
            if kind == "rows":
                st, f = F.recording_features(data, self.fs, self.window_s, self.step_s)
                if st.size == 0:
                    raise ValueError(f"recording has {len(data)} rows, shorter than one window "
                                     f"({self.window_rows})")  # fmt: skip
                feats.append(f)
                starts.append(st)
                series.append(F.sensor_series(data, self.fs, self.window_s, self.step_s)
                              if needs_series else None)  # fmt: skip
            elif kind == "windows":
                x = np.asarray(data, dtype=np.float64)
                if x.ndim != 2 or x.shape[1] != len(self.feature_names) or x.shape[0] == 0:
                    raise ValueError(f"expected (k >= 1, {len(self.feature_names)}) window "
                                     f"features, got {x.shape}")  # fmt: skip
                if not self.feature_members:
                    raise ValueError(f"model {self.candidate!r} needs raw rows, not feature windows")
                feats.append(x)
                starts.append(np.zeros(0, dtype=np.int64))
                series.append(None)
            else:
                raise ValueError(f"unknown input kind {kind!r}")
        # Rows: [recording summary, one row per window] per item, concatenated.
        sizes = np.array([1 + len(f) for f in feats])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        n_items = len(feats)
        rec_sum = np.zeros(n_items)
        win_sum = np.zeros(int(offsets[-1]))
        used = np.zeros(n_items)
        summary = [m for m in self.members if m.kind == "features"]
        if summary:
            x = np.vstack([np.vstack([aggregate(f)[None, :], aggregate_each(f)]) for f in feats])
            for m in summary:
                p = m.proba(x)
                rec_sum += p[offsets[:-1]]
                win_sum += p
            used += len(summary)
        for m in (m for m in self.members if m.kind == "set"):
            # every window's decision once; a recording's is the mean of its windows'
            assert isinstance(m.estimator, SetKernelSVM)
            d, rec_d = m.estimator.decisions(feats)
            wb = np.concatenate([[0], np.cumsum([len(f) for f in feats])])
            rec_sum += m.estimator.proba_from_decisions(rec_d)
            pw = m.estimator.proba_from_decisions(d)
            for i in range(n_items):
                win_sum[offsets[i] + 1 : offsets[i + 1]] += pw[wb[i] : wb[i + 1]]
            used += 1
        raw = [i for i, s in enumerate(series) if s is not None]
        for m in (m for m in self.members if m.kind in SERIES_KINDS and raw):
            ppv = m.series_features(np.concatenate([series[i] for i in raw]))  # type: ignore[misc]
            bounds = np.cumsum([0] + [len(series[i]) for i in raw])  # type: ignore[arg-type]
            x = np.vstack([
                np.vstack([ppv[a:b].mean(axis=0, keepdims=True), ppv[a:b]])
                for a, b in itertools.pairwise(bounds)
            ])  # fmt: skip
            p = m.proba(x)
            local = np.concatenate([[0], np.cumsum([1 + len(series[i]) for i in raw])])  # type: ignore[arg-type]
            for j, i in enumerate(raw):
                rec_sum[i] += p[local[j]]
                win_sum[offsets[i] : offsets[i + 1]] += p[local[j] : local[j + 1]]
                used[i] += 1
        out = []
        for i in range(n_items):
            prob = float(rec_sum[i] / used[i])
            wins = win_sum[offsets[i] + 1 : offsets[i + 1]] / used[i]
            out.append(Prediction(prob, self.label(prob), wins, starts[i]))
        return out
