"""make demo's summary: its confusion matrix and the honest figures beside it."""
from __future__ import annotations

import json
from pathlib import Path

from stack.demo import confusion, honest_figures


def test_confusion_matrix_from_file_names() -> None:
    found = {"GaPt01_01": {"label": "parkinson"}, "GaPt02_01": {"label": "control"},
             "JuCo01_01": {"label": "control"}, "SiCo02_01": {"label": "parkinson"}}
    text = confusion(found)
    assert text.splitlines()[1].split()[-2:] == ["1", "1"]   # control: 1 right, 1 wrong
    assert text.splitlines()[2].split()[-2:] == ["1", "1"]
    assert "sensitivity 0.500  specificity 0.500  balanced accuracy 0.500" in text
    controls_only = confusion({"GaCo01_01": {"label": "control"}})
    assert controls_only.endswith("sensitivity – (no parkinson recording)  specificity 1.000  "
                                  "balanced accuracy – (needs both)")


def test_the_in_sample_matrix_points_at_the_cross_validation(tmp_path: Path) -> None:
    card = {"evaluation": {
        "metrics": [{"slice": "fold", "name": "0", "auc": 0.5, "balanced_accuracy": 0.5},
                    {"slice": "overall", "name": "all", "auc": 0.9357,
                     "balanced_accuracy": 0.8554}],
        "repeats": [{"auc": 0.93, "balanced_accuracy": 0.85},
                    {"auc": 0.91, "balanced_accuracy": 0.83}]}}
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "model.json").write_text(json.dumps(card))
    text = honest_figures(tmp_path, ["v1", "unknown"])
    assert "in-sample" in text
    assert "of v1: AUC 0.936, balanced accuracy 0.855" in text
    assert "over 2 fold assignments: AUC 0.920, balanced accuracy 0.840 (mean)" in text
    assert "unknown" not in text


def test_the_summary_names_the_members_that_scored_the_pipeline_windows(tmp_path: Path) -> None:
    card = {"members": ["logreg_core", "set_svm", "hydra_ridge"],
            "window_members": ["logreg_core", "set_svm"],
            "evaluation": {
                "metrics": [{"slice": "overall", "name": "all", "auc": 0.943,
                             "balanced_accuracy": 0.872}],
                "window_subset": {"candidate": "ensemble_set", "members": "logreg_core+set_svm",
                                  "auc": 0.9224, "balanced_accuracy": 0.8426}}}
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "model.json").write_text(json.dumps(card))
    text = honest_figures(tmp_path, ["v2"])
    assert ("the pipeline sends feature windows, which the model scores with "
            "logreg_core + set_svm only (hydra_ridge read the raw series)") in text
    assert ("those members on the same folds (ensemble_set): AUC 0.922, balanced accuracy "
            "0.843 (mean over fold assignments)") in text
    card["window_members"] = card["members"]  # every member reads windows: nothing to add
    (tmp_path / "v2" / "model.json").write_text(json.dumps(card))
    assert "feature windows" not in honest_figures(tmp_path, ["v2"])
