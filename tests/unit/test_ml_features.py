"""Window features on synthetic signals with known gait timing."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ml import features as F
from ml.synthetic import synthetic_recording


def _median_features(x: np.ndarray) -> dict[str, float]:
    _, feats = F.recording_features(x)
    assert feats.shape[1] == len(F.FEATURE_NAMES)
    return dict(zip(F.FEATURE_NAMES, np.nanmedian(feats, axis=0), strict=True))


def _frame(x: np.ndarray, rid: str = "rec1") -> pd.DataFrame:
    df = pd.DataFrame(x, columns=list(F.COLUMNS))
    df["recording_id"] = rid
    df["seq"] = np.arange(len(df))
    return df


@pytest.mark.parametrize("stride_s", [1.1, 1.4])
def test_stride_time_and_cadence_of_a_periodic_gait(stride_s: float) -> None:
    f = _median_features(synthetic_recording(stride_s, 60.0))
    assert f["stride_mean"] == pytest.approx(stride_s, abs=0.01)
    assert f["cadence"] == pytest.approx(120.0 / stride_s, rel=0.01)  # steps per minute
    assert f["step_mean"] == pytest.approx(stride_s / 2, abs=0.01)
    assert f["stride_cv"] < 1.0  # a perfectly periodic gait
    assert f["phase_mean"] == pytest.approx(180.0, abs=2.0)  # anti-phase feet
    assert f["asym_stride_mean"] < 1.0
    assert f["spec_stride_freq"] == pytest.approx(1.0 / stride_s, abs=0.1)
    # a threshold shortens the detected stance a little; double support is what
    # the two overlapping stances leave: 2 * stance% - 100
    assert 52.0 < f["stance_pct"] < 62.0
    assert f["double_support_pct"] == pytest.approx(2 * f["stance_pct"] - 100.0, abs=1.5)
    assert f["swing_mean"] + f["stance_mean"] == pytest.approx(stride_s, abs=0.01)


def test_variable_strides_raise_the_cv() -> None:
    steady = _median_features(synthetic_recording(1.1, 60.0, stride_cv=0.0))
    shaky = _median_features(synthetic_recording(1.1, 60.0, stride_cv=0.06, seed=3))
    assert shaky["stride_cv"] > 3.0 > steady["stride_cv"]


def test_centre_of_pressure_rolls_from_heel_to_toe() -> None:
    f = _median_features(synthetic_recording(1.1, 40.0))
    assert f["cop_y_start"] < -300 < 300 < f["cop_y_end"]
    assert f["cop_ap_range"] > 800
    profile = [f[f"cop_y_profile_{p:03d}"] for p in range(0, 101, 10)]
    assert profile[0] < profile[5] < profile[-1]


def test_centre_of_pressure_uses_the_sensor_coordinates() -> None:
    load = np.zeros((3, 8))
    load[0, 0] = 100.0  # all on sensor 1 (heel)
    load[1, 7] = 50.0  # all on sensor 8 (toes)
    load[2, [2, 4]] = 10.0  # halfway between sensors 3 and 5
    x, y = F.centre_of_pressure(load, "L")
    assert (x[0], y[0]) == (-500, -800)
    assert (x[1], y[1]) == (-500, 800)
    assert (x[2], y[2]) == (-300, -200)
    xr, yr = F.centre_of_pressure(load, "R")
    assert xr[0] == 500 and yr[0] == -800


def test_gait_events_from_a_contact_pattern() -> None:
    # contact 60 samples, swing 40, repeated: strides of 100 samples (1 s at 100 Hz)
    c = np.tile(np.r_[np.ones(60), np.zeros(40)], 5).astype(bool)
    c = np.r_[np.zeros(10, bool), c]
    ev = F.gait_events(c)
    assert list(ev.hs) == [10, 110, 210, 310]
    assert list(ev.to) == [70, 170, 270, 370]
    assert set(ev.stride) == {100} and set(ev.stance) == {60} and set(ev.swing) == {40}


def test_contact_hysteresis_ignores_noise_around_the_threshold() -> None:
    rng = np.random.default_rng(0)
    force = np.tile(np.r_[np.full(60, 700.0), np.zeros(40)], 6) + rng.normal(0, 20, 600)
    force = np.clip(force, 0, None)
    c = F.contact_mask(force)
    assert np.count_nonzero(np.diff(c.astype(int)) == 1) <= 6


def test_windows_without_gait_give_nan_not_errors() -> None:
    standing = np.zeros((1000, 19))
    standing[:, 1:17] = 40.0
    standing[:, 17] = standing[:, 1:9].sum(axis=1)
    standing[:, 18] = standing[:, 9:17].sum(axis=1)
    v = F.window_features(standing)
    assert v.shape == (len(F.FEATURE_NAMES),)
    assert np.isnan(v[F.FEATURE_NAMES.index("stride_mean")])
    assert v[F.FEATURE_NAMES.index("n_strides")] == 0
    assert np.isnan(F.window_features(np.zeros((1000, 19)))).all()


def test_feature_names_are_unique_and_fixed() -> None:
    assert len(set(F.FEATURE_NAMES)) == len(F.FEATURE_NAMES)
    assert F.FEATURE_NAMES[:3] == ("n_strides", "valid_fraction", "bw_newton")
    assert F.FEATURE_NAMES[-1] == "spec_peak_sharpness"
    assert F.FEATURE_NAMES.index("sensor8_095") < F.FEATURE_NAMES.index("spec_step_freq")


def test_window_starts() -> None:
    assert list(F.window_starts(2999)) == [0, 500, 1000, 1500]
    assert list(F.window_starts(999)) == []
    assert list(F.window_starts(4000, window_s=20, step_s=10)) == [0, 1000, 2000]
    with pytest.raises(ValueError):
        F.window_starts(100, window_s=0.0)


def test_features_frame_matches_recording_features_and_keys() -> None:
    x = synthetic_recording(1.2, 32.0)
    out = F.features_frame(_frame(x))
    starts, feats = F.recording_features(x)
    assert list(out.columns[:5]) == ["key", "recording_id", "window", "start_seq", "t_start"]
    assert tuple(out.columns[5:]) == F.FEATURE_NAMES
    assert list(out["key"]) == [f"rec1:{k}" for k in range(len(starts))]
    assert list(out["start_seq"]) == list(starts)
    np.testing.assert_allclose(out.loc[:, list(F.FEATURE_NAMES)].to_numpy(), feats, equal_nan=True)


def test_features_frame_is_order_independent_and_skips_gaps() -> None:
    x = synthetic_recording(1.2, 26.0)
    df = _frame(x)
    shuffled = df.sample(frac=1.0, random_state=1)
    a, b = F.features_frame(df), F.features_frame(shuffled)
    pd.testing.assert_frame_equal(a, b)
    gappy = df[(df.seq < 1200) | (df.seq > 1210)]  # a hole in windows 1 and 2
    g = F.features_frame(gappy)
    assert list(g["window"]) == [0, 3]
    assert list(g["key"]) == ["rec1:0", "rec1:3"]


def test_features_frame_edge_cases() -> None:
    empty = F.features_frame(_frame(np.zeros((0, 19))))
    assert empty.empty and tuple(empty.columns[5:]) == F.FEATURE_NAMES
    short = F.features_frame(_frame(synthetic_recording(1.1, 5.0)))
    assert short.empty
    with pytest.raises(ValueError, match="missing columns"):
        F.features_frame(_frame(np.zeros((10, 19))).drop(columns=["R3"]))
    two = pd.concat([_frame(np.zeros((10, 19)), "a"), _frame(np.zeros((10, 19)), "b")])
    with pytest.raises(ValueError, match="one recording"):
        F.features_frame(two)


def test_baseline_frame_is_100_row_means() -> None:
    x = synthetic_recording(1.1, 3.5)
    out = F.baseline_frame(_frame(x))
    assert list(out["key"]) == ["rec1:b0", "rec1:b1", "rec1:b2"]  # the partial block is dropped
    np.testing.assert_allclose(out["mean_L3"].to_numpy(), x[:300, 3].reshape(3, 100).mean(axis=1))
    assert tuple(out.columns[3:]) == F.BASELINE_NAMES


def test_sensor_series_shape_and_scale() -> None:
    x = synthetic_recording(1.1, 21.0, body_weight_n=800.0)
    s = F.sensor_series(x)
    assert s.shape == (3, 16, 500) and s.dtype == np.float32
    # sensors / body weight: the 16 series sum to about 1 on average
    assert s.sum(axis=1).mean() == pytest.approx(1.0, rel=0.05)


def test_features_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, ml.features; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sklearn', 'scipy', 'matplotlib', 'aiohttp', 'pyspark', 'joblib'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
