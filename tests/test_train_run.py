"""Training runs end to end on the tiny world: exact resume after kill -9, EMA, gradient checkpointing, tracking."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from train_world import build_cache, run_params

from dmd.core.config import load
from dmd.core.video import read_video
from dmd.student.sample import student_videos
from dmd.training.checkpoint import CheckpointManager
from dmd.training.loop import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_wan_dir):
    return build_cache(tmp_path_factory.mktemp("train-world"), tiny_wan_dir)


def _final(run_dir):
    """Tensor groups of a run's newest checkpoint (written at its last step)."""
    manager = CheckpointManager(run_dir / "checkpoints", 10)
    return manager.load(manager.latest())[0]


def test_resume_after_kill_9_equals_an_uninterrupted_run(world, tmp_path, one_thread):
    settings = dict(max_train_steps=10, checkpoint_step_interval=3, checkpoints_total_limit=2,
                    lr_scheduler="cosine_with_min_lr", lr_warmup_steps=2, report_to="dvclive")  # fmt: skip
    straight = tmp_path / "straight"
    train(load(run_params(world, straight, **settings)), progress=False)

    killed = tmp_path / "killed"
    params_file = run_params(world, killed, **settings)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    worker = subprocess.Popen([sys.executable, "-m", "dmd.training.loop", str(params_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    first = killed / "checkpoints" / "checkpoint-0000003"
    deadline = time.monotonic() + 300
    while not first.exists() and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    latest = CheckpointManager(killed / "checkpoints", 2).latest()
    assert latest is not None and latest.name < "checkpoint-0000010", "the worker must die mid-run"

    train(load(params_file), progress=False)  # resume_from_checkpoint: latest

    a, b = _final(straight), _final(killed)
    for role in ("student", "critic", "ema"):
        assert a[role].keys() == b[role].keys()
        for key in a[role]:
            assert torch.equal(a[role][key], b[role][key]), f"{role} {key}"
    lora_a = load_file(straight / "student" / "pytorch_lora_weights.safetensors")
    lora_b = load_file(killed / "student" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    # the resumed run logged every step once, with the same losses
    tsv = "metrics/plots/metrics/fake_score_loss.tsv"
    assert (straight / tsv).read_text() == (killed / tsv).read_text()
    assert len((killed / tsv).read_text().splitlines()) == 11


def test_ema_weights_differ_from_live_and_serve_validation_and_export(world, tmp_path):
    run = tmp_path / "ema"
    params = load(run_params(world, run, max_train_steps=3, learning_rate=1e-2, ema_decay=0.5, checkpoint_step_interval=3,
                             validation_step_interval=3, ema_validation="comparison",
                             validation_prompt="a red square moving right slowly"))  # fmt: skip
    train(params, progress=False)
    groups = _final(run)
    live, shadow = groups["student"], groups["ema"]
    assert any(not torch.equal(live[k], shadow[f"shadow.{k}"]) for k in live)

    folder = run / "student" / "validation" / "step-0000003"
    assert not np.array_equal(read_video(folder / "live-prompt.mp4"), read_video(folder / "ema-prompt.mp4"))
    assert (folder / "grid.png").is_file()

    # the export holds the EMA weights: every exported tensor is one of the checkpoint's shadows
    exported = list(load_file(run / "student" / "pytorch_lora_weights.safetensors").values())
    shadows = [shadow[f"shadow.{k}"] for k in live]
    assert len(exported) == len(shadows)
    assert all(any(torch.equal(e, s) for s in shadows) for e in exported)
    assert not all(any(torch.equal(e, w) for w in live.values()) for e in exported)


def test_an_ema_that_never_folded_exports_the_live_weights(world, tmp_path):
    """Fewer student steps than ema_update_interval: the shadow still holds the initial weights (a LoRA's B is
    zero), so the export must hold the trained weights instead, and the card must not claim EMA."""
    run = tmp_path / "short"
    params = load(run_params(world, run, max_train_steps=2, learning_rate=1e-2, ema_update_interval=5,
                             checkpoint_step_interval=2))  # fmt: skip
    train(params, progress=False)
    live = _final(run)["student"]
    exported = list(load_file(run / "student" / "pytorch_lora_weights.safetensors").values())
    assert len(exported) == len(live)
    assert all(any(torch.equal(e, w) for w in live.values()) for e in exported)
    assert any(float(e.abs().max()) > 0 for e in exported)
    assert json.loads((run / "student" / "student.json").read_text())["ema"] is False


def test_gradient_checkpointing_gives_the_same_updates(world, tmp_path):
    results = []
    for flag in (False, True):
        run = tmp_path / f"gc-{flag}"
        train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=2,
                              gradient_checkpointing=flag)), progress=False)  # fmt: skip
        results.append(_final(run))
    for role in ("student", "critic"):
        for key in results[0][role]:
            assert torch.allclose(results[0][role][key], results[1][role][key], atol=1e-6), f"{role} {key}"


def test_a_causal_student_trains_the_same_with_checkpointing_exports_and_streams_past_its_length(
    world, tmp_path
):
    """train.causal on a LoRA student sharing its base with both scores: the rollout is block-causal only while the
    student runs (backward comes after, recomputed block-causally under gradient checkpointing), so checkpointing
    changes nothing; the key changes the updates; the export says so and samples a clip twice the trained length."""
    results = {}
    for name, settings in {
        "causal": dict(causal=True),
        "causal-gc": dict(causal=True, gradient_checkpointing=True),
        "prefix": dict(causal=False),
    }.items():
        run = tmp_path / name
        train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=2, learning_rate=1e-2,
                              **settings)), progress=False)  # fmt: skip
        results[name] = _final(run)
    for role in ("student", "critic"):
        for key in results["causal"][role]:
            assert torch.allclose(results["causal"][role][key], results["causal-gc"][role][key], atol=1e-6), (
                key
            )
    assert any(
        not torch.allclose(results["causal"]["student"][k], results["prefix"]["student"][k], atol=1e-6)
        for k in results["causal"]["student"]
    )

    student_dir = tmp_path / "causal" / "student"
    card = json.loads((student_dir / "student.json").read_text())
    assert card["causal"] is True and card["num_training_frames"] == 6
    assert "**Block-causal.**" in (student_dir / "README.md").read_text()
    twice = ["train.validation_num_video_frames=45"]  # 12 latent frames, the trained rollout's 6 twice over
    params = load(tmp_path / "causal" / "params.yaml", twice)
    ((latents, frames),) = student_videos(params, student_dir, ["a red square moving right slowly"], seed=0)
    assert latents.shape[2] == 12 and frames.shape[0] == 45 and torch.isfinite(latents).all()


def test_one_process_trains_at_one_precision_after_another(world, tmp_path):
    """accelerate remembers the first Accelerator's precision process-wide; a worker that trains in fp32, then in
    bf16, then in fp32 again must get the same fp32 student both times."""
    finals = []
    for i, precision in enumerate(("no", "bf16", "no")):
        run = tmp_path / f"{i}-{precision}"
        train(load(run_params(world, run, max_train_steps=1, checkpoint_step_interval=1,
                              mixed_precision=precision)), progress=False)  # fmt: skip
        finals.append(_final(run))
    first, _, last = finals
    for role in ("student", "critic"):
        assert all(torch.equal(first[role][k], last[role][k]) for k in first[role]), role


def test_latest_does_not_resume_another_runs_checkpoint(world, tmp_path):
    run = tmp_path / "changed"
    train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=1)), progress=False)
    # another seed is another run (a learning rate is not: a run may resume with a lower one)
    train(load(run_params(world, run, max_train_steps=2, checkpoint_step_interval=1, seed=1001)),
          progress=False)  # fmt: skip
    superseded = list((run / "checkpoints").glob("superseded-*/checkpoint-*"))
    assert sorted(p.name for p in superseded) == ["checkpoint-0000001", "checkpoint-0000002"]
    assert [p.name for p in CheckpointManager(run / "checkpoints", 3).checkpoints()] == [
        "checkpoint-0000001", "checkpoint-0000002"
    ]  # fmt: skip


def test_latest_does_not_resume_a_checkpoint_of_another_cache_at_the_same_path(world, tmp_path):
    """A new teacher or new data rebuilds the cache in place (`dvc repro`): the checkpoints of the run on the old
    samples are another run's, not a resume point."""
    run = tmp_path / "rebuilt"
    base = copy.deepcopy(world)
    base["cache"]["output_dir"] = str(run / "cache")
    shutil.copytree(world["cache"]["output_dir"], run / "cache")
    train(load(run_params(base, run, max_train_steps=2, checkpoint_step_interval=1)), progress=False)
    index_file = run / "cache" / "index.parquet"
    pd.read_parquet(index_file).iloc[:-1].to_parquet(index_file)  # the same path, one sample fewer
    train(load(run_params(base, run, max_train_steps=2, checkpoint_step_interval=1)), progress=False)
    superseded = list((run / "checkpoints").glob("superseded-*/checkpoint-*"))
    assert sorted(p.name for p in superseded) == ["checkpoint-0000001", "checkpoint-0000002"]
