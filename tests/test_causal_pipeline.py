"""BlockCausalWanPipeline: a block-causal student through diffusers makes the video `dmd sample` makes, survives
save_pretrained / from_pretrained, streams past the trained length, and refuses what it cannot do."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dmd.core.config import load
from dmd.core.noise import randn
from dmd.distill.rollout import RolloutSchedule, sample
from dmd.student.export import export_student, read_card
from dmd.student.pipeline import (
    PIPELINE_FOLDER,
    BlockCausalWanPipeline,
    pipeline_snippet,
    write_student_pipeline,
)
from dmd.student.sample import pipeline_arguments, student_videos
from dmd.wan.decode import to_uint8
from dmd.wan.loading import add_lora, encode_prompts, load_transformer

PROMPT = "a red square moving right slowly"
OTHER = "a blue circle moving up quickly"
CAUSAL = ["train.causal=true"]
FULL = [*CAUSAL, "train.model_type=full"]
LORA = [*CAUSAL, "train.model_type=lora", "train.lora_rank=4", "train.lora_alpha=8"]
STUDENT_KEYS = (
    "sigmas",
    "num_frame_per_block",
    "independent_first_frame",
    "context_sigma",
    "num_training_frames",
)


def _student_transformer(params, seed=0):
    """The teacher's transformer made into a student that is not the teacher: every weight perturbed (full), or a
    "student" LoRA with random A and B."""
    transformer = load_transformer(params.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if params.train.student.model_type == "full":
            for p in transformer.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        else:
            add_lora(transformer, params.train.student.lora_rank, params.train.student.lora_alpha, "student")
            for name, p in transformer.named_parameters():
                if "lora_" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return transformer


def _export(params, path):
    return export_student(
        _student_transformer(params), params, RolloutSchedule.from_params(params), path, ema=False, step=1
    )


def _pipeline(student_dir, params) -> BlockCausalWanPipeline:
    pipe = BlockCausalWanPipeline.from_student(student_dir, params)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(params, **overrides) -> dict:
    """The pipeline arguments `dmd sample` samples with (the model card passes them), plus the student's steps."""
    steps = len(RolloutSchedule.from_params(params).sigmas)
    return {**pipeline_arguments(params), "num_inference_steps": steps, **overrides}


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _generator(seeds: int | list[int]):
    return [_seeded(s) for s in seeds] if isinstance(seeds, list) else _seeded(seeds)


def _run(
    pipe, params, prompt=PROMPT, seeds: int | list[int] = 0, **overrides
) -> tuple[torch.Tensor, np.ndarray]:
    """(latents, uint8 frames) of a call with generators seeded `seeds` (one, or a list: one per video): the call
    made twice, for latents and decoded, each with fresh generators."""
    arguments = _call(params, **overrides)
    latents = pipe(prompt, generator=_generator(seeds), output_type="latent", **arguments).frames
    frames = pipe(prompt, generator=_generator(seeds), output_type="np", **arguments).frames
    return latents, to_uint8(frames)


@pytest.mark.parametrize("overrides", [FULL, LORA], ids=["full", "lora"])
def test_the_pipeline_makes_the_video_dmd_sample_makes(tiny_params_file, tmp_path, overrides, one_thread):
    params = load(tiny_params_file, overrides)
    out = _export(params, tmp_path / "student")
    assert read_card(out)["causal"] is True
    pipe = _pipeline(out, params)

    latents, frames = _run(pipe, params)
    (ours, ours_frames), (other_seed, _) = [
        next(student_videos(params, out, [PROMPT], seed)) for seed in (0, 1)
    ]
    assert frames.shape == (1, 21, 32, 32, 3)
    np.testing.assert_array_equal(frames[0], ours_frames)
    torch.testing.assert_close(latents, ours, rtol=0, atol=1e-6)

    # what the comparison must tell apart differs: another seed, and the same student sampled as WanPipeline
    # samples it (the whole clip as one bidirectional block, from the same draws)
    embeds = encode_prompts(pipe.tokenizer, pipe.text_encoder, [PROMPT], params.model.max_sequence_length)
    generator = _seeded(0)
    noise = randn(latents.shape, generator)
    one_block = dataclasses.replace(pipe.schedule, num_frame_per_block=latents.shape[2], causal=False)
    bidirectional = sample(pipe.transformer, embeds, noise, one_block, generator)
    for different in (other_seed, bidirectional):
        assert (latents - different).abs().max() > 1e-2


def test_save_pretrained_and_from_pretrained_give_the_same_pipeline(tiny_params_file, tmp_path, one_thread):
    params = load(tiny_params_file, FULL)
    pipe = _pipeline(_export(params, tmp_path / "student"), params)
    pipe.save_pretrained(tmp_path / "saved")

    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "BlockCausalWanPipeline"
    schedule = RolloutSchedule.from_params(params)
    assert index["sigmas"] == pytest.approx(list(schedule.sigmas), abs=0)
    assert (index["num_frame_per_block"], index["num_training_frames"]) == (3, 6)
    assert (index["independent_first_frame"], index["context_sigma"]) == (False, 0.0)

    # plain diffusers loading of the folder, offline (conftest sets HF_HUB_OFFLINE)
    loaded = BlockCausalWanPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert {k: loaded.config[k] for k in STUDENT_KEYS} == {k: pipe.config[k] for k in STUDENT_KEYS}
    assert loaded.schedule == pipe.schedule == dataclasses.replace(schedule, causal=True)
    assert loaded.transformer_2 is None and loaded.config.boundary_ratio is None

    latents, frames = _run(pipe, params)
    loaded_latents, loaded_frames = _run(loaded, params)
    assert torch.equal(loaded_latents, latents)
    np.testing.assert_array_equal(loaded_frames, frames)

    # from_pretrained's keyword arguments override saved settings, as for any pipeline config entry
    no_window = BlockCausalWanPipeline.from_pretrained(tmp_path / "saved", num_training_frames=None)
    assert no_window.config.num_training_frames is None and no_window.schedule.cache_frames() is None


def _run_card_snippet(snippet: str, cwd, monkeypatch) -> tuple[np.ndarray, BlockCausalWanPipeline]:
    """(uint8 video, pipeline) of the card's snippet run as printed in `cwd`."""
    monkeypatch.chdir(cwd)  # the snippet names the student directory relative to where it runs
    namespace: dict = {}
    exec(snippet, namespace)
    return to_uint8(namespace["video"]), namespace["pipe"]


BF16 = [*FULL, "model.base_model_precision=bf16", "model.text_encoder_1_precision=bf16"]


def test_the_exported_pipeline_folder_and_its_card_snippet(
    tiny_params_file, tmp_path, monkeypatch, one_thread
):
    """write_student_pipeline (what the export calls): a full student's folder, through the model card's snippet
    run as printed, makes `dmd sample`'s video exactly, at float32 or at bf16 (which the snippet must ask for:
    diffusers loads in float32 otherwise); a LoRA student's, fused, to rounding."""
    from diffusers import WanTransformer3DModel

    results = {}
    for name, overrides in {"full": FULL, "bf16": BF16, "lora": LORA}.items():
        params = load(tiny_params_file, overrides)
        out = _export(params, tmp_path / name / "student")
        folder = write_student_pipeline(out, params)
        assert folder == out / PIPELINE_FOLDER
        assert (folder / "model_index.json").is_file() and (folder / "transformer" / "config.json").is_file()
        # the saved transformer is a plain diffusers one (a LoRA fused in, no peft layers left)
        plain = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer")
        assert not any("lora" in k for k in plain.state_dict())
        snippet = pipeline_snippet(out, params, read_card(out))
        assert f'"student/{PIPELINE_FOLDER}"' in snippet and "manual_seed(0)" in snippet
        video, pipe = _run_card_snippet(snippet, out.parent, monkeypatch)
        latents, frames = next(student_videos(params, out, ["a prompt"], 0))
        folder_latents = pipe("a prompt", generator=_seeded(0), output_type="latent", **_call(params)).frames
        results[name] = (video, frames, folder_latents, latents, pipe)

    for name in ("full", "bf16"):
        video, frames, folder_latents, latents, _ = results[name]
        np.testing.assert_array_equal(video, frames)
        assert torch.equal(folder_latents, latents)
    bf16 = results["bf16"][4]
    assert (
        bf16.transformer.dtype == bf16.text_encoder.dtype == torch.bfloat16
        and bf16.vae.dtype == torch.float32
    )
    assert (results["bf16"][3] - results["full"][3]).abs().max() > 1e-3  # the precision shows in the video
    video, frames, folder_latents, latents, _ = results["lora"]
    assert np.abs(video.astype(int) - frames).max() <= 1  # a fused LoRA rounds otherwise than the adapter
    torch.testing.assert_close(folder_latents, latents, rtol=0, atol=1e-4)
    assert (folder_latents - results["full"][3]).abs().max() > 1e-2  # the two students differ


def test_a_bidirectional_export_has_no_pipeline_folder(tiny_params_file, tmp_path):
    causal = load(tiny_params_file, FULL)
    out = _export(causal, tmp_path / "student")
    assert write_student_pipeline(out, causal) is not None
    bidirectional = load(tiny_params_file, ["train.model_type=full"])
    _export(bidirectional, out)  # the same folder exported again as a bidirectional student
    assert write_student_pipeline(out, bidirectional) is None
    assert not (out / PIPELINE_FOLDER).exists()  # a stale folder would load as a causal student
    with pytest.raises(ValueError, match="bidirectional"):
        BlockCausalWanPipeline.from_student(out, bidirectional)


def test_a_clip_twice_the_trained_length_streams_with_a_rolling_window(
    tiny_params_file, tmp_path, one_thread
):
    """12 latent frames (45 video frames) from a student trained on 6 in blocks of 3: the cache keeps 6 − 3 = 3
    frames. Blocks 0 and 1 never see more than 3 cached frames, so with the same initial noise and generator they
    are the 21-frame clip (the long clip draws block 1's context noise only after block 1 is done); from block 2
    on the window drops frames an unbounded cache would keep."""
    params = load(tiny_params_file, FULL)
    out = _export(params, tmp_path / "student")
    pipe = _pipeline(out, params)
    assert pipe.schedule.cache_frames() == 3
    noise = randn((1, 4, 12, 8, 8), _seeded(7))

    long_latents, long_frames = _run(pipe, params, num_frames=45, latents=noise, seeds=5)
    short_latents, short_frames = _run(pipe, params, num_frames=21, latents=noise[:, :, :6], seeds=5)
    assert long_latents.shape == (1, 4, 12, 8, 8) and long_frames.shape == (1, 45, 32, 32, 3)
    assert torch.equal(long_latents[:, :, :6], short_latents)
    # Wan's VAE decodes causally in time: the first 6 latent frames are the first 21 video frames either way
    np.testing.assert_array_equal(long_frames[:, :21], short_frames)

    # `dmd sample` at that length makes the same long video (its own noise, from --seed)
    long_params = load(tiny_params_file, [*FULL, "train.validation_num_video_frames=45"])
    ours, ours_frames = next(student_videos(long_params, out, [PROMPT], 3))
    latents, frames = _run(pipe, params, num_frames=45, seeds=3)
    np.testing.assert_array_equal(frames[0], ours_frames)
    torch.testing.assert_close(latents, ours, rtol=0, atol=1e-6)

    # the window is in force: without it (num_training_frames unset) blocks 2 and 3 see more and differ
    settings = {k: pipe.config[k] for k in STUDENT_KEYS}
    unbounded = BlockCausalWanPipeline(**pipe.components, **{**settings, "num_training_frames": None})
    unbounded.set_progress_bar_config(disable=True)
    unbounded_latents = unbounded(
        PROMPT, latents=noise, generator=_seeded(5), output_type="latent", **_call(params, num_frames=45)
    ).frames
    assert torch.equal(unbounded_latents[:, :, :6], long_latents[:, :, :6])
    for block in (slice(6, 9), slice(9, 12)):
        assert (unbounded_latents[:, :, block] - long_latents[:, :, block]).abs().max() > 1e-3


def test_a_batch_draws_as_its_generators_say(tiny_params_file, tmp_path, one_thread):
    """A list of generators, one per video: each video alone from its own, so two prompts with
    `[Generator(seed)] * 2` are `dmd sample --prompt A --prompt B --seed` (every prompt from a fresh generator
    seeded `seed`). One generator for both draws once for the batch: the initial noise of both videos, then each
    step's re-noising and context noise of both; its first video is then not the one the prompt gets alone."""
    params = load(tiny_params_file, FULL)
    out = _export(params, tmp_path / "student")
    pipe = _pipeline(out, params)
    ours = list(student_videos(params, out, [PROMPT, OTHER], 3))

    latents, frames = _run(pipe, params, prompt=[PROMPT, OTHER], seeds=[3, 3])
    for i, (our_latents, our_frames) in enumerate(ours):
        np.testing.assert_array_equal(frames[i], our_frames)
        torch.testing.assert_close(latents[i : i + 1], our_latents, rtol=0, atol=1e-6)

    # one generator: the batch's draws, in sample()'s order on a batch
    latents, frames = _run(pipe, params, prompt=[PROMPT, OTHER], seeds=3)
    embeds = encode_prompts(
        pipe.tokenizer, pipe.text_encoder, [PROMPT, OTHER], params.model.max_sequence_length
    )
    generator = _seeded(3)
    noise = randn(latents.shape, generator)
    expected = sample(pipe.transformer, embeds, noise, pipe.schedule, generator)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    assert (latents[:1] - ours[0][0]).abs().max() > 1e-2

    # num_videos_per_prompt repeats each prompt in place; prompt_embeds stand for the prompts
    repeated = pipe(
        prompt_embeds=embeds[:1],
        num_videos_per_prompt=2,
        generator=[_seeded(3), _seeded(4)],
        output_type="latent",
        **_call(params),
    ).frames
    torch.testing.assert_close(repeated[:1], ours[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        repeated[1:], next(student_videos(params, out, [PROMPT], 4))[0], rtol=0, atol=1e-6
    )


def test_what_a_block_causal_student_cannot_do_is_refused(tiny_params_file, tmp_path):
    params = load(tiny_params_file, FULL)
    pipe = _pipeline(_export(params, tmp_path / "student"), params)
    call = _call(params)
    with pytest.raises(
        ValueError, match=r"num_inference_steps=2: this student samples in its 3 trained steps"
    ):
        pipe(PROMPT, **{**call, "num_inference_steps": 2})
    with pytest.raises(
        ValueError, match=r"guidance_scale=3.0: .*without classifier-free guidance.*one KV cache"
    ):
        pipe(PROMPT, **{**call, "guidance_scale": 3.0})
    with pytest.raises(ValueError, match="takes no negative_prompt"):
        pipe(PROMPT, negative_prompt="blurry", **call)
    with pytest.raises(ValueError, match="num_frame_per_block=3 does not divide the 5 latent frames"):
        pipe(PROMPT, **{**call, "num_frames": 17})
    with pytest.raises(ValueError, match="must be 4k\\+1"):
        pipe(PROMPT, **{**call, "num_frames": 20})
    with pytest.raises(ValueError, match="2 generators for 1 videos"):
        pipe(PROMPT, generator=[_seeded(0), _seeded(1)], **call)
    with pytest.raises(ValueError, match="output_type='mp4'"):
        pipe(PROMPT, output_type="mp4", **call)
    with pytest.raises(ValueError, match="needs the student's sigmas"):
        BlockCausalWanPipeline(**pipe.components)
    # None takes the student's steps; what was refused above ran nothing, and each call's draws come from its own
    # generator only
    default = pipe(
        PROMPT, generator=_seeded(0), output_type="latent", **{**call, "num_inference_steps": None}
    )
    again = pipe(PROMPT, generator=_seeded(0), output_type="latent", **call)
    assert torch.equal(default.frames, again.frames)


def test_outputs_come_in_wanpipelines_types(tiny_params_file, tmp_path):
    params = load(tiny_params_file, FULL)
    pipe = _pipeline(_export(params, tmp_path / "student"), params)
    call = _call(params)
    np_frames = pipe(PROMPT, generator=_seeded(0), **call).frames
    pt_frames = pipe(PROMPT, generator=_seeded(0), output_type="pt", **call).frames
    (pil_frames,) = pipe(PROMPT, generator=_seeded(0), output_type="pil", return_dict=False, **call)[0]
    assert np_frames.shape == (1, 21, 32, 32, 3) and pt_frames.shape == (1, 21, 3, 32, 32)
    assert len(pil_frames) == 21 and pil_frames[0].size == (32, 32)
    np.testing.assert_allclose(pt_frames.permute(0, 1, 3, 4, 2).numpy(), np_frames)
    # without a generator the draws come from torch's global stream: seeding it repeats the video
    torch.manual_seed(11)
    first = pipe(PROMPT, output_type="latent", **call).frames
    torch.manual_seed(11)
    assert torch.equal(pipe(PROMPT, output_type="latent", **call).frames, first)
    assert torch.isfinite(first).all()


def test_decoding_is_dmd_samples_with_the_vaes_statistics(tiny_params_file, tmp_path):
    """The tiny VAE's latents_mean / latents_std are 0 / 1, so the calls above cannot see the denormalisation: here
    the pipeline's decode meets `dmd sample`'s (dmd.wan.decode.LatentDecoder) with statistics that matter."""
    from dmd.wan.decode import LatentDecoder

    params = load(tiny_params_file, FULL)
    pipe = _pipeline(_export(params, tmp_path / "student"), params)
    pipe.vae.register_to_config(latents_mean=[0.3, -0.2, 0.1, 0.0], latents_std=[0.5, 2.0, 1.5, 1.0])
    latents = randn((2, 4, 6, 8, 8), _seeded(0))
    ours = to_uint8(pipe.video_processor.postprocess_video(pipe.decode_latents(latents), output_type="np"))
    np.testing.assert_array_equal(
        ours, np.concatenate([LatentDecoder(pipe.vae)(x) for x in latents.split(1)])
    )
    plain = pipe.vae.decode(latents, return_dict=False)[0]  # without the statistics
    assert (pipe.decode_latents(latents) - plain).abs().max() > 1e-2


def test_an_int8_based_lora_student_has_no_folder_but_samples_through_from_student(
    tiny_params_file, tmp_path
):
    """optimum-quanto weights can absorb no LoRA and diffusers cannot save them: no pipeline folder, and the card's
    snippet builds the pipeline from the student instead, which still makes `dmd sample`'s video."""
    params = load(tiny_params_file, [*LORA, "model.base_model_precision=int8-quanto"])
    out = _export(params, tmp_path / "student")
    assert write_student_pipeline(out, params) is None and not (out / PIPELINE_FOLDER).exists()
    assert 'BlockCausalWanPipeline.from_student("student", load("params.yaml"))' in pipeline_snippet(
        out, params, read_card(out)
    )
    latents, frames = _run(_pipeline(out, params), params)
    ours, ours_frames = next(student_videos(params, out, [PROMPT], 0))
    np.testing.assert_array_equal(frames[0], ours_frames)
    torch.testing.assert_close(latents, ours, rtol=0, atol=1e-6)

    # likewise a student whose text encoder is int8 (a full one: its own transformer saves fine)
    int8_text = load(tiny_params_file, [*FULL, "model.text_encoder_1_precision=int8-quanto"])
    out = _export(int8_text, tmp_path / "int8-text" / "student")
    assert write_student_pipeline(out, int8_text) is None and not (out / PIPELINE_FOLDER).exists()
    assert "from_student(" in pipeline_snippet(out, int8_text, read_card(out))
