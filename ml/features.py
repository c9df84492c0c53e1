"""Window features of a gaitpdb recording: one definition for training, serving and Spark.

Input: a recording as a float array of shape ``(n, 19)`` sampled at 100 Hz, columns
``time, L1..L8, R1..R8, L, R`` (vertical ground reaction forces in newtons; ``L``
and ``R`` are the total force under each foot). Output: one row of
:data:`FEATURE_NAMES` per window.

Windows
    ``window_s`` seconds long, starting every ``step_s`` seconds (defaults 10 s and
    5 s). Ten seconds hold about 8-10 strides, enough for a stride-time mean and
    coefficient of variation, while a recording of the shortest walk (~40 s)
    still yields 7 windows; 50 % overlap doubles the windows without making
    consecutive windows near copies. Window ``k`` covers samples
    ``[k*step, k*step + window)`` counted from the recording's first sample
    (``seq`` 0), and its key is ``f"{recording_id}:{k}"``: the same samples always
    give the same key and the same features. A window's features depend only on
    its own samples, so a streaming job and a batch job agree.

Gait events
    Per foot, contact is the total force with hysteresis: contact starts (heel
    strike) when the force rises above ``base + 0.12 * range`` and ends (toe-off)
    when it falls below ``base + 0.06 * range``, where ``base`` and ``range`` are
    the window's 2nd percentile and 98th-2nd percentile spread of that foot's
    force (insoles have offsets; subjects weigh differently). A stride is heel
    strike to the next heel strike of the same foot and is kept only if it lasts
    0.5-3.0 s with a stance of 0.2-2.5 s and a swing of 0.1-1.5 s.

Normalisation
    Forces are divided by the window's mean total force ``mean(L + R)`` (during
    walking, the body weight), so that force features compare across subjects.

Feature families are listed by :data:`FEATURE_GROUPS`; :func:`sensor_series`
gives the normalised 16 sensor series per window for time-series models.

The module imports numpy and pandas only, holds no global state besides
constants, and every function is deterministic, so a PySpark job can call
:func:`features_frame` inside ``applyInPandas`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "BASELINE_NAMES",
    "CHANNELS",
    "COLUMNS",
    "DEFAULT_STEP_S",
    "DEFAULT_WINDOW_S",
    "FEATURES_VERSION",
    "FEATURE_GROUPS",
    "FEATURE_NAMES",
    "FS",
    "SENSOR_XY",
    "GaitEvents",
    "baseline_frame",
    "centre_of_pressure",
    "contact_mask",
    "feature_group",
    "features_frame",
    "gait_events",
    "recording_features",
    "sensor_series",
    "window_features",
    "window_starts",
]

#: Bump when any feature's definition changes (models record it).
FEATURES_VERSION = "1"
FS = 100.0
DEFAULT_WINDOW_S = 10.0
DEFAULT_STEP_S = 5.0

COLUMNS: tuple[str, ...] = (
    "time",
    *(f"L{i}" for i in range(1, 9)),
    *(f"R{i}" for i in range(1, 9)),
    "L",
    "R",
)
CHANNELS = COLUMNS[1:]
_L_SENSORS = slice(1, 9)
_R_SENSORS = slice(9, 17)
_L_TOTAL, _R_TOTAL = 17, 18

#: Sensor (x, y) coordinates from the dataset's ``format.txt``: left foot
#: L1..L8, right foot mirrored (R_i = (-x, y)). Arbitrary units.
SENSOR_XY = np.array(
    [
        (-500, -800),
        (-700, -400),
        (-300, -400),
        (-700, 0),
        (-300, 0),
        (-700, 400),
        (-300, 400),
        (-500, 800),
    ],
    dtype=np.float64,
)

# Event detection and stride validity (seconds / fractions of the force range).
_HI, _LO = 0.12, 0.06
_STRIDE = (0.5, 3.0)
_STANCE = (0.2, 2.5)
_SWING = (0.1, 1.5)
_PROFILE_POINTS = np.linspace(0.0, 1.0, 11)
_SENSOR_POINTS = np.array([0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95])

_FOOT_FEATURES = (
    # timing (seconds, fractions of the stride, coefficients of variation in %)
    "stride_mean", "stride_cv", "stance_mean", "stance_cv", "swing_mean", "swing_cv",
    "stance_pct", "swing_pct_cv",
    # force (units of body weight, body weights per second)
    "peak1", "peak2", "valley", "valley_ratio", "peak_cv", "loading_rate", "unloading_rate",
    "impulse",
    # centre of pressure during stance (sensor coordinate units, per second)
    "cop_ap_range", "cop_ml_range", "cop_path", "cop_velocity", "cop_y_start", "cop_y_end",
    "cop_x_mean", "cop_path_cv",
)  # fmt: skip


_SPECTRAL = (
    "spec_step_freq", "spec_stride_freq", "spec_entropy", "spec_centroid",
    "spec_band_0_05", "spec_band_05_3", "spec_band_3_8", "spec_band_8_20",
    "harmonic_ratio", "spec_peak_sharpness",
)  # fmt: skip


def _feature_names() -> tuple[str, ...]:
    names: list[str] = ["n_strides", "valid_fraction", "bw_newton"]
    # per-window signal statistics (forces / body weight)
    for side in ("L", "R"):
        names += [f"{side}_mean", f"{side}_std", f"{side}_skew", f"{side}_kurt"]
    names += [f"share_{s}" for s in CHANNELS[:16]]
    names += [f"nstd_{s}" for s in CHANNELS[:16]]
    # gait timing, force and COP: mean of both feet, then |L-R| asymmetry
    names += [f"{f}" for f in _FOOT_FEATURES]
    names += [f"asym_{f}" for f in _FOOT_FEATURES if not f.endswith("_cv")]
    names += [
        "cadence", "step_mean", "step_cv", "step_asym", "double_support_pct",
        "double_support_cv", "single_support_asym", "phase_mean", "phase_cv", "pci",
        "stride_cv_pooled", "stride_diff_rms",
    ]  # fmt: skip
    names += [f"profile_{round(p * 100):03d}" for p in _PROFILE_POINTS]
    names += [f"cop_y_profile_{round(p * 100):03d}" for p in _PROFILE_POINTS]
    names += [f"cop_x_profile_{round(p * 100):03d}" for p in _PROFILE_POINTS]
    # load of each sensor (both feet averaged) at points of the stance phase
    names += [
        f"sensor{i}_{round(p * 100):03d}" for i in range(1, 9) for p in _SENSOR_POINTS
    ]
    # spectral features of the total force (L + R) and of one foot
    names += list(_SPECTRAL)
    return tuple(names)


#: Feature column names, in the order :func:`window_features` returns them.
FEATURE_NAMES: tuple[str, ...] = _feature_names()
_NF = len(FEATURE_NAMES)

_FORCE = {"bw_newton", "peak1", "peak2", "valley", "valley_ratio", "peak_cv", "loading_rate",
          "unloading_rate", "impulse"}  # fmt: skip


def feature_group(name: str) -> str:
    """The family a feature belongs to: ``moments``, ``sensor_share``, ``sensor_std``,
    ``asymmetry``, ``force_profile``, ``cop_profile_y``, ``cop_profile_x``,
    ``sensor_profile``, ``spectral``, ``cop``, ``force`` or ``timing`` (stride, stance,
    swing, step, double support, cadence, phase coordination, their variability)."""
    prefixes = (
        (("L_", "R_"), "moments"), (("share_",), "sensor_share"), (("nstd_",), "sensor_std"),
        (("asym_",), "asymmetry"), (("profile_",), "force_profile"),
        (("cop_y_profile",), "cop_profile_y"), (("cop_x_profile",), "cop_profile_x"),
        (("sensor",), "sensor_profile"), (("spec_", "harmonic_ratio"), "spectral"),
        (("cop_",), "cop"),
    )  # fmt: skip
    for pre, group in prefixes:
        if name.startswith(pre):
            return group
    return "force" if name in _FORCE else "timing"


#: Feature name -> family (see :func:`feature_group`).
FEATURE_GROUPS: dict[str, str] = {n: feature_group(n) for n in FEATURE_NAMES}


# ----------------------------------------------------------------------------- primitives


def window_starts(n: int, fs: float = FS, window_s: float = DEFAULT_WINDOW_S,
                  step_s: float = DEFAULT_STEP_S) -> np.ndarray:  # fmt: skip
    """Start indices of the complete windows of a recording of ``n`` samples."""
    w, s = _window_rows(fs, window_s, step_s)
    if n < w:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n - w + 1, s, dtype=np.int64)


def _window_rows(fs: float, window_s: float, step_s: float) -> tuple[int, int]:
    w, s = round(window_s * fs), round(step_s * fs)
    if w < 2 or s < 1:
        raise ValueError(f"window ({window_s} s) and step ({step_s} s) too short at {fs} Hz")
    return w, s


def contact_mask(force: np.ndarray, hi: float = _HI, lo: float = _LO) -> np.ndarray:
    """Boolean foot contact from a total force, with hysteresis.

    On when the force exceeds ``base + hi * range``, off below ``base + lo * range``
    (``base`` = 2nd percentile, ``range`` = 98th - 2nd percentile); in between the
    previous state holds. Vectorised: the state is a forward fill of the last
    decided sample.
    """
    f = np.asarray(force, dtype=np.float64)
    p2, p98 = np.percentile(f, [2.0, 98.0])
    span = p98 - p2
    if span <= 1e-9:
        return np.zeros(f.shape, dtype=bool)
    on, off = f > p2 + hi * span, f < p2 + lo * span
    decided = on | off
    idx = np.where(decided, np.arange(f.size), 0)
    np.maximum.accumulate(idx, out=idx)
    state = on[idx]
    # Before the first decided sample, call it contact if above the midpoint.
    first = int(np.argmax(decided)) if decided.any() else f.size
    state[:first] = f[:first] > p2 + 0.5 * span
    return state


@dataclass(frozen=True, slots=True)
class GaitEvents:
    """Strides of one foot, in samples: heel strike ``hs``, toe-off ``to``, next heel strike."""

    hs: np.ndarray  # heel strike of each valid stride
    to: np.ndarray  # toe-off within the stride
    hs_next: np.ndarray  # heel strike that ends the stride
    n_candidates: int  # strides before validity checks

    @property
    def stride(self) -> np.ndarray:
        return self.hs_next - self.hs

    @property
    def stance(self) -> np.ndarray:
        return self.to - self.hs

    @property
    def swing(self) -> np.ndarray:
        return self.hs_next - self.to


def gait_events(contact: np.ndarray, fs: float = FS) -> GaitEvents:
    """Heel strikes (contact rising edges) and toe-offs (falling edges) of one foot.

    Only strides seen whole inside the signal and of plausible duration are kept.
    """
    c = np.asarray(contact, dtype=np.int8)
    d = np.diff(c)
    hs_all = np.flatnonzero(d == 1) + 1
    to_all = np.flatnonzero(d == -1) + 1
    empty = np.zeros(0, dtype=np.int64)
    if hs_all.size < 2 or to_all.size < 1:
        return GaitEvents(empty, empty, empty, 0)
    hs, hs_next = hs_all[:-1], hs_all[1:]
    # contact alternates, so the first toe-off after hs is within the stride
    j = np.searchsorted(to_all, hs, side="right")
    ok = j < to_all.size
    hs, hs_next, j = hs[ok], hs_next[ok], j[ok]
    to = to_all[j]
    ok = to < hs_next
    hs, hs_next, to = hs[ok], hs_next[ok], to[ok]
    stride, stance, swing = (hs_next - hs) / fs, (to - hs) / fs, (hs_next - to) / fs
    valid = (
        (stride >= _STRIDE[0]) & (stride <= _STRIDE[1])
        & (stance >= _STANCE[0]) & (stance <= _STANCE[1])
        & (swing >= _SWING[0]) & (swing <= _SWING[1])
    )  # fmt: skip
    return GaitEvents(hs[valid], to[valid], hs_next[valid], int(hs_all.size - 1))


def centre_of_pressure(sensors: np.ndarray, side: str = "L") -> tuple[np.ndarray, np.ndarray]:
    """Centre of pressure ``(x, y)`` of one foot from its 8 sensor forces ``(n, 8)``.

    Uses :data:`SENSOR_XY` (x mirrored for the right foot). Where the foot carries
    no load the COP is undefined; it is returned as 0 there.
    """
    s = np.clip(np.asarray(sensors, dtype=np.float64), 0.0, None)
    tot = s.sum(axis=1)
    xy = SENSOR_XY.copy()
    if side == "R":
        xy[:, 0] = -xy[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(tot > 1e-6, s @ xy[:, 0] / tot, 0.0)
        y = np.where(tot > 1e-6, s @ xy[:, 1] / tot, 0.0)
    return x, y


# ----------------------------------------------------------------------------- helpers


def _cv(a: np.ndarray) -> float:
    """Coefficient of variation in %, NaN with fewer than 3 values."""
    if a.size < 3:
        return np.nan
    m = a.mean()
    return float(100.0 * a.std(ddof=1) / m) if m > 0 else np.nan


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else np.nan


def _segment_reduce(ufunc: np.ufunc, x: np.ndarray, start: np.ndarray,
                    stop: np.ndarray) -> np.ndarray:  # fmt: skip
    """``ufunc.reduce(x[start_k:stop_k])`` for sorted, non-empty, disjoint-ordered segments."""
    if start.size == 0:
        return np.zeros(0)
    stop = np.maximum(stop, start + 1)
    idx = np.empty(2 * start.size, dtype=np.int64)
    idx[0::2], idx[1::2] = start, np.minimum(stop, x.size)
    if idx[-1] >= x.size:  # reduceat cannot take len(x) as an index: pad
        x = np.append(x, x[-1:])
    return ufunc.reduceat(x, idx)[0::2]


def _segment_mean(x: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    stop = np.maximum(stop, start + 1)
    return _segment_reduce(np.add, x, start, stop) / (stop - start)


def _profiles(x: np.ndarray, start: np.ndarray, stop: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Resample ``x`` over each ``[start_k, stop_k)`` at fractional ``points`` (k, p)."""
    pos = start[:, None] + (stop - 1 - start)[:, None] * points[None, :]
    return np.interp(pos, np.arange(x.size), x)


def _moments(x: np.ndarray) -> tuple[float, float, float, float]:
    m, s = float(x.mean()), float(x.std())
    if s <= 1e-12:
        return m, s, 0.0, 0.0
    z = (x - m) / s
    return m, s, float((z**3).mean()), float((z**4).mean() - 3.0)


def _asym(a: float, b: float) -> float:
    """Symmetry index |a - b| / mean(a, b) in %."""
    den = 0.5 * (abs(a) + abs(b))
    if not np.isfinite(a) or not np.isfinite(b) or den <= 1e-12:
        return np.nan
    return 100.0 * abs(a - b) / den


def _foot_features(x: np.ndarray, side: str, fs: float, bw: float) -> tuple[dict, dict]:
    """Timing, force and COP features of one foot, and its raw events/arrays."""
    sensors = x[:, _L_SENSORS] if side == "L" else x[:, _R_SENSORS]
    force = x[:, _L_TOTAL if side == "L" else _R_TOTAL] / bw
    contact = contact_mask(force)
    ev = gait_events(contact, fs)
    out = dict.fromkeys(_FOOT_FEATURES, np.nan)
    extra = {"events": ev, "contact": contact, "profile": None, "cop_profile": None,
             "cop_x_profile": None, "sensor_profile": None}  # fmt: skip
    n = ev.hs.size
    if n == 0:
        return out, extra
    stride, stance, swing = ev.stride / fs, ev.stance / fs, ev.swing / fs
    out |= {
        "stride_mean": _mean(stride), "stride_cv": _cv(stride),
        "stance_mean": _mean(stance), "stance_cv": _cv(stance),
        "swing_mean": _mean(swing), "swing_cv": _cv(swing),
        "stance_pct": 100.0 * _mean(stance / stride), "swing_pct_cv": _cv(swing / stride),
    }  # fmt: skip
    hs, to = ev.hs, ev.to
    mid = hs + (to - hs) // 2
    third = (to - hs) // 3
    p1 = _segment_reduce(np.maximum, force, hs, mid)
    p2 = _segment_reduce(np.maximum, force, mid, to)
    valley = _segment_reduce(np.minimum, force, hs + third, to - third)
    dfdt = np.gradient(force) * fs
    quarter = np.maximum((to - hs) // 4, 1)
    load = _segment_reduce(np.maximum, dfdt, hs, hs + quarter)
    unload = _segment_reduce(np.minimum, dfdt, to - quarter, to)
    impulse = _segment_reduce(np.add, force, hs, to) / fs
    peaks = np.maximum(p1, p2)
    out |= {
        "peak1": _mean(p1), "peak2": _mean(p2), "valley": _mean(valley),
        "valley_ratio": _mean(valley / np.maximum(0.5 * (p1 + p2), 1e-9)),
        "peak_cv": _cv(peaks), "loading_rate": _mean(load), "unloading_rate": _mean(-unload),
        "impulse": _mean(impulse),
    }  # fmt: skip
    cx, cy = centre_of_pressure(sensors, side)
    if side == "R":
        cx = -cx  # mirror so that medial/lateral mean the same for both feet
    step_len = np.hypot(np.diff(cx, append=cx[-1]), np.diff(cy, append=cy[-1]))
    path = _segment_reduce(np.add, step_len, hs, to - 1)
    ap = _segment_reduce(np.maximum, cy, hs, to) - _segment_reduce(np.minimum, cy, hs, to)
    ml = _segment_reduce(np.maximum, cx, hs, to) - _segment_reduce(np.minimum, cx, hs, to)
    tenth = np.maximum((to - hs) // 10, 1)
    out |= {
        "cop_ap_range": _mean(ap), "cop_ml_range": _mean(ml), "cop_path": _mean(path),
        "cop_velocity": _mean(path / stance),
        "cop_y_start": _mean(_segment_mean(cy, hs, hs + tenth)),
        "cop_y_end": _mean(_segment_mean(cy, to - tenth, to)),
        "cop_x_mean": _mean(_segment_mean(cx, hs, to)), "cop_path_cv": _cv(path),
    }  # fmt: skip
    extra["profile"] = _profiles(force, hs, to, _PROFILE_POINTS).mean(axis=0)
    extra["cop_profile"] = _profiles(cy, hs, to, _PROFILE_POINTS).mean(axis=0)
    extra["cop_x_profile"] = _profiles(cx, hs, to, _PROFILE_POINTS).mean(axis=0)
    sens = np.clip(sensors, 0.0, None) / bw
    extra["sensor_profile"] = np.stack(
        [_profiles(sens[:, i], hs, to, _SENSOR_POINTS).mean(axis=0) for i in range(8)]
    )
    return out, extra


def _spectral(total: np.ndarray, left: np.ndarray, fs: float, stride_s: float) -> list[float]:
    n = total.size
    win = np.hanning(n)
    freqs = np.fft.rfftfreq(n, 1.0 / fs)
    amp_t = np.abs(np.fft.rfft((total - total.mean()) * win))
    amp_l = np.abs(np.fft.rfft((left - left.mean()) * win))
    power = amp_t**2
    tot = power[freqs > 0].sum()
    if tot <= 1e-12:
        return [np.nan] * 10
    gait = (freqs >= 0.5) & (freqs <= 4.0)
    step_f = float(freqs[gait][np.argmax(power[gait])])
    lg = (freqs >= 0.25) & (freqs <= 2.0)
    stride_f = float(freqs[lg][np.argmax(amp_l[lg])])
    p = power[freqs > 0] / tot
    entropy = float(-(p * np.log(np.where(p > 0, p, 1.0))).sum() / np.log(p.size))
    centroid = float((freqs[freqs > 0] * p).sum())

    def band(a: float, b: float) -> float:
        return float(power[(freqs > a) & (freqs <= b)].sum() / tot)

    # Harmonic ratio: even over odd harmonics of the stride frequency in L + R.
    f0 = 1.0 / stride_s if np.isfinite(stride_s) and stride_s > 0 else stride_f
    k = np.arange(1, 21)
    hk = np.interp(k * f0, freqs, amp_t)
    hr = float(hk[1::2].sum() / max(hk[0::2].sum(), 1e-12))
    peak_band = (freqs >= step_f - 0.3) & (freqs <= step_f + 0.3)
    sharp = float(power[peak_band].sum() / max(power[gait].sum(), 1e-12))
    return [step_f, stride_f, entropy, centroid, band(0.0, 0.5), band(0.5, 3.0),
            band(3.0, 8.0), band(8.0, 20.0), hr, sharp]  # fmt: skip


# ----------------------------------------------------------------------------- public API


def window_features(x: np.ndarray, fs: float = FS) -> np.ndarray:
    """Features of one window ``x`` of shape ``(n, 19)``: a float vector in
    :data:`FEATURE_NAMES` order. Undefined features (no strides found) are NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(COLUMNS):
        raise ValueError(f"expected an (n, {len(COLUMNS)}) array, got {x.shape}")
    out = np.full(_NF, np.nan)
    total_n = x[:, _L_TOTAL] + x[:, _R_TOTAL]
    bw = float(total_n.mean())
    if bw <= 1e-6 or x.shape[0] < 4:
        return out
    feats: dict[str, float] = {"bw_newton": bw}
    for side, col in (("L", _L_TOTAL), ("R", _R_TOTAL)):
        m, s, sk, ku = _moments(x[:, col] / bw)
        feats |= {f"{side}_mean": m, f"{side}_std": s, f"{side}_skew": sk, f"{side}_kurt": ku}
    sensors = np.clip(x[:, 1:17], 0.0, None)
    foot_mean = np.concatenate(
        [np.full(8, max(x[:, _L_TOTAL].mean(), 1e-9)), np.full(8, max(x[:, _R_TOTAL].mean(), 1e-9))]
    )
    share = sensors.mean(axis=0) / foot_mean
    nstd = sensors.std(axis=0) / bw
    for i, ch in enumerate(CHANNELS[:16]):
        feats[f"share_{ch}"] = float(share[i])
        feats[f"nstd_{ch}"] = float(nstd[i])

    fl, xl = _foot_features(x, "L", fs, bw)
    fr, xr = _foot_features(x, "R", fs, bw)
    evl, evr = xl["events"], xr["events"]
    n_valid = evl.hs.size + evr.hs.size
    n_cand = evl.n_candidates + evr.n_candidates
    feats["n_strides"] = float(n_valid)
    feats["valid_fraction"] = n_valid / n_cand if n_cand else 0.0
    for f in _FOOT_FEATURES:
        vals = [v for v in (fl[f], fr[f]) if np.isfinite(v)]
        feats[f] = float(np.mean(vals)) if vals else np.nan
        if not f.endswith("_cv"):
            feats[f"asym_{f}"] = _asym(fl[f], fr[f])

    # Both feet: steps, double support, phase coordination.
    strides = np.concatenate([evl.stride, evr.stride]) / fs
    feats["stride_cv_pooled"] = _cv(strides)
    feats["cadence"] = 120.0 / _mean(strides) if strides.size else np.nan
    diffs = [np.diff(ev.stride / fs) for ev in (evl, evr) if ev.stride.size >= 2]
    feats["stride_diff_rms"] = (
        float(np.sqrt(np.mean(np.concatenate(diffs) ** 2))) if diffs else np.nan
    )
    _steps(feats, xl["contact"], xr["contact"], evl, evr, fs)

    prof = [p for p in (xl["profile"], xr["profile"]) if p is not None]
    cop = [p for p in (xl["cop_profile"], xr["cop_profile"]) if p is not None]
    copx = [p for p in (xl["cop_x_profile"], xr["cop_x_profile"]) if p is not None]
    for i, pt in enumerate(_PROFILE_POINTS):
        tag = f"{round(pt * 100):03d}"
        feats[f"profile_{tag}"] = float(np.mean([p[i] for p in prof])) if prof else np.nan
        feats[f"cop_y_profile_{tag}"] = float(np.mean([p[i] for p in cop])) if cop else np.nan
        feats[f"cop_x_profile_{tag}"] = float(np.mean([p[i] for p in copx])) if copx else np.nan
    sp = [p for p in (xl["sensor_profile"], xr["sensor_profile"]) if p is not None]
    if sp:
        spm = np.mean(sp, axis=0)
        for i in range(8):
            for j, pt in enumerate(_SENSOR_POINTS):
                feats[f"sensor{i + 1}_{round(pt * 100):03d}"] = float(spm[i, j])

    spec = _spectral(total_n / bw, x[:, _L_TOTAL] / bw, fs, feats["stride_mean"])
    for name, v in zip(_SPECTRAL, spec, strict=True):
        feats[name] = v
    for i, name in enumerate(FEATURE_NAMES):
        v = feats.get(name, np.nan)
        out[i] = v if v is not None and np.isfinite(v) else np.nan
    return out


def _steps(feats: dict, cl: np.ndarray, cr: np.ndarray, evl: GaitEvents, evr: GaitEvents,
           fs: float) -> None:  # fmt: skip
    """Step times, double support and phase coordination from both feet."""
    hs = np.concatenate([evl.hs, evr.hs])
    side = np.concatenate([np.zeros(evl.hs.size, np.int8), np.ones(evr.hs.size, np.int8)])
    order = np.argsort(hs, kind="stable")
    hs, side = hs[order], side[order]
    step = np.diff(hs) / fs
    alt = (np.diff(side) != 0) & (step >= 0.2) & (step <= 1.6)
    s_lr = step[alt & (side[:-1] == 0)]
    s_rl = step[alt & (side[:-1] == 1)]
    steps = step[alt]
    feats["step_mean"] = _mean(steps)
    feats["step_cv"] = _cv(steps)
    feats["step_asym"] = _asym(_mean(s_lr), _mean(s_rl))
    # double support per left stride, from the cumulative count of both-feet samples
    both = np.concatenate([[0], np.cumsum(cl & cr)])
    if evl.hs.size:
        ds = (both[evl.hs_next] - both[evl.hs]) / np.maximum(evl.stride, 1)
        feats["double_support_pct"] = 100.0 * _mean(ds)
        feats["double_support_cv"] = _cv(ds)
    single_l = _mean(evr.swing / fs) if evr.hs.size else np.nan  # left single support
    single_r = _mean(evl.swing / fs) if evl.hs.size else np.nan
    feats["single_support_asym"] = _asym(single_l, single_r)
    # Phase of the right heel strike inside each left stride (180 deg = perfect
    # anti-phase); PCI (Plotnik 2007) = CV of the phase + mean |phase - 180| in %.
    if evl.hs.size and evr.hs.size:
        j = np.searchsorted(evr.hs, evl.hs, side="right")
        ok = j < evr.hs.size
        tr = evr.hs[np.minimum(j, evr.hs.size - 1)]
        ok &= tr < evl.hs_next
        phase = 360.0 * (tr[ok] - evl.hs[ok]) / evl.stride[ok]
        if phase.size:
            feats["phase_mean"] = _mean(phase)
            cv = _cv(phase)
            feats["phase_cv"] = cv
            feats["pci"] = cv + 100.0 * _mean(np.abs(phase - 180.0)) / 180.0


def recording_features(x: np.ndarray, fs: float = FS, window_s: float = DEFAULT_WINDOW_S,
                       step_s: float = DEFAULT_STEP_S) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Features of every complete window of a recording ``x`` of shape ``(n, 19)``.

    Returns ``(starts, features)``: window start rows ``(k,)`` and a float matrix
    ``(k, len(FEATURE_NAMES))``. A recording shorter than a window gives ``k = 0``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(COLUMNS):
        raise ValueError(f"expected an (n, {len(COLUMNS)}) array, got {x.shape}")
    w, _ = _window_rows(fs, window_s, step_s)
    starts = window_starts(x.shape[0], fs, window_s, step_s)
    feats = np.empty((starts.size, _NF))
    for i, s in enumerate(starts):
        feats[i] = window_features(x[s : s + w], fs)
    return starts, feats


def sensor_series(x: np.ndarray, fs: float = FS, window_s: float = DEFAULT_WINDOW_S,
                  step_s: float = DEFAULT_STEP_S, decimate: int = 2) -> np.ndarray:  # fmt: skip
    """The 16 sensor forces of every complete window, for time-series models.

    Each window's sensors are divided by its mean total force (body weight) and
    averaged over blocks of ``decimate`` samples (100 Hz -> 50 Hz by default).
    Returns float32 ``(k, 16, window_rows // decimate)``, windows as in
    :func:`recording_features`.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(COLUMNS):
        raise ValueError(f"expected an (n, {len(COLUMNS)}) array, got {x.shape}")
    w, _ = _window_rows(fs, window_s, step_s)
    starts = window_starts(x.shape[0], fs, window_s, step_s)
    length = w // decimate
    out = np.empty((starts.size, 16, length), dtype=np.float32)
    for i, s in enumerate(starts):
        win = x[s : s + length * decimate]
        bw = max(float((win[:, _L_TOTAL] + win[:, _R_TOTAL]).mean()), 1e-6)
        sens = np.clip(win[:, 1:17], 0.0, None).T / bw
        out[i] = sens.reshape(16, length, decimate).mean(axis=2)
    return out


def features_frame(df: pd.DataFrame, *, id_col: str = "recording_id", seq_col: str = "seq",
                   fs: float = FS, window_s: float = DEFAULT_WINDOW_S,
                   step_s: float = DEFAULT_STEP_S) -> pd.DataFrame:  # fmt: skip
    """Window features of one recording given as a DataFrame (Spark ``applyInPandas``).

    ``df`` holds the samples of one recording: columns ``time, L1..L8, R1..R8, L, R``,
    the recording id ``id_col`` and the sample number ``seq_col`` (0 = first sample,
    100 per second). Rows may come in any order. Window ``k`` covers
    ``seq`` in ``[k*step, k*step + window)``; a window with a missing sample is
    skipped (never computed on a gap). Returns one row per window with columns
    ``key`` (``f"{recording_id}:{k}"``), ``recording_id``, ``window``, ``start_seq``,
    ``t_start``, then :data:`FEATURE_NAMES` (float64). An empty frame with those
    columns when no window is complete.
    """
    out_cols = ["key", "recording_id", "window", "start_seq", "t_start", *FEATURE_NAMES]
    missing = [c for c in (*COLUMNS, id_col, seq_col) if c not in df.columns]
    if missing:
        raise ValueError(f"features_frame: missing columns {missing}")
    if df.empty:
        return _empty_frame(out_cols)
    ids = df[id_col].unique()
    if len(ids) != 1:
        raise ValueError(f"features_frame: expected one recording, got {len(ids)}")
    rid = str(ids[0])
    d = df.sort_values(seq_col, kind="stable").drop_duplicates(seq_col, keep="last")
    seq = d[seq_col].to_numpy(dtype=np.int64)
    w, s = _window_rows(fs, window_s, step_s)
    if seq[0] < 0:
        raise ValueError("features_frame: negative seq")
    # Lay the samples on the full seq grid so that gaps show up as NaN rows.
    n = int(seq[-1]) + 1
    grid = np.full((n, len(COLUMNS)), np.nan)
    grid[seq] = d.loc[:, list(COLUMNS)].to_numpy(dtype=np.float64)
    present = np.concatenate([[0], np.cumsum(np.isfinite(grid).all(axis=1))])
    rows = []
    for k in range((n - w) // s + 1 if n >= w else 0):
        a = k * s
        if present[a + w] - present[a] != w:
            continue
        win = grid[a : a + w]
        rows.append((f"{rid}:{k}", rid, k, a, float(win[0, 0]), *window_features(win, fs)))
    if not rows:
        return _empty_frame(out_cols)
    out = pd.DataFrame(rows, columns=out_cols)
    out["window"] = out["window"].astype("int64")
    out["start_seq"] = out["start_seq"].astype("int64")
    return out


def _empty_frame(cols: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    out["key"] = out["key"].astype(object)
    out["recording_id"] = out["recording_id"].astype(object)
    out["window"] = out["window"].astype("int64")
    out["start_seq"] = out["start_seq"].astype("int64")
    return out


#: Columns of :func:`baseline_frame`'s output after the key columns.
BASELINE_NAMES: tuple[str, ...] = tuple(f"mean_{c}" for c in CHANNELS)


def baseline_frame(df: pd.DataFrame, *, id_col: str = "recording_id", seq_col: str = "seq",
                   rows: int = 100) -> pd.DataFrame:  # fmt: skip
    """The original tutorial's features: means of the 18 force channels over blocks
    of ``rows`` samples (``seq // rows``), one row per complete block, keyed
    ``f"{recording_id}:b{block}"``. Kept as a baseline for comparisons.
    """
    missing = [c for c in (*COLUMNS, id_col, seq_col) if c not in df.columns]
    if missing:
        raise ValueError(f"baseline_frame: missing columns {missing}")
    cols = ["key", "recording_id", "block", *BASELINE_NAMES]
    if df.empty:
        return _empty_baseline(cols)
    block = df[seq_col].to_numpy(dtype=np.int64) // rows
    g = df.assign(_block=block).groupby([id_col, "_block"], sort=True)
    means = g[list(CHANNELS)].mean()
    counts = g.size()
    means = means[counts.to_numpy() == rows]
    if means.empty:
        return _empty_baseline(cols)
    rid = means.index.get_level_values(0).astype(str)
    blk = means.index.get_level_values(1).to_numpy(dtype=np.int64)
    out = pd.DataFrame(means.to_numpy(), columns=list(BASELINE_NAMES))
    out.insert(0, "block", blk)
    out.insert(0, "recording_id", np.asarray(rid, dtype=object))
    out.insert(0, "key", [f"{r}:b{b}" for r, b in zip(rid, blk, strict=True)])
    return out


def _empty_baseline(cols: list[str]) -> pd.DataFrame:
    out = pd.DataFrame({c: pd.Series(dtype="float64") for c in cols})
    out["key"] = out["key"].astype(object)
    out["recording_id"] = out["recording_id"].astype(object)
    out["block"] = out["block"].astype("int64")
    return out
