"""Toy teacher training writes a WanPipeline directory that plain diffusers loads and samples offline; the shipped
teacher in models/toy-teacher does too."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKLWan, WanPipeline

from dmd.core.config import load
from dmd.core.io import sha256_file
from dmd.toy.judge import judge_clips
from dmd.toy.teacher import (
    clips_to_pixels,
    decode_unclamped,
    reconstruction_weights,
    sample_clips,
    train_teacher,
    vae_round_trip,
)
from dmd.toy.world import COLOURS, SHAPES, ToyWorld
from dmd.wan.tiny import build_vae

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "models" / "toy-teacher"

TINY_TEACHER = {
    "num_clips": 16,
    "vae_steps": 2,
    "vae_batch_size": 2,
    "vae_full_clip_steps": 2,
    "vae_full_clip_batch_size": 2,
    "vae_num_frames": 5,
    "transformer_steps": 3,
    "transformer_batch_size": 4,
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "ffn_dim": 16,
    "z_dim": 4,
    "vae_base_dim": 8,
    "text_dim": 16,
}


def _params(tmp_path: Path, name: str):
    path = tmp_path / f"{name}.yaml"
    raw = {
        "toy_teacher": {**TINY_TEACHER, "output_dir": str(tmp_path / name)},
        "model": {"max_sequence_length": 16},
    }
    path.write_text(yaml.safe_dump(raw))
    return load(path)


def test_decode_unclamped_is_decode_before_its_clamp():
    vae = build_vae(z_dim=4, base_dim=8, seed=1)
    z = 3 * torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = decode_unclamped(vae, z)
        theirs = vae.decode(z).sample
    assert ours.shape == theirs.shape == (1, 3, 5, 16, 16)
    torch.testing.assert_close(ours.clamp(-1, 1), theirs)


def test_reconstruction_weights_cover_the_object_and_its_margin_in_its_own_frame():
    is_object = torch.zeros(1, 1, 2, 9, 9, dtype=torch.bool)
    is_object[0, 0, 0, 4, 4] = True  # one object pixel in frame 0, none in frame 1
    weights = reconstruction_weights(is_object, object_weight=3.0, margin=2)
    expected = torch.ones(1, 1, 2, 9, 9)
    expected[0, 0, 0, 2:7, 2:7] = 4.0  # the 5×5 square within 2 px (Chebyshev) of the pixel
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(reconstruction_weights(is_object, 3.0, margin=0), 1 + 3.0 * is_object.float())


def test_training_writes_a_loadable_deterministic_pipeline(tmp_path):
    params = _params(tmp_path, "a")
    out = train_teacher(params, progress=False)
    pipe = WanPipeline.from_pretrained(out)
    assert pipe.scheduler.config.shift == params.model.flow_schedule_shift
    summary = json.loads((out / "training.json").read_text())
    assert summary["seconds"]["total_seconds"] > 0 and summary["max_sequence_length"] == 16

    # the saved latent statistics normalise the training clips' latents to zero mean, unit std per channel
    clips, _ = ToyWorld(params.toy).sample_dataset(TINY_TEACHER["num_clips"], params.toy_teacher.seed)
    with torch.no_grad():
        z = pipe.vae.encode(clips_to_pixels(clips)).latent_dist.mode()
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1)
    normalised = (z - mean) / std
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=1e-3, rtol=0)

    clips = sample_clips(
        pipe,
        ["a red square moving left slowly"],
        [0],
        num_inference_steps=2,
        guidance_scale=3.0,
        toy=params.toy,
        max_sequence_length=16,
    )
    assert clips.shape == (1, 21, 32, 32, 3) and clips.dtype == np.uint8

    again = train_teacher(_params(tmp_path, "b"), progress=False)
    for part in ("transformer", "vae"):
        weights = f"{part}/diffusion_pytorch_model.safetensors"
        assert sha256_file(out / weights) == sha256_file(again / weights)


@pytest.mark.slow
def test_toy_teacher_flow_from_the_cli_writes_the_pipeline_and_its_settings(tmp_path):
    from flows.cli import main

    params_file = tmp_path / "params.yaml"
    raw = {
        "toy_teacher": {**TINY_TEACHER, "output_dir": str(tmp_path / "teacher")},
        "model": {"max_sequence_length": 16},
    }
    params_file.write_text(yaml.safe_dump(raw))
    assert main(["toy-teacher", "--params", str(params_file), "--set", "toy_teacher.seed=3"]) == 0
    effective = yaml.safe_load((tmp_path / "teacher" / "params.effective.yaml").read_text())
    assert effective["toy_teacher"]["seed"] == 3
    WanPipeline.from_pretrained(tmp_path / "teacher")


def test_vae_window_longer_than_the_clips_is_rejected(tmp_path):
    params = _params(tmp_path, "c")
    params.toy_teacher.vae_num_frames = 25
    with pytest.raises(ValueError, match="vae_num_frames"):
        train_teacher(params, progress=False)


def test_shipped_teacher_samples_offline_with_plain_diffusers():
    params = load(REPO / "params.yaml")
    pipe = WanPipeline.from_pretrained(SHIPPED)
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20 * 2**20
    assert pipe.scheduler.config.shift == params.model.flow_schedule_shift
    caption = ToyWorld(params.toy).captions("held_out")[0]
    clips = sample_clips(
        pipe,
        [caption],
        [0],
        num_inference_steps=2,
        guidance_scale=3.0,
        toy=params.toy,
        max_sequence_length=params.model.max_sequence_length,
    )
    assert clips.shape == (1, params.toy.num_frames, params.toy.height, params.toy.width, 3)


def test_shipped_vae_keeps_every_shape_and_colour_through_its_round_trip():
    """The teacher cannot draw a shape its VAE cannot decode: the judge must see every colour × shape of the world in
    the round trip of real clips it never trained on (the training set is drawn from another seed)."""
    params = load(REPO / "params.yaml")
    world = ToyWorld(params.toy)
    captions = [f"a {c} {s} moving {d} quickly" for c in COLOURS for s in SHAPES for d in ("left", "down")]
    rng = np.random.default_rng(12345)
    real = np.stack([world.sample_clip(c, rng) for c in captions])
    vae = AutoencoderKLWan.from_pretrained(SHIPPED, subfolder="vae")
    scores = judge_clips(vae_round_trip(vae, real), captions, world)
    assert scores["accuracy"]["shape"] == 1.0 and scores["accuracy"]["colour"] == 1.0
    assert scores["sharpness"] > 0.9
