"""Student export: plain diffusers loads it, and WanPipeline with the shipped scheduler samples what `dmd sample` does."""

from __future__ import annotations

import argparse
import re

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
from dmd.generate import to_uint8
from dmd.sample import pipeline_arguments, student_videos
from dmd.wan import add_lora, load_transformer

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


def _card_snippet(student_dir) -> str:
    (snippet,) = re.findall(r"```python\n(.*?)```", (student_dir / "README.md").read_text(), flags=re.S)
    return snippet


@pytest.mark.slow
def test_the_model_cards_snippet_makes_the_video_dmd_sample_makes(
    tiny_params_file, tiny_wan_dir, tmp_path, monkeypatch
):
    """The card's WanPipeline snippet, run exactly as printed, against `dmd sample`'s frames; neither draws from
    torch's global random stream (on a GPU that stream is the device's, whose numbers differ from the CPU's)."""
    from diffusers import WanPipeline

    params = load(tiny_params_file, [*SINGLE_BLOCK, "train.lora_rank=4", "train.lora_alpha=8"])
    out = export_student(_lora_student(params), params, tmp_path / "student", ema=False, step=7)
    card = read_card(out)
    assert card["single_block_training"] and card["num_steps"] == 3 and card["train_steps"] == 7
    snippet = _card_snippet(out)
    assert snippet.count("load_lora_weights") == 1 and "manual_seed(0)" in snippet

    monkeypatch.chdir(out.parent)  # the snippet names the student directory relative to where it runs
    # Each side runs with torch's global stream in another state (loading a model draws from it too): a draw from
    # it while sampling, as WanPipeline's scheduler makes on a GPU's stream without a generator, would show here.
    setup, call = snippet.split("video = pipe(")
    namespace: dict = {}
    exec(setup, namespace)
    torch.manual_seed(1)
    exec("video = pipe(" + call, namespace)
    torch.manual_seed(2)
    (ours, ours_frames), (other_seed, _) = [
        next(student_videos(params, out, ["a prompt"], seed)) for seed in (0, 1)
    ]

    theirs = to_uint8(namespace["video"])
    assert theirs.shape == ours_frames.shape == (21, 32, 32, 3)
    # equal up to rounding at a colour level's boundary
    assert np.abs(theirs.astype(int) - ours_frames).max() <= 1
    # what the comparison must tell apart differs: another seed's video, and the teacher's (no student LoRA)
    teacher = WanPipeline.from_pretrained(tiny_wan_dir)
    teacher.set_progress_bar_config(disable=True)
    teacher_latents = teacher(
        "a prompt", **pipeline_arguments(params), num_inference_steps=3, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(0),
    ).frames  # fmt: skip
    for different in (other_seed, teacher_latents):
        assert (ours - different).abs().max() > 1e-2


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
