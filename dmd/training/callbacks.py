"""The training run's side effects as callbacks: tracking, progress, validation, webhooks, hub pushes.

The loop calls five hooks and knows nothing of what answers them (`step` counts the steps done):

- `on_train_start(run)`: after resuming, before the first step of this process;
- `on_log(step, scalars)`: right after a step's updates, before its checkpoint, so every step a checkpoint covers
  is logged by then (a run killed after writing it resumes past that step);
- `on_checkpoint(step, path)`: after checkpoint `path` is in place;
- `on_step_end(step)`: when the step is done, its checkpoint included;
- `on_train_end(run, student_dir, error)`: once, with the exported student, or with the exception that ends the run.

`Callbacks` calls them in the order given and `on_train_end` in reverse, so the part set up last is torn down
first (the student is pushed before the finish message, which comes before the tracker closes).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dmd.core.progress import Progress


class Callback:
    """A side effect of training; every hook does nothing unless overridden."""

    def on_train_start(self, run) -> None:
        pass

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        pass

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        pass


class Callbacks(Callback):
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def on_train_start(self, run) -> None:
        for callback in self.callbacks:
            callback.on_train_start(run)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_log(step, scalars)

    def on_checkpoint(self, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, path)

    def on_step_end(self, step: int) -> None:
        for callback in self.callbacks:
            callback.on_step_end(step)

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        for callback in reversed(self.callbacks):
            callback.on_train_end(run, student_dir, error)


class ProgressBar(Callback):
    """The run's progress with its two losses, as a bar on a terminal and as throttled log lines elsewhere."""

    SHOWN = ("dmd_loss", "fake_score_loss")

    def __init__(self, total_steps: int, log: logging.Logger, *, initial: int, enabled: bool):
        self.bar = Progress(total_steps, "train", log, initial=initial, enabled=enabled)

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        self.bar.update(1, **{k: scalars[k] for k in self.SHOWN if k in scalars})

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        self.bar.close()
