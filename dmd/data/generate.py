"""Teacher data: videos sampled by the teacher (diffusers' WanPipeline), in shards that are resumable and
reproducible.

Layout of `generate.output_dir`:

    shard-NNNNN/{id}.mp4                   H.264 video
    shard-NNNNN/{id}.latents.safetensors   key `latents`, (C,T,H,W): the exact latents the video was decoded from,
                                           in the normalised space the transformer works in (save_latents)
    shard-NNNNN/{id}.noise.safetensors     key `noise`, (C,T,H,W): the initial noise of the sample (save_noise)
    shard-NNNNN/{id}.trajectory.safetensors
                                           key `trajectory`, (K,C,T,H,W) float32: the teacher's latents at the
                                           student's σs, listed in its metadata and the manifest (save_trajectory)
    shard-NNNNN/manifest.parquet           one row per video (MANIFEST_COLUMNS; paths relative to the shard)
    manifest.parquet                       every current shard's rows plus a `shard` column

Sample i (its global index) has id `f"{i:08d}"`, prompt `prompts[prompt_index(seed, i, len(prompts))]` (the library in
a hashed order, a new one per pass) and seed `sample_seed(seed, i)`;
its initial noise is drawn on the CPU from that seed alone and handed to the pipeline, so a sample does not depend
on which run, shard, batch or device made it, and any shard can be regenerated alone. Shards are spread over the
devices of `generate.device` (dmd.wan.device: one teacher per listed device, each shard on the least busy one). A
shard is written into a temporary directory and renamed when complete, so a killed run leaves nothing that counts
as done. Each shard manifest carries a fingerprint of everything that determined its content (settings, prompts,
seeds, teacher); a shard whose fingerprint differs from the current plan is stale and is regenerated.

Trajectories (`generate.save_trajectory`) are the σs of `trajectory_sigmas`, exactly the student's rollout σs; the
clean end point is the latents file. They enter the fingerprint only when on, so shards made without them keep
theirs. A shard whose videos, latents and noise are current but whose trajectories are not (absent, at other σs,
or no longer wanted) is 'missing_trajectories': generating it runs the teacher again from the saved noise and
swaps in, atomically, the same video, latents and noise files (hard links, byte for byte), the trajectory files and
an updated manifest. The top-level manifest lists such a shard without its trajectories meanwhile.
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dmd.core.config import ModelConfig, Params, dump_stage
from dmd.core.flow_matching import denoising_sigmas
from dmd.core.io import (
    atomic_dir,
    remove_stale_temporaries,
    sha256_file,
    write_parquet,
    write_safetensors,
    write_text,
)
from dmd.core.video import write_video
from dmd.data.prompts import Prompt, load_prompt_library, warn_truncated
from dmd.data.schema import (
    MANIFEST,
    MANIFEST_COLUMNS,
    MANIFEST_SHARD,
    TEACHER_LATENTS_TENSOR,
    TEACHER_NOISE_TENSOR,
    TEACHER_TRAJECTORY_TENSOR,
    TRAJECTORY_SIGMAS_METADATA,
    Manifest,
    sigmas_cell,
    teacher_shard_name,
)
from dmd.wan.device import DeviceError, DeviceSlot, device_pool, resolve_devices
from dmd.wan.latents import initial_noise

log = logging.getLogger(__name__)

_SAMPLE_FILE_COLUMNS = (
    Manifest.VIDEO,
    Manifest.LATENTS,
    Manifest.NOISE,
)  # a shard is complete when all exist (and its trajectories, when wanted)

# Shard states (GenerationPlan.status)
COMPLETE = "complete"
MISSING_TRAJECTORIES = "missing_trajectories"
STALE = "stale"
MISSING = "missing"

# How far, relative to their norm, the latents of a teacher run made again for a trajectory may lie from the saved
# ones: reruns on the same device and precision agree exactly; another GPU or kernel moves them slightly, while another
# teacher, noise or precision moves them by about their own size
REGENERATED_LATENTS_TOLERANCE = 1e-2

DEVICE_KEY = "generate.device"


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
    settings = {
        "teacher": model.pretrained_model_name_or_path,
        "text_encoder": model.text_encoder_path,
        "revision": model.revision,
        "base_model_precision": model.base_model_precision,
        "text_encoder_1_precision": model.text_encoder_1_precision,
        "max_sequence_length": model.max_sequence_length,
        "prompts": cfg.prompts,
        "toy": params.toy.model_dump() if cfg.prompts == "toy" else None,
        "negative_prompt": params.model.negative_prompt,
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
    sigmas = trajectory_sigmas(params)
    if sigmas is not None:  # absent when off: shards made before trajectories existed keep their fingerprint
        settings["trajectory_sigmas"] = list(sigmas)
    return settings


def trajectory_sigmas(params: Params) -> tuple[float, ...] | None:
    """The σs at which the teacher's trajectory is saved, None when generate.save_trajectory is off: the student's
    rollout σs (dmd.distill.rollout.RolloutSchedule.from_params(params).sigmas), from
    train.distillation_config.dmd_denoising_steps, warped by model.flow_schedule_shift when warp_denoising_steps."""
    if not params.generate.save_trajectory:
        return None
    dc = params.train.distillation_config
    warp = params.model.flow_schedule_shift if dc.warp_denoising_steps else None
    return tuple(denoising_sigmas(dc.dmd_denoising_steps, warp).tolist())


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
        return self.output_dir / teacher_shard_name(shard)

    def samples(self, shard: int) -> list[Sample]:
        cfg = self.params.generate
        if not 0 <= shard < self.num_shards:
            raise GenerationError(f"shard {shard} is outside the target 0:{self.num_shards}")
        out = []
        for i in shard_indices(shard, cfg.num_videos, cfg.shard_size):
            prompt = self.prompts[prompt_index(cfg.seed, i, len(self.prompts))]
            out.append(Sample(i, sample_id(i), prompt.id, prompt.text, sample_seed(cfg.seed, i)))
        return out

    @property
    def trajectory_sigmas(self) -> tuple[float, ...] | None:
        return trajectory_sigmas(self.params)

    def fingerprint(self, shard: int) -> str:
        return self.fingerprint_with(shard, self.trajectory_sigmas)

    def fingerprint_with(self, shard: int, sigmas: tuple[float, ...] | None) -> str:
        """The fingerprint of `shard` made with these settings and trajectories at `sigmas` (None: none)."""
        settings = generation_settings(self.params)
        # the samples cover these, and the teacher's content (teacher_revision) its location
        for key in ("num_videos", "shard_size", "prompts", "toy", "seed", "teacher", "text_encoder"):
            settings.pop(key)
        settings.pop("trajectory_sigmas", None)  # the argument's, not the settings'
        content = {
            "settings": settings,
            "teacher_revision": self.teacher_revision,
            "samples": [(s.id, s.prompt_id, s.prompt, s.seed) for s in self.samples(shard)],
        }
        if sigmas is not None:
            content["trajectory_sigmas"] = list(sigmas)
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def status(self, shard: int) -> str:
        """COMPLETE; MISSING_TRAJECTORIES (videos, latents and noise current, trajectories absent, at other σs or no
        longer wanted); STALE (made with other settings, or files missing); or MISSING."""
        manifest = self.shard_dir(shard) / MANIFEST
        if not manifest.is_file():
            return MISSING
        try:
            rows = pd.read_parquet(manifest)
        except Exception:  # an unreadable manifest makes the shard unusable, whatever the reason
            return STALE
        needed = (Manifest.FINGERPRINT, *_SAMPLE_FILE_COLUMNS)
        if any(col not in rows for col in needed) or len(rows) != len(self.samples(shard)):
            return STALE
        files = [f for col in _SAMPLE_FILE_COLUMNS for f in rows[col] if isinstance(f, str)]
        if not all((self.shard_dir(shard) / f).is_file() for f in files):
            return STALE
        fingerprints = set(rows[Manifest.FINGERPRINT])
        if fingerprints == {self.fingerprint(shard)}:
            return COMPLETE if self._trajectories_present(shard, rows) else MISSING_TRAJECTORIES
        made_with = (
            {sigmas_cell(v) for v in rows[Manifest.TRAJECTORY_SIGMAS]}
            if Manifest.TRAJECTORY_SIGMAS in rows
            else {None}
        )
        if len(made_with) == 1 and fingerprints == {self.fingerprint_with(shard, made_with.pop())}:
            return MISSING_TRAJECTORIES
        return STALE

    def _trajectories_present(self, shard: int, rows: pd.DataFrame) -> bool:
        if self.trajectory_sigmas is None:
            return True
        if Manifest.TRAJECTORY not in rows:
            return False
        names = list(rows[Manifest.TRAJECTORY])
        return all(isinstance(f, str) and (self.shard_dir(shard) / f).is_file() for f in names)


def missing_shards(plan: GenerationPlan, shards: range | None = None) -> list[int]:
    """Shards of `shards` (default: the whole target) that are absent, stale or missing trajectories, in order."""
    return [k for k in (range(plan.num_shards) if shards is None else shards) if plan.status(k) != COMPLETE]


def prepare(params: Params) -> GenerationPlan:
    """Check everything that can be checked before any sampling, then return the plan.

    Raises GenerationError / PromptLibraryError / dmd.wan.loading.ModelNotFoundError with the key or file and the fix;
    warns about prompts over the text encoder's window (they are truncated, as WanPipeline does).
    """
    from transformers import AutoTokenizer

    from dmd.wan.latents import load_geometry
    from dmd.wan.loading import check_model_dir, model_source, teacher_revision

    cfg, model = params.generate, params.model
    model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    text_encoder = model_source(model.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    for device in sorted({slot.device for slot in devices(params)}):
        check_model_dir(model, device)
    geometry = load_geometry(model)
    spatial, patch = geometry.spatial_factor, geometry.patch_size
    for key, value, p in (("height", cfg.height, patch[1]), ("width", cfg.width, patch[2])):
        step = spatial * p
        if value % step:
            fixed = max(step, round(value / step) * step)
            raise GenerationError(
                f"generate.{key}={value} is not a multiple of {step} (VAE factor {spatial} × patch {p}); use {fixed}"
            )
    if cfg.save_trajectory:
        _check_trajectory_scheduler(model)
    prompts = load_prompt_library(cfg.prompts, params.toy)
    tokenizer = AutoTokenizer.from_pretrained(text_encoder, subfolder="tokenizer", revision=model.revision)
    source = "toy world" if cfg.prompts == "toy" else cfg.prompts
    warn_truncated(source, prompts, tokenizer, model.max_sequence_length, params.model.negative_prompt)
    # last: it creates the folder, which a rejected input must not leave behind
    _check_writable(Path(cfg.output_dir))
    return GenerationPlan(params, prompts, teacher_revision(params.model))


def devices(params: Params) -> list[DeviceSlot]:
    """The slots of generate.device on this machine; GenerationError when it names a device that is not here. With
    an existing Dask cluster (generate.dask_address) the shards run on its workers' machines, which check their own
    devices."""
    cfg = params.generate
    remote = cfg.task_runner == "dask" and cfg.dask_address is not None
    try:
        return resolve_devices(cfg.device, DEVICE_KEY, present=not remote)
    except DeviceError as e:
        raise GenerationError(str(e)) from None


def _check_trajectory_scheduler(model: ModelConfig) -> None:
    """A trajectory between the teacher's steps is read off by linear interpolation, which only straight Euler
    steps allow; the scheduler's config says whether the teacher takes them, before any weights are read."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmd.wan.loading import model_source
    from dmd.wan.sampler import EULER_SCHEDULER, trajectory_scheduler_problem

    source = model_source(model.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    # any scheduler class reads the file as it is, whatever class it names
    config = FlowMatchEulerDiscreteScheduler.load_config(
        source, subfolder="scheduler", revision=model.revision
    )
    problem = trajectory_scheduler_problem(config)
    if problem:
        raise GenerationError(
            f"generate.save_trajectory: the teacher {model.pretrained_model_name_or_path} cannot give its trajectory "
            f"at the student's σs: {problem} (scheduler/scheduler_config.json), so its latents between two steps "
            f"are not the straight line in σ that a partial step would follow. Set generate.save_trajectory: false, "
            f"or give the teacher an {EULER_SCHEDULER} with stochastic_sampling: false (its `_class_name` in "
            f"scheduler/scheduler_config.json, `shift` as model.flow_schedule_shift) and generate its data anew "
            f"with it"
        )


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


@dataclass
class SampledBatch:
    latents_BCTHW: torch.Tensor  # float32, CPU
    noise_BCTHW: torch.Tensor  # float32, CPU
    frames_BTHW3: np.ndarray | None  # uint8; None when not decoded
    seconds: float  # teacher time: initial noise, denoising, VAE decode
    trajectory_BKCTHW: torch.Tensor | None = None  # float32, CPU, at trajectory_sigmas(params); None when off


class TeacherWorker:
    """The teacher (dmd.wan.sampler), loaded once per process and device slot, and shared by the shards sampled
    there.

    All of its torch work (loading, denoising, decoding) runs on one dedicated thread, whichever task thread
    asks: one batch at a time, since a pipeline's scheduler is stateful, while the task threads write files. One
    thread also keeps the CPU build of torch to one OpenMP team: each new thread that runs torch ops brings its
    own, and on a machine with few cores a second team's threads contend with the first (sampling from
    per-run task threads measured 1.3–1.8× slower than from one thread here).
    """

    _shared: dict[str, TeacherWorker] = {}
    # one load at a time in a process, whatever the slot: loading (accelerate's init_empty_weights, which diffusers
    # and transformers use) patches torch.nn.Module for the whole process while it builds a model, and two loads in
    # two threads left each other's weights on the meta device
    _shared_lock = threading.Lock()

    def __init__(self, params: Params, slot: DeviceSlot | None = None):
        self.slot = slot or devices(params)[0]
        self.device = torch.device(self.slot.device)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"teacher-{self.slot.index}")
        self.pipe, self.decode = self._thread.submit(self._load, params).result()

    def _load(self, params: Params):
        from dmd.wan.decode import LatentDecoder
        from dmd.wan.sampler import load_teacher_pipeline

        if self.device.type == "cuda" and self.device.index is not None:
            # the current CUDA device is per thread: this one's is the teacher's, so nothing it runs without
            # naming a device (a library's scratch tensor) lands on cuda:0 beside another slot's teacher
            torch.cuda.set_device(self.device)
        pipe = load_teacher_pipeline(params.model, self.device, flow_shift(params))
        return pipe, LatentDecoder(pipe.vae)

    @classmethod
    def shared(cls, params: Params, slot: DeviceSlot | None = None) -> TeacherWorker:
        """The teacher of `slot` (default: generate.device's first) in this process, loaded on first use."""
        slot = slot or devices(params)[0]
        key = json.dumps(
            [params.model.model_dump(), slot.index, slot.device, flow_shift(params)], sort_keys=True
        )
        with cls._shared_lock:
            if key not in cls._shared:
                cls._shared[key] = cls(params, slot)
            return cls._shared[key]

    def sample(
        self,
        samples: list[Sample],
        params: Params,
        noise_BCTHW: torch.Tensor | None = None,
        decode: bool = True,
    ) -> SampledBatch:
        """Latents, initial noise, uint8 frames (unless not `decode`) and, with generate.save_trajectory, the
        trajectory of `samples`, made on the worker's thread from `noise_BCTHW` (default: drawn from their seeds)."""
        return self._thread.submit(self._sample, samples, params, noise_BCTHW, decode).result()

    def _sample(
        self, samples: list[Sample], params: Params, noise: torch.Tensor | None, decode: bool
    ) -> SampledBatch:
        from dmd.wan.sampler import TeacherSampler

        cfg, model = params.generate, params.model
        start = time.perf_counter()
        sampler = TeacherSampler(
            self.pipe,
            cfg.num_inference_steps,
            cfg.guidance_scale,
            model.negative_prompt,
            model.max_sequence_length,
        )
        shape = sampler.geometry.latent_shape(cfg.height, cfg.width, cfg.num_frames)
        if noise is None:
            noise = torch.stack([initial_noise(s.seed, shape) for s in samples])
        embeds = sampler.encode([s.prompt for s in samples])
        sigmas, trajectory = trajectory_sigmas(params), None
        if sigmas is None:
            latents = sampler.denoise(embeds, noise.to(self.device))
        else:
            latents, trajectory = sampler.denoise_with_trajectory(embeds, noise.to(self.device), sigmas)
            trajectory = trajectory.cpu()
        frames = self.decode(latents) if decode else None  # the whole batch at once, as WanPipeline decodes
        return SampledBatch(latents.float().cpu(), noise, frames, time.perf_counter() - start, trajectory)


# --------------------------------------------------------------------------------------------------------------
# Shards


@dataclass
class ShardResult:
    shard: int
    videos: int  # videos generated by this call (0 when the shard was already complete)
    seconds: float
    sampling_seconds: float
    trajectories: int = 0  # trajectory files written by this call, with their videos or alone
    # the device slot that sampled it ("index:device", dmd.wan.device.DeviceSlot); None when nothing was sampled
    device: str | None = None


def generate_shard(plan: GenerationPlan, shard: int, teacher: TeacherWorker | None = None) -> ShardResult:
    """Generate `shard` unless it is complete; the shard directory appears only when every file is written.
    Without a `teacher`, the shard takes the least busy slot of generate.device for as long as it runs and, when
    it has to sample, that slot's teacher (this process's, loaded on first use)."""
    start = time.perf_counter()
    status = plan.status(shard)
    if status == COMPLETE:
        return ShardResult(shard, 0, time.perf_counter() - start, 0.0)
    if teacher is not None:
        return _make_shard(plan, shard, status, lambda: teacher, start)
    with device_pool(plan.params.generate.device, DEVICE_KEY).lease() as slot:
        return _make_shard(plan, shard, status, lambda: TeacherWorker.shared(plan.params, slot), start)


def _make_shard(
    plan: GenerationPlan, shard: int, status: str, get_teacher: Callable[[], TeacherWorker], start: float
) -> ShardResult:
    if status == MISSING_TRAJECTORIES:
        return _renew_trajectories(plan, shard, get_teacher, start)
    if status == STALE:
        log.warning("%s was made with other settings or lost files; regenerating it", plan.shard_dir(shard))
    cfg = plan.params.generate
    samples = plan.samples(shard)
    final = plan.shard_dir(shard)
    _remove_leftovers(final)
    teacher = get_teacher()
    fingerprint = plan.fingerprint(shard)
    rows, sampling = [], 0.0
    with atomic_dir(final) as tmp:
        for batch in _batches(samples, cfg.batch_size):
            out = teacher.sample(batch, plan.params)
            sampling += out.seconds
            for k, sample in enumerate(batch):
                rows.append(_write_sample(tmp, sample, out, k, plan, fingerprint))
        write_parquet(tmp / MANIFEST, pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    trajectories = len(samples) if plan.trajectory_sigmas is not None else 0
    return ShardResult(
        shard, len(samples), time.perf_counter() - start, sampling, trajectories, str(teacher.slot)
    )


def _renew_trajectories(
    plan: GenerationPlan, shard: int, get_teacher: Callable[[], TeacherWorker], start: float
) -> ShardResult:
    """Bring a shard whose videos, latents and noise are current to the plan's trajectories without touching those
    files: the teacher runs again from each sample's saved noise (its seed's when none was saved), its clean
    latents are checked against the saved ones, and a new shard directory holding the same files (hard links), the
    trajectory files and the updated manifest replaces the old one at once."""
    cfg, sigmas = plan.params.generate, plan.trajectory_sigmas
    final = plan.shard_dir(shard)
    rows = pd.read_parquet(final / MANIFEST)
    for column in MANIFEST_COLUMNS:  # a manifest written before a column existed
        if column not in rows:
            rows[column] = None
    _remove_leftovers(final)
    row_of = {sample_id: i for i, sample_id in enumerate(rows[Manifest.ID])}
    names: list[str | None] = [None] * len(rows)
    sampling, device = 0.0, None
    if sigmas is None:
        log.info("%s: dropping its trajectories (generate.save_trajectory is off)", final)
    else:
        log.info(
            "%s: adding trajectories at σ %s; its videos, latents and noise stay as they are", final, sigmas
        )
    with atomic_dir(final) as tmp:
        for column in _SAMPLE_FILE_COLUMNS:
            for name in rows[column]:
                if isinstance(name, str):
                    _link(final / name, tmp / name)
        if sigmas is not None:
            teacher = get_teacher()
            device = str(teacher.slot)
            for batch in _batches(plan.samples(shard), cfg.batch_size):
                batch_rows = [rows.iloc[row_of[s.id]] for s in batch]
                out = teacher.sample(batch, plan.params, _saved_noise(final, batch_rows), decode=False)
                sampling += out.seconds
                for k, (sample, row) in enumerate(zip(batch, batch_rows)):
                    _check_regenerated(final / row[Manifest.LATENTS], out.latents_BCTHW[k])
                    names[row_of[sample.id]] = _write_trajectory(
                        tmp, sample, out.trajectory_BKCTHW[k], sigmas
                    )
        rows[Manifest.FINGERPRINT] = plan.fingerprint(shard)
        rows[Manifest.TRAJECTORY] = names
        rows[Manifest.TRAJECTORY_SIGMAS] = [None if sigmas is None else list(sigmas) for _ in names]
        write_parquet(tmp / MANIFEST, rows[MANIFEST_COLUMNS])
    written = sum(name is not None for name in names)
    return ShardResult(shard, 0, time.perf_counter() - start, sampling, written, device)


def _link(source: Path, target: Path) -> None:
    """`target` as the same file as `source`: a hard link, or a copy where the file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _saved_noise(shard_dir: Path, rows: list[pd.Series]) -> torch.Tensor | None:
    """The batch's saved initial noise, or None (draw it from the seeds) when a sample has no noise file."""
    from safetensors.torch import load_file

    files = [row[Manifest.NOISE] for row in rows]
    if not all(isinstance(f, str) for f in files):
        return None
    return torch.stack([load_file(shard_dir / f)[TEACHER_NOISE_TENSOR] for f in files])


def _check_regenerated(latents_file: Path, regenerated: torch.Tensor) -> None:
    """A trajectory made now must lead to the saved latents, its clean end point."""
    from safetensors.torch import load_file

    saved = load_file(latents_file)[TEACHER_LATENTS_TENSOR].float()
    if saved.shape == regenerated.shape:
        error = float((regenerated - saved).norm() / saved.norm().clamp_min(torch.finfo(saved.dtype).tiny))
        if error <= REGENERATED_LATENTS_TOLERANCE:
            return
        found = f"ends {error:.3g} (relative) away from them"
    else:
        found = f"gives latents of shape {tuple(regenerated.shape)}, not their {tuple(saved.shape)}"
    raise GenerationError(
        f"{latents_file}: the teacher run again from this sample's noise for generate.save_trajectory {found}, "
        f"so its trajectory would not lead to these latents (another teacher, device or precision made them); "
        f"delete {latents_file.parent} to regenerate the shard whole, or set generate.save_trajectory: false"
    )


def _write_trajectory(
    shard_dir: Path, sample: Sample, trajectory: torch.Tensor, sigmas: tuple[float, ...]
) -> str:
    name = f"{sample.id}.trajectory.safetensors"
    write_safetensors(
        shard_dir / name,
        {TEACHER_TRAJECTORY_TENSOR: trajectory},
        {TRAJECTORY_SIGMAS_METADATA: json.dumps(list(sigmas))},
    )
    return name


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
    latents = noise = trajectory = None
    sigmas = plan.trajectory_sigmas
    if sigmas is not None:
        trajectory = _write_trajectory(shard_dir, sample, out.trajectory_BKCTHW[k], sigmas)
    if cfg.save_latents:
        latents = f"{sample.id}.latents.safetensors"
        write_safetensors(shard_dir / latents, {TEACHER_LATENTS_TENSOR: out.latents_BCTHW[k]})
    if cfg.save_noise:
        noise = f"{sample.id}.noise.safetensors"
        write_safetensors(shard_dir / noise, {TEACHER_NOISE_TENSOR: out.noise_BCTHW[k]})
    return {
        Manifest.ID: sample.id,
        Manifest.PROMPT: sample.prompt,
        Manifest.NEGATIVE_PROMPT: plan.params.model.negative_prompt,
        Manifest.SEED: sample.seed,
        Manifest.STEPS: cfg.num_inference_steps,
        Manifest.GUIDANCE: cfg.guidance_scale,
        Manifest.SHIFT: flow_shift(plan.params),
        Manifest.FRAMES: cfg.num_frames,
        Manifest.FPS: cfg.fps,
        Manifest.WIDTH: cfg.width,
        Manifest.HEIGHT: cfg.height,
        Manifest.TEACHER: plan.params.model.pretrained_model_name_or_path,
        Manifest.TEACHER_REVISION: plan.teacher_revision,
        Manifest.VIDEO: video,
        Manifest.SHA256: sha256_file(shard_dir / video),
        Manifest.LATENTS: latents,
        Manifest.NOISE: noise,
        Manifest.INDEX: sample.index,
        Manifest.PROMPT_ID: sample.prompt_id,
        Manifest.FINGERPRINT: fingerprint,
        Manifest.TRAJECTORY: trajectory,
        Manifest.TRAJECTORY_SIGMAS: None if sigmas is None else list(sigmas),
    }


def write_manifest(plan: GenerationPlan) -> pd.DataFrame:
    """The top-level manifest: every complete shard of the target, in order, with a `shard` column, and the shards
    missing trajectories without their trajectory columns (their videos, latents and noise are current)."""
    tables = []
    for shard in range(plan.num_shards):
        status = plan.status(shard)
        if status not in (COMPLETE, MISSING_TRAJECTORIES):
            continue
        table = pd.read_parquet(plan.shard_dir(shard) / MANIFEST)
        for column in MANIFEST_COLUMNS:  # a manifest written before a column existed
            if column not in table:
                table[column] = None
        if status == MISSING_TRAJECTORIES:
            table[Manifest.TRAJECTORY] = None
            table[Manifest.TRAJECTORY_SIGMAS] = None
        table = table[MANIFEST_COLUMNS]
        table.insert(0, MANIFEST_SHARD, shard)
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
        pd.concat(tables, ignore_index=True)
        if tables
        else pd.DataFrame(columns=[MANIFEST_SHARD, *MANIFEST_COLUMNS])
    )
    write_parquet(plan.output_dir / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------------------
# The stage


# (plan, shards to generate) -> (the ShardResults of those that succeeded, the shards that failed)
ShardRunner = Callable[[GenerationPlan, list[int]], tuple[list[ShardResult], list[int]]]


def run_shards_in_order(plan: GenerationPlan, shards: list[int]) -> tuple[list[ShardResult], list[int]]:
    """The plain ShardRunner: one shard after another in this process; an error stops the stage."""
    return [generate_shard(plan, k) for k in shards], []


class ShardsFailedError(RuntimeError):
    """Some shards failed (after their retries); the complete ones are in the manifest."""


@dataclass
class GenerationReport:
    generated_shards: list[int]  # shards this run wrote videos or trajectories into
    videos: int  # videos this run wrote
    complete_shards: int  # complete shards of the target after the run
    target_shards: int
    trajectories: int = 0  # trajectory files this run wrote (with new videos, or added to existing ones)
    # device slot ("index:device") -> the shards this run sampled on it
    placement: dict[str, list[int]] = field(default_factory=dict)


def generate_teacher_data(
    params: Params,
    shards: str | None = None,
    max_shards: int | None = None,
    run_shards: ShardRunner = run_shards_in_order,
) -> GenerationReport:
    """The generate stage: the missing or stale shards of `shards` ('A:B', default all; at most `max_shards`),
    then the top-level manifest and params.effective.yaml (the settings the stage reads, so a run that generates
    nothing rewrites the same bytes).

    `run_shards` decides where shards run: in order here by default; the Prefect flow passes one that maps them
    over its task runner. Shards that fail there are reported after the manifest of the others is written.
    """
    plan = prepare(params)
    remove_stale_temporaries(plan.output_dir)  # what killed runs were writing; running ones' are kept
    todo = missing_shards(plan, parse_shard_range(shards, plan.num_shards))
    if max_shards is not None:
        todo = todo[:max_shards]
    write_text(plan.output_dir / "params.effective.yaml", dump_stage(params, "generate"))
    log.info(
        "%d shard(s) to generate of %s (target: %d shards, %d videos) into %s",
        len(todo),
        shards or "all",
        plan.num_shards,
        params.generate.num_videos,
        plan.output_dir,
    )
    results, failed = run_shards(plan, todo) if todo else ([], [])
    manifest = write_manifest(plan)
    left = len(missing_shards(plan))
    log.info(
        "%d of %d shard(s) complete, %d video(s) in %s",
        plan.num_shards - left,
        plan.num_shards,
        len(manifest),
        plan.output_dir / MANIFEST,
    )
    if failed:
        raise ShardsFailedError(
            f"shard(s) {sorted(failed)} failed after {params.generate.retries} retries; see the log above"
        )
    return GenerationReport(
        generated_shards=[r.shard for r in results if r.videos or r.trajectories],
        videos=sum(r.videos for r in results),
        complete_shards=plan.num_shards - left,
        target_shards=plan.num_shards,
        trajectories=sum(r.trajectories for r in results),
        placement=_placement(results),
    )


def _placement(results: list[ShardResult]) -> dict[str, list[int]]:
    placement: dict[str, list[int]] = {}
    for r in sorted(results, key=lambda r: r.shard):
        if r.device is not None:
            placement.setdefault(r.device, []).append(r.shard)
    return dict(sorted(placement.items()))
