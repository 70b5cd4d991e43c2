"""Run events (start, validation, checkpoint, finish, failure) POSTed to a webhook, as the seed trainer does.

`train.webhook_config` names a JSON file:

    {"webhook_url": "https://discord.com/api/webhooks/…", "webhook_type": "discord",
     "message_prefix": "wan-dmd", "log_level": "info"}

`webhook_type: raw` posts the event as JSON (`event`, `level`, `message`, `step`, plus event data);
`discord` posts `{"content": "<prefix> <message>"}`. Events below `log_level` are not sent. A webhook that
fails never stops training: the failure is logged with the URL reduced to its host, because the path and query
of webhook URLs carry their secret.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from dmd.training.callbacks import Callback

log = logging.getLogger("dmd.training.loop")  # events are the run's messages

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
EVENT_LEVELS = {
    "start": "info",
    "validation": "info",
    "checkpoint": "info",
    "finish": "info",
    "failure": "error",
}


def redact_url(url: str) -> str:
    """scheme://host[:port]/… — everything that may hold a token (user info, path, query, fragment) dropped."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/…"


@dataclass(frozen=True)
class WebhookConfig:
    webhook_url: str
    webhook_type: Literal["raw", "discord"] = "raw"
    message_prefix: str = ""
    log_level: str = "info"

    @classmethod
    def from_file(cls, path: str | Path) -> WebhookConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"train.webhook_config: {path} not found; fix the path or set it to null")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        problems = []
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must be a JSON object with webhook_url, webhook_type, ...")
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            problems.append(f"unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        url = raw.get("webhook_url")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            problems.append("webhook_url must be an http(s) URL")
        if raw.get("webhook_type", "raw") not in ("raw", "discord"):
            problems.append(f"webhook_type={raw.get('webhook_type')!r}: use 'raw' or 'discord'")
        if str(raw.get("log_level", "info")).lower() not in LEVELS:
            problems.append(f"log_level={raw.get('log_level')!r}: use one of {list(LEVELS)}")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        raw["log_level"] = str(raw.get("log_level", "info")).lower()
        return cls(**raw)


class Webhook:
    """Posts events; `send` never raises."""

    def __init__(self, config: WebhookConfig, timeout: float = 10.0):
        self.config = config
        self.timeout = timeout

    def send(self, event: str, message: str, step: int | None = None, **data) -> bool:
        """POST one event; True when the server accepted it."""
        level = EVENT_LEVELS.get(event, "info")
        if LEVELS[level] < LEVELS[self.config.log_level]:
            return False
        prefix = f"{self.config.message_prefix} " if self.config.message_prefix else ""
        if self.config.webhook_type == "discord":
            body = {"content": f"{prefix}{message}"[:2000]}
        else:
            body = {"event": event, "level": level, "message": f"{prefix}{message}", "step": step, **data}
        request = urllib.request.Request(
            self.config.webhook_url,
            data=json.dumps(body, default=str).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "dmd-pipeline"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "code", None) or e.__class__.__name__
            log.warning(
                "webhook %s: %s event not delivered (%s)", redact_url(self.config.webhook_url), event, reason
            )
            return False


class Notifier(Callback):
    """The run's event sink: the webhook when configured, nothing otherwise, and only on the main process. As a
    callback it announces the run's start, checkpoints, finish and failure."""

    def __init__(self, webhook_config: str | None, enabled: bool = True, num_processes: int = 1):
        self.webhook = Webhook(WebhookConfig.from_file(webhook_config)) if webhook_config else None
        self.enabled = enabled
        self.num_processes = num_processes

    def on_train_start(self, run) -> None:
        self(
            "start",
            f"training {run.step}/{run.total_steps} steps on {self.num_processes} process(es)",
            run.step,
        )

    def on_checkpoint(self, step: int, path: Path) -> None:
        self("checkpoint", f"checkpoint {path.name} saved", step, path=str(path))

    def on_train_end(self, run, student_dir: Path | None, error: BaseException | None) -> None:
        if error is None:
            self("finish", f"training finished at step {run.step}; student in {student_dir}", run.step,
                 skipped_steps=run.skipped_steps)  # fmt: skip
        else:
            self(
                "failure",
                f"training failed at step {run.step}: {error.__class__.__name__}: {error}",
                run.step,
            )

    def __call__(self, event: str, message: str, step: int | None = None, **data) -> None:
        if not self.enabled:
            return
        log.log(LEVELS[EVENT_LEVELS.get(event, "info")], "%s", message)
        if self.webhook is not None:
            self.webhook.send(event, message, step, **data)
