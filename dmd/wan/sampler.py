"""The teacher as diffusers runs it: `WanPipeline` with its own scheduler at the configured shift, CFG when the
guidance is above 1, from initial noise the caller draws. The generate stage and the evaluation both sample
through `TeacherSampler`."""

from __future__ import annotations

import torch

from dmd.core.config import ModelConfig
from dmd.wan.latents import LatentGeometry
from dmd.wan.loading import encode_prompts, load_text_encoder, load_transformer, load_vae

# FlowMatchEulerDiscreteScheduler calls the shift `shift`, UniPC (the stock Wan 2.1 scheduler) `flow_shift`
SHIFT_KEYS = ("flow_shift", "shift")


def load_teacher_pipeline(model: ModelConfig, device: torch.device | str, shift: float):
    """WanPipeline of the teacher: its components through dmd.wan.loading (precision, int8), the scheduler from its
    directory rebuilt with `shift`."""
    from diffusers import WanPipeline

    tokenizer, text_encoder = load_text_encoder(model, device)
    pipe = WanPipeline.from_pretrained(
        model.pretrained_model_name_or_path,
        revision=model.revision,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=load_transformer(model, device),
        vae=load_vae(model, device),
    )
    pipe.scheduler = scheduler_with_shift(pipe.scheduler, shift)
    return pipe


def scheduler_with_shift(scheduler, shift: float):
    """The scheduler rebuilt with `shift` under whichever name its class gives it."""
    for key in SHIFT_KEYS:
        if key in scheduler.config:
            return type(scheduler).from_config(scheduler.config, **{key: shift})
    return scheduler


class TeacherSampler:
    """One teacher run: `steps` steps of the pipeline's scheduler, CFG `guidance` against `negative_prompt`."""

    def __init__(self, pipe, steps: int, guidance: float, negative_prompt: str, max_sequence_length: int):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.steps = steps
        self.guidance = guidance
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.geometry = LatentGeometry.of(pipe.transformer, pipe.vae)
        pipe.set_progress_bar_config(disable=True)

    def encode(self, prompt: str | list[str]) -> dict[str, torch.Tensor]:
        """The embeddings of one prompt or a batch, and of the negative prompt (one per prompt) when CFG is on:
        what WanPipeline computes from the same text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embeds = {"prompt_embeds": self._encode(prompts)}
        if self.guidance > 1:  # WanPipeline's own condition for CFG
            embeds["negative_prompt_embeds"] = self._encode([self.negative_prompt] * len(prompts))
        return embeds

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.max_sequence_length)

    @torch.no_grad()
    def denoise(
        self, embeds: dict[str, torch.Tensor], noise_BCTHW: torch.Tensor, seed: int | None = None
    ) -> torch.Tensor:
        """Normalised latents from `noise_BCTHW` (the seed is in the noise already; the pipeline draws nothing)."""
        _, _, t, h, w = noise_BCTHW.shape
        geometry = self.geometry
        return self.pipe(
            prompt_embeds=embeds["prompt_embeds"],
            negative_prompt_embeds=embeds.get("negative_prompt_embeds"),
            height=h * geometry.spatial_factor,
            width=w * geometry.spatial_factor,
            num_frames=(t - 1) * geometry.temporal_factor + 1,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            latents=noise_BCTHW,
            output_type="latent",
            return_dict=False,
        )[0]
