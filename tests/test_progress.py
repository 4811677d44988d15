"""Progress where output is not a terminal (a log file, a pipe): plain lines, not a silent or \\r-drawn bar."""

from __future__ import annotations

import io
import re

import pytest

from llamaforge.eval.scoring import generate_until, loglikelihoods
from llamaforge.progress import ProgressBar, clock


def test_a_log_gets_a_line_at_the_start_each_tenth_and_the_end() -> None:
    log = io.StringIO()
    with ProgressBar(50, "step", "step", file=log) as bar:
        for step in range(50):
            bar.update(1, loss=f"{1 / (step + 1):.4g}")
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == ["step 1/50"] + [f"step {n}/50" for n in range(5, 51, 5)]
    assert re.fullmatch(r"step 50/50 \(100%\), loss 0\.02, [\d.,]+ step/s, elapsed 0:00, ETA 0:00", lines[-1])
    assert "\r" not in log.getvalue()


def test_no_work_and_no_progress_print_nothing() -> None:
    for bar in (ProgressBar(0, "loglikelihood", "req", file=io.StringIO()),
                ProgressBar(5, "generate", "req", enabled=False, file=io.StringIO())):
        bar.update(1)
        bar.write("a note")
        bar.close()
        assert bar.file.getvalue() == ""


def test_a_resumed_count_starts_where_it_was() -> None:
    log = io.StringIO()
    bar = ProgressBar(100, "step", "step", initial=60, file=log)
    bar.update(1)
    assert log.getvalue().startswith("step 61/100 (61%), ")


def test_clock() -> None:
    assert [clock(s) for s in (0, 7.4, 754, 3723)] == ["0:00", "0:07", "12:34", "1:02:03"]


def test_eval_shows_no_bar_for_a_request_type_without_requests(tiny_llm, capsys: pytest.CaptureFixture) -> None:
    assert loglikelihoods(tiny_llm.model, [], batch_size=4) == []
    generate_until(tiny_llm, ["Once upon", "Llamas"], ["\n"], max_new_tokens=3, batch_size=1)
    lines = capsys.readouterr().err.splitlines()  # pytest's capture is not a terminal: plain lines
    assert [line.split(" (")[0] for line in lines] == ["generate 1/2", "generate 2/2"]
