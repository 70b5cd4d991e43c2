"""Progress off a terminal is a few log lines with counts and rate, not a line per redraw of a bar."""

from __future__ import annotations

import io
import logging

from dmd.core.progress import Progress


def test_off_a_terminal_a_line_every_tenth_and_one_at_the_end(caplog):
    caplog.set_level(logging.INFO, logger="dmd.test")
    stream = io.StringIO()  # not a terminal: what `dvc repro` under a Prefect task gives the stage
    with Progress(400, "train", logging.getLogger("dmd.test"), stream=stream, every_seconds=3600) as bar:
        for _ in range(400):
            bar.update(1, dmd_loss=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and stream.getvalue() == ""
    assert lines[0].startswith("train: 40/400 steps (10%), ") and "steps/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("train: 400/400 steps (100%), ") and lines[-1].endswith("dmd_loss=0.5")


def test_a_resumed_loop_counts_from_where_it_starts(caplog):
    caplog.set_level(logging.INFO, logger="dmd.test")
    with Progress(10, "train", logging.getLogger("dmd.test"), initial=7, stream=io.StringIO()) as bar:
        for _ in range(3):
            bar.update()
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["train: 8/10 steps (80%)",
                                                                      "train: 9/10 steps (90%)",
                                                                      "train: 10/10 steps (100%)"]  # fmt: skip


def test_disabled_says_nothing(caplog):
    caplog.set_level(logging.INFO, logger="dmd.test")
    with Progress(5, "x", logging.getLogger("dmd.test"), enabled=False, stream=io.StringIO()) as bar:
        for _ in range(5):
            bar.update()
    assert not caplog.records
