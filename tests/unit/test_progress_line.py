"""Progress lines: redrawn in place on a terminal, one line per update in a log."""
from __future__ import annotations

import io

import pytest

from stack import progress as P


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_redraws_one_line_and_wipes_a_longer_previous_text() -> None:
    out = Tty()
    line = P.ProgressLine(out, tty_every=0.0)
    assert line.update("sent 10/20 messages")
    assert line.update("sent 20/20", final=True)
    assert out.getvalue() == "\rsent 10/20 messages" + "\rsent 20/20" + " " * 9 + "\n"


def test_log_gets_whole_lines_throttled(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(P.time, "monotonic", lambda: clock[0])
    out = io.StringIO()  # not a terminal: no carriage returns
    line = P.ProgressLine(out, log_every=10.0)
    assert line.update("1/5")  # the first update is always shown
    clock[0] += 3.0
    assert not line.update("2/5")  # too soon
    clock[0] += 8.0
    assert line.update("3/5")
    clock[0] += 1.0
    assert line.update("5/5", final=True)  # the last one always
    assert out.getvalue() == "1/5\n3/5\n5/5\n"
    assert "\r" not in out.getvalue()
    calls: list[int] = []
    clock[0] += 1.0  # not due: a callable text is not even formatted
    assert not line.update(lambda: calls.append(1) or "6/5")
    clock[0] += 10.0
    assert line.update(lambda: calls.append(1) or "7/5") and calls == [1]
    assert out.getvalue().endswith("5/5\n7/5\n")


def test_replay_progress_in_a_log_ends_with_the_totals(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from stack.replay import Progress

    progress = Progress(total_msgs=3, total_rows=300)
    for _ in range(3):
        progress.add(100)
    progress.finish()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("[") and " 1/3 msgs 100 rows" in lines[0]
    assert " 3/3 msgs 300 rows" in lines[-1]
