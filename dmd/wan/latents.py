"""Wan latents: how a video's size maps to latents, their normalisation, and the initial noise.

The transformer works on latents normalised per channel by the VAE's `latents_mean` / `latents_std`; the layout and
the decode follow diffusers' `WanPipeline` (`prepare_latents`, and its `latents / (1 / std) + mean` before
`vae.decode`), so what the stages make and what plain diffusers makes agree bit for bit.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from dmd.core.config import ModelConfig
from dmd.core.noise import randn

NORMALISATION_SHAPE = (1, -1, 1, 1, 1)  # one value per channel of (B, C, T, H, W)


@dataclass(frozen=True)
class LatentGeometry:
    """How pixels map to latents: the VAE's factors and statistics, the transformer's channels and patch."""

    latent_channels: int
    temporal_factor: int
    spatial_factor: int
    patch_size: tuple[int, int, int]
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]

    @classmethod
    def of(cls, transformer, vae) -> LatentGeometry:
        """The geometry of loaded models (or anything with their `config`)."""
        return cls.from_configs(dict(transformer.config), dict(vae.config))

    @classmethod
    def from_configs(cls, transformer_config: dict, vae_config: dict) -> LatentGeometry:
        """The geometry of a model directory's config files; a key they leave out takes the value diffusers'
        classes give it (the factors from `temperal_downsample` when the config names none)."""
        from diffusers import AutoencoderKLWan

        defaults = {
            k: p.default
            for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        down = vae_config.get("temperal_downsample", defaults["temperal_downsample"])
        z_dim = vae_config.get("z_dim", defaults["z_dim"])
        return cls(
            latent_channels=int(transformer_config.get("in_channels", z_dim)),
            temporal_factor=int(vae_config.get("scale_factor_temporal") or 2 ** sum(bool(d) for d in down)),
            spatial_factor=int(vae_config.get("scale_factor_spatial") or 2 ** len(down)),
            patch_size=tuple(int(p) for p in transformer_config.get("patch_size", (1, 2, 2))),
            latents_mean=tuple(vae_config.get("latents_mean") or [0.0] * z_dim),
            latents_std=tuple(vae_config.get("latents_std") or [1.0] * z_dim),
        )

    @property
    def alignment(self) -> int:
        """What a video's height and width must be a multiple of: one latent pixel per patch side."""
        return self.spatial_factor * math.lcm(self.patch_size[1], self.patch_size[2])

    def size_problem(self, height: int, width: int, num_frames: int) -> str | None:
        """Why a video of this size cannot be laid out as latents, or None when it can."""
        if height % self.alignment or width % self.alignment:
            return f"video size {height}×{width} must be a multiple of {self.alignment} (VAE × patch)"
        if (num_frames - 1) % self.temporal_factor:
            return f"num_frames={num_frames} must be {self.temporal_factor}k+1"
        return None

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one video's latents, as WanPipeline.prepare_latents lays them out."""
        return (
            self.latent_channels,
            (num_frames - 1) // self.temporal_factor + 1,
            height // self.spatial_factor,
            width // self.spatial_factor,
        )

    def normalize(self, z_BCTHW: torch.Tensor) -> torch.Tensor:
        return normalize_latents(z_BCTHW, self.latents_mean, self.latents_std)

    def denormalize(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        return denormalize_latents(latents_BCTHW, self.latents_mean, self.latents_std)


def load_geometry(model: ModelConfig) -> LatentGeometry:
    """The teacher's latent geometry from its config files alone (no weights are read)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from dmd.wan.loading import model_source

    src = model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    return LatentGeometry.from_configs(
        WanTransformer3DModel.load_config(src, subfolder="transformer", revision=model.revision),
        AutoencoderKLWan.load_config(src, subfolder="vae", revision=model.revision),
    )


def normalize_latents(z_BCTHW: torch.Tensor, mean, std) -> torch.Tensor:
    """VAE latents in the space the transformer works in: `(z - latents_mean) / latents_std`."""
    return (z_BCTHW - torch.tensor(mean).view(NORMALISATION_SHAPE)) / torch.tensor(std).view(
        NORMALISATION_SHAPE
    )


def denormalize_latents(latents_BCTHW: torch.Tensor, mean, std) -> torch.Tensor:
    """What `vae.decode` takes, computed as WanPipeline computes it (dividing by the reciprocal of `latents_std`,
    in the latents' dtype), so decoded frames equal the pipeline's own bit for bit."""
    mean_t = torch.tensor(mean).view(NORMALISATION_SHAPE).to(latents_BCTHW.device, latents_BCTHW.dtype)
    inv_std = 1.0 / torch.tensor(std).view(NORMALISATION_SHAPE).to(latents_BCTHW.device, latents_BCTHW.dtype)
    return latents_BCTHW / inv_std + mean_t


def seeded_initial_noise(
    seed: int, shape: tuple[int, ...], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Generator]:
    """A video's initial noise (float32), the first draw of a CPU generator seeded with `seed`, and that generator,
    for a sampler whose later draws (the re-noising between steps) continue the same stream."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return randn(shape, generator, device), generator


def initial_noise(
    seed: int, shape: tuple[int, ...], device: torch.device | str | None = None
) -> torch.Tensor:
    """A video's initial noise (float32): a function of `seed` alone, so every run, sampler and device that asks
    for the same seed starts from the same noise."""
    return seeded_initial_noise(seed, shape, device)[0]
