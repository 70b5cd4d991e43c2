"""Tracking: wandb goes offline without an API key and records the scalars; dvclive files render in `dvc plots`."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from dmd.core.config import TrainConfig
from dmd.training.tracking import Tracker, wandb_mode

BIN = Path(sys.executable).parent


def wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline wandb run file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, rows = run_file.read_bytes(), 7, 32768, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_is_offline_without_an_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"


def test_wandb_offline_run_and_dvclive_hold_the_scalars(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    wandb.teardown()  # a wandb session another test started in this process would ignore the new WANDB_DIR
    cfg = TrainConfig(report_to="wandb", metrics_dir=str(tmp_path / "metrics"), tracker_run_name="tiny")
    tracker = Tracker(cfg, {"train": {"seed": 1}})
    for step in (1, 2, 3):
        tracker.log({"dmd_loss": 0.1 * step, "fake_score_loss": 2.0 / step}, step)
    tracker.finish()

    run_files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = [r for r in wandb_history(run_files[0]) if "dmd_loss" in r]
    assert [(r["_step"], r["dmd_loss"], r["fake_score_loss"]) for r in rows] == [
        (1, 0.1, 2.0), (2, 0.2, 1.0), (3, 0.1 * 3, 2.0 / 3)
    ]  # fmt: skip

    tsv = tmp_path / "metrics" / "plots" / "metrics" / "dmd_loss.tsv"
    assert tsv.read_text().splitlines() == ["step\tdmd_loss", "1\t0.1", "2\t0.2", f"3\t{0.1 * 3}"]
    assert json.loads((tmp_path / "metrics" / "metrics.json").read_text())["fake_score_loss"] == 2.0 / 3

    # dvc renders them (a plain folder: `dvc init --no-scm`, plots of the tsv files)
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    shown = subprocess.run(
        [BIN / "dvc", "plots", "show", "--json", "metrics/plots/metrics/dmd_loss.tsv",
         "metrics/plots/metrics/fake_score_loss.tsv"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    rendered = json.loads(shown.stdout)
    text = json.dumps(rendered)
    assert "dmd_loss" in text and "fake_score_loss" in text and not rendered.get("errors")


def test_a_resumed_run_drops_the_rows_it_will_log_again(tmp_path):
    metrics = tmp_path / "metrics"
    first = Tracker(TrainConfig(report_to="dvclive", metrics_dir=str(metrics)), {})
    for step in range(1, 6):
        first.log({"dmd_loss": float(step)}, step)
    first.finish()
    resumed = Tracker(
        TrainConfig(report_to="dvclive", metrics_dir=str(metrics)), {}, start_step=3
    )  # checkpoint 3
    resumed.log({"dmd_loss": 40.0}, 4)
    resumed.finish()
    rows = (metrics / "plots" / "metrics" / "dmd_loss.tsv").read_text().splitlines()
    assert rows == ["step\tdmd_loss", "1\t1.0", "2\t2.0", "3\t3.0", "4\t40.0"]


def test_report_to_none_writes_nothing(tmp_path):
    tracker = Tracker(TrainConfig(report_to="none", metrics_dir=str(tmp_path / "m")), {})
    tracker.log({"dmd_loss": 1.0}, 1)
    tracker.finish()
    assert not (tmp_path / "m").exists()
