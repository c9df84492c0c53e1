"""The sensor replay's message encoding and fault injection (no broker)."""
import json
import random

import numpy as np
import pytest

from stack.replay import COLUMNS, ReplayOptions, apply_faults, encode_messages, end_message


def _rows(n: int) -> np.ndarray:
    rows = np.arange(n * 19, dtype=float).reshape(n, 19)
    rows[:, 0] = np.arange(n) / 100
    return rows


def test_sample_format_is_the_tutorials():
    msgs = list(encode_messages("GaCo01_01", _rows(3), "sample", 100))
    assert len(msgs) == 3
    obj = json.loads(msgs[2][1])
    assert obj["Patient"] == "GaCo01_01"
    assert obj["seq"] == 2
    assert list(obj)[2:] == COLUMNS
    assert obj["time"] == pytest.approx(0.02)
    assert msgs[2][0] == pytest.approx(0.02)


def test_batch_format_carries_sequence_numbers_and_all_rows():
    rows = _rows(250)
    msgs = list(encode_messages("GaPt03_02", rows, "batch", 100))
    decoded = [json.loads(p) for _, p in msgs]
    assert [d["seq"] for d in decoded] == [0, 100, 200]
    assert [len(d["rows"]) for d in decoded] == [100, 100, 50]
    assert np.array_equal(np.array([r for d in decoded for r in d["rows"]]), rows)
    assert decoded[0]["device"] == "insole-GaPt03_02"


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="sample.*batch"):
        list(encode_messages("x", _rows(1), "csv", 1))


def test_end_marker():
    assert json.loads(end_message("GaCo01_01", 5)) == {
        "device": "insole-GaCo01_01", "recording": "GaCo01_01", "end": True, "rows_total": 5}


def test_faults_are_seeded_and_do_what_they_say():
    msgs = [(float(i), str(i).encode()) for i in range(1000)]
    lossy = apply_faults(msgs, ReplayOptions(loss=0.1), random.Random(1))
    assert 850 < len(lossy) < 950
    assert apply_faults(msgs, ReplayOptions(loss=0.1), random.Random(1)) == lossy
    dup = apply_faults(msgs, ReplayOptions(duplicate=0.1), random.Random(1))
    assert len(dup) > 1000 and set(dup) == set(msgs)
    swapped = apply_faults(msgs, ReplayOptions(reorder=0.2), random.Random(1))
    assert sorted(swapped) == msgs and swapped != msgs
    assert apply_faults(msgs, ReplayOptions(), random.Random(1)) == msgs
