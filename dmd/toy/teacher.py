"""Training of the tiny Wan teacher on the toy world, saved as an ordinary diffusers Wan directory.

Three parts, trained in order, all of diffusers' / transformers' own Wan classes:
1. `AutoencoderKLWan` on reconstruction of world clips (windows of `vae_num_frames`). The loss is taken on the decoder's
   unclamped output: `AutoencoderKLWan.decode` clamps to [-1, 1], which zeroes the gradient wherever the
   decoder undershoots, and a tiny VAE trained through it collapses to the background. Object pixels and the
   background just around them weigh extra: with the object alone weighted, objects decoded as blobs of the
   right colour and no cross survived the round trip. Afterwards
   `latents_mean` / `latents_std` are set from the encoded training set, so the latents WanPipeline works in,
   `(z − mean) / std`, have unit scale per channel.
2. A tiny `UMT5EncoderModel` over a word-level tokenizer of the world's vocabulary, left at its seeded random
   initialisation and frozen: each caption word lands at a fixed position, so distinct captions already have
   distinct embeddings and the transformer learns to read them.
3. `WanTransformer3DModel` with flow matching in the normalised latent space (dmd.core.flow_matching conventions),
   σ drawn like the sampler's shifted schedule, captions dropped to the empty prompt's embedding so that
   classifier-free guidance works.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from tqdm.auto import tqdm

from dmd.core.config import Params, ToyConfig, ToyTeacherConfig
from dmd.core.flow_matching import add_noise, shift_sigma, sigma_to_timestep, velocity_target
from dmd.core.io import write_json
from dmd.toy.world import ToyWorld
from dmd.wan.loading import encode_prompts
from dmd.wan.tiny import (
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae,
    save_pipeline,
)

log = logging.getLogger(__name__)


def clips_to_pixels(clips_NTHWC: np.ndarray) -> torch.Tensor:
    """uint8 (N,T,H,W,3) → float (N,3,T,H,W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(clips_NTHWC)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def decode_unclamped(vae: AutoencoderKLWan, z_BCTHW: torch.Tensor) -> torch.Tensor:
    """`AutoencoderKLWan._decode` without its final clamp, so reconstruction gradients reach every pixel."""
    vae.clear_cache()
    x = vae.post_quant_conv(z_BCTHW)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(
                x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0
            )
        )
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(
    clips: np.ndarray,
    cfg: ToyTeacherConfig,
    generator: torch.Generator,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[AutoencoderKLWan, dict]:
    """Two phases: `vae_steps` on random `vae_num_frames` windows, then `vae_full_clip_steps` on whole clips."""
    vae = build_vae(z_dim=cfg.z_dim, base_dim=cfg.vae_base_dim, seed=cfg.seed).to(device).train()
    stats = {}
    phases = [
        ("windows", cfg.vae_steps, cfg.vae_batch_size, cfg.vae_learning_rate, cfg.vae_num_frames),
        ("whole clips", cfg.vae_full_clip_steps, cfg.vae_full_clip_batch_size, cfg.vae_full_clip_learning_rate,
         clips.shape[1]),
    ]  # fmt: skip
    for name, steps, batch_size, lr, frames in phases:
        if steps:
            loss = _train_vae_phase(
                vae, clips, cfg, steps, batch_size, lr, frames, generator, name, progress, device
            )
            stats[f"final_reconstruction_loss_{name.replace(' ', '_')}"] = loss
    return vae.eval().requires_grad_(False), stats


def reconstruction_weights(is_object_B1THW: torch.Tensor, object_weight: float, margin: int) -> torch.Tensor:
    """Per-pixel loss weights: 1 everywhere, 1 + `object_weight` on objects and on the background within `margin`
    pixels of them (same frame). A shape is told apart as much by the background it leaves (a cross's empty
    corners, a circle's cut corners) as by its own pixels; weighting only the object lets a blob that fills those
    corners cost almost nothing."""
    near = is_object_B1THW.float()
    if margin:
        size = 2 * margin + 1
        near = F.max_pool3d(near, kernel_size=(1, size, size), stride=1, padding=(0, margin, margin))
    return 1 + object_weight * near


def _train_vae_phase(
    vae: AutoencoderKLWan,
    clips: np.ndarray,
    cfg: ToyTeacherConfig,
    steps: int,
    batch_size: int,
    learning_rate: float,
    window: int,
    generator: torch.Generator,
    name: str,
    progress: bool,
    device: str | torch.device,
) -> float:
    """Weighted reconstruction MSE + a light L2 on the latents, on random `window`-frame windows."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, steps, max(1, steps // 20))
    )
    pixels = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)  # uint8 (N,3,T,H,W), converted per batch
    background = torch.from_numpy(clips[0, 0, 0, 0].astype(np.int16)).view(1, 3, 1, 1, 1).to(device)
    num_frames = pixels.shape[2]
    bar = tqdm(range(steps), desc=f"toy teacher: VAE ({name})", disable=not progress)
    losses = []
    for _ in bar:
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator)
        start = int(torch.randint(0, num_frames - window + 1, (1,), generator=generator))
        # batches are drawn on the CPU from the CPU generator: the same data order on every device
        batch = pixels[index, :, start : start + window].to(device)
        is_object = (batch.to(torch.int16) - background).abs().sum(1, keepdim=True) > 0
        x = batch.float() / 127.5 - 1
        # the posterior mean, not a sample: with the initial unit posterior variance, sampling drowns the
        # encoder's small early signal and the decoder learns to ignore it (posterior collapse)
        mean = vae._encode(x).chunk(2, dim=1)[0]
        weight = reconstruction_weights(is_object, cfg.vae_object_weight, cfg.vae_object_margin)
        decoded = decode_unclamped(vae, mean)
        reconstruction = (weight * (decoded - x) ** 2).mean()
        latent_penalty = 0.5 * (mean**2).mean()
        loss = reconstruction + cfg.vae_latent_weight * latent_penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(reconstruction.item())
        bar.set_postfix(rec=f"{np.mean(losses[-20:]):.4f}", latent=f"{latent_penalty.item():.3f}")
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def encode_latents(vae: AutoencoderKLWan, clips: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (N, z_dim, T', H', W') of whole clips on the CPU, as WanPipeline's VAE sees them
    (unnormalised)."""
    device = next(vae.parameters()).device
    return torch.cat(
        [
            vae.encode(clips_to_pixels(clips[i : i + batch_size]).to(device)).latent_dist.mode().cpu()
            for i in range(0, len(clips), batch_size)
        ]
    )


def set_latent_statistics(vae: AutoencoderKLWan, latents_NCTHW: torch.Tensor) -> torch.Tensor:
    """Store per-channel mean/std in the VAE config (read by WanPipeline) and return the normalised latents."""
    mean = latents_NCTHW.mean(dim=(0, 2, 3, 4))
    std = latents_NCTHW.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (latents_NCTHW - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def _round_trip(vae: AutoencoderKLWan, clips: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, decoded) of uint8 clips encoded to the posterior mean and decoded as WanPipeline decodes
    (`decode` clamps to [-1, 1])."""
    x = clips_to_pixels(clips).to(next(vae.parameters()).device)
    return x, vae.decode(vae.encode(x).latent_dist.mode()).sample


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKLWan, clips: np.ndarray) -> np.ndarray:
    """uint8 clips after the round trip: what the VAE alone keeps of them, the ceiling for anything the
    transformer draws."""
    _, decoded = _round_trip(vae, clips)
    return ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKLWan, clips: np.ndarray) -> float:
    """Mean absolute error in 0–255 pixel units of the round trip, as the pipeline decodes."""
    x, decoded = _round_trip(vae, clips)
    return float(((decoded - x).abs() * 127.5).mean())


def train_transformer(
    latents_NCTHW: torch.Tensor,
    caption_index: torch.Tensor,
    prompt_embeds_KLD: torch.Tensor,
    empty_embeds_LD: torch.Tensor,
    cfg: ToyTeacherConfig,
    shift: float,
    generator: torch.Generator,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> tuple[WanTransformer3DModel, dict]:
    """Flow matching: x_σ = (1−σ)x0 + σε, target ε − x0, timestep 1000σ, σ = shift(u, shift) with u ~ U(0,1)."""
    transformer = (
        build_transformer(
            in_channels=latents_NCTHW.shape[1],
            text_dim=prompt_embeds_KLD.shape[-1],
            num_layers=cfg.num_layers,
            num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim,
            ffn_dim=cfg.ffn_dim,
            seed=cfg.seed,
        )
        .to(device)
        .train()
    )
    optimizer = torch.optim.AdamW(
        transformer.parameters(), lr=cfg.transformer_learning_rate, weight_decay=0.01
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine_lr(s, cfg.transformer_steps, max(1, cfg.transformer_steps // 20))
    )
    ema = [p.detach().clone() for p in transformer.parameters()]
    bar = tqdm(range(cfg.transformer_steps), desc="toy teacher: transformer", disable=not progress)
    losses = []
    for _ in bar:
        index = torch.randint(0, len(latents_NCTHW), (cfg.transformer_batch_size,), generator=generator)
        x0 = latents_NCTHW[index]
        embeds = prompt_embeds_KLD[caption_index[index]]
        dropped = torch.rand(len(index), generator=generator) < cfg.caption_dropout_probability
        embeds = torch.where(dropped.view(-1, 1, 1), empty_embeds_LD.expand_as(embeds), embeds)
        noise = torch.randn(x0.shape, generator=generator)
        sigma = shift_sigma(torch.rand(len(index), generator=generator), shift)
        x0, embeds, noise, sigma = (t.to(device) for t in (x0, embeds, noise, sigma))
        velocity = transformer(
            hidden_states=add_noise(x0, noise, sigma),
            timestep=sigma_to_timestep(sigma),
            encoder_hidden_states=embeds,
            return_dict=False,
        )[0]
        loss = ((velocity - velocity_target(x0, noise)) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for average, p in zip(ema, transformer.parameters()):
                average.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    with torch.no_grad():
        for average, p in zip(ema, transformer.parameters()):
            p.copy_(average)
    return transformer.cpu().eval().requires_grad_(False), {
        "final_flow_matching_loss": float(np.mean(losses[-200:]))
    }


def train_teacher(params: Params, *, progress: bool = True, device: str | torch.device = "cpu") -> Path:
    """Train VAE, text encoder and transformer on the toy world; save a WanPipeline dir at toy_teacher.output_dir.

    Data order and noise come from one seeded CPU generator, so a run on `device` sees the same batches as a
    run on the CPU (the weights differ only by floating-point rounding)."""
    cfg = params.toy_teacher
    world = ToyWorld(params.toy)
    if cfg.vae_num_frames > params.toy.num_frames:
        raise ValueError(
            f"toy_teacher.vae_num_frames={cfg.vae_num_frames} exceeds toy.num_frames={params.toy.num_frames}; "
            "use a window no longer than the clips"
        )
    generator = torch.Generator().manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    started, cpu_started = time.perf_counter(), time.process_time()

    clips, captions = world.sample_dataset(cfg.num_clips, cfg.seed)
    log.info("toy teacher: %d clips of %d training captions", len(clips), len(world.captions("train")))

    vae, vae_stats = train_vae(clips, cfg, generator, progress, device)
    timings["vae_seconds"] = time.perf_counter() - started
    vae_stats["reconstruction_mae_255"] = reconstruction_error(vae, clips[:64])
    log.info("toy teacher: VAE round trip off by %.2f / 255 per pixel", vae_stats["reconstruction_mae_255"])
    latents = set_latent_statistics(vae, encode_latents(vae, clips))
    vae.cpu()
    timings["encode_seconds"] = time.perf_counter() - started - timings["vae_seconds"]

    tokenizer = build_tokenizer(world.vocabulary())
    text_encoder = build_text_encoder(len(tokenizer), d_model=cfg.text_dim, seed=cfg.seed)
    unique = sorted(set(captions))
    embeds = encode_prompts(tokenizer, text_encoder, [*unique, ""], params.model.max_sequence_length)
    caption_index = torch.tensor([unique.index(c) for c in captions])

    phase = time.perf_counter()
    transformer, transformer_stats = train_transformer(
        latents,
        caption_index,
        embeds[:-1],
        embeds[-1],
        cfg,
        params.model.flow_schedule_shift,
        generator,
        progress,
        device,
    )
    timings["transformer_seconds"] = time.perf_counter() - phase

    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=build_scheduler(params.model.flow_schedule_shift),
    )
    output = save_pipeline(pipe, cfg.output_dir)
    timings["total_seconds"] = time.perf_counter() - started
    timings["cpu_seconds"] = time.process_time() - cpu_started
    write_json(
        output / "training.json",
        {
            "seconds": timings,
            "vae": vae_stats,
            "transformer": transformer_stats,
            "parameters": {
                "vae": sum(p.numel() for p in vae.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
                "transformer": sum(p.numel() for p in transformer.parameters()),
            },
            "max_sequence_length": params.model.max_sequence_length,
            "captions": {"train": world.captions("train"), "held_out": world.captions("held_out")},
            "toy": params.toy.model_dump(mode="json"),
            "toy_teacher": cfg.model_dump(mode="json"),
            "flow_schedule_shift": params.model.flow_schedule_shift,
            "machine": {
                "platform": platform.platform(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "device": str(device),
            },
        },
    )
    log.info("toy teacher saved to %s in %.0f s", output, timings["total_seconds"])
    return output


def training_summary(teacher_dir: str | Path) -> dict:
    """The training.json written beside a trained teacher."""
    return json.loads((Path(teacher_dir) / "training.json").read_text())


@torch.no_grad()
def sample_clips(
    pipe: WanPipeline,
    captions: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    toy: ToyConfig,
    max_sequence_length: int,
    negative_prompt: str = "",
    batch_size: int = 32,
) -> np.ndarray:
    """uint8 (N,T,H,W,3) clips from a WanPipeline, one torch.Generator per clip so a clip depends only on its seed."""
    clips = []
    for i in range(0, len(captions), batch_size):
        out = pipe(
            prompt=captions[i : i + batch_size],
            negative_prompt=[negative_prompt] * len(captions[i : i + batch_size]),
            height=toy.height,
            width=toy.width,
            num_frames=toy.num_frames,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]],
            output_type="np",
            max_sequence_length=max_sequence_length,
        )
        clips.append((np.clip(out.frames, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(clips)
