"""The tiny Wan builder round-trips through plain diffusers, offline."""

import torch
from diffusers import WanPipeline

from dmd.wan.loading import encode_prompts


def test_tiny_pipeline_round_trip_samples_offline(tiny_wan_dir):
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    out = pipe(
        "a red square moving left",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=21,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        max_sequence_length=16,
    )
    assert out.frames.shape == (1, 21, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(out.frames)).all()


def test_encode_prompts_equals_wan_pipeline(tiny_wan_dir):
    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    prompts = ["a red square moving left", "a blue circle moving up quickly", ""]
    ours = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, max_sequence_length=16)
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
