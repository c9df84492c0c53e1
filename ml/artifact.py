"""Model artifacts on disk: one directory per version, plus a pointer to the latest.

Layout under a models directory (``artifacts/model/`` by default)::

    artifacts/model/
      LATEST                      # the newest version's name
      20261204-153012-ab12cd34/   # <UTC time>-<training data hash[:8]>
        model.joblib              # the fitted GaitModel
        model.json                # version, features, window params, data hash, metrics, libs
        MODEL_CARD.md             # human-readable card, links the plots
        roc.png  calibration.png
        cv_predictions.csv        # out-of-fold recording predictions (nested CV)

``load_model`` accepts either a version directory or a models directory (then it
follows ``LATEST``, else takes the newest version). Loading checks the artifact's
feature names and window parameters against the code, so a model never scores
features it was not trained on.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib

from . import features as F
from .model import GaitModel

__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactError",
    "LoadedModel",
    "library_versions",
    "list_versions",
    "load_model",
    "resolve_version_dir",
    "save_model",
]

ARTIFACT_FORMAT = 1
MODEL_FILE = "model.joblib"
META_FILE = "model.json"
LATEST_FILE = "LATEST"


class ArtifactError(RuntimeError):
    """A model directory is missing, incomplete or incompatible with this code."""


@dataclass(frozen=True)
class LoadedModel:
    model: GaitModel
    meta: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return self.model.version


def library_versions() -> dict[str, str]:
    import numpy
    import pandas
    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "pandas": pandas.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "joblib": joblib.__version__,
    }


def save_model(model: GaitModel, meta: dict[str, Any], models_dir: str | os.PathLike[str],
               *, set_latest: bool = True) -> Path:  # fmt: skip
    """Write ``model.joblib`` and ``model.json`` into ``models_dir/<version>/``."""
    d = Path(models_dir) / model.version
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / (MODEL_FILE + ".part")
    joblib.dump(model, tmp, compress=3)
    tmp.replace(d / MODEL_FILE)
    full = {
        "format": ARTIFACT_FORMAT,
        "version": model.version,
        "candidate": model.candidate,
        "members": [m.name for m in model.members],
        "window_members": [m.name for m in model.feature_members],  # score feature windows
        "threshold": model.threshold,
        "feature_names": list(model.feature_names),
        "features_version": F.FEATURES_VERSION,
        "window": {"window_s": model.window_s, "step_s": model.step_s, "fs": model.fs},
        "columns": list(F.COLUMNS),
        "libraries": library_versions(),
        **meta,
    }
    (d / META_FILE).write_text(json.dumps(full, indent=2, default=_json_default) + "\n")
    if set_latest:
        (Path(models_dir) / LATEST_FILE).write_text(model.version + "\n")
    return d


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def list_versions(models_dir: str | os.PathLike[str]) -> list[str]:
    """Versions (sub-directories holding a model) under ``models_dir``, oldest first."""
    d = Path(models_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / MODEL_FILE).is_file())


def resolve_version_dir(path: str | os.PathLike[str], version: str | None = None) -> Path:
    """The version directory for ``path`` (a version dir or a models dir)."""
    p = Path(path)
    if version is not None:
        if "/" in version or version.startswith("."):
            raise ArtifactError(f"bad model version {version!r}")
        cand = p / version
        if (cand / MODEL_FILE).is_file():
            return cand
        raise ArtifactError(f"no model version {version!r} in {str(p)!r}")
    if (p / MODEL_FILE).is_file():
        return p
    latest = p / LATEST_FILE
    if latest.is_file():
        v = latest.read_text().strip()
        if (p / v / MODEL_FILE).is_file():
            return p / v
    versions = list_versions(p)
    if not versions:
        raise ArtifactError(f"no model in {str(p)!r} (train one: python -m ml.train --out DIR)")
    return p / versions[-1]


def load_model(path: str | os.PathLike[str], version: str | None = None) -> LoadedModel:
    """Load and check a model (see :func:`resolve_version_dir`)."""
    d = resolve_version_dir(path, version)
    try:
        meta = json.loads((d / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{d}: unreadable {META_FILE}: {exc}") from exc
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{d}: artifact format {meta.get('format')} != {ARTIFACT_FORMAT}")
    if tuple(meta.get("feature_names", ())) != F.FEATURE_NAMES:
        raise ArtifactError(
            f"{d}: trained on other features (features_version {meta.get('features_version')},"
            f" code has {F.FEATURES_VERSION}); retrain the model"
        )
    libs = meta.get("libraries", {})
    now = library_versions()
    if libs.get("scikit-learn") != now["scikit-learn"]:
        warnings.warn(
            f"{d}: trained with scikit-learn {libs.get('scikit-learn')}, running "
            f"{now['scikit-learn']}",
            stacklevel=2,
        )
    model = joblib.load(d / MODEL_FILE)
    if not isinstance(model, GaitModel) or model.version != meta.get("version"):
        raise ArtifactError(f"{d}: {MODEL_FILE} does not match {META_FILE}")
    _single_threaded(model)
    return LoadedModel(model=model, meta=meta, path=d)


def _single_threaded(model: GaitModel) -> None:
    """Predict with one thread per estimator: the server parallelises across
    requests, and joblib's per-call thread pools cost more than they save on
    one recording."""
    for member in model.members:
        for cc in getattr(member.estimator, "calibrated_classifiers_", []):
            est = cc.estimator
            for step in getattr(est, "named_steps", {"_": est}).values():
                if hasattr(step, "n_jobs"):
                    step.n_jobs = 1
