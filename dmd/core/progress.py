"""Progress of a long loop, readable where it is shown.

On a terminal a tqdm bar redraws one line in place. Anywhere else (a pipe into `dvc repro`, a Prefect task that
copies every line it reads into the run's logs, a log file) each redraw would become a line of its own, so there
the progress is a log line every `every_fraction` of the total or every `every_seconds`, whichever comes first,
with the count, the rate and the time left, and one at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO


class Progress:
    """`update()` once per unit of work; `close()` at the end (also a context manager)."""

    def __init__(
        self,
        total: int,
        desc: str,
        logger: logging.Logger,
        *,
        initial: int = 0,
        unit: str = "step",
        enabled: bool = True,
        every_fraction: float = 0.1,
        every_seconds: float = 60.0,
        stream: TextIO | None = None,
    ):
        stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.log, self.unit = total, desc, logger, unit
        self.count = self.last_count = self.start_count = initial
        self.enabled = enabled
        self.every_count = max(1, round(total * every_fraction))
        self.every_seconds = every_seconds
        self.started = self.last_time = time.monotonic()
        self.postfix: dict[str, str] = {}
        self.bar = None
        if enabled and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)

    def update(self, n: int = 1, **postfix: float) -> None:
        self.count += n
        self.postfix = {k: f"{v:.4g}" for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix)
            return
        now = time.monotonic()
        due = self.count - self.last_count >= self.every_count or now - self.last_time >= self.every_seconds
        if self.enabled and (due or self.count >= self.total):
            self._log_line(now)

    def line(self, now: float | None = None) -> str:
        """`desc: 120/400 steps (30%), 2.1 steps/s, 57 s, ~2 min 13 s left; key=value ...`"""
        now = time.monotonic() if now is None else now
        elapsed = now - self.started
        done = self.count - self.start_count
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.count}/{self.total} {self.unit}s ({100 * self.count / max(self.total, 1):.0f}%)"
        text += f", {rate:.3g} {self.unit}s/s, {_duration(elapsed)}"
        if 0 < self.count < self.total and rate > 0:
            text += f", ~{_duration((self.total - self.count) / rate)} left"
        if self.postfix:
            text += "; " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _log_line(self, now: float) -> None:
        self.log.info("%s", self.line(now))
        self.last_count, self.last_time = self.count, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.enabled and self.count != self.last_count:
            self._log_line(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
