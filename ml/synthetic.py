"""Synthetic gait recordings in the gaitpdb format, for tests, demos and benchmarks.

A foot's stance is a double-hump vertical force (heel loading, mid-stance dip,
push-off) whose load rolls from the heel sensors (L1) to the toe sensors (L8);
the other foot does the same half a stride later. Known stride, stance fraction
and body weight make the gait features checkable. ``parkinsonian=True`` gives a
flatter, heel-poor rollover and a longer stance, so a classifier has something to
learn. Nothing here is a model of real pathology.
"""

from __future__ import annotations

import gzip
import itertools
import os
from pathlib import Path

import numpy as np

from .features import SENSOR_XY

__all__ = ["synthetic_recording", "write_synthetic_dataset"]


def _stance_force(phase: np.ndarray, dip: float) -> np.ndarray:
    """Vertical force (body weights) over stance phase 0..1: two humps and a dip."""
    base = np.clip(np.sin(np.pi * phase), 0.0, None) ** 0.6
    humps = np.exp(-(((phase - 0.25) / 0.12) ** 2)) + np.exp(-(((phase - 0.78) / 0.12) ** 2))
    return np.clip(0.75 * base + (0.35 + dip) * humps - dip * 0.5, 0.0, None)


def synthetic_recording(stride_s: float = 1.1, seconds: float = 60.0, *,
                        stance_fraction: float = 0.6, body_weight_n: float = 700.0,
                        parkinsonian: bool = False, stride_cv: float = 0.0,
                        noise_n: float = 2.0, seed: int = 0) -> np.ndarray:  # fmt: skip
    """A recording ``(n, 19)`` at 100 Hz: time, L1..L8, R1..R8, L, R (newtons).

    Heel strikes of the left foot every ``stride_s`` seconds (jittered by
    ``stride_cv``, a fraction), the right foot half a stride later; each stance
    lasts ``stance_fraction`` of its stride.
    """
    rng = np.random.default_rng(seed)
    fs = 100.0
    n = round(seconds * fs)
    t = np.arange(n) / fs
    heel_share = 0.12 if parkinsonian else 0.35
    dip = 0.05 if parkinsonian else 0.25
    out = np.zeros((n, 19))
    out[:, 0] = t
    # stride onsets with optional variability
    strides = stride_s * (1.0 + stride_cv * rng.standard_normal(int(seconds / stride_s) + 4))
    onsets = np.concatenate([[0.2], 0.2 + np.cumsum(strides)])
    y_sensor = (SENSOR_XY[:, 1] - SENSOR_XY[:, 1].min()) / np.ptp(SENSOR_XY[:, 1])  # heel 0 .. toe 1
    for foot, shift in ((0, 0.0), (1, 0.5)):
        force = np.zeros(n)
        sensors = np.zeros((n, 8))
        for a, b in itertools.pairwise(onsets):
            start = a + shift * (b - a)
            stance = stance_fraction * (b - a)
            i0, i1 = int(np.ceil(start * fs)), int(np.floor((start + stance) * fs))
            if i0 >= n:
                break
            i1 = min(i1, n - 1)
            if i1 <= i0:
                continue
            ph = (t[i0 : i1 + 1] - start) / stance
            f = body_weight_n * _stance_force(ph, dip)
            # where the load sits along the foot: heel early, toes late
            centre = np.clip(ph * 1.1 - 0.05, 0.0, 1.0)
            w = np.exp(-(((y_sensor[None, :] - centre[:, None]) / 0.22) ** 2))
            w[:, 0] += heel_share * np.exp(-((ph / 0.15) ** 2))[:]
            w /= w.sum(axis=1, keepdims=True)
            sensors[i0 : i1 + 1] = f[:, None] * w
            force[i0 : i1 + 1] = f
        sensors = np.clip(sensors + noise_n * rng.standard_normal(sensors.shape) * (sensors > 0), 0, None)
        cols = slice(1, 9) if foot == 0 else slice(9, 17)
        out[:, cols] = np.round(sensors, 2)
        out[:, 17 + foot] = out[:, cols].sum(axis=1)
    return out


def _format(rec: np.ndarray) -> bytes:
    """PhysioNet's text layout: tab separated, CRLF, 4 decimals for time."""
    import pandas as pd

    df = pd.DataFrame(np.round(rec[:, 1:], 2))
    df.insert(0, "t", np.char.mod("%.4f", rec[:, 0]))
    return df.to_csv(sep="\t", header=False, index=False, lineterminator="\r\n").encode()


def write_synthetic_dataset(directory: str | os.PathLike[str], *, n_controls: int = 6,
                            n_patients: int = 6, walks: int = 2, seconds: float = 40.0,
                            studies: tuple[str, ...] = ("Ga", "Ju", "Si"),
                            gzip_files: bool = True, seed: int = 0) -> Path:  # fmt: skip
    """Write a small gaitpdb-like dataset (recordings + demographics.txt).

    Subjects are spread over ``studies``; file names follow gaitpdb
    (``GaCo01_01.txt.gz``). Patients walk with longer, more variable strides.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    demo = ["ID\tStudy\tGroup\tSubjnum\tGender\tAge\tHeight\tWeight\tHoehnYahr\tUPDRS\t\t"]
    for group, count in (("Co", n_controls), ("Pt", n_patients)):
        for i in range(count):
            study = studies[i % len(studies)]
            sid = f"{study}{group}{i + 1:02d}"
            pd_ = group == "Pt"
            for w in range(1, walks + 1):
                rec = synthetic_recording(
                    stride_s=float(rng.uniform(1.15, 1.4) if pd_ else rng.uniform(0.95, 1.2)),
                    seconds=seconds,
                    stance_fraction=float(rng.uniform(0.62, 0.68) if pd_ else rng.uniform(0.57, 0.62)),
                    body_weight_n=float(rng.uniform(550, 900)),
                    parkinsonian=pd_,
                    stride_cv=0.04 if pd_ else 0.015,
                    seed=int(rng.integers(1 << 31)),
                )  # fmt: skip
                name = f"{sid}_{w:02d}.txt"
                data = _format(rec)
                if gzip_files:
                    (d / (name + ".gz")).write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
                else:
                    (d / name).write_bytes(data)
            hy = f"{rng.uniform(2, 3):.1f}" if pd_ else "NaN"
            updrs = str(int(rng.integers(10, 40))) if pd_ else "NaN"
            demo.append(f"{sid}\t{study}\t{1 if pd_ else 2}\t{i + 1}\t1\t65\t1.70\t70\t{hy}\t{updrs}\t\t")
    (d / "demographics.txt").write_text("\r\n".join(demo) + "\r\n")
    return d
