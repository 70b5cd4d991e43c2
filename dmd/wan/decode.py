"""Normalised latents to video frames, as WanPipeline decodes them."""

from __future__ import annotations

import numpy as np
import torch

from dmd.wan.latents import denormalize_latents


class LatentDecoder:
    """Normalised latents → uint8 (B, T, H, W, 3) frames: WanPipeline's own operations (denormalise in the VAE's
    dtype, `vae.decode`, its video processor), then rounding to colour levels."""

    def __init__(self, vae):
        from diffusers.video_processor import VideoProcessor

        self.vae = vae
        self.processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)

    @torch.no_grad()
    def __call__(self, latents_BCTHW: torch.Tensor) -> np.ndarray:
        config = self.vae.config
        z = denormalize_latents(latents_BCTHW.to(self.vae.dtype), config.latents_mean, config.latents_std)
        video = self.vae.decode(z, return_dict=False)[0]
        return to_uint8(self.processor.postprocess_video(video, output_type="np"))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounding as diffusers does when it makes images."""
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
