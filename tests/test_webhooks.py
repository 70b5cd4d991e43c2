"""Webhooks: events reach a local HTTP server in order, secrets never reach the log, bad configs are named."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from dmd.training.webhooks import Notifier, Webhook, WebhookConfig, redact_url

SECRET = "s3cr3t-t0ken"


@pytest.fixture
def server():
    """A loopback HTTP server that records (path, JSON body) of every POST."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()


def _config_file(tmp_path, **entries):
    path = tmp_path / "webhook.json"
    path.write_text(json.dumps(entries))
    return path


def test_raw_events_arrive_in_order_with_their_data(server, tmp_path):
    url, received = server
    notify = Notifier(str(_config_file(tmp_path, webhook_url=f"{url}/hook/{SECRET}", webhook_type="raw",
                                       message_prefix="[dmd]")))  # fmt: skip
    notify("start", "training 0/4 steps", 0)
    notify("checkpoint", "checkpoint-0000002 saved", 2, path="checkpoints/checkpoint-0000002")
    notify("finish", "done", 4)
    assert [b["event"] for _, b in received] == ["start", "checkpoint", "finish"]
    assert received[1][1] == {"event": "checkpoint", "level": "info", "message": "[dmd] checkpoint-0000002 saved",
                              "step": 2, "path": "checkpoints/checkpoint-0000002"}  # fmt: skip
    assert received[0][0] == f"/hook/{SECRET}"


def test_discord_format_and_log_level(server, tmp_path):
    url, received = server
    config = WebhookConfig(webhook_url=url, webhook_type="discord", message_prefix="wan", log_level="error")
    assert Webhook(config).send("validation", "grid ready", 10) is False  # below log_level: not sent
    assert Webhook(config).send("failure", "loss is NaN", 11) is True
    assert received == [("/", {"content": "wan loss is NaN"})]


def test_undeliverable_events_log_only_the_host(tmp_path, caplog):
    url = f"http://user:pw@127.0.0.1:9/api/webhooks/{SECRET}?token={SECRET}"
    assert redact_url(url) == "http://127.0.0.1:9/…"
    with caplog.at_level(logging.INFO):
        Notifier(str(_config_file(tmp_path, webhook_url=url)))("failure", "stopped", 3)
    assert "not delivered" in caplog.text and "127.0.0.1" in caplog.text
    assert SECRET not in caplog.text and "pw" not in caplog.text


def test_bad_configs_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        WebhookConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="webhook_url must be an http"):
        WebhookConfig.from_file(_config_file(tmp_path, webhook_url="ftp://x"))
    with pytest.raises(ValueError, match="webhook_type='slack'"):
        WebhookConfig.from_file(_config_file(tmp_path, webhook_url="http://x", webhook_type="slack"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]"):
        WebhookConfig.from_file(_config_file(tmp_path, webhook_url="http://x", colour="red"))


@pytest.mark.slow
def test_a_training_run_posts_its_events_in_order(server, tmp_path, tiny_wan_dir):
    """start, validation (step 0 baseline), checkpoint, validation, checkpoint, finish; then a run that fails."""
    from train_world import build_cache, run_params

    from dmd.core.config import load
    from dmd.training.loop import NonFiniteError, train

    url, received = server
    base = build_cache(tmp_path / "world", tiny_wan_dir)
    hook = _config_file(tmp_path, webhook_url=f"{url}/{SECRET}", webhook_type="raw")
    params = load(run_params(base, tmp_path / "ok", max_train_steps=2, checkpoint_step_interval=1,
                             validation_step_interval=2, disable_benchmark=False, webhook_config=str(hook),
                             validation_prompt="a red square moving right slowly"))  # fmt: skip
    train(params, progress=False)
    events = [(b["event"], b["step"]) for _, b in received]
    assert events == [("start", 0), ("validation", 0), ("checkpoint", 1), ("checkpoint", 2), ("validation", 2),
                      ("finish", 2)]  # fmt: skip
    assert received[1][1]["grid"].endswith("step-0000000/grid.png")

    received.clear()
    broken = load(run_params(base, tmp_path / "nan", max_train_steps=6, checkpoint_step_interval=1,
                             learning_rate=1e30, max_consecutive_nonfinite=2, webhook_config=str(hook),
                             distillation_config={"fake_score_lr": 1e30, "num_training_frames": 6,
                                                  "num_frame_per_block": 3}))  # fmt: skip
    with pytest.raises(NonFiniteError, match="consecutive steps.*last checkpoint.*intact"):
        train(broken, progress=False)
    assert received[-1][1]["event"] == "failure" and "NonFiniteError" in received[-1][1]["message"]
