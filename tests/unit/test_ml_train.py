"""Subject-wise evaluation, training on a tiny synthetic dataset, artifacts."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml import data as D
from ml import evaluate as E
from ml import features as F
from ml import train as T
from ml.artifact import ArtifactError, list_versions, load_model
from ml.hydra import Hydra, foot_totals
from ml.model import CANDIDATES, DEFAULT_CANDIDATES, DEFAULT_MODEL, MEMBERS, aggregate
from ml.rocket import MiniRocket
from ml.synthetic import write_synthetic_dataset

DEMOGRAPHIC_WORDS = ("updrs", "hoehn", "yahr", "study", "age", "height", "weight", "gender",
                     "speed", "tuag")  # fmt: skip


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), n_controls=6, n_patients=6,
                                   walks=2, seconds=30.0, seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def trained(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    return T.train(synth_dir, out, folds=3, inner_folds=2, seed=0, leaky=True,
                   candidates=["logreg", "svm", "ensemble_features"], jobs=1, n_boot=50)  # fmt: skip


# ----------------------------------------------------------------------------- folds


def _meta(n_subjects: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subjects):
        study = ["Ga", "Ju", "Si"][s % 3]
        label = int(s % 2)
        for w in range(int(rng.integers(1, 8))):
            rows.append({"id": f"{s}_{w}", "subject": f"{study}{s}", "study": study, "label": label})
    return pd.DataFrame(rows)


def test_no_subject_on_both_sides_of_any_fold() -> None:
    meta = _meta()
    folds = E.subject_folds(meta, 5, seed=3)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen) == list(range(len(meta)))  # each row tested once
    for tr, te in folds:
        assert not set(meta.subject.iloc[tr]) & set(meta.subject.iloc[te])
        # inner folds inside the training rows stay inside them, also by subject
        for itr, ite in E.subject_folds(meta, 3, seed=4, index=tr):
            assert set(itr) | set(ite) <= set(tr)
            assert not set(meta.subject.iloc[itr]) & set(meta.subject.iloc[ite])


def test_real_data_folds_are_subject_wise_and_stratified() -> None:
    path = os.environ.get(D.ENV_VAR)
    if not path:
        pytest.fail(f"{D.ENV_VAR} is not set: point it at the gaitpdb copy")
    meta = D.list_recordings(path)
    for seed in range(3):
        for tr, te in E.subject_folds(meta, 5, seed):
            E.check_disjoint(meta, tr, te)
            strata = set(meta.study.iloc[te] + meta.group.iloc[te])
            assert strata == {"GaCo", "GaPt", "JuCo", "JuPt", "SiCo", "SiPt"}


def test_check_disjoint_catches_a_leak() -> None:
    meta = _meta(6)
    a = np.flatnonzero(meta.subject == meta.subject.iloc[0])
    with pytest.raises(AssertionError, match="both sides"):
        E.check_disjoint(meta, a[:1], np.r_[a[1:], a[:1]])


def test_metrics_and_bootstrap() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.6, 0.5, 0.7, 0.8, 0.9])
    m = E.binary_metrics(y, p, 0.55)
    assert m["sensitivity"] == 0.75 and m["specificity"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(11 / 12)
    assert m["balanced_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)
    groups = np.array(["a", "a", "b", "c", "c", "d", "e"])
    ci = E.bootstrap_ci(y, p, groups, 0.55, n_boot=200, seed=0)
    lo, hi = ci["auc"]
    assert 0.0 <= lo <= m["auc"] <= hi <= 1.0


def test_rocket_transform_is_deterministic() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 3, 200)).astype(np.float32)
    a = MiniRocket(num_features=336, random_state=1).fit(x)
    b = MiniRocket(num_features=336, random_state=1).fit(x)
    ta, tb = a.transform(x), b.transform(x)
    assert ta.shape == (12, a.n_features_out_) and a.n_features_out_ == 336
    np.testing.assert_array_equal(ta, tb)
    assert ((ta >= 0) & (ta <= 1)).all()
    with pytest.raises(ValueError, match="fitted on 3 channels"):
        a.transform(x[:, :2])


# ----------------------------------------------------------------------------- inputs


def test_demographics_and_study_are_never_inputs(synth_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # 1. the feature names say nothing about demographics or the study
    assert not [n for n in F.FEATURE_NAMES if any(w in n.lower() for w in DEMOGRAPHIC_WORDS)]
    # 2. training never reads demographics.txt (UPDRS, Hoehn & Yahr live there)
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("demographics were read")

    monkeypatch.setattr(D, "load_demographics", boom)
    ds = T.load_dataset(synth_dir, series=False, jobs=1)
    # 3. the inputs come from the signals alone: the same recording under another
    #    study's (and group's) name has the same features
    other = tmp_path / "renamed"
    other.mkdir()
    src = min(synth_dir.glob("GaCo*_01.txt.gz"))
    shutil.copy(src, other / "SiPt77_04.txt.gz")
    shutil.copy(src, other / src.name)
    ds2 = T.load_dataset(other, series=False, jobs=1)
    np.testing.assert_array_equal(ds2.feats[0], ds2.feats[1])
    # 4. a dataset refuses metadata columns other than labels and grouping
    with pytest.raises(ValueError, match="unexpected metadata"):
        T.Dataset(meta=ds.meta.assign(UPDRS=1.0), feats=ds.feats, series=None,
                  baseline=ds.baseline, data_hash="x", window_s=10, step_s=5)  # fmt: skip
    # 5. models score raw rows or window features, nothing else
    from ml.model import GaitModel

    assert list(GaitModel.predict_rows.__annotations__) == ["rows", "return"]
    assert list(GaitModel.predict_windows.__annotations__) == ["window_feats", "return"]


def test_aggregate_is_quantiles_of_windows() -> None:
    x = np.arange(12, dtype=float).reshape(4, 3)
    x[0, 2] = np.nan
    a = aggregate(x)
    assert a.shape == (9,)
    np.testing.assert_allclose(a[3:6], np.nanmedian(x, axis=0))
    all_nan = aggregate(np.full((2, 3), np.nan))
    assert np.isnan(all_nan).all()


def test_candidates_reference_known_members() -> None:
    assert {m for ms in CANDIDATES.values() for m in ms} <= set(MEMBERS)
    assert DEFAULT_MODEL in CANDIDATES and set(DEFAULT_CANDIDATES) <= set(CANDIDATES)


def test_fixed_model_is_not_selected_but_auto_selects_inside(synth_dir: Path) -> None:
    ds = T.load_dataset(synth_dir, series=False, jobs=1)
    cands = ["logreg_core", "svm_core"]
    fixed = T.nested_cv(ds, folds=3, inner_folds=2, seed=0, candidates=cands, jobs=1,
                        model="set_svm")  # fmt: skip
    assert fixed.chosen == ["set_svm"] * 3 and fixed.inner_scores == [{}] * 3
    assert set(fixed.per_candidate) == {"set_svm", *cands}  # the model is scored too
    np.testing.assert_array_equal(fixed.nested, fixed.per_candidate["set_svm"])
    assert np.isfinite(fixed.nested).all() and (fixed.fold_of >= 0).all()
    auto = T.nested_cv(ds, folds=3, inner_folds=2, seed=0, candidates=[*cands, "set_svm",
                       "ensemble_set"], jobs=1, model=None)  # fmt: skip
    assert all(set(s) == {*cands, "set_svm", "ensemble_set"} for s in auto.inner_scores)
    for k, pick in enumerate(auto.chosen):
        scores = auto.inner_scores[k]
        assert scores[pick] == max(scores.values())
        te = auto.fold_of == k
        np.testing.assert_array_equal(auto.nested[te], auto.per_candidate[pick][te])
    with pytest.raises(ValueError, match="sensor series"):
        T.nested_cv(ds, folds=3, inner_folds=2, candidates=cands, jobs=1, model="ensemble_all")


def test_every_member_kind_is_fitted_and_scored_through_one_interface(synth_dir: Path) -> None:
    from ml.model import feature_columns, fit_member, member_oof_scores

    ds = T.load_dataset(synth_dir, series=False, jobs=1)
    y, rows = ds.y, np.arange(len(ds.y))
    inputs = T.Inputs(ds.aggregated(), ds.bags())
    folds = T._local_folds(E.subject_folds(ds.meta, 2, seed=0), rows)
    for name in ("logreg_core", "svm", "set_svm"):
        x = inputs.read(name, rows)
        member = fit_member(name, x, y, folds, seed=0)
        assert member.kind == MEMBERS[name].kind
        p = member.proba(x)
        assert p.shape == (len(y),) and ((p >= 0) & (p <= 1)).all()
        oof = member_oof_scores(name, x, y, folds, seed=0)
        assert np.isfinite(oof).all()  # every row scored once, out of fold
    # a summary member reads its own columns only: the others cannot move its output
    member = fit_member("logreg_core", inputs.agg, y, folds)
    others = np.setdiff1d(np.arange(inputs.agg.shape[1]), feature_columns("core"))
    noisy = inputs.agg.copy()
    noisy[:, others] = np.random.default_rng(0).normal(size=(len(y), len(others))) * 1e6
    np.testing.assert_array_equal(member.proba(inputs.agg), member.proba(noisy))
    with pytest.raises(ValueError, match="rocket_logreg.*sensor series"):
        inputs.read("rocket_logreg", rows)


def test_cli_refuses_an_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        T.main(["--data", str(tmp_path), "--out", str(tmp_path), "--model", "nope"])
    assert exc.value.code == 2
    assert "unknown 'nope'" in capsys.readouterr().err


def test_cli_candidates_without_model_select_among_them(synth_dir: Path, tmp_path: Path) -> None:
    # as before --model existed: ``--candidates logreg`` trains and ships logreg
    small = ["--folds", "3", "--inner-folds", "2", "--bootstrap", "10", "--jobs", "1"]
    assert T.main(["--data", str(synth_dir), "--out", str(tmp_path / "a"),
                   "--candidates", "logreg", *small]) == 0  # fmt: skip
    meta = json.loads(next((tmp_path / "a").glob("*/model.json")).read_text())
    assert meta["candidate"] == "logreg" and not meta["evaluation"]["model_fixed_in_advance"]
    assert T.main(["--data", str(synth_dir), "--out", str(tmp_path / "b"),
                   "--candidates", "logreg", "--model", "svm", *small]) == 0  # fmt: skip
    meta = json.loads(next((tmp_path / "b").glob("*/model.json")).read_text())
    assert meta["candidate"] == "svm" and meta["evaluation"]["model_fixed_in_advance"]
    assert {c["candidate"] for c in meta["evaluation"]["candidates"]} == {"svm", "logreg"}


# ----------------------------------------------------------------------------- end to end


def test_train_writes_a_versioned_artifact(trained: Path) -> None:
    names = {p.name for p in trained.iterdir()}
    assert {"model.joblib", "model.json", "MODEL_CARD.md", "roc.png", "calibration.png",
            "cv_predictions.csv"} <= names  # fmt: skip
    assert (trained.parent / "LATEST").read_text().strip() == trained.name
    meta = json.loads((trained / "model.json").read_text())
    assert meta["version"] == trained.name
    assert meta["feature_names"] == list(F.FEATURE_NAMES)
    assert meta["window"] == {"window_s": 10.0, "step_s": 5.0, "fs": 100.0}
    assert len(meta["training_data"]["sha256"]) == 64
    assert meta["training_data"]["n_recordings"] == 24
    assert {"numpy", "scikit-learn", "pandas", "python"} <= set(meta["libraries"])
    slices = {(m["slice"], m["name"]) for m in meta["evaluation"]["metrics"]}
    assert {("overall", "all"), ("study", "Ga"), ("study", "Ju"), ("study", "Si"),
            ("fold", "0")} <= slices  # fmt: skip
    overall = next(m for m in meta["evaluation"]["metrics"] if m["slice"] == "overall")
    for k in ("auc", "balanced_accuracy", "sensitivity", "specificity"):
        assert overall[f"{k}_lo"] <= overall[k] <= overall[f"{k}_hi"]
    assert overall["auc"] > 0.8  # the synthetic groups are separable
    assert set(meta["evaluation"]["leaky"]) == {"random_window_split", "random_recording_split",
                                                "tutorial_knn"}  # fmt: skip
    card = (trained / "MODEL_CARD.md").read_text()
    assert "![ROC](roc.png)" in card and "subject" in card
    # the default model is evaluated and shipped, fixed in advance; the candidates
    # asked for are scored beside it
    assert meta["candidate"] == DEFAULT_MODEL and meta["evaluation"]["model_fixed_in_advance"]
    assert meta["evaluation"]["chosen_per_fold"] == [DEFAULT_MODEL] * 3
    assert {c["candidate"] for c in meta["evaluation"]["candidates"]} == {
        DEFAULT_MODEL, "logreg", "svm", "ensemble_features"}  # fmt: skip
    assert f"fixed in advance ({DEFAULT_MODEL})" in meta["evaluation"]["scheme"]
    assert f"Model: **{DEFAULT_MODEL}**" in card and "fixed before the\n  cross-validation" in card
    assert f"--model {DEFAULT_MODEL} --leaky" in card  # how to reproduce it
    assert (trained / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_train_auto_selects_inside_and_says_so(synth_dir: Path, tmp_path: Path) -> None:
    vdir = T.train(synth_dir, tmp_path, folds=3, inner_folds=2, seed=0, candidates=["logreg", "svm"],
                   jobs=1, n_boot=20, model=None)  # fmt: skip
    meta = json.loads((vdir / "model.json").read_text())
    ev = meta["evaluation"]
    assert not ev["model_fixed_in_advance"] and ev["scheme"].startswith("nested")
    assert set(ev["chosen_per_fold"]) <= {"logreg", "svm"} and len(ev["chosen_per_fold"]) == 3
    best = max(ev["candidates"], key=lambda c: c["auc"])["candidate"]
    assert meta["candidate"] == best  # ships the best outer-CV AUC
    card = (vdir / "MODEL_CARD.md").read_text()
    assert "Per fold, the inner CV picked" in card and "--model auto" in card


def test_cv_predictions_are_out_of_fold_by_subject(trained: Path) -> None:
    preds = pd.read_csv(trained / "cv_predictions.csv")
    assert len(preds) == 24 and preds["probability"].between(0, 1).all()
    assert (preds.groupby("subject")["fold"].nunique() == 1).all()


def test_saved_model_loads_and_predicts(trained: Path, synth_dir: Path) -> None:
    loaded = load_model(trained.parent)  # via LATEST
    assert loaded.version == trained.name
    x = D.load_recording(min(synth_dir.glob("GaPt*")))
    pred = loaded.model.predict_rows(x)
    assert 0.0 <= pred.probability <= 1.0 and pred.label in {"parkinson", "control"}
    assert len(pred.window_probabilities) == len(F.window_starts(len(x)))
    _, feats = F.recording_features(x)
    by_windows = loaded.model.predict_windows(feats)
    # feature windows are scored by the window-feature members, exactly as rows are
    window_members = dataclasses.replace(loaded.model, members=loaded.model.feature_members)
    assert by_windows.probability == pytest.approx(window_members.predict_rows(x).probability)
    if len(window_members.members) == len(loaded.model.members):
        assert by_windows.probability == pytest.approx(pred.probability)
    with pytest.raises(ValueError, match="shorter than one window"):
        loaded.model.predict_rows(x[:500])


def test_load_model_refuses_mismatched_artifacts(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models" / trained.name
    shutil.copytree(trained, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["feature_names"] = meta["feature_names"][:-1]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="other features"):
        load_model(copy)
    with pytest.raises(ArtifactError, match="no model version"):
        load_model(tmp_path / "models", "nope")
    with pytest.raises(ArtifactError, match="no model in"):
        load_model(tmp_path)
    assert list_versions(tmp_path / "models") == [trained.name]


def test_cli_reports_a_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert T.main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_error_subjects_counts_misclassified_walks_per_subject() -> None:
    from ml.report import _errors_md, error_subjects

    preds = pd.DataFrame({
        "subject": ["A", "A", "A", "B", "C", "C"],
        "study": ["Ju", "Ju", "Ju", "Si", "Ga", "Ga"],
        "label": [1, 1, 1, 0, 0, 0],
        "probability": [0.2, 0.3, 0.1, 0.9, 0.1, 0.7],
        "threshold": [0.6, 0.6, 0.6, 0.6, 0.6, 0.5],
    })  # fmt: skip
    subj = error_subjects(preds)
    assert subj["subject"].tolist() == ["A", "B", "C"]  # most errors first, then fewer walks
    assert subj["wrong"].tolist() == [3, 1, 1] and subj["walks"].tolist() == [3, 1, 2]
    np.testing.assert_allclose(subj["probability"], [0.2, 0.9, 0.4])
    md = _errors_md(preds)
    assert md.startswith("5 of 6 recordings are misclassified, from 3 subjects. 2 subjects")
    assert "(1) account for 3 of the errors" in md
    assert "| A | Ju | parkinson | 3 | 3 | 0.200 |" in md
    ok = preds.assign(probability=[0.9, 0.9, 0.9, 0.1, 0.1, 0.1])
    assert error_subjects(ok).empty and _errors_md(ok) == "No recording is misclassified."


def test_hydra_transform_is_deterministic_and_every_step_has_one_loser() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 2, 120)).astype(np.float32)
    a = Hydra(k=4, groups=6, random_state=3).fit(x[:1])
    b = Hydra(k=4, groups=6, random_state=3).fit(x)  # the data never matters, only its shape
    fa = a.transform(x)
    np.testing.assert_array_equal(fa, b.transform(x))
    assert fa.shape == (5, a.n_features) and len(a.dilations_) == 4  # 1, 2, 4, 8 for 120 steps
    # per dilation and representation: [soft winners (3 groups x 4), hard losers (3 x 4)];
    # the loser counts of a group cover each step of the series (or its difference) once
    blocks = fa.reshape(5, 4, 2, 2, 3, 4)
    losers = blocks[:, :, :, 1].sum(axis=-1)  # (n, dilation, representation, group)
    np.testing.assert_array_equal(losers[:, :, 0], 120)
    np.testing.assert_array_equal(losers[:, :, 1], 119)
    assert not np.array_equal(fa, Hydra(k=4, groups=6, random_state=4).fit(x).transform(x))
    with pytest.raises(ValueError, match=r"expected \(n, 2, 120\)"):
        a.transform(x[:, :, :100])
    np.testing.assert_array_equal(foot_totals(np.ones((3, 16, 7)))[:, :, 0], 8.0)


def test_a_hydra_model_scores_raw_rows_with_every_member_and_windows_without_hydra(
        synth_dir: Path) -> None:  # fmt: skip
    ds = T.load_dataset(synth_dir, series=True, jobs=1)
    model = T.fit_final(ds, "ensemble_hydra", inner_folds=2, seed=0, version="h", jobs=1)
    assert [m.name for m in model.members] == ["logreg_core", "set_svm", "hydra_ridge"]
    assert [m.name for m in model.feature_members] == ["logreg_core", "set_svm"]
    rows = D.load_recording(next(Path(synth_dir).glob("*_01.txt*")))
    by_rows = model.predict_rows(rows)
    feats = F.recording_features(rows, F.FS)[1]
    by_windows = model.predict_windows(feats)
    assert len(by_rows.window_probabilities) == len(by_windows.window_probabilities) == len(feats)
    # feature windows: the mean of the two feature members; raw rows: of all three
    hydra = model.members[2]
    series = F.sensor_series(rows, F.FS)
    x = hydra.series_features(series)
    p_hydra = hydra.proba(x.mean(axis=0, keepdims=True))[0]
    assert by_rows.probability == pytest.approx((2 * by_windows.probability + p_hydra) / 3)


def test_the_artifact_says_which_members_score_feature_windows(trained: Path) -> None:
    meta = json.loads((trained / "model.json").read_text())
    assert meta["members"] == ["logreg_core", "set_svm", "hydra_ridge"]
    assert meta["window_members"] == ["logreg_core", "set_svm"]
    # ensemble_set was not among this run's candidates: no figures to give for the subset
    assert meta["evaluation"]["window_subset"] == {"candidate": None,
                                                   "members": "logreg_core+set_svm"}
    card = (trained / "MODEL_CARD.md").read_text()
    assert "feature windows (what the pipeline's Spark job sends to `model_call`) by " \
           "logreg_core, set_svm only, since hydra_ridge reads the sensor series" in card
