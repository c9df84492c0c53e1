"""Train and honestly evaluate the diagnosis model.

    python -m ml.train --data DIR --out DIR [--model NAME|auto] [--folds 5] [--seed 0]
                       [--repeats N] [--leaky]

1. Every recording in ``--data`` (default ``$GAITPDB_DIR``) is cut into windows
   and featurised (:mod:`ml.features`); the 16 sensor series are kept when a
   MiniRocket member is asked for.
2. Cross-validation by subject: ``--folds`` outer folds (``StratifiedGroupKFold``,
   groups = subject, strata = study x group). In each outer training set the
   model's members are fitted and Platt-calibrated with ``--inner-folds``
   subject-wise folds, then score the outer test subjects. The model is
   ``--model`` (default :data:`ml.model.DEFAULT_MODEL`), fixed before the run; with
   ``--model auto`` the inner folds also pick, per outer fold, the candidate
   (:data:`ml.model.CANDIDATES`) with the best inner AUC (nested selection). The
   set kernel's scaling and the MiniRocket transform are fitted on
   outer-training windows only. Nothing is ever tuned on a split that puts a
   subject on both sides.
3. The reported figures are those out-of-fold predictions: recording-level AUC,
   balanced accuracy, sensitivity and specificity per fold, per study, per walk
   type and overall, with 95 % subject-bootstrap intervals; ``--repeats`` reruns
   the whole procedure on other fold assignments. Every ``--candidates`` model
   is scored on the same outer folds, for comparison.
4. The final model (``--model``, or with ``auto`` the candidate with the best
   outer-CV AUC) is refitted on all data and written with ``model.json``,
   ``MODEL_CARD.md`` and plots.

Inputs are the force recordings only: UPDRS, Hoehn & Yahr, the study and the
other demographics are never read here (``tests/unit/test_ml_train.py`` checks).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from threadpoolctl import threadpool_limits

from . import data as D
from . import features as F
from .evaluate import binary_metrics, evaluation_table, subject_folds
from .hydra import Hydra, foot_totals
from .model import (
    CANDIDATES,
    DEFAULT_CANDIDATES,
    DEFAULT_MODEL,
    MEMBERS,
    SERIES_KINDS,
    GaitModel,
    Member,
    aggregate,
    fit_member,
    make_hydra,
    make_rocket,
    member_oof_scores,
)
from .rocket import MiniRocket

__all__ = ["Dataset", "load_dataset", "main", "nested_cv", "train"]

#: Metadata columns the model may see (labels and grouping only, never inputs).
META_COLUMNS = ("id", "subject", "study", "group", "label", "walk", "dual_task")


def log(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Featurised recordings: ``meta`` rows align with ``feats`` and ``series``."""

    meta: pd.DataFrame  # META_COLUMNS
    feats: list[np.ndarray]  # per recording (k, n_features)
    series: list[np.ndarray] | None  # per recording (k, 16, L) float32
    baseline: list[np.ndarray]  # per recording: the tutorial's 100-row means (b, 18)
    data_hash: str
    window_s: float
    step_s: float
    # the Hydra transform and every recording's mean Hydra features, once computed
    _hydra: tuple[Hydra, np.ndarray] | None = field(default=None, init=False, repr=False,
                                                    compare=False)  # fmt: skip

    def __post_init__(self) -> None:
        extra = set(self.meta.columns) - set(META_COLUMNS)
        if extra:
            raise ValueError(f"unexpected metadata columns {sorted(extra)}")

    @property
    def y(self) -> np.ndarray:
        return self.meta["label"].to_numpy(dtype=int)

    def aggregated(self) -> np.ndarray:
        return np.stack([aggregate(f) for f in self.feats])

    def hydra_features(self, jobs: int = 2) -> tuple[Hydra, np.ndarray]:
        """The Hydra transform (:func:`ml.model.make_hydra`) and every recording's mean
        Hydra features, computed on first use."""
        if self._hydra is None:
            if self.series is None:
                raise ValueError("a hydra member needs the sensor series (load them)")
            hydra = make_hydra().fit(foot_totals(self.series[0][:1]))
            t0 = time.perf_counter()
            self._hydra = (hydra, hydra_transform(hydra, self.series, jobs))
            log(f"  hydra features of {sum(len(s) for s in self.series)} windows "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        return self._hydra

    def bags(self) -> np.ndarray:
        """Each recording's window features, as a 1-d object array (index it by rows)."""
        out = np.empty(len(self.feats), dtype=object)
        out[:] = self.feats
        return out


def _prepare(path: str, window_s: float, step_s: float, series: bool) -> tuple:
    raw = Path(path).read_bytes()
    x = D.load_recording(path)
    _, feats = F.recording_features(x, F.FS, window_s, step_s)
    s = F.sensor_series(x, F.FS, window_s, step_s) if series else None
    frame = pd.DataFrame(x, columns=list(F.COLUMNS))
    frame["recording_id"] = Path(path).name
    frame["seq"] = np.arange(len(frame))
    base = F.baseline_frame(frame).loc[:, list(F.BASELINE_NAMES)].to_numpy()
    return hashlib.sha256(raw).hexdigest(), feats, s, base


def load_dataset(directory: str | Path | None = None, *, window_s: float = F.DEFAULT_WINDOW_S,
                 step_s: float = F.DEFAULT_STEP_S, series: bool = True, jobs: int = 2,
                 ids: Sequence[str] | None = None) -> Dataset:  # fmt: skip
    """Load and featurise every recording (in ``jobs`` processes)."""
    listing = D.list_recordings(directory)
    if ids is not None:
        listing = listing[listing["id"].isin(set(ids))].reset_index(drop=True)
    paths = listing["path"].tolist()
    args = ([window_s] * len(paths), [step_s] * len(paths), [series] * len(paths))
    results = []
    t0 = time.perf_counter()
    if jobs > 1 and len(paths) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            for i, r in enumerate(ex.map(_prepare, paths, *args, chunksize=4), 1):
                results.append(r)
                if i % 40 == 0 or i == len(paths):
                    log(f"  featurised {i}/{len(paths)} recordings ({time.perf_counter() - t0:.0f} s)")
    else:
        for p, *a in zip(paths, *args, strict=True):
            results.append(_prepare(p, *a))
    keep = [i for i, r in enumerate(results) if r[1].shape[0] > 0]
    if len(keep) < len(results):
        short = listing["id"].iloc[[i for i in range(len(results)) if i not in keep]].tolist()
        log(f"  skipping {len(short)} recordings shorter than one window: {short}")
    h = hashlib.sha256()
    for rid, r in sorted(zip(listing["id"], results, strict=True)):
        h.update(f"{rid}\t{r[0]}\n".encode())
    meta = listing.loc[keep, list(META_COLUMNS)].reset_index(drop=True)
    return Dataset(
        meta=meta,
        feats=[results[i][1] for i in keep],
        series=[results[i][2] for i in keep] if series else None,
        baseline=[results[i][3] for i in keep],
        data_hash=h.hexdigest(),
        window_s=window_s,
        step_s=step_s,
    )


# ----------------------------------------------------------------------------- rocket


def rocket_fit_transform(series: list[np.ndarray], train: np.ndarray, seed: int,
                         jobs: int = 2, max_fit_windows: int = 2000,
                         ) -> tuple[MiniRocket, np.ndarray]:  # fmt: skip
    """Fit MiniRocket on windows of ``train`` recordings; mean PPV of every recording."""
    rng = np.random.default_rng(seed)
    pool = np.concatenate([series[i] for i in train])
    pick = rng.choice(len(pool), size=min(max_fit_windows, len(pool)), replace=False)
    rocket = make_rocket(seed).fit(pool[np.sort(pick)])
    del pool
    return rocket, rocket_transform(rocket, series, jobs)


def _rocket_chunk(rocket: MiniRocket | Hydra, x: np.ndarray) -> np.ndarray:
    with threadpool_limits(1):
        return rocket.transform(x)


def hydra_transform(hydra: Hydra, series: list[np.ndarray], jobs: int = 2) -> np.ndarray:
    """Mean Hydra features of each recording's windows (of the feet's total force)."""
    return rocket_transform(hydra, [foot_totals(s) for s in series], jobs)


def rocket_transform(rocket: MiniRocket | Hydra, series: list[np.ndarray],
                     jobs: int = 2) -> np.ndarray:  # fmt: skip
    """Mean MiniRocket (or other series transform) features of each recording's
    windows (``jobs`` processes)."""
    allw = np.concatenate(series)
    bounds = np.cumsum([0] + [len(s) for s in series])
    step = 256
    chunks = [allw[a : a + step] for a in range(0, len(allw), step)]
    if jobs > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as ex:
            parts = list(ex.map(_rocket_chunk, [rocket] * len(chunks), chunks))
    else:
        parts = [_rocket_chunk(rocket, c) for c in chunks]
    out = np.concatenate(parts)
    return np.stack([out[bounds[i] : bounds[i + 1]].mean(axis=0) for i in range(len(series))])


# ----------------------------------------------------------------------------- models


@dataclass
class Inputs:
    """What the members read, row-aligned with the recordings: the aggregated
    summaries, the window-feature bags and, when a rocket member is used, the
    fitted MiniRocket transform and every recording's mean MiniRocket features."""

    agg: np.ndarray
    bags: np.ndarray
    rk: np.ndarray | None = None
    rocket: MiniRocket | None = None
    hy: np.ndarray | None = None  # every recording's mean Hydra features
    hydra: Hydra | None = None

    def read(self, member: str, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Member ``member``'s input for ``rows``, as :meth:`Member.proba` takes it."""
        kind = MEMBERS[member].kind
        if kind == "set":
            return list(self.bags[rows])
        if kind in SERIES_KINDS:
            x = self.rk if kind == "rocket" else self.hy
            if x is None:
                raise ValueError(f"member {member!r} needs the sensor series (load them)")
            return x[rows]
        return self.agg[rows]

    def transform(self, member: str) -> MiniRocket | Hydra | None:
        """The fitted series transform member ``member``'s input came from."""
        kind = MEMBERS[member].kind
        return self.rocket if kind == "rocket" else self.hydra if kind == "hydra" else None


def _local_folds(folds: Sequence[tuple[np.ndarray, np.ndarray]],
                 rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """``folds`` (global row numbers) as positions within ``rows``."""
    pos = {r: i for i, r in enumerate(rows)}
    return [(np.array([pos[i] for i in a]), np.array([pos[i] for i in b])) for a, b in folds]


def select_candidate(meta: pd.DataFrame, inputs: Inputs, train: np.ndarray,
                     candidates: Sequence[str], inner_folds: int, seed: int,
                     ) -> tuple[str, dict[str, float]]:  # fmt: skip
    """Pick the candidate with the best inner-CV AUC on the ``train`` rows only."""
    yt = meta["label"].to_numpy(dtype=int)[train]
    local = _local_folds(subject_folds(meta, inner_folds, seed, index=train), train)
    members = sorted({m for c in candidates for m in CANDIDATES[c]})
    ranks = {m: rankdata(member_oof_scores(m, inputs.read(m, train), yt, local, seed)) / len(train)
             for m in members}  # fmt: skip
    scores = {}
    for c in candidates:
        s = np.mean([ranks[m] for m in CANDIDATES[c]], axis=0)
        scores[c] = binary_metrics(yt, s, 0.5)["auc"]
    best = max(candidates, key=lambda c: (scores[c], -len(CANDIDATES[c])))
    return best, scores


def fit_members(meta: pd.DataFrame, inputs: Inputs, train: np.ndarray, names: Sequence[str],
                inner_folds: int, seed: int) -> dict[str, Member]:  # fmt: skip
    """Calibrated members fitted on ``train`` rows (calibration folds by subject)."""
    yt = meta["label"].to_numpy(dtype=int)[train]
    local = _local_folds(subject_folds(meta, inner_folds, seed, index=train), train)
    return {m: fit_member(m, inputs.read(m, train), yt, local, seed, inputs.transform(m))
            for m in names}  # fmt: skip


def _ensemble_proba(members: dict[str, Member], cand: str, inputs: Inputs,
                    rows: np.ndarray) -> np.ndarray:  # fmt: skip
    return np.mean([members[m].proba(inputs.read(m, rows)) for m in CANDIDATES[cand]], axis=0)


@dataclass
class CVResult:
    nested: np.ndarray  # out-of-fold probability of the model (or selected candidate)
    threshold: np.ndarray  # per recording: its fold's threshold (training prevalence)
    fold_of: np.ndarray
    chosen: list[str]  # the model, or the candidate selected, in each outer fold
    inner_scores: list[dict[str, float]]  # inner AUCs (nested selection only)
    per_candidate: dict[str, np.ndarray]  # outer OOF probability of every candidate
    fold_seconds: list[float]


def nested_cv(ds: Dataset, *, folds: int = 5, inner_folds: int = 4, seed: int = 0,
              candidates: Sequence[str] = DEFAULT_CANDIDATES, jobs: int = 2,
              model: str | None = DEFAULT_MODEL) -> CVResult:  # fmt: skip
    """Subject-wise cross-validation of ``model`` (fixed) or, with ``model=None``, of
    the candidate picked by the inner folds in each outer fold (nested selection).
    Every candidate is scored on the same outer folds."""
    meta, y = ds.meta, ds.y
    if model is not None and model not in candidates:
        candidates = [model, *candidates]
    inputs = Inputs(ds.aggregated(), ds.bags())
    kinds = {MEMBERS[m].kind for c in candidates for m in CANDIDATES[c]}
    if ds.series is None:
        if model is not None and any(MEMBERS[m].kind in SERIES_KINDS for m in CANDIDATES[model]):
            raise ValueError(f"model {model!r} needs the sensor series (load them)")
        candidates = [c for c in candidates
                      if all(MEMBERS[m].kind not in SERIES_KINDS for m in CANDIDATES[c])]  # fmt: skip
        kinds -= set(SERIES_KINDS)
    use_rocket = "rocket" in kinds
    if "hydra" in kinds:
        inputs.hydra, inputs.hy = ds.hydra_features(jobs)
    n = len(meta)
    res = CVResult(np.full(n, np.nan), np.full(n, np.nan), np.full(n, -1), [], [],
                   {c: np.full(n, np.nan) for c in candidates}, [])  # fmt: skip
    for k, (tr, te) in enumerate(subject_folds(meta, folds, seed)):
        t0 = time.perf_counter()
        if use_rocket:
            assert ds.series is not None
            inputs.rocket, inputs.rk = rocket_fit_transform(ds.series, tr, seed + k, jobs)
        if model is None:
            best, scores = select_candidate(meta, inputs, tr, candidates, inner_folds, seed + 1)
        else:
            best, scores = model, {}
        needed = sorted({m for c in candidates for m in CANDIDATES[c]})
        members = fit_members(meta, inputs, tr, needed, inner_folds, seed + 2)
        for c in candidates:
            res.per_candidate[c][te] = _ensemble_proba(members, c, inputs, te)
        res.nested[te] = res.per_candidate[best][te]
        res.threshold[te] = float(y[tr].mean())
        res.fold_of[te] = k
        res.chosen.append(best)
        res.inner_scores.append(scores)
        dt = time.perf_counter() - t0
        res.fold_seconds.append(dt)
        m = binary_metrics(y[te], res.nested[te], float(y[tr].mean()))
        pick = f"inner pick {best} (inner AUC {scores[best]:.3f})" if scores else best
        log(
            f"fold {k + 1}/{folds}: {len(set(meta.subject.iloc[te]))} test subjects, "
            f"{pick}; outer AUC {m['auc']:.3f} bal.acc {m['balanced_accuracy']:.3f} ({dt:.0f} s)"
        )
    return res


def fit_final(ds: Dataset, candidate: str, *, inner_folds: int = 4, seed: int = 0,
              jobs: int = 2, version: str) -> GaitModel:  # fmt: skip
    meta = ds.meta
    inputs = Inputs(ds.aggregated(), ds.bags())
    names = CANDIDATES[candidate]
    everyone = np.arange(len(meta))
    if any(MEMBERS[m].kind == "rocket" for m in names):
        assert ds.series is not None
        inputs.rocket, inputs.rk = rocket_fit_transform(ds.series, everyone, seed, jobs)
    if any(MEMBERS[m].kind == "hydra" for m in names):
        inputs.hydra, inputs.hy = ds.hydra_features(jobs)
    members = fit_members(meta, inputs, everyone, names, inner_folds, seed + 2)
    return GaitModel(
        version=version,
        candidate=candidate,
        members=[members[m] for m in names],
        threshold=float(ds.y.mean()),
        window_s=ds.window_s,
        step_s=ds.step_s,
    )


# ----------------------------------------------------------------------------- leaky


def leaky_comparison(ds: Dataset, candidate: str, seed: int = 0, folds: int = 5,
                     jobs: int = 2) -> dict[str, Any]:  # fmt: skip
    """What splits that ignore subjects would report (for the README's comparison).

    * ``random_window_split``: windows shuffled into folds regardless of recording or
      subject; a window-level extra-trees classifier; window-level metrics.
    * ``random_recording_split``: recordings shuffled into folds regardless of subject
      (walks of one person on both sides); the feature members of the final candidate.
    * ``tutorial_knn``: the original tutorial, k-NN on 100-row means with a random
      split of the 100-row blocks, next to the same k-NN split by subject.
    """
    from sklearn.ensemble import ExtraTreesClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline

    y = ds.y
    out: dict[str, Any] = {}
    # 1. random window split
    X = np.concatenate(ds.feats)
    yw = np.concatenate([[y[i]] * len(f) for i, f in enumerate(ds.feats)])
    p = np.zeros(len(yw))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, yw):
        est = make_pipeline(
            SimpleImputer(strategy="median"),
            ExtraTreesClassifier(300, min_samples_leaf=1, n_jobs=jobs, random_state=seed),
        ).fit(X[tr], yw[tr])
        p[te] = est.predict_proba(X[te])[:, 1]
    out["random_window_split"] = binary_metrics(yw, p, 0.5) | {"unit": "window"}
    log(f"leaky: random window split AUC {out['random_window_split']['auc']:.3f}")
    # 2. random recording split (same candidate's window-feature members)
    names = [m for m in CANDIDATES[candidate]
             if MEMBERS[m].kind not in SERIES_KINDS] or ["logreg"]  # fmt: skip
    inputs = Inputs(ds.aggregated(), ds.bags())
    p = np.zeros(len(y))
    thr = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(inputs.agg, y):
        folds_tr = list(StratifiedKFold(4, shuffle=True, random_state=seed).split(tr, y[tr]))
        p[te] = np.mean([fit_member(m, inputs.read(m, tr), y[tr], folds_tr, seed)
                         .proba(inputs.read(m, te)) for m in names], axis=0)  # fmt: skip
        thr[te] = y[tr].mean()
    out["random_recording_split"] = (
        binary_metrics(y, p - thr + 0.5, 0.5)
        | {"auc": binary_metrics(y, p, 0.5)["auc"], "unit": "recording", "members": names}
    )
    log(f"leaky: random recording split AUC {out['random_recording_split']['auc']:.3f}")
    out["tutorial_knn"] = _tutorial_knn(ds, seed, folds)
    return out


def _tutorial_knn(ds: Dataset, seed: int, folds: int) -> dict[str, Any]:
    from sklearn.model_selection import StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    blocks = ds.baseline
    yb = [np.full(len(b), ds.y[i]) for i, b in enumerate(blocks)]
    rec = [np.full(len(b), i) for i, b in enumerate(blocks)]
    Xb, yb_, rb = np.concatenate(blocks), np.concatenate(yb), np.concatenate(rec)
    subj = ds.meta["subject"].to_numpy()[rb]

    def knn() -> Any:
        return make_pipeline(StandardScaler(), KNeighborsClassifier(5))

    res: dict[str, Any] = {}
    p = np.zeros(len(yb_))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Xb, yb_):
        p[te] = knn().fit(Xb[tr], yb_[tr]).predict_proba(Xb[te])[:, 1]
    res["random_block_split"] = binary_metrics(yb_, p, 0.5) | {
        "accuracy": float(((p >= 0.5) == yb_).mean()), "unit": "100-row block"
    }
    meta_b = pd.DataFrame({"subject": subj, "study": ds.meta["study"].to_numpy()[rb], "label": yb_})
    p = np.zeros(len(yb_))
    for tr, te in subject_folds(meta_b, folds, seed):
        p[te] = knn().fit(Xb[tr], yb_[tr]).predict_proba(Xb[te])[:, 1]
    res["subject_split"] = binary_metrics(yb_, p, 0.5) | {
        "accuracy": float(((p >= 0.5) == yb_).mean()), "unit": "100-row block"
    }
    log(
        f"leaky: tutorial k-NN accuracy {res['random_block_split']['accuracy']:.3f} (random "
        f"blocks) vs {res['subject_split']['accuracy']:.3f} (by subject)"
    )
    return res


# ----------------------------------------------------------------------------- driver


def _overall(meta: pd.DataFrame, run: CVResult, seed: int) -> dict[str, Any]:
    """One repeat's recording-level figures, overall and per study."""
    y = meta.label.to_numpy()

    def figures(mask: np.ndarray) -> dict[str, float]:
        m = binary_metrics(y[mask], (run.nested - run.threshold + 0.5)[mask], 0.5)
        m["auc"] = binary_metrics(y[mask], run.nested[mask], 0.5)["auc"]
        return {k: m[k] for k in ("auc", "balanced_accuracy", "sensitivity", "specificity")}

    studies = meta.study.to_numpy()
    return {"seed": seed, **figures(np.ones(len(y), dtype=bool)), "chosen": run.chosen,
            "per_study": {str(s): figures(studies == s) for s in sorted(set(studies))}}  # fmt: skip


def _window_subset(model: GaitModel, cand_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The candidate made of the members that score feature windows, when that is not
    the whole model (series members): its CV figures are what the pipeline gets."""
    window = "+".join(m.name for m in model.feature_members)
    if len(model.feature_members) == len(model.members):
        return None
    return next((r for r in cand_rows if r["members"] == window),
                {"candidate": None, "members": window})  # fmt: skip


def train(data_dir: str | Path, out_dir: str | Path, *, folds: int = 5, inner_folds: int = 4,
          seed: int = 0, leaky: bool = False, window_s: float = F.DEFAULT_WINDOW_S,
          step_s: float = F.DEFAULT_STEP_S, candidates: Sequence[str] | None = None,
          jobs: int = 2, n_boot: int = 1000, ids: Sequence[str] | None = None,
          repeats: int = 1, model: str | None = DEFAULT_MODEL) -> Path:  # fmt: skip
    """Run the whole procedure; returns the new model's version directory.

    ``model`` is the candidate evaluated and shipped (fixed in advance); ``None``
    selects a candidate inside the inner folds of each outer fold instead, and
    ships the one with the best outer-CV AUC.
    """
    from .artifact import save_model
    from .report import write_report

    t_start = time.perf_counter()
    fixed = model  # the model's name, or None for nested selection
    candidates = list(candidates or DEFAULT_CANDIDATES)
    if fixed is not None and fixed not in candidates:
        candidates.insert(0, fixed)
    unknown = set(candidates) - set(CANDIDATES)
    if unknown:
        raise ValueError(f"unknown candidates {sorted(unknown)}; known: {sorted(CANDIDATES)}")
    use_series = any(MEMBERS[m].kind in SERIES_KINDS for c in candidates for m in CANDIDATES[c])
    data_dir = D.data_dir(data_dir)
    log(f"loading recordings from {data_dir}")
    with threadpool_limits(1, user_api="blas"):
        ds = load_dataset(data_dir, window_s=window_s, step_s=step_s, series=use_series,
                          jobs=jobs, ids=ids)  # fmt: skip
        meta = ds.meta
        n_win = sum(len(f) for f in ds.feats)
        log(
            f"{len(meta)} recordings, {meta.subject.nunique()} subjects, {n_win} windows of "
            f"{window_s:g} s (step {step_s:g} s), {len(F.FEATURE_NAMES)} features; "
            f"data sha256 {ds.data_hash[:12]}"
        )
        t_cv = time.perf_counter()
        runs = []
        for r in range(repeats):
            if repeats > 1:
                log(f"repeat {r + 1}/{repeats} (seed {seed + r})")
            runs.append(nested_cv(ds, folds=folds, inner_folds=inner_folds, seed=seed + r,
                                  candidates=candidates, jobs=jobs, model=fixed))  # fmt: skip
        cv = runs[0]
        cv_seconds = time.perf_counter() - t_cv
        table = evaluation_table(meta, cv.nested, cv.threshold, cv.fold_of, n_boot, seed)
        overall = table[table.slice == "overall"].iloc[0]
        log(
            f"{'CV of ' + fixed if fixed else 'nested CV'}: AUC {overall.auc:.3f} "
            f"[{overall.auc_lo:.3f}, {overall.auc_hi:.3f}], "
            f"balanced accuracy {overall.balanced_accuracy:.3f} "
            f"[{overall.balanced_accuracy_lo:.3f}, {overall.balanced_accuracy_hi:.3f}]"
        )
        repeat_rows = [_overall(meta, run, seed + r) for r, run in enumerate(runs)]
        if repeats > 1:
            aucs = [row["auc"] for row in repeat_rows]
            bals = [row["balanced_accuracy"] for row in repeat_rows]
            log(f"over {repeats} repeats: AUC {np.mean(aucs):.3f} +- {np.std(aucs):.3f}, "
                f"balanced accuracy {np.mean(bals):.3f} +- {np.std(bals):.3f}")  # fmt: skip
        cand_rows = []
        y_all = meta.label.to_numpy()
        for c in cv.per_candidate:
            per_run = []
            for run in runs:
                p = run.per_candidate[c]
                m = binary_metrics(y_all, p - run.threshold + 0.5, 0.5)
                m["auc"] = binary_metrics(y_all, p, 0.5)["auc"]
                per_run.append(m)
            row = {k: float(np.mean([m[k] for m in per_run])) for k in
                   ("auc", "balanced_accuracy", "sensitivity", "specificity")}  # fmt: skip
            cand_rows.append({"candidate": c, "members": "+".join(CANDIDATES[c]), **row,
                              "times_chosen": sum(run.chosen.count(c) for run in runs)})  # fmt: skip
        cand_table = pd.DataFrame(cand_rows).sort_values("auc", ascending=False)
        if fixed is not None:
            final = fixed
            log(f"final model (fixed in advance): {final}; fitting on all data")
        else:
            final = str(cand_table.iloc[0]["candidate"])
            log(f"final candidate (best outer-CV AUC): {final}; fitting on all data")
        version = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{ds.data_hash[:8]}"
        t_fit = time.perf_counter()
        gait_model = fit_final(ds, final, inner_folds=inner_folds, seed=seed, jobs=jobs,
                               version=version)  # fmt: skip
        fit_seconds = time.perf_counter() - t_fit
        leak = leaky_comparison(ds, final, seed, folds, jobs) if leaky else None
    subj_p = pd.Series(cv.nested).groupby(meta.subject.to_numpy()).mean()
    subj_y = meta.groupby("subject").label.first().loc[subj_p.index]
    subj_thr = pd.Series(cv.threshold).groupby(meta.subject.to_numpy()).mean()
    subject_level = binary_metrics(subj_y.to_numpy(), (subj_p - subj_thr + 0.5).to_numpy(), 0.5)
    subject_level["auc"] = binary_metrics(subj_y.to_numpy(), subj_p.to_numpy(), 0.5)["auc"]
    meta_json = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": {
            "sha256": ds.data_hash,
            "n_recordings": len(meta),
            "n_subjects": int(meta.subject.nunique()),
            "n_windows": int(n_win),
            "n_parkinson_recordings": int(meta.label.sum()),
        },
        "inputs": {
            "raw": "rows of 19 numbers at 100 Hz: " + ", ".join(F.COLUMNS),
            "never_used": ["UPDRS", "UPDRSM", "HoehnYahr", "study", "demographics"],
            "feature_windows_supported": bool(gait_model.feature_members),
        },
        "evaluation": {
            "scheme": (
                f"subject-wise CV of the model fixed in advance ({fixed}): {folds} outer "
                "StratifiedGroupKFold folds (groups = subject, strata = study x group); in "
                f"each outer training set, {inner_folds} subject-wise inner folds for Platt "
                "calibration, no selection; recording-level metrics; 95% CIs from "
                f"{n_boot} subject-bootstrap resamples"
                if fixed is not None else
                f"nested subject-wise CV: {folds} outer StratifiedGroupKFold folds (groups = "
                f"subject, strata = study x group), {inner_folds} inner folds for model "
                "selection and Platt calibration; recording-level metrics; 95% CIs from "
                f"{n_boot} subject-bootstrap resamples"
            ),
            "model_fixed_in_advance": fixed is not None,
            "seed": seed,
            "metrics": table.to_dict(orient="records"),
            "subject_level": subject_level,
            "candidates": cand_table.to_dict(orient="records"),
            "window_subset": _window_subset(gait_model, cand_rows),
            "chosen_per_fold": cv.chosen,
            "repeats": repeat_rows,
            "leaky": leak,
        },
        "timing_seconds": {
            "total": None,
            "cross_validation": round(cv_seconds, 1),
            "final_fit": round(fit_seconds, 1),
        },
    }
    out = Path(out_dir)
    meta_json["timing_seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    vdir = save_model(gait_model, meta_json, out)
    preds = meta.assign(probability=cv.nested, threshold=cv.threshold, fold=cv.fold_of)
    for c, p in cv.per_candidate.items():
        preds[f"p_{c}"] = p
    preds.to_csv(vdir / "cv_predictions.csv", index=False)
    write_report(vdir, gait_model, meta_json, preds, table, cand_table)
    log(f"wrote {vdir} in {time.perf_counter() - t_start:.0f} s total")
    return vdir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ml.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=None, help=f"dataset directory (default ${D.ENV_VAR})")
    ap.add_argument("--out", default="artifacts/model", help="models directory")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--inner-folds", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leaky", action="store_true",
                    help="also report what subject-ignoring splits would claim")  # fmt: skip
    ap.add_argument("--window", type=float, default=F.DEFAULT_WINDOW_S, help="window length, s")
    ap.add_argument("--step", type=float, default=F.DEFAULT_STEP_S, help="window step, s")
    ap.add_argument("--model", default=None,
                    help=f"the model to evaluate and ship, from {','.join(CANDIDATES)}, or "
                         f"'auto': pick among --candidates inside the inner folds (nested "
                         f"selection) and ship the best outer-CV AUC (default {DEFAULT_MODEL}; "
                         f"'auto' when --candidates is given, as before --model existed)")
    ap.add_argument("--candidates", default=None,
                    help=f"comma-separated, from {','.join(CANDIDATES)}, also scored for "
                         f"comparison (default {','.join(DEFAULT_CANDIDATES)})")  # fmt: skip
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=1,
                    help="repeat the cross-validation with seeds seed..seed+N-1 (mean +- sd reported)")
    args = ap.parse_args(argv)
    if args.model is None:
        args.model = "auto" if args.candidates else DEFAULT_MODEL
    if args.model != "auto" and args.model not in CANDIDATES:
        ap.error(f"--model: unknown {args.model!r}; known: auto, {', '.join(CANDIDATES)}")
    try:
        train(
            args.data, args.out, folds=args.folds, inner_folds=args.inner_folds, seed=args.seed,
            leaky=args.leaky, window_s=args.window, step_s=args.step,
            candidates=args.candidates.split(",") if args.candidates else None,
            jobs=args.jobs, n_boot=args.bootstrap, repeats=args.repeats,
            model=None if args.model == "auto" else args.model,
        )  # fmt: skip
    except (D.DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
