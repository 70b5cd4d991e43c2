"""Pushing the student (and optionally checkpoints) to the Hugging Face Hub, when there is a way to.

`push_to_hub` uploads the exported student at the end; `push_checkpoints_to_hub` also uploads each checkpoint
under `checkpoints/<name>`. Both need `hub_model_id` and a token (`HF_TOKEN` or `huggingface-cli login`) and a
hub that is reachable (`HF_HUB_OFFLINE` unset). Without them the push is skipped, said once, and training goes on;
a failed upload is logged and does not stop training either.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dmd.core.config import TrainConfig
from dmd.training.callbacks import Callback

log = logging.getLogger(__name__)


class HubPusher(Callback):
    """Pushes each checkpoint (push_checkpoints_to_hub) and the exported student (push_to_hub)."""

    def __init__(self, cfg: TrainConfig, enabled: bool = True):
        self.push_final = cfg.hub.push_to_hub
        self.push_checkpoints = cfg.hub.push_checkpoints_to_hub
        self.repo_id = cfg.hub.hub_model_id
        self.reason_skipped = None
        if not enabled or not (self.push_final or self.push_checkpoints):
            self.push_final = self.push_checkpoints = False
            return
        self.reason_skipped = self._why_not()
        if self.reason_skipped:
            log.warning(
                "train.push_to_hub / push_checkpoints_to_hub: skipped for this run, %s", self.reason_skipped
            )
            self.push_final = self.push_checkpoints = False

    def _why_not(self) -> str | None:
        if not self.repo_id:
            return "train.hub_model_id is not set (e.g. 'user/wan-dmd-3step')"
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            return "HF_HUB_OFFLINE is set"
        from huggingface_hub import get_token

        if not get_token():
            return "no Hugging Face token (set HF_TOKEN or run `huggingface-cli login`)"
        return None

    def _upload(self, folder: Path, path_in_repo: str | None, message: str) -> bool:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(self.repo_id, exist_ok=True)
            api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(folder),
                path_in_repo=path_in_repo,
                commit_message=message,
            )
            log.info("pushed %s to https://huggingface.co/%s", folder.name, self.repo_id)
            return True
        except Exception as e:  # network, auth or quota; the run must go on
            log.warning("push of %s to %s failed: %s", folder.name, self.repo_id, e.__class__.__name__)
            return False

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.push_checkpoint(path)

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        if error is None:
            self.push_student(student_dir)

    def push_checkpoint(self, checkpoint: Path) -> bool:
        if not self.push_checkpoints:
            return False
        return self._upload(checkpoint, f"checkpoints/{checkpoint.name}", f"checkpoint {checkpoint.name}")

    def push_student(self, student_dir: Path) -> bool:
        if not self.push_final:
            return False
        return self._upload(student_dir, None, "DMD student")
