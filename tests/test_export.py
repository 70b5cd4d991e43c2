"""Student export: plain diffusers loads it, and WanPipeline with the shipped scheduler samples what `dmd sample` does."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch

from dmd.core.config import load
from dmd.distill.rollout import RolloutSchedule, transformer_velocity
from dmd.student.export import (
    export_student,
    fit_scheduler_config,
    load_student,
    read_card,
    write_model_card,
)
from dmd.student.sample import pipeline_arguments, student_videos
from dmd.wan.decode import to_uint8
from dmd.wan.formats import scheduler_sigmas
from dmd.wan.loading import add_lora, is_int8, load_transformer

PROMPT = "a red square moving right slowly"
SINGLE_BLOCK = [
    "train.distillation_config.num_frame_per_block=6",
    "train.distillation_config.num_training_frames=6",
]
INT8 = ["model.base_model_precision=int8-quanto"]


def _schedule(params) -> RolloutSchedule:
    return RolloutSchedule.from_params(params)


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
    add_lora(transformer, params.train.student.lora_rank, params.train.student.lora_alpha, "student")
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
    out = export_student(
        _lora_student(params), params, _schedule(params), tmp_path / "student", ema=False, step=7
    )
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
    from dmd.core.video import video_info
    from dmd.student.sample import main

    params = load(tiny_params_file, SINGLE_BLOCK)
    export_student(_lora_student(params), params, _schedule(params), tmp_path / "student", ema=True, step=1)
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
    out = export_student(transformer, params, _schedule(params), tmp_path / "student", ema=False, step=3)
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


def _plain_int8_base(wan_dir):
    """The tiny teacher's transformer with int8 weights as optimum-quanto's own README quantizes a model, leaving out
    Wan's condition embedder and output projection: independent of dmd.wan.loading."""
    from diffusers import WanTransformer3DModel
    from optimum.quanto import freeze, qint8, quantize

    transformer = WanTransformer3DModel.from_pretrained(wan_dir, subfolder="transformer")
    quantize(transformer, weights=qint8, exclude=["condition_embedder.*", "proj_out"])
    freeze(transformer)
    return transformer


def _velocity(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(1, 4, 6, 8, 8, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        return transformer_velocity(transformer)(x, torch.full((1, 6), 757.0), c)


def test_the_card_records_the_base_the_student_trained_on(tiny_params_file, tmp_path):
    cards = {}
    for name, overrides in {
        "fp": [],
        "int8": INT8,
        "int8-bf16": [*INT8, "train.mixed_precision=bf16"],
        "full-int8": [*INT8, "train.model_type=full"],
    }.items():
        params = load(tiny_params_file, overrides)
        student = load_transformer(params.model) if name == "full-int8" else _lora_student(params)
        out = export_student(student, params, _schedule(params), tmp_path / name, ema=False, step=1)
        cards[name] = (read_card(out), (out / "README.md").read_text())
    assert [cards[n][0]["base_model_precision"] for n in cards] == ["no_change", *["int8-quanto"] * 3]
    assert [cards[n][0]["int8_float_dtype"] for n in cards] == [None, "fp32", "bf16", "fp32"]
    # the snippet quantizes the base only under a LoRA trained on int8, in the dtype the base computed in
    assert [cards[n][1].count("quantize(transformer") for n in cards] == [0, 1, 1, 0]
    assert "torch_dtype=torch.bfloat16" in cards["int8-bf16"][1]
    assert ["**Base: int8.**" in cards[n][1] for n in cards] == [False, True, True, False]
    # loaded in the dtype it trained in, whatever params say (loading only: the tiny model's widths are not what
    # torch's CPU kernel for bf16 activations on int8 weights takes)
    transformer, _ = load_student(tmp_path / "int8-bf16", load(tiny_params_file))
    assert is_int8(transformer) and transformer.dtype == torch.bfloat16


def test_load_student_loads_the_base_the_student_trained_on(tiny_params_file, tiny_wan_dir, tmp_path):
    """An int8-trained LoRA is loaded on the int8 base whatever params say, a float-trained one on the float base."""
    from diffusers import WanTransformer3DModel

    from dmd.evaluation.evaluate import fuse_student_lora

    trained = {"int8": load(tiny_params_file, INT8), "fp": load(tiny_params_file)}
    dirs = {
        k: export_student(_lora_student(p), p, _schedule(p), tmp_path / k, ema=False, step=1)
        for k, p in trained.items()
    }
    # the reference: plain diffusers (+ optimum-quanto), the LoRA loaded on top
    reference = {}
    for name, base in (
        ("int8", _plain_int8_base(tiny_wan_dir)),
        ("fp", WanTransformer3DModel.from_pretrained(tiny_wan_dir, subfolder="transformer")),
    ):
        base.load_lora_adapter(
            str(dirs[name]), weight_name="pytorch_lora_weights.safetensors", prefix="transformer"
        )
        reference[name] = _velocity(base)
    # the two bases must give different results, or the comparisons below prove nothing
    assert (reference["int8"] - reference["fp"]).abs().max() > 1e-3

    for now in ("fp", "int8"):  # what params say at loading time
        transformer, _ = load_student(dirs["int8"], trained[now])
        assert is_int8(transformer)
        torch.testing.assert_close(_velocity(transformer), reference["int8"], rtol=0, atol=1e-6)
        assert not fuse_student_lora(transformer, trained[now])  # int8 weights cannot absorb the LoRA
        transformer, _ = load_student(dirs["fp"], trained[now])
        assert not is_int8(transformer)
        torch.testing.assert_close(_velocity(transformer), reference["fp"], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_the_int8_students_card_snippet_makes_the_video_dmd_sample_makes(
    tiny_params_file, tmp_path, monkeypatch
):
    """A LoRA trained on an int8 base: the card's snippet, run exactly as printed, quantizes the base with
    optimum-quanto before loading the LoRA and makes the video `dmd sample` makes, which is not the video of the same
    LoRA on the float base."""
    params = {
        "int8": load(tiny_params_file, [*SINGLE_BLOCK, *INT8, "train.lora_rank=4", "train.lora_alpha=8"]),
        "fp": load(tiny_params_file, [*SINGLE_BLOCK, "train.lora_rank=4", "train.lora_alpha=8"]),
    }
    # the same LoRA weights exported as trained on each base
    dirs = {
        k: export_student(_lora_student(p), p, _schedule(p), tmp_path / k / "student", ema=False, step=7)
        for k, p in params.items()
    }
    snippet = _card_snippet(dirs["int8"])
    assert snippet.count("load_lora_weights") == 1
    assert snippet.index("freeze(transformer)") < snippet.index("load_lora_weights")

    monkeypatch.chdir(dirs["int8"].parent)
    setup, call = snippet.split("video = pipe(")
    namespace: dict = {}
    exec(setup, namespace)
    assert is_int8(namespace["pipe"].transformer)
    torch.manual_seed(1)
    exec("video = pipe(" + call, namespace)
    torch.manual_seed(2)
    # `dmd sample` of the int8 student, with params that name the float base: the card decides
    (_, ours), (_, on_fp_base) = [
        next(student_videos(params["fp"], dirs[k], ["a prompt"], 0)) for k in ("int8", "fp")
    ]
    theirs = to_uint8(namespace["video"])
    assert theirs.shape == ours.shape == (21, 32, 32, 3)
    # equal up to rounding at a colour level's boundary; on the tiny model the float base's video is within a level
    # too, but in many more values, so the share of values that differ tells the two bases apart
    assert np.abs(theirs.astype(int) - ours).max() <= 1
    assert _share_differing(theirs, ours) < _share_differing(on_fp_base, ours) / 10


def _share_differing(a: np.ndarray, b: np.ndarray) -> float:
    return float((a != b).mean())


def test_load_student_names_a_directory_that_is_not_one(tiny_params, tmp_path):
    with pytest.raises(FileNotFoundError, match="no student.json"):
        load_student(tmp_path, tiny_params)
