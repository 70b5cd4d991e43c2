"""Every sampler and the training roles at the precisions real Wan runs in, against the fp32 model of the same weights.

The base is loaded as the project loads it (`dmd.wan.loading.load_transformer` at `model.base_model_precision`), so diffusers
keeps its `_keep_in_fp32_modules` (scale_shift_table, time embedder, norms) in fp32 next to bf16 / fp16 weights.
"int8/bf16" is `base_model_precision: int8-quanto` with `train.mixed_precision: bf16`: int8 weights whose other
weights and activations are bf16, as training loads it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dmd.core.config import load
from dmd.distill.rollout import RolloutSchedule, sample
from dmd.wan.loading import load_transformer

PROMPT = "a red square moving right slowly"
SIGMAS = (1.0, 0.757, 0.522)
# Largest error relative to the fp32 result's largest magnitude: a few rounding steps of the format accumulated
# over a few sampling steps (bf16 keeps 8 significant bits, fp16 11; int8 weights round to 1/127 of a row's range).
TOLERANCE = {"bf16": 8 * 2**-8, "fp16": 8 * 2**-11, "int8/bf16": 4 * 2**-7}
PRECISIONS = list(TOLERANCE)
SETTINGS = {"int8/bf16": ["model.base_model_precision=int8-quanto", "train.mixed_precision=bf16"]}
FLOAT_PRECISIONS = ["bf16", "fp16"]


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny Wan directory whose layer widths are multiples of 16, as real Wan's are: torch's CPU kernel that
    optimum-quanto calls for bf16 activations on int8 weights (`_weight_int8pack_mm`) crashes on other widths."""
    from diffusers import WanPipeline

    from dmd.wan.tiny import (
        build_scheduler,
        build_text_encoder,
        build_tokenizer,
        build_transformer,
        build_vae,
        save_pipeline,
    )

    tokenizer = build_tokenizer()
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer)),
        vae=build_vae(),
        transformer=build_transformer(attention_head_dim=16, ffn_dim=64),
        scheduler=build_scheduler(),
    )
    return save_pipeline(pipe, tmp_path_factory.mktemp("wan16") / "wan")


@pytest.fixture
def params_at(tiny_params_file, wan_dir):
    """precision, *overrides -> the tiny profile's Params on `wan_dir` with the base at that precision."""

    def params(precision: str, *overrides: str):
        settings = SETTINGS.get(precision, [f"model.base_model_precision={precision}"])
        return load(
            tiny_params_file, [f"model.pretrained_model_name_or_path={wan_dir}", *settings, *overrides]
        )

    return params


def _base(params_at, precision: str):
    """The teacher as the project loads it (an int8 base as training loads it, in the run's mixed precision)."""
    if precision == "int8/bf16":
        return load_transformer(params_at(precision).model, int8_float_dtype=torch.bfloat16)
    return load_transformer(params_at(precision).model)


def _assert_close(out: torch.Tensor, reference: torch.Tensor, precision: str) -> None:
    out, reference = out.float(), reference.float()
    assert out.shape == reference.shape
    assert torch.isfinite(out).all()
    error = float((out - reference).abs().max() / reference.abs().max())
    assert error < TOLERANCE[precision], f"{precision}: relative error {error:.3g}"


def _inputs(shape=(1, 4, 6, 8, 8), length=16, dim=32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(1, length, dim, generator=g)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rollout_sample(params_at, precision):
    noise, embeds = _inputs()
    schedule = RolloutSchedule(SIGMAS, num_frame_per_block=3, context_sigma=0.1)

    def run(transformer):
        return sample(transformer, embeds, noise, schedule, torch.Generator().manual_seed(1))

    _assert_close(run(_base(params_at, precision)), run(_base(params_at, "fp32")), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_student_sampler_with_guidance(params_at, precision):
    from dmd.student.sample import generate_latents

    noise, embeds = _inputs()
    negative = torch.zeros_like(embeds)
    schedule = RolloutSchedule(SIGMAS, num_frame_per_block=6)

    def run(transformer):
        return generate_latents(
            transformer, schedule, embeds, noise.shape, seed=3, negative_embeds_1LD=negative, guidance=2.0
        )

    _assert_close(run(_base(params_at, precision)), run(_base(params_at, "fp32")), precision)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "model_type"), [("bf16", "lora"), ("fp16", "lora"), ("bf16", "full")])
def test_dmd_sample_of_an_exported_student(params_at, tmp_path, precision, model_type):
    """`dmd sample`'s videos (with CFG) from a student exported in fp32, loaded on a base at `precision`."""
    from dmd.student.export import export_student, load_student
    from dmd.student.sample import student_videos
    from dmd.wan.loading import DTYPES, add_lora

    overrides = [
        "train.distillation_config.num_frame_per_block=6",
        "train.distillation_config.num_training_frames=6",
        "train.validation_guidance=2.0",
        f"train.model_type={model_type}",
    ]
    params = params_at("fp32", *overrides)
    student = load_transformer(params.model)
    if model_type == "lora":
        add_lora(student, params.train.student.lora_rank, params.train.student.lora_alpha, "student")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights that make the student differ from the teacher
        for name, p in student.named_parameters():
            if "lora_B" in name or (model_type == "full" and name.startswith("proj_out")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = export_student(
        student, params, RolloutSchedule.from_params(params), tmp_path / "student", ema=False, step=1
    )

    def video(precision):
        settings = params_at(precision, *overrides)
        assert load_student(out, settings)[0].dtype == DTYPES[precision]
        return next(student_videos(settings, out, [PROMPT], seed=2))

    (latents, clip), (ref_latents, ref_clip) = video(precision), video("fp32")
    _assert_close(latents, ref_latents, precision)
    assert clip.shape == ref_clip.shape and clip.dtype == np.uint8


@pytest.mark.slow
@pytest.mark.parametrize("precision", FLOAT_PRECISIONS)
def test_validation(params_at, precision):
    from dmd.training.validation import Validator

    def grid(precision, step):
        params = params_at(precision, "train.validation_guidance=2.0")
        transformer = load_transformer(params.model)
        result = Validator(params, "cpu", RolloutSchedule.from_params(params)).run(
            step, transformer, ema=None
        )
        assert transformer.training is False  # run() restores the mode it found
        return np.asarray(Image.open(result.grid), dtype=np.float32)

    ours, reference = grid(precision, 1), grid("fp32", 2)
    assert ours.shape == reference.shape
    # random weights decode to noise-like frames, so the grids are compared in colour levels on average
    assert np.abs(ours - reference).mean() < 255 * TOLERANCE[precision] / 4


@pytest.mark.slow
@pytest.mark.parametrize("precision", FLOAT_PRECISIONS)
def test_evaluate_teacher_and_student_samplers(params_at, precision):
    from dmd.evaluation import evaluate as ev
    from dmd.wan.decode import LatentDecoder
    from dmd.wan.loading import load_text_encoder
    from dmd.wan.sampler import TeacherSampler, load_teacher_pipeline

    noise, _ = _inputs(shape=(1, 4, 3, 8, 8))

    def teacher(precision):
        params = params_at(precision)
        pipe = load_teacher_pipeline(params.model, "cpu", params.model.flow_schedule_shift)
        sampler = TeacherSampler(pipe, 2, 3.0, "", params.model.max_sequence_length)
        latents = sampler.denoise(sampler.encode(PROMPT), noise, seed=0)
        clip = LatentDecoder(pipe.vae)(latents)
        return latents, clip

    def student(precision):
        params = params_at(precision)
        tokenizer, text_encoder = load_text_encoder(params.model)
        sampler = ev.StudentSampler(
            load_transformer(params.model),
            RolloutSchedule(SIGMAS, num_frame_per_block=3),
            tokenizer,
            text_encoder,
            params.model.max_sequence_length,
        )
        return sampler.denoise(sampler.encode(PROMPT), noise, seed=0)

    (latents, clip), (ref_latents, ref_clip) = teacher(precision), teacher("fp32")
    _assert_close(latents, ref_latents, precision)
    assert clip.dtype == np.uint8 and clip.shape == ref_clip.shape
    _assert_close(student(precision), student("fp32"), precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", FLOAT_PRECISIONS)
def test_generate_teacher_sampler(params_at, precision):
    from dmd.data.generate import Sample, TeacherWorker

    def run(precision):
        params = params_at(precision)
        batch = [Sample(0, "00000000", "p0", PROMPT, 5)]
        return TeacherWorker(params).sample(batch, params)

    out, reference = run(precision), run("fp32")
    torch.testing.assert_close(out.noise_BCTHW, reference.noise_BCTHW, rtol=0, atol=0)
    assert out.latents_BCTHW.dtype == torch.float32
    _assert_close(out.latents_BCTHW, reference.latents_BCTHW, precision)
    assert out.frames_BTHW3.dtype == np.uint8 and out.frames_BTHW3.shape == reference.frames_BTHW3.shape


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_forward_and_backward_without_autocast(params_at, precision):
    """A DMD step's two losses and their gradients on the roles as training builds them, run without autocast (as
    `mixed_precision: no` runs them), against the same step on the fp32 roles (the student's LoRA made non-zero so
    every factor gets a gradient)."""
    from dmd.distill.method import DMDMethod
    from dmd.distill.roles import build_roles

    overrides = ["train.distillation_config.fake_score_lora_rank=4"]
    g = torch.Generator().manual_seed(4)
    batch = SimpleNamespace(
        latents_BCTHW=torch.randn(2, 4, 6, 8, 8, generator=g),
        prompt_embeds_BLD=torch.randn(2, 16, 32, generator=g),
        noise_BCTHW=None,
    )

    def run(precision):
        params = params_at(precision, *overrides)
        torch.manual_seed(0)  # the same LoRA initialisation for every precision
        roles = build_roles(params)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in roles.student_parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        method = DMDMethod(
            params, roles, RolloutSchedule.from_params(params), torch.zeros(1, 16, 32), torch.zeros(1, 16, 32)
        )
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        losses = []
        for loss_fn, weights in ((method.generator_loss, method.student_parameters()),
                                 (method.critic_loss, method.critic_parameters())):  # fmt: skip
            loss, _ = loss_fn(batch, torch.Generator().manual_seed(6))
            loss.backward()
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in weights)
            losses.append(loss.detach())
        grads = [p.grad.float().flatten() for p in method.student_parameters() + method.critic_parameters()]
        return *losses, torch.cat(grads)

    for ours, reference in zip(run(precision), run("fp32")):
        _assert_close(ours, reference, precision)
