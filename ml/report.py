"""The model card (``MODEL_CARD.md``) and its plots (ROC, calibration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import features as F
from .artifact import library_versions
from .evaluate import METRICS

__all__ = ["error_subjects", "plot_calibration", "plot_roc", "write_report"]


def _roc_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return fpr, tpr


def plot_roc(preds: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .evaluate import binary_metrics

    fig, ax = plt.subplots(figsize=(5.5, 5))
    y, p = preds["label"].to_numpy(), preds["probability"].to_numpy()
    fpr, tpr = _roc_curve(y, p)
    ax.plot(fpr, tpr, lw=2.2, color="black",
            label=f"all (AUC {binary_metrics(y, p, 0.5)['auc']:.3f})")  # fmt: skip
    for study, g in preds.groupby("study"):
        yy, pp = g["label"].to_numpy(), g["probability"].to_numpy()
        fpr, tpr = _roc_curve(yy, pp)
        ax.plot(fpr, tpr, lw=1.2, label=f"{study} (AUC {binary_metrics(yy, pp, 0.5)['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_calibration(preds: pd.DataFrame, path: Path, bins: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, p = preds["label"].to_numpy(), preds["probability"].to_numpy()
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    mp = np.array([p[which == b].mean() for b in range(bins) if (which == b).any()])
    fy = np.array([y[which == b].mean() for b in range(bins) if (which == b).any()])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect")
    ax.plot(mp, fy, "o-", color="black", label="nested CV (quantile bins)")
    ax.set_ylabel("fraction with Parkinson's")
    brier = float(np.mean((p - y) ** 2))
    ax.set_title(f"Calibration of recording probabilities (Brier {brier:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    ax2.hist([p[y == 0], p[y == 1]], bins=20, range=(0, 1), label=["control", "parkinson"],
             color=["tab:blue", "tab:red"], alpha=0.8)  # fmt: skip
    ax2.set_xlabel("predicted probability")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, lo: Any = None, hi: Any = None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    s = f"{v:.3f}"
    if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
        s += f" [{lo:.2f}, {hi:.2f}]"
    return s


def _metrics_md(table: pd.DataFrame) -> str:
    head = "| slice | n rec. | n subj. | AUC | balanced acc. | sensitivity | specificity |"
    lines = [head, "|---|---:|---:|---|---|---|---|"]
    for r in table.itertuples(index=False):
        cells = [_fmt(getattr(r, k), getattr(r, f"{k}_lo"), getattr(r, f"{k}_hi")) for k in METRICS]
        lines.append(f"| {r.slice} {r.name} | {r.n} | {r.n_subjects} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def error_subjects(preds: pd.DataFrame) -> pd.DataFrame:
    """Subjects with at least one misclassified recording (out-of-fold prediction
    against its fold's threshold), most errors first: study, label, walks, wrong,
    mean probability."""
    wrong = (preds["probability"] >= preds["threshold"]).astype(int) != preds["label"]
    g = preds.assign(wrong=wrong).groupby("subject").agg(
        study=("study", "first"), label=("label", "first"), walks=("wrong", "size"),
        wrong=("wrong", "sum"), probability=("probability", "mean"),
    )  # fmt: skip
    g = g[g["wrong"] > 0].reset_index()
    return g.sort_values(["wrong", "walks", "subject"], ascending=[False, True, True],
                         ignore_index=True)  # fmt: skip


def _errors_md(preds: pd.DataFrame, top: int = 10) -> str:
    subj = error_subjects(preds)
    n_wrong = int(subj["wrong"].sum())
    if n_wrong == 0:
        return "No recording is misclassified."
    always = subj[subj["wrong"] == subj["walks"]]
    multi = always[always["walks"] > 1]
    lines = [
        (f"{n_wrong} of {len(preds)} recordings are misclassified, from {len(subj)} subjects. "
        f"{len(always)} subjects have every walk misclassified; those with several walks "
        f"({len(multi)}) account for {int(multi['wrong'].sum())} of the errors, because "
        "recording-level figures count each walk. The subjects with the most errors:"),
        "",
        "| subject | study | true label | walks | misclassified | mean probability |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in subj.head(top).itertuples(index=False):
        label = "parkinson" if r.label == 1 else "control"
        lines.append(f"| {r.subject} | {r.study} | {label} | {r.walks} | {r.wrong} | "
                     f"{r.probability:.3f} |")  # fmt: skip
    return "\n".join(lines)


def _inputs_md(model: Any, subset: dict[str, Any] | None) -> str:
    """Which members score raw rows and which score feature windows, with the CV
    figures of the window-only subset (``evaluation.window_subset``) when it was
    scored as a candidate."""
    series = [m.name for m in model.members if m.name not in {f.name for f in model.feature_members}]
    if not series:
        return "Raw rows and feature windows are scored by every member."
    window = [m.name for m in model.feature_members]
    if not window:
        return (f"Only raw rows can be scored ({', '.join(series)} read the sensor series); "
                "feature windows are refused.")
    figures = ""
    if subset and subset.get("candidate"):
        figures = (f": the candidate `{subset['candidate']}` below, AUC {subset['auc']:.3f} and "
                   f"balanced accuracy {subset['balanced_accuracy']:.3f} on the same folds")
    return (f"Raw rows are scored by every member; feature windows (what the pipeline's "
            f"Spark job sends to `model_call`) by {', '.join(window)} only{figures}, since "
            f"{', '.join(series)} {'reads' if len(series) == 1 else 'read'} the sensor series.")


def write_report(vdir: Path, model: Any, meta: dict[str, Any], preds: pd.DataFrame,
                 table: pd.DataFrame, cand_table: pd.DataFrame) -> Path:  # fmt: skip
    """Write ``MODEL_CARD.md``, ``roc.png`` and ``calibration.png`` into ``vdir``."""
    overall = table[table.slice == "overall"].iloc[0]
    plot_roc(preds, vdir / "roc.png",
             f"Nested subject-wise CV, recording level (n={len(preds)})")  # fmt: skip
    plot_calibration(preds, vdir / "calibration.png")
    ev = meta["evaluation"]
    td = meta["training_data"]
    cand_lines = ["| candidate | members | AUC | balanced acc. | sens. | spec. | chosen in folds |",
                  "|---|---|---|---|---|---|---:|"]  # fmt: skip
    for r in cand_table.itertuples(index=False):
        cand_lines.append(
            f"| {r.candidate} | {r.members} | {_fmt(r.auc)} | {_fmt(r.balanced_accuracy)} | "
            f"{_fmt(r.sensitivity)} | {_fmt(r.specificity)} | {r.times_chosen} |"
        )
    leak_md = "Not computed (train with `--leaky`)."
    if ev.get("leaky"):
        lk = ev["leaky"]
        w, r, t = lk["random_window_split"], lk["random_recording_split"], lk["tutorial_knn"]
        leak_md = "\n".join([
            "| split | unit | AUC | balanced acc. | accuracy |",
            "|---|---|---|---|---|",
            (f"| **subject-wise (this card)** | recording | {_fmt(overall.auc)} | "
            f"{_fmt(overall.balanced_accuracy)} | – |"),
            (f"| random recording split (walks of a subject on both sides) | recording | "
            f"{_fmt(r['auc'])} | {_fmt(r['balanced_accuracy'])} | – |"),
            (f"| random window split | 10 s window | {_fmt(w['auc'])} | "
            f"{_fmt(w['balanced_accuracy'])} | – |"),
            (f"| tutorial: k-NN on 100-row means, random split | 1 s block | "
            f"{_fmt(t['random_block_split']['auc'])} | "
            f"{_fmt(t['random_block_split']['balanced_accuracy'])} | "
            f"{_fmt(t['random_block_split']['accuracy'])} |"),
            (f"| tutorial k-NN, split by subject | 1 s block | {_fmt(t['subject_split']['auc'])} | "
            f"{_fmt(t['subject_split']['balanced_accuracy'])} | "
            f"{_fmt(t['subject_split']['accuracy'])} |"),
        ])  # fmt: skip
    sl = ev["subject_level"]
    fixed = bool(ev.get("model_fixed_in_advance"))
    reps = ev.get("repeats") or []
    rep_md = ""
    if len(reps) > 1:
        aucs = np.array([r["auc"] for r in reps])
        bals = np.array([r["balanced_accuracy"] for r in reps])
        studies = sorted(reps[0].get("per_study", {}))

        def per_study(r: dict[str, Any]) -> str:
            return " / ".join(f"{_fmt(r['per_study'][s]['auc'])}, "
                              f"{_fmt(r['per_study'][s]['balanced_accuracy'])}"
                              for s in studies)  # fmt: skip

        rows = "\n".join(
            f"| {r['seed']} | {_fmt(r['auc'])} | {_fmt(r['balanced_accuracy'])} | "
            f"{_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} | {per_study(r)} |"
            + ("" if fixed else f" {', '.join(r['chosen'])} |")
            for r in reps
        )
        means = " / ".join(
            f"{np.mean([r['per_study'][s]['auc'] for r in reps]):.3f}, "
            f"{np.mean([r['per_study'][s]['balanced_accuracy'] for r in reps]):.3f}"
            for s in studies
        )
        what = "cross-validation" if fixed else "nested procedure"
        rep_md = f"""
### Repeated cross-validation (other fold assignments)
The split into folds moves the figures by a few points on data this small, so the
whole {what} was repeated with {len(reps)} seeds: **AUC {aucs.mean():.3f} ± {aucs.std():.3f},
balanced accuracy {bals.mean():.3f} ± {bals.std():.3f}** (mean ± sd over repeats). Per
study ({" / ".join(studies)}; AUC, balanced accuracy), mean over repeats: {means}.

| seed | AUC | balanced acc. | sens. | spec. | per study: AUC, bal. acc. ({" / ".join(studies)}) |{"" if fixed else " inner picks per fold |"}
|---:|---|---|---|---|---|{"" if fixed else "---|"}
{rows}
"""
    members = ", ".join(m.name for m in model.members)
    inputs_md = _inputs_md(model, ev.get("window_subset"))
    if fixed:
        model_line = (f"Model: **{model.candidate}** (members: {members}), fixed before the\n"
                      "  cross-validation (nothing is selected inside it); the other candidates\n"
                      "  below were scored on the same folds for comparison")  # fmt: skip
        picks_md = (f"The model, {model.candidate}, was fixed in advance; `--model auto` "
                    "instead picks a candidate inside the inner folds of each outer fold.")  # fmt: skip
    else:
        model_line = (f"Candidate selected: **{model.candidate}** (members: {members}),\n"
                      "  the best outer-CV AUC among the candidates below")  # fmt: skip
        picks_md = f"Per fold, the inner CV picked: {', '.join(ev['chosen_per_fold'])}."
    reproduce = (f" --model {model.candidate if fixed else 'auto'}"
                 + (f" --repeats {len(reps)}" if len(reps) > 1 else "")
                 + (" --leaky" if ev.get("leaky") else ""))  # fmt: skip
    text = f"""# Model card: gaitflow Parkinson's gait classifier `{model.version}`

## What it does
Estimates the probability that a walk recorded with force-sensing insoles (gaitpdb
format: 19 columns at 100 Hz) comes from a person with Parkinson's disease, and
labels it `parkinson` when the probability reaches {model.threshold:.3f} (the
training prevalence: for calibrated probabilities this is the balanced-accuracy
rule). A research prototype trained on {td['n_subjects']} people; **not a medical
device** and not validated for clinical use.

## Model
- {model_line}; each member is Platt-calibrated with subject-wise folds, and the
  model's probability is the mean of its members'.
- Windows of {model.window_s:g} s every {model.step_s:g} s; {len(F.FEATURE_NAMES)} features per
  window (`ml/features.py`: force statistics, gait events with stride/stance/swing/
  double-support times and their CV, asymmetry, cadence, force peaks and loading
  rates, centre-of-pressure path and profiles, per-sensor stance profiles, spectral
  features); a recording is summarised by the 10th/50th/90th percentile of each feature
  over its windows (the `*_core` members read the "core" feature families: timing,
  asymmetry, force and COP-y stance profiles, per-sensor stance profiles). The
  `set_svm` member (multiple-instance learning, `ml/setkernel.py`) compares two
  recordings as sets of windows, with the mean RBF similarity of their standardised
  core window features as the kernel of an SVM (scikit-learn's default C and gamma);
  its score for a recording is the mean of its windows' scores. The `hydra_ridge`
  member (`ml/hydra.py`, after Dempster et al.'s Hydra) runs 192 groups of 8
  competing random kernels at dilations 1-32 over each window's left and right total
  force (50 Hz) and its first difference, counts which kernel wins and loses at each
  step, averages the counts over the windows and classifies them with a ridge
  classifier. The `rocket_logreg` member uses MiniRocket-style random convolutions
  of the 16 sensor series (50 Hz) averaged over windows.
- {inputs_md}
- Inputs are the force signals only. UPDRS, Hoehn & Yahr, the study and the other
  demographics are never inputs.

## Training data
{td['n_recordings']} recordings ({td['n_parkinson_recordings']} Parkinson's) of {td['n_subjects']}
subjects from PhysioNet gaitpdb 1.0.0 (studies Ga, Ju, Si), {td['n_windows']} windows.
Data SHA-256 `{td['sha256'][:16]}…`.

## Evaluation (honest: by subject)
{ev['scheme']}.

**Overall: AUC {_fmt(overall.auc, overall.auc_lo, overall.auc_hi)}, balanced accuracy
{_fmt(overall.balanced_accuracy, overall.balanced_accuracy_lo, overall.balanced_accuracy_hi)}**
(recording level, 95 % CI). Subject level (mean probability of a subject's walks):
AUC {_fmt(sl['auc'])}, balanced accuracy {_fmt(sl['balanced_accuracy'])}.

{_metrics_md(table)}

![ROC](roc.png) ![calibration](calibration.png)

### Where the errors are
{_errors_md(preds)}
{rep_md}
### Candidates (outer-CV out-of-fold predictions, recording level, mean over repeats)
{chr(10).join(cand_lines)}

{picks_md}

### What a leaky split would claim
{leak_md}

Splits that let a subject's walks (or windows) sit on both sides learn the person,
not the disease; their figures are not estimates of performance on new people.

## What was tried on the way (subject-wise 5-fold CV, 3-8 fold assignments)
Figures are recording-level AUC / balanced accuracy, means over fold assignments.
- Fixed models over 8 fold assignments (`--model X --repeats 8`): percentile
  summaries of the core features, logistic regression + RBF SVM (`ensemble_core`)
  0.922 / 0.839; the same with the set-kernel SVM instead of the RBF SVM
  (`ensemble_set`) 0.923 / 0.843; the set-kernel SVM alone 0.914 / 0.848 (higher
  sensitivity, mostly on the Ju walks, lower AUC on Si). A subject bootstrap puts
  the balanced-accuracy gain over `ensemble_core` at about +0.005 [-0.013, +0.023]
  (`ensemble_set`) and +0.015 [-0.018, +0.051] (`set_svm`): within the noise.
- Picking the candidate inside the inner folds (`--model auto`) costs about
  0.005-0.01 of both figures against a fixed ensemble: with about 150 training
  recordings per inner split, the inner AUCs of the good candidates differ by less
  than their noise.
- Window-level classifiers whose window scores are averaged (instance-level
  multiple-instance learning): logistic regression 0.90 / 0.81, RBF SVM 0.906 /
  0.837, gradient boosting 0.86 / 0.81 (the set kernel, trained on recordings, is
  better).
- Other summaries (mean, median, mean + sd, percentiles + sd or IQR, quartiles):
  0.905-0.915 / 0.83-0.84; dropping windows by detection quality, stride CV or
  position: no change.
- Feature families: the per-sensor stance loading profiles (rollover) alone reach
  about 0.89, gait timing alone about 0.86; spectral, force-moment and sensor-share
  features add nothing; the "core" set (timing, asymmetry, force and COP-y profiles,
  sensor profiles) beats all features by about 0.01 for logistic regression.
- Classifiers on all features: logistic regression, RBF SVM, extra trees, random
  forest, gradient boosting, k-NN all land between 0.87 and 0.91; tuning their
  hyper-parameters moves the AUC by less than the fold-to-fold noise.
- MiniRocket-style random convolutions (16 sensor series, 50 Hz): about 0.89 alone
  and +0.005 in an ensemble; on 25 Hz or on totals only: 0.68-0.86.
- No gain from: 20 s windows, stride-level high-frequency "tremor" energy, total-force
  speed proxies, per-side min/max ("affected side") features, subject-weighted
  training, study-consistent feature selection, alternative thresholds.
- Also no gain (0.90-0.923 AUC, 0.81-0.84 balanced accuracy): univariate or L1
  feature selection inside the pipeline, shrinkage LDA, quantile-transformed inputs,
  tuned C / gamma, per study x group or per subject sample weights, stacking one
  model per feature family, training on half-recording subsets; extra window
  features (each sensor's onset, peak and release time in stance, load shares at
  initial contact, heel-to-toe delay, stride-to-stride profile variability,
  21-point stride-normalised sensor profiles, sensor correlation matrices);
  recording-level stride and swing CV (stronger alone than their 10 s window
  versions) and DFA of stride times; contact thresholds of 4, 6 or 20 % of the
  force range instead of 12 %.
- The balanced-accuracy-maximising threshold chosen on inner out-of-fold calibrated
  probabilities: 0.824-0.828 against 0.836 for the training prevalence.
- A 1-D convolutional network on the 16 sensor series (50 Hz windows, random 8 s
  crops, left/right foot swap and amplitude augmentation, three convolution layers,
  about 30 k weights, trained with JAX outside this package): AUC 0.86 alone on the
  default fold assignment (one or three initialisations averaged), and no gain when
  rank-averaged with the default model (0.916-0.936 against 0.936). With 131 subjects
  the engineered features and the set kernel do better.
- 10 outer folds instead of 5 (more training subjects per fold): 0.923 / 0.840 over 8
  fold assignments, the same as with 5 (0.923 / 0.843).
- A learned metric in the set kernel, learned inside every calibration fold: feature
  weights from logistic-regression coefficients or univariate AUCs 0.906-0.920 / 0.817-0.836
  (the harder the weighting, the worse); dropping features with a univariate AUC near
  0.5 0.921 / 0.846 (best of about 35 settings, within the noise); NCA projections to
  5-20 dimensions 0.894-0.911 / 0.83 (they learn to group windows by subject); the set
  kernel on all features, or sums of per-family kernels, 0.918-0.923 / 0.841-0.844.
  Baseline on the same folds: 0.923 / 0.843.
- Other ensembles of the same members (with the RBF SVM as a third member, or the
  all-feature logistic regression): 0.918-0.923 / 0.837-0.842; each member bagged 10
  times over 80 % subsamples of the training recordings: 0.923 / 0.843, unchanged.
- Training without the Ju walks under rhythmic auditory cueing (walks 2-7; still
  scored as test recordings, threshold at the kept training prevalence): AUC +0.004
  (0.928 against 0.923 over seeds 0-7, 0.924 against 0.920 over seeds 8-15) and balanced
  accuracy +0.003 ± 0.013, 0.846 against 0.843 over the 16: a small ranking gain,
  balanced accuracy within the noise, so the default keeps every walk.
- Hydra (competing random convolutional kernels) on the feet's total-force series as
  a third member: found while screening new series transforms on fold assignments
  0-7 (QUANT interval quantiles with extra trees and Hydra, on the 16 sensor series
  and on the two totals: 5 settings x 4 ways of combining them), then fixed (Hydra on
  the totals, ridge, one third of the ensemble) and confirmed on fold assignments
  8-15, never looked at before: AUC +0.010 ± 0.005 and balanced accuracy +0.015 ±
  0.009 over `ensemble_set` (paired, mean ± sd over the 8; +0.009 / +0.018 with 192
  groups). Kernel draws matter (another draw of 64 groups gave +0.006 / +0.009),
  hence 192 groups in the shipped member, whose kernels are fixed (seed 0) so the
  cross-validation scores the very transform the model ships. The other
  settings: QUANT -0.001 to -0.013 AUC in the ensemble, Hydra on the 16 sensors
  +0.003. This is the one change since the previous model; `ensemble_set` stays as a
  candidate and is what feature windows get.
- No gain either (8 fold assignments, paired against `ensemble_set`): severity as
  an auxiliary training target (ridge or SVR on Hoehn & Yahr or UPDRS-III, controls
  at 0; used as a target only, never an input), -0.006 to +0.002 AUC in the ensemble;
  a second-level RBF kernel on the distance between the recordings' window
  distributions (MMD) instead of the linear set kernel, -0.001 to -0.003; left/right
  foot-swap augmentation of the training recordings, -0.003 to -0.005. With
  `ensemble_set`, even the best threshold chosen on the test predictions themselves
  reaches a balanced accuracy of only 0.859 on average: the ranking, not the
  threshold, was what kept it below 0.85.

## Caveats
- Small data: {td['n_subjects']} subjects; the confidence intervals are wide, and the
  features, the candidate set and the default model were designed while looking at
  subject-wise CV on this same data (the default was chosen among a handful of fixed
  ensembles), so the figures above may be slightly optimistic: differences between
  the good candidates are within the noise.
- Studies differ (overground vs treadmill, dual-task walks, cueing in Ju walks 2-7;
  Ju patients contribute up to 7 walks each and weigh more in recording-level
  figures). Per-study figures are above.
- Mild Parkinson's with near-normal gait is the main source of errors.
- The hydra member was picked while looking at fold assignments 0-7; the 16-repeat
  figures include them. On the 8 unseen assignments alone the gain was the same.

## Reproduce
`python -m ml.train --data $GAITPDB_DIR --out artifacts/model --seed {ev['seed']}{reproduce}`
(libraries: {", ".join(f"{k} {v}" for k, v in library_versions().items())}).
"""
    path = vdir / "MODEL_CARD.md"
    path.write_text(text)
    return path
