"""Experiment tracking: wandb (offline without an API key) and dvclive (for `dvc plots`), one `log` call for both.

`report_to: dvclive` writes `train.metrics_dir` (`metrics.json` and `plots/metrics/<name>.tsv` per scalar);
`report_to: wandb` writes the same scalars to wandb and to dvclive, so `dvc plots` works either way; `none`
writes neither. Only the main process tracks.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

from dmd.core.config import TrainConfig
from dmd.training.callbacks import Callback

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """WANDB_MODE when set; otherwise online with an API key and offline without one (sync later with
    `wandb sync <run dir>`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def truncate_dvclive_history(metrics_dir: Path, from_step: int) -> None:
    """Drop rows at or after `from_step` from every dvclive `.tsv`, so a resumed run does not log a step twice."""
    for tsv in (metrics_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            continue
        kept = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) < from_step]
        with tsv.open("w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)


class Tracker(Callback):
    """Scalars, images and videos to the configured trackers; a no-op on non-main processes or `report_to: none`."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_config: dict,
        *,
        start_step: int = 0,
        enabled: bool = True,
        wandb_run_id: str | None = None,
    ):
        self.wandb = None
        self.live = None
        self.metrics_dir = Path(cfg.tracking.metrics_dir)
        if not enabled or cfg.tracking.report_to == "none":
            return
        self._open_dvclive(start_step)
        if cfg.tracking.report_to == "wandb":
            self._open_wandb(cfg, run_config, wandb_run_id)

    def _open_dvclive(self, start_step: int) -> None:
        from dvclive import Live

        if start_step == 0:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        else:
            truncate_dvclive_history(self.metrics_dir, start_step + 1)  # rows after the checkpoint's step
        self.live = Live(dir=str(self.metrics_dir), resume=start_step > 0, save_dvc_exp=False, dvcyaml=None)

    def _open_wandb(self, cfg: TrainConfig, run_config: dict, run_id: str | None) -> None:
        import wandb

        mode = wandb_mode()
        self.wandb = wandb.init(
            project=cfg.tracking.tracker_project_name,
            name=cfg.tracking.tracker_run_name,
            config=run_config,
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
        )
        if mode == "offline":
            log.info(
                "wandb is offline (no WANDB_API_KEY): the run is in %s; upload it with `wandb sync %s`",
                self.wandb.dir,
                Path(self.wandb.dir).parent,
            )

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.live is not None:
            self.live.step = step
            for name, value in scalars.items():
                self.live.log_metric(name, value)
            self.live.next_step()

    def log_media(self, images: dict[str, Path], videos: dict[str, Path], step: int, fps: int = 8) -> None:
        """PNG grids go to both trackers; mp4s to wandb (dvclive has no video type; they stay on disk)."""
        if self.wandb is not None:
            import wandb

            media = {k: wandb.Image(str(p)) for k, p in images.items()}
            media.update({k: wandb.Video(str(p), fps=fps, format="mp4") for k, p in videos.items()})
            self.wandb.log(media, step=step)
        if self.live is not None:  # one file per step (<name>/<step>.png), which `dvc plots` orders by step
            for name, path in images.items():
                self.live.log_image(f"{name}/{step}.png", str(path))

    def on_log(self, step: int, scalars: dict[str, float]) -> None:
        self.log(scalars, step)

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        self.finish()

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.live is not None:
            self.live.end()
            self.live = None
