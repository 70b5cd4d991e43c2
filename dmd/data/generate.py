"""Teacher data: videos sampled by the teacher (diffusers' WanPipeline), in shards that are resumable and
reproducible.

Layout of `generate.output_dir`:

    shard-NNNNN/{id}.mp4                   H.264 video
    shard-NNNNN/{id}.latents.safetensors   key `latents`, (C,T,H,W): the exact latents the video was decoded from,
                                           in the normalised space the transformer works in (save_latents)
    shard-NNNNN/{id}.noise.safetensors     key `noise`, (C,T,H,W): the initial noise of the sample (save_noise)
    shard-NNNNN/manifest.parquet           one row per video (MANIFEST_COLUMNS; paths relative to the shard)
    manifest.parquet                       every complete shard's rows plus a `shard` column

Sample i (its global index) has id `f"{i:08d}"`, prompt `prompts[prompt_index(seed, i, len(prompts))]` (the library in
a hashed order, a new one per pass) and seed `sample_seed(seed, i)`;
its initial noise is drawn on the CPU from that seed alone and handed to the pipeline, so a sample does not depend
on which run, shard, batch or device made it, and any shard can be regenerated alone. A shard is written into a
temporary directory and renamed when complete, so a killed run leaves nothing that counts as done. Each shard
manifest carries a fingerprint of everything that determined its content (settings, prompts, seeds, teacher); a
shard whose fingerprint differs from the current plan is stale and is regenerated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dmd.core.config import Params
from dmd.core.io import atomic_dir, sha256_file, write_parquet, write_safetensors
from dmd.core.noise import initial_noise
from dmd.core.video import write_video
from dmd.data.prompts import Prompt, load_prompt_library, warn_truncated

log = logging.getLogger(__name__)

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = [
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "shift",
    "frames",
    "fps",
    "width",
    "height",
    "teacher",
    "teacher_revision",
    "video",
    "sha256",
    "latents",
    "noise",
    "index",
    "prompt_id",
    "fingerprint",
]


class GenerationError(ValueError):
    """Settings or inputs that cannot produce teacher data; the message names the key or file and the fix."""


# --------------------------------------------------------------------------------------------------------------
# Pure planning: ids, seeds, shard ranges


def sample_seed(base_seed: int, index: int) -> int:
    """The seed of sample `index`: a hash of (base seed, index), so runs with different base seeds never share
    seeds (as base + index would) and any sample's seed is known without generating the others."""
    digest = hashlib.sha256(f"dmd-teacher-sample:{base_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_id(index: int) -> str:
    return f"{index:08d}"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


@functools.lru_cache(maxsize=4)
def prompt_order(base_seed: int, cycle: int, num_prompts: int) -> tuple[int, ...]:
    """The order in which cycle `cycle` visits the prompts: a permutation fixed by hashing, so every run of
    `num_prompts` consecutive samples uses each prompt once and any prefix of the data set spreads over the whole
    library (a library sorted by topic would otherwise give a small data set only its first topics)."""
    key = f"dmd-teacher-prompts:{base_seed}:{cycle}:"
    return tuple(sorted(range(num_prompts), key=lambda j: hashlib.sha256(f"{key}{j}".encode()).digest()))


def prompt_index(base_seed: int, index: int, num_prompts: int) -> int:
    """Which prompt sample `index` draws."""
    return prompt_order(base_seed, index // num_prompts, num_prompts)[index % num_prompts]


def shard_indices(shard: int, num_videos: int, shard_size: int) -> range:
    """Global sample indices in `shard` (the last shard may be shorter)."""
    return range(shard * shard_size, min((shard + 1) * shard_size, num_videos))


def parse_shard_range(text: str | None, num_shards: int) -> range:
    """'A:B' (B exclusive), 'A:', ':B' or 'K' within 0..num_shards; None means all shards."""
    if text is None or text.strip() in ("", ":"):
        return range(num_shards)
    match = re.fullmatch(r"\s*(\d*)\s*(:?)\s*(\d*)\s*", text)
    if not match or (not match.group(2) and not match.group(1)):
        raise GenerationError(f"--shards {text!r}: expected A:B (e.g. 0:4), A:, :B or a single shard K")
    a = int(match.group(1)) if match.group(1) else 0
    b = (int(match.group(3)) if match.group(3) else num_shards) if match.group(2) else a + 1
    if a >= b:
        raise GenerationError(f"--shards {text!r}: empty range; the end must be above the start")
    if b > num_shards:
        raise GenerationError(
            f"--shards {text!r}: the target has {num_shards} shard(s) (0:{num_shards}, from generate.num_videos and "
            f"generate.shard_size); raise generate.num_videos to generate more"
        )
    return range(a, b)


def generation_settings(params: Params) -> dict:
    """Every setting that determines what a sample looks like (the teacher's weights aside)."""
    cfg, model = params.generate, params.model
    return {
        "teacher": model.pretrained_model_name_or_path,
        "text_encoder": model.text_encoder_path,
        "revision": model.revision,
        "base_model_precision": model.base_model_precision,
        "text_encoder_1_precision": model.text_encoder_1_precision,
        "max_sequence_length": model.max_sequence_length,
        "prompts": cfg.prompts,
        "toy": params.toy.model_dump() if cfg.prompts == "toy" else None,
        "negative_prompt": params.negative_prompt,
        "shift": flow_shift(params),
        "steps": cfg.num_inference_steps,
        "guidance": cfg.guidance_scale,
        "height": cfg.height,
        "width": cfg.width,
        "frames": cfg.num_frames,
        "fps": cfg.fps,
        "seed": cfg.seed,
        "num_videos": cfg.num_videos,
        "shard_size": cfg.shard_size,
        "save_latents": cfg.save_latents,
        "save_noise": cfg.save_noise,
    }


def settings_hash(params: Params, length: int = 12) -> str:
    text = json.dumps(generation_settings(params), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def flow_shift(params: Params) -> float:
    shift = params.generate.flow_shift
    return params.model.flow_schedule_shift if shift is None else shift


# --------------------------------------------------------------------------------------------------------------
# The plan: what every shard holds


@dataclass(frozen=True)
class Sample:
    index: int
    id: str
    prompt_id: str
    prompt: str
    seed: int


@dataclass
class GenerationPlan:
    """What each shard of the target contains: a pure function of the settings, the prompts and the teacher."""

    params: Params
    prompts: list[Prompt]
    teacher_revision: str

    @property
    def output_dir(self) -> Path:
        return Path(self.params.generate.output_dir)

    @property
    def num_shards(self) -> int:
        return self.params.generate.num_shards

    def shard_dir(self, shard: int) -> Path:
        return self.output_dir / shard_name(shard)

    def samples(self, shard: int) -> list[Sample]:
        cfg = self.params.generate
        if not 0 <= shard < self.num_shards:
            raise GenerationError(f"shard {shard} is outside the target 0:{self.num_shards}")
        out = []
        for i in shard_indices(shard, cfg.num_videos, cfg.shard_size):
            prompt = self.prompts[prompt_index(cfg.seed, i, len(self.prompts))]
            out.append(Sample(i, sample_id(i), prompt.id, prompt.text, sample_seed(cfg.seed, i)))
        return out

    def fingerprint(self, shard: int) -> str:
        settings = generation_settings(self.params)
        # the samples cover these, and the teacher's content (teacher_revision) its location
        for key in ("num_videos", "shard_size", "prompts", "toy", "seed", "teacher", "text_encoder"):
            settings.pop(key)
        content = {
            "settings": settings,
            "teacher_revision": self.teacher_revision,
            "samples": [(s.id, s.prompt_id, s.prompt, s.seed) for s in self.samples(shard)],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def status(self, shard: int) -> str:
        """'complete', 'stale' (made with other settings, or files missing) or 'missing'."""
        manifest = self.shard_dir(shard) / MANIFEST
        if not manifest.is_file():
            return "missing"
        try:
            rows = pd.read_parquet(manifest, columns=["fingerprint", "video", "latents", "noise"])
        except Exception:  # an unreadable manifest makes the shard unusable, whatever the reason
            return "stale"
        if len(rows) != len(self.samples(shard)) or set(rows["fingerprint"]) != {self.fingerprint(shard)}:
            return "stale"
        files = [f for col in ("video", "latents", "noise") for f in rows[col] if isinstance(f, str)]
        if not all((self.shard_dir(shard) / f).is_file() for f in files):
            return "stale"
        return "complete"


def missing_shards(plan: GenerationPlan, shards: range | None = None) -> list[int]:
    """Shards of `shards` (default: the whole target) that are absent or stale, in order."""
    return [k for k in (range(plan.num_shards) if shards is None else shards) if plan.status(k) != "complete"]


def prepare(params: Params) -> GenerationPlan:
    """Check everything that can be checked before any sampling, then return the plan.

    Raises GenerationError / PromptLibraryError / dmd.wan.loading.ModelNotFoundError with the key or file and the fix;
    warns about prompts over the text encoder's window (they are truncated, as WanPipeline does).
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer

    from dmd.wan.loading import check_model_dir, model_source, teacher_revision

    cfg, model = params.generate, params.model
    teacher = model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    text_encoder = model_source(model.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    check_model_dir(model, resolve_device(cfg.device))
    vae_config = AutoencoderKLWan.load_config(teacher, subfolder="vae", revision=model.revision)
    patch = WanTransformer3DModel.load_config(teacher, subfolder="transformer", revision=model.revision)[
        "patch_size"
    ]
    spatial = vae_config.get("scale_factor_spatial", 8)
    for key, value, p in (("height", cfg.height, patch[1]), ("width", cfg.width, patch[2])):
        step = spatial * p
        if value % step:
            fixed = max(step, round(value / step) * step)
            raise GenerationError(
                f"generate.{key}={value} is not a multiple of {step} (VAE factor {spatial} × patch {p}); use {fixed}"
            )
    prompts = load_prompt_library(cfg.prompts, params.toy)
    tokenizer = AutoTokenizer.from_pretrained(text_encoder, subfolder="tokenizer", revision=model.revision)
    source = "toy world" if cfg.prompts == "toy" else cfg.prompts
    warn_truncated(source, prompts, tokenizer, model.max_sequence_length, params.negative_prompt)
    # last: it creates the folder, which a rejected input must not leave behind
    _check_writable(Path(cfg.output_dir))
    return GenerationPlan(params, prompts, teacher_revision(params.model))


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise GenerationError(
            f"generate.output_dir={out}: cannot write there ({e.__class__.__name__}: {e.strerror or e}); "
            f"choose another directory or fix its permissions"
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Sampling


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class SampledBatch:
    latents_BCTHW: torch.Tensor  # float32, CPU
    noise_BCTHW: torch.Tensor  # float32, CPU
    frames_BTHW3: np.ndarray  # uint8
    seconds: float  # teacher time: initial noise, denoising, VAE decode


class TeacherSampler:
    """The teacher as a WanPipeline, loaded once per process and shared by the shards sampled in it.

    All of its torch work (loading, denoising, decoding) runs on one dedicated thread, whichever task thread
    asks: one batch at a time, since a pipeline's scheduler is stateful, while the task threads write files. One
    thread also keeps the CPU build of torch to one OpenMP team: each new thread that runs torch ops brings its
    own, and on a machine with few cores a second team's threads contend with the first (sampling from
    per-run task threads measured 1.3–1.8× slower than from one thread here).
    """

    _shared: dict[str, TeacherSampler] = {}
    _shared_lock = threading.Lock()

    def __init__(self, params: Params):
        self.device = resolve_device(params.generate.device)
        self.max_sequence_length = params.model.max_sequence_length
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self.pipe = self._thread.submit(self._load, params).result()

    def _load(self, params: Params):
        from diffusers import WanPipeline

        from dmd.wan.loading import load_text_encoder, load_transformer, load_vae

        model = params.model
        tokenizer, text_encoder = load_text_encoder(model, self.device)
        pipe = WanPipeline.from_pretrained(
            model.pretrained_model_name_or_path,
            transformer=load_transformer(model, self.device),
            vae=load_vae(model, self.device),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            revision=model.revision,
        )
        scheduler = pipe.scheduler
        # FlowMatchEulerDiscreteScheduler calls it `shift`, UniPC (the stock Wan 2.1 scheduler) `flow_shift`
        key = "flow_shift" if "flow_shift" in scheduler.config else "shift"
        pipe.scheduler = type(scheduler).from_config(scheduler.config, **{key: flow_shift(params)})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @classmethod
    def shared(cls, params: Params) -> TeacherSampler:
        key = json.dumps(
            [params.model.model_dump(), params.generate.device, flow_shift(params)], sort_keys=True
        )
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(params)
            return cls._shared[key]

    def sample(self, samples: list[Sample], params: Params) -> SampledBatch:
        """Latents, initial noise and uint8 frames of `samples`, made on the sampler's thread."""
        return self._thread.submit(self._sample, samples, params).result()

    def _sample(self, samples: list[Sample], params: Params) -> SampledBatch:
        cfg = params.generate
        start = time.perf_counter()
        shape = latent_shape(self.pipe, cfg.height, cfg.width, cfg.num_frames)
        noise = torch.stack([initial_noise(s.seed, shape) for s in samples])
        latents = self.pipe(
            prompt=[s.prompt for s in samples],
            negative_prompt=[params.negative_prompt] * len(samples),
            height=cfg.height,
            width=cfg.width,
            num_frames=cfg.num_frames,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            latents=noise.to(self.device),
            output_type="latent",
            max_sequence_length=self.max_sequence_length,
            return_dict=False,
        )[0]
        frames = decode_latents(self.pipe, latents)  # the whole batch at once, as WanPipeline decodes
        return SampledBatch(latents.float().cpu(), noise, frames, time.perf_counter() - start)


def latent_shape(pipe, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
    """(C, T, H, W) of one sample's latents in a Wan pipeline, as WanPipeline.prepare_latents makes them."""
    return (
        pipe.transformer.config.in_channels,
        (num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
        height // pipe.vae_scale_factor_spatial,
        width // pipe.vae_scale_factor_spatial,
    )


@torch.no_grad()
def decode_latents(pipe, latents_BCTHW: torch.Tensor) -> np.ndarray:
    """uint8 (B,T,H,W,3) frames from normalised latents: the same operations as WanPipeline's own decode."""
    vae = pipe.vae
    z = latents_BCTHW.to(vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(
        z.device, z.dtype
    )
    video = vae.decode(z / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return to_uint8(frames)


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8, rounding as diffusers does when it makes images."""
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardResult:
    shard: int
    videos: int  # videos generated by this call (0 when the shard was already complete)
    seconds: float
    sampling_seconds: float


def generate_shard(plan: GenerationPlan, shard: int, sampler: TeacherSampler | None = None) -> ShardResult:
    """Generate `shard` unless it is complete; the shard directory appears only when every file is written."""
    start = time.perf_counter()
    status = plan.status(shard)
    if status == "complete":
        return ShardResult(shard, 0, time.perf_counter() - start, 0.0)
    if status == "stale":
        log.warning("%s was made with other settings or lost files; regenerating it", plan.shard_dir(shard))
    cfg = plan.params.generate
    samples = plan.samples(shard)
    final = plan.shard_dir(shard)
    _remove_leftovers(final)
    sampler = sampler or TeacherSampler.shared(plan.params)
    fingerprint = plan.fingerprint(shard)
    rows, sampling = [], 0.0
    with atomic_dir(final) as tmp:
        for batch in _batches(samples, cfg.batch_size):
            out = sampler.sample(batch, plan.params)
            sampling += out.seconds
            for k, sample in enumerate(batch):
                rows.append(_write_sample(tmp, sample, out, k, plan, fingerprint))
        write_parquet(tmp / MANIFEST, pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    return ShardResult(shard, len(samples), time.perf_counter() - start, sampling)


def _batches(items: list[Sample], size: int) -> Iterator[list[Sample]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _remove_leftovers(final: Path) -> None:
    """Temporary directories of `final` left by a killed run (one writer per shard at a time)."""
    for leftover in [*final.parent.glob(f".{final.name}.*.tmp"), final.parent / f".{final.name}.old"]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _write_sample(
    shard_dir: Path, sample: Sample, out: SampledBatch, k: int, plan: GenerationPlan, fingerprint: str
) -> dict:
    cfg = plan.params.generate
    video = f"{sample.id}.mp4"
    write_video(shard_dir / video, out.frames_BTHW3[k], fps=cfg.fps)
    latents = noise = None
    if cfg.save_latents:
        latents = f"{sample.id}.latents.safetensors"
        write_safetensors(shard_dir / latents, {"latents": out.latents_BCTHW[k]})
    if cfg.save_noise:
        noise = f"{sample.id}.noise.safetensors"
        write_safetensors(shard_dir / noise, {"noise": out.noise_BCTHW[k]})
    return {
        "id": sample.id,
        "prompt": sample.prompt,
        "negative_prompt": plan.params.negative_prompt,
        "seed": sample.seed,
        "steps": cfg.num_inference_steps,
        "guidance": cfg.guidance_scale,
        "shift": flow_shift(plan.params),
        "frames": cfg.num_frames,
        "fps": cfg.fps,
        "width": cfg.width,
        "height": cfg.height,
        "teacher": plan.params.model.pretrained_model_name_or_path,
        "teacher_revision": plan.teacher_revision,
        "video": video,
        "sha256": sha256_file(shard_dir / video),
        "latents": latents,
        "noise": noise,
        "index": sample.index,
        "prompt_id": sample.prompt_id,
        "fingerprint": fingerprint,
    }


def write_manifest(plan: GenerationPlan) -> pd.DataFrame:
    """The top-level manifest: every complete shard of the target, in order, with a `shard` column."""
    tables = []
    for shard in range(plan.num_shards):
        if plan.status(shard) == "complete":
            table = pd.read_parquet(plan.shard_dir(shard) / MANIFEST)
            table.insert(0, "shard", shard)
            tables.append(table)
    beyond = sorted(
        p.name
        for p in plan.output_dir.glob("shard-*")
        if p.is_dir() and re.fullmatch(r"shard-\d{5}", p.name) and int(p.name[6:]) >= plan.num_shards
    )
    if beyond:
        log.warning(
            "%s: %d shard(s) beyond the target of %d (%s...) are left out of the manifest",
            plan.output_dir,
            len(beyond),
            plan.num_shards,
            beyond[0],
        )
    manifest = (
        pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["shard", *MANIFEST_COLUMNS])
    )
    write_parquet(plan.output_dir / MANIFEST, manifest)
    return manifest
