"""Student export: plain diffusers loads it, and WanPipeline with the shipped scheduler samples what `dmd sample` does."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from dmd.config import load
from dmd.export import (
    export_student,
    fit_scheduler_config,
    load_student,
    read_card,
    scheduler_sigmas,
    write_model_card,
)
from dmd.sample import generate_latents, latent_shape
from dmd.wan import add_lora, encode_prompts, load_text_encoder, load_transformer, load_vae

PROMPT = "a red square moving right slowly"
SINGLE_BLOCK = [
    "train.distillation_config.num_frame_per_block=6",
    "train.distillation_config.num_training_frames=6",
]


@pytest.mark.parametrize(
    "sigmas", [[1.0], [1.0, 0.5], [1.0, 0.757, 0.522], [1.0, 0.9375, 0.833], [1.0, 0.75, 0.5, 0.25]]
)
def test_the_scheduler_config_steps_through_the_students_sigmas(sigmas):
    config, error = fit_scheduler_config(sigmas)
    assert config["stochastic_sampling"] is True
    assert error < 1e-6
    assert np.allclose(scheduler_sigmas(config, len(sigmas)), sigmas, atol=1e-6)


def test_an_unreachable_schedule_reports_its_error():
    config, error = fit_scheduler_config([1.0, 0.9, 0.6, 0.3])
    assert error == pytest.approx(np.abs(scheduler_sigmas(config, 4) - [1.0, 0.9, 0.6, 0.3]).max())
    assert error > 1e-3


def _lora_student(params, seed=0):
    """The teacher with a "student" adapter whose weights are random (not the zero-initialised B)."""
    transformer = load_transformer(params.model)
    add_lora(transformer, params.train.lora_rank, params.train.lora_alpha, "student")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return transformer


@pytest.mark.slow
def test_wan_pipeline_with_the_exported_lora_and_scheduler_equals_dmd_sample(
    tiny_params_file, tiny_wan_dir, tmp_path
):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    params = load(tiny_params_file, [*SINGLE_BLOCK, "train.lora_rank=4", "train.lora_alpha=8"])
    out = export_student(_lora_student(params), params, tmp_path / "student", ema=False, step=7)
    card = read_card(out)
    assert card["single_block_training"] and card["num_steps"] == 3 and card["train_steps"] == 7
    assert (out / "README.md").read_text().count("load_lora_weights") == 1

    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    kwargs = dict(prompt=PROMPT, negative_prompt="", height=32, width=32, num_frames=21, num_inference_steps=3,
                  guidance_scale=1.0, output_type="latent", max_sequence_length=16)  # fmt: skip
    torch.manual_seed(5)
    teacher_latents = pipe(**kwargs).frames
    pipe.load_lora_weights(
        out, weight_name="pytorch_lora_weights.safetensors"
    )  # offline diffusers needs the name
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(out, subfolder="scheduler")
    torch.manual_seed(5)
    diffusers_latents = pipe(**kwargs).frames

    student, schedule = load_student(out, params)
    tokenizer, text_encoder = load_text_encoder(params.model)
    embeds = encode_prompts(tokenizer, text_encoder, [PROMPT], 16)
    shape = latent_shape(student, load_vae(params.model), 32, 32, 21)
    ours = generate_latents(student, schedule, embeds, shape, seed=5)

    assert ours.shape == diffusers_latents.shape
    assert torch.allclose(ours, diffusers_latents, atol=1e-5), (ours - diffusers_latents).abs().max()
    assert (
        ours - teacher_latents
    ).abs().max() > 1e-2  # the LoRA (with its alpha) is what made the difference


@pytest.mark.slow
def test_dmd_sample_writes_the_videos(tiny_params_file, tmp_path):
    from dmd.sample import main
    from dmd.video import video_info

    params = load(tiny_params_file, SINGLE_BLOCK)
    export_student(_lora_student(params), params, tmp_path / "student", ema=True, step=1)
    args = argparse.Namespace(params=str(tiny_params_file), overrides=SINGLE_BLOCK, student=str(tmp_path / "student"),
                              prompt=[PROMPT, "a blue circle moving up quickly"], seed=3,
                              output=str(tmp_path / "samples"))  # fmt: skip
    assert main(args) == 0
    videos = sorted((tmp_path / "samples").glob("*.mp4"))
    assert [v.name for v in videos] == ["00-a-red-square-moving-right-slowly-seed3.mp4",
                                        "01-a-blue-circle-moving-up-quickly-seed3.mp4"]  # fmt: skip
    assert video_info(videos[0])[:3] == (21, 32, 32)


def test_a_full_student_exports_as_a_diffusers_transformer(tiny_params_file, tmp_path):
    from diffusers import WanTransformer3DModel

    params = load(tiny_params_file, ["train.model_type=full"])
    transformer = load_transformer(params.model)
    with torch.no_grad():
        transformer.proj_out.bias.add_(1.0)
    out = export_student(transformer, params, tmp_path / "student", ema=False, step=3)
    plain = WanTransformer3DModel.from_pretrained(out, subfolder="transformer")
    ours, _ = load_student(out, params)
    for (name, a), b, c in zip(
        transformer.state_dict().items(), plain.state_dict().values(), ours.state_dict().values()
    ):
        assert torch.equal(a, b) and torch.equal(a, c), name
    card = (out / "README.md").read_text()
    assert "model_type: full" in card and "| metric | value |" not in card  # figures come with evaluation
    metrics = {"student": {"sharpness": 0.61, "accuracy": {"colour": 1.0}}}
    with_figures = write_model_card(out, params, metrics=metrics, path=tmp_path / "reports" / "model_card.md")
    text = with_figures.read_text()
    assert "| student.sharpness | 0.61 |" in text and "| student.accuracy.colour | 1 |" in text


def test_load_student_names_a_directory_that_is_not_one(tiny_params, tmp_path):
    with pytest.raises(FileNotFoundError, match="no student.json"):
        load_student(tmp_path, tiny_params)
