"""The cache builder: VAE latents and T5 embeddings of every usable clip, written as shards with an index.

Content addressing. A clip's latents are stored under `latent_key` = sha256 of (the video file's bytes, the
preprocessing settings, the bucket rounding and alignment, the VAE's config + weight hashes, and, when taken from
the generate stage, the teacher latents', noise's and, when there is one, trajectory's bytes, so trajectories
added to teacher data re-encode just the clips that gained them). A caption's embedding is stored under `text_key` =
sha256 of (caption, max_sequence_length, text encoder + tokenizer config and weight hashes, precision). A re-run
hashes the sources, reuses every shard entry whose key it finds, encodes only the rest, and rebuilds the index
from the current sources alone, so an old entry is never mixed in; shards nothing refers to any more are deleted.
A shard is written (atomically) before its row table, so an interrupted run keeps what it finished.

Devices. Captions are embedded on the first device of `cache.device`; chunks are encoded one after another there, or,
given an `encode_chunks` that maps them over a task runner (the cache flow does, when `cache.device` lists several
devices), on every device at once, one VAE per device. A chunk's shard is named by its content, so which device
encoded it does not show in the cache.

Latents are the VAE posterior's mode (its mean: deterministic), normalised as diffusers' WanPipeline expects,
`(z - latents_mean) / latents_std`; WanPipeline decodes with `z = latents * latents_std + latents_mean`.
Text embeddings equal `WanPipeline.encode_prompt` (positions past each prompt's length are zero); they are stored
without the zero tail.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from dmd.core.config import ModelConfig, Params, dump_stage
from dmd.core.io import (
    remove_stale_temporaries,
    sha256_file,
    write_json,
    write_parquet,
    write_text,
)
from dmd.core.video import VideoReadError, read_video, video_info
from dmd.data.buckets import Bucket, bucket_size, frame_indices, meets_minimum_size, resize_clip
from dmd.data.cache.shards import COMPRESSION, FORMAT_VERSION, content_digest, read_shard_tables, write_shard
from dmd.data.datasets import (
    PROBLEM_KINDS,
    UNUSABLE_KINDS,
    Problem,
    Source,
    discover,
    file_problem,
    sniff_video,
)
from dmd.data.schema import (
    INDEX,
    INDEX_COLUMNS,
    LATENTS_DIR,
    META,
    PROBLEM_COLUMNS,
    PROBLEMS,
    PROMPT_EMBEDS_TENSOR,
    SUMMARY,
    TEACHER_LATENTS_TENSOR,
    TEACHER_NOISE_TENSOR,
    TEACHER_TRAJECTORY_TENSOR,
    TEXT_DIR,
    TEXT_KEY_METADATA,
    TRAJECTORY_SIGMAS_METADATA,
    Index,
    LatentRows,
    TextRows,
    latents_tensor,
    noise_tensor,
    prompt_embeds_tensor,
    sigmas_cell,
    trajectory_tensor,
)
from dmd.wan.device import DeviceSlot, resolve_devices
from dmd.wan.latents import LatentGeometry, normalize_latents
from dmd.wan.loading import count_truncated, encode_prompts, load_text_encoder, load_vae

log = logging.getLogger(__name__)

DECODE_PROBLEMS = ("not_a_video", "corrupt")  # depend on the bytes alone, so a re-run may reuse them


class NoUsableSamplesError(RuntimeError):
    """Every source was a problem; the message counts them by kind and shows some."""


DEVICE_KEY = "cache.device"


def cache_devices(params: Params) -> list[DeviceSlot]:
    """The slots of cache.device on this machine (DeviceError, a ValueError naming the key, when one is not here)."""
    return resolve_devices(params.cache.device, DEVICE_KEY)


# --------------------------------------------------------------------------------------------------------------
# Model identity and latent geometry


def model_dir(path_or_id: str, revision: str | None, subfolders: list[str]) -> Path:
    """A local directory for a model path or hub id (offline: only what the hub cache already holds)."""
    if Path(path_or_id).exists():
        return Path(path_or_id)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                path_or_id,
                revision=revision,
                allow_patterns=[f"{s}/*" for s in subfolders],
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"),
            )
        )
    except Exception as e:
        raise FileNotFoundError(
            f"model '{path_or_id}' ({', '.join(subfolders)}): not a local directory and not fetchable ({e}); "
            f"set model.pretrained_model_name_or_path / model.pretrained_t5_model_name_or_path to a local "
            f"diffusers Wan directory"
        ) from None


def _config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; is {folder.parent} a diffusers Wan directory?")
    return json.loads(file.read_text())


def model_geometry(cfg: ModelConfig) -> LatentGeometry:
    root = model_dir(cfg.pretrained_model_name_or_path, cfg.revision, ["vae", "transformer"])
    return LatentGeometry.from_configs(_config(root / "transformer"), _config(root / "vae"))


def weight_file_sha256(path: Path) -> str:
    """A weight file's sha256; files in the hub cache are symlinks to blobs already named by it."""
    target = path.resolve()
    if path.is_symlink() and len(target.name) == 64 and all(c in "0123456789abcdef" for c in target.name):
        return target.name
    return sha256_file(path)


def folder_identity(folder: Path) -> dict:
    """Config files verbatim and weight files by hash: what makes a model component what it is."""
    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = f.relative_to(folder).as_posix()
        files[rel] = (
            f.read_text() if f.suffix in (".json", ".txt", ".model") and f.stat().st_size < 1 << 24 else None
        )
        if files[rel] is None:
            files[rel] = weight_file_sha256(f)
    return files


def vae_identity(cfg: ModelConfig) -> str:
    root = model_dir(cfg.pretrained_model_name_or_path, cfg.revision, ["vae"])
    return content_digest({"vae": folder_identity(root / "vae")})


def text_identity(cfg: ModelConfig) -> str:
    root = model_dir(cfg.text_encoder_path, cfg.revision, ["text_encoder", "tokenizer"])
    return content_digest(
        {
            "text_encoder": folder_identity(root / "text_encoder"),
            "tokenizer": folder_identity(root / "tokenizer"),
            "precision": cfg.text_encoder_1_precision,
            "quantize_via": cfg.quantize_via,
            "max_sequence_length": cfg.max_sequence_length,
        }
    )


def latent_key(
    source_sha: str, source: Source, rounding: int, geometry: LatentGeometry, vae_id: str, teacher
) -> str:
    return content_digest(
        {
            "format": FORMAT_VERSION,
            "source": source_sha,
            "preprocessing": source.settings.preprocessing(),
            "aspect_bucket_rounding": rounding,
            "alignment": geometry.alignment,
            "vae": vae_id,
            "teacher": teacher,
        }
    )


def text_key(caption: str, text_id: str) -> str:
    return content_digest({"format": FORMAT_VERSION, "caption": caption, "text": text_id})


def sample_key(latent: str, text: str) -> str:
    return hashlib.sha256(f"{latent}:{text}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Planning: hash the sources, reuse what the shards hold, list what must be encoded


@dataclass(frozen=True)
class WorkItem:
    """A source whose latents are not in the cache yet."""

    source: Source
    source_sha: str
    latent_key: str
    teacher_latents: bool  # the generate stage's exact latents may be taken


@dataclass
class Plan:
    output_dir: Path
    geometry: LatentGeometry
    vae_id: str
    text_id: str
    sources: list[tuple[Source, str, str]]  # (source, source_sha, latent_key) for every hashable source
    available: pd.DataFrame  # latent shard rows found, one per latent_key
    work: list[WorkItem]
    problems: list[Problem]
    problem_sha: dict[str, str]  # path -> source sha of hashed problem files
    shard_dirs: list[Path]
    started: float = field(default_factory=time.perf_counter)

    def chunks(self, chunk_size: int) -> list[list[WorkItem]]:
        """Work split per shard directory into chunks of `chunk_size` (one shard each)."""
        by_dir: dict[Path, list[WorkItem]] = {}
        for item in self.work:
            by_dir.setdefault(item.source.settings.shard_dir, []).append(item)
        return [
            items[i : i + chunk_size] for items in by_dir.values() for i in range(0, len(items), chunk_size)
        ]


def plan_cache(params: Params) -> Plan:
    cfg = params.cache
    out = Path(cfg.output_dir)
    geometry = model_geometry(params.model)
    vae_id, text_id = vae_identity(params.model), text_identity(params.model)
    sources, problems = discover(cfg, geometry.temporal_factor)
    shard_dirs = sorted(
        {*(p for p in (out / LATENTS_DIR).glob("*") if p.is_dir()), *(s.settings.shard_dir for s in sources)}
    )
    for folder in (out, *shard_dirs):  # the cache is kept across runs: a killed run's temporaries go now
        for path in remove_stale_temporaries(folder):
            log.info("removed %s, left by a run that was stopped", path)
    available = read_shard_tables(shard_dirs)
    if len(available):
        available = available.drop_duplicates(LatentRows.LATENT_KEY).set_index(
            LatentRows.LATENT_KEY, drop=False
        )
    cached = set(available.index) if len(available) else set()
    known_bad = _previous_decode_problems(out)

    checked = _map_threads(_check_and_hash, sources, max(1, cfg.num_workers))
    planned, work, problem_sha, queued = [], [], {}, set()
    for source, (sha, problem) in zip(sources, checked):
        if problem is not None:
            problems.append(problem)
            continue
        teacher = _teacher_digest(source, sha, params) if cfg.use_teacher_latents else None
        key = latent_key(sha, source, cfg.aspect_bucket_rounding, geometry, vae_id, teacher)
        if key not in cached:
            if sha in known_bad:
                kind, reason = known_bad[sha]
                problems.append(Problem(source.dataset, str(source.path), kind, f"{source.path}: {reason}"))
                problem_sha[str(source.path)] = sha
                continue
            if key not in queued:
                queued.add(key)
                work.append(WorkItem(source, sha, key, teacher is not None))
        planned.append((source, sha, key))
    log.info(
        "cache plan: %d sources, %d already cached, %d to encode, %d problems",
        len(planned) + len(problems),
        len(planned) - len(work),
        len(work),
        len(problems),
    )
    return Plan(out, geometry, vae_id, text_id, planned, available, work, problems, problem_sha, shard_dirs)


def _check_and_hash(source: Source) -> tuple[str | None, Problem | None]:
    problem = file_problem(source.dataset, source.path)
    if problem is not None:
        return None, problem
    try:
        return sha256_file(source.path), None
    except OSError as e:
        return None, Problem(
            source.dataset, str(source.path), "unreadable", f"{source.path}: cannot be read ({e})"
        )


def _teacher_digest(source: Source, sha: str, params: Params) -> dict | None:
    """The teacher files' identity when their latents are exactly this clip's, else None (encode the video)."""
    t, s = source.teacher, source.settings
    if t is None or t.latents is None or not t.latents.is_file() or t.sha256 != sha:
        return None
    if t.frames != s.num_frames or s.frame_interval != 1 or t.height is None or t.width is None:
        return None
    if t.teacher is not None and not _same_model(t.teacher, params.model.pretrained_model_name_or_path):
        return None
    noise = t.noise if t.noise is not None and t.noise.is_file() else None
    digest = {"latents": sha256_file(t.latents), "noise": sha256_file(noise) if noise else None}
    # absent without a trajectory, so the entries of clips that have none keep their keys
    if t.trajectory is not None and t.trajectory.is_file():
        digest["trajectory"] = sha256_file(t.trajectory)
    return digest


def _same_model(a: str, b: str) -> bool:
    pa_, pb = Path(a), Path(b)
    if pa_.exists() and pb.exists():
        return pa_.resolve() == pb.resolve()
    return a == b


def _previous_decode_problems(out: Path) -> dict[str, tuple[str, str]]:
    file = out / PROBLEMS
    if not file.is_file():
        return {}
    table = pd.read_parquet(file)
    table = table[table["kind"].isin(DECODE_PROBLEMS) & table["source_sha256"].notna()]
    return {r.source_sha256: (r.kind, r.reason.removeprefix(f"{r.path}: ")) for r in table.itertuples()}


# --------------------------------------------------------------------------------------------------------------
# Encoding: read + resize in worker threads, VAE in the calling thread, one shard per chunk


@dataclass
class ChunkResult:
    rows: pd.DataFrame  # shard rows, one per encoded latent_key
    problems: list[Problem]
    problem_sha: dict[str, str]
    clips: int  # items processed
    seconds: float


@dataclass
class _Prepared:
    item: WorkItem
    bucket: Bucket | None = None
    info: tuple[int, int, int] = (0, 0, 0)  # source frames, height, width
    pixels: torch.Tensor | None = None  # (3,F,H,W) in [-1,1]
    latents: torch.Tensor | None = None  # teacher latents (C,T,H,W)
    noise: torch.Tensor | None = None
    trajectory: torch.Tensor | None = None  # teacher trajectory (K,C,T,H,W)
    trajectory_sigmas: tuple[float, ...] | None = None
    problem: Problem | None = None


# Wan's VAE keeps per-call feature caches: one encode at a time per VAE (one VAE per device slot, each with its own
# lock); the text encoder takes this one
_MODEL_LOCK = threading.Lock()


# One load at a time: loading (accelerate's init_empty_weights, which diffusers and transformers use) patches
# torch.nn.Module for the whole process while it builds a model, so two loads in two threads can leave each other's
# weights on the meta device.
_LOAD_LOCK = threading.Lock()


@functools.cache  # one per device slot of the run; finalize_cache frees them
def _vae(model_json: str, slot: DeviceSlot) -> tuple[object, threading.Lock]:
    with _LOAD_LOCK:
        return load_vae(ModelConfig.model_validate_json(model_json), slot.device), threading.Lock()


@functools.lru_cache(maxsize=1)
def _text_encoder(model_json: str, device: str):
    with _LOAD_LOCK:
        return load_text_encoder(ModelConfig.model_validate_json(model_json), device)


def encode_chunk(
    params: Params, plan: Plan, items: list[WorkItem], device: str | DeviceSlot | None = None
) -> ChunkResult:
    """Encode `items` (one shard directory) into one shard with the VAE of `device` (a device name or slot;
    default: cache.device's first); unusable files come back as problems."""
    started = time.perf_counter()
    cfg, geometry = params.cache, plan.geometry
    slot = _slot(params, device)
    latents: dict[str, torch.Tensor] = {}
    rows, problems, problem_sha = [], [], {}
    pending: dict[Bucket, list[_Prepared]] = {}

    def add(prep: _Prepared, z: torch.Tensor, source: str) -> None:
        key = prep.item.latent_key
        latents[latents_tensor(key)] = z
        if prep.noise is not None:
            latents[noise_tensor(key)] = prep.noise
        if prep.trajectory is not None:
            latents[trajectory_tensor(key)] = prep.trajectory
        rows.append(
            {
                LatentRows.LATENT_KEY: key,
                LatentRows.BUCKET: prep.bucket.name,
                LatentRows.LATENT_SHAPE: list(z.shape),
                LatentRows.DTYPE: str(z.dtype).removeprefix("torch."),
                LatentRows.COMPRESSION: COMPRESSION if cfg.compress_disk_cache else "none",
                LatentRows.HAS_NOISE: prep.noise is not None,
                LatentRows.LATENTS_FROM: source,
                LatentRows.SOURCE_FRAMES: prep.info[0],
                LatentRows.SOURCE_HEIGHT: prep.info[1],
                LatentRows.SOURCE_WIDTH: prep.info[2],
                LatentRows.TRAJECTORY_SIGMAS: (
                    None if prep.trajectory is None else list(prep.trajectory_sigmas)
                ),
            }
        )

    def flush(bucket: Bucket) -> None:
        batch = pending.pop(bucket)
        vae, lock = _vae(params.model.model_dump_json(), slot)
        z = encode_pixels(vae, torch.stack([p.pixels for p in batch]), geometry, lock)
        for prep, zi in zip(batch, z):
            add(prep, zi.clone(), "vae")

    prepare = functools.partial(_prepare, cfg=cfg, geometry=geometry)
    window = max(1, cfg.num_workers) + cfg.vae_batch_size
    for prep in _map_threads_ordered(prepare, items, cfg.num_workers, window):
        if prep.problem is not None:
            problems.append(prep.problem)
            problem_sha[prep.problem.path] = prep.item.source_sha
        elif prep.latents is not None:
            add(prep, prep.latents, "teacher")
        else:
            pending.setdefault(prep.bucket, []).append(prep)
            if len(pending[prep.bucket]) >= cfg.vae_batch_size:
                flush(prep.bucket)
    for bucket in list(pending):
        flush(bucket)

    table = pd.DataFrame(rows)
    if rows:
        name = "shard-" + content_digest(sorted(r[LatentRows.LATENT_KEY] for r in rows))[:20]
        folder = items[0].source.settings.shard_dir
        write_shard(folder / f"{name}.safetensors", latents, cfg.compress_disk_cache)
        table = table.assign(**{LatentRows.SHARD: f"{name}.safetensors"})
        write_parquet(folder / f"{name}.parquet", table)
        table = table.assign(**{LatentRows.PATH: str(folder / f"{name}.safetensors")})
    return ChunkResult(table, problems, problem_sha, len(items), time.perf_counter() - started)


def _slot(params: Params, device: str | DeviceSlot | None) -> DeviceSlot:
    if isinstance(device, DeviceSlot):
        return device
    return DeviceSlot(0, device) if device else cache_devices(params)[0]


@torch.no_grad()
def encode_pixels(
    vae, pixels_BCFHW: torch.Tensor, geometry: LatentGeometry, lock: threading.Lock = _MODEL_LOCK
) -> torch.Tensor:
    """Normalised latents (B,C,T,H,W) in float32: the posterior's mode, `(z - latents_mean) / latents_std`."""
    with lock:
        z = vae.encode(pixels_BCFHW.to(vae.device, vae.dtype)).latent_dist.mode()
    return normalize_latents(z.float().cpu(), geometry.latents_mean, geometry.latents_std)


def _prepare(item: WorkItem, cfg, geometry: LatentGeometry) -> _Prepared:
    """Probe, check and read one clip (runs in a worker thread)."""
    source, s = item.source, item.source.settings
    prep = _Prepared(item)

    def fail(kind: str, reason: str) -> _Prepared:
        prep.problem = Problem(source.dataset, str(source.path), kind, f"{source.path}: {reason}")
        return prep

    try:
        if not sniff_video(source.path):
            return fail("not_a_video", "not a video container (unknown file signature)")
        frames, height, width, _ = video_info(source.path)
    except VideoReadError as e:
        return fail("corrupt", str(e).removeprefix(f"{source.path}: "))
    except OSError as e:
        return fail("unreadable", f"cannot be read ({e.strerror or e})")
    prep.info = (frames, height, width)
    indices = frame_indices(s.num_frames, s.frame_interval)
    if frames <= indices[-1]:
        return fail(
            "too_few_frames",
            f"{frames} frames; needs {indices[-1] + 1} for num_frames={s.num_frames} at frame_interval="
            f"{s.frame_interval}",
        )
    if not meets_minimum_size(height, width, s.resolution_type, s.minimum_image_size):
        return fail(
            "too_small",
            f"{width}x{height} is below minimum_image_size={s.minimum_image_size} ({s.resolution_type})",
        )
    h, w = bucket_size(
        height, width, s.resolution_type, s.resolution, cfg.aspect_bucket_rounding, geometry.alignment
    )
    prep.bucket = Bucket(s.num_frames, h, w)
    if item.teacher_latents and _take_teacher(prep, geometry):
        return prep
    try:
        pixels = read_video(source.path, indices)
    except VideoReadError as e:
        return fail("corrupt", str(e).removeprefix(f"{source.path}: "))
    prep.pixels = resize_clip(torch.from_numpy(pixels), h, w, s.crop)
    return prep


def _take_teacher(prep: _Prepared, geometry: LatentGeometry) -> bool:
    """Use the generate stage's latents when the video is whole and at its bucket's size; else encode it."""
    teacher, bucket = prep.item.source.teacher, prep.bucket
    if prep.info != (bucket.frames, bucket.height, bucket.width):
        return False
    from safetensors.torch import load_file

    latents = load_file(str(teacher.latents))[TEACHER_LATENTS_TENSOR].float()
    if tuple(latents.shape) != geometry.latent_shape(bucket.height, bucket.width, bucket.frames):
        return False
    noise = (
        load_file(str(teacher.noise))[TEACHER_NOISE_TENSOR].float()
        if teacher.noise is not None and teacher.noise.is_file()
        else None
    )
    prep.latents = latents
    prep.noise = noise if noise is not None and noise.shape == latents.shape else None
    if teacher.trajectory is not None and teacher.trajectory.is_file():
        with safe_open(str(teacher.trajectory), framework="pt") as f:
            trajectory = f.get_tensor(TEACHER_TRAJECTORY_TENSOR).float()
            sigmas = json.loads((f.metadata() or {}).get(TRAJECTORY_SIGMAS_METADATA, "null"))
        # a trajectory that does not say its σs, or does not fit the clip, is left out rather than guessed at
        if sigmas is not None and tuple(trajectory.shape) == (len(sigmas), *latents.shape):
            prep.trajectory, prep.trajectory_sigmas = trajectory, tuple(float(s) for s in sigmas)
    return True


def encode_texts(params: Params, plan: Plan, device: str | None = None) -> pd.DataFrame:
    """Embed every caption of the plan not yet in text/, and the negative and empty prompts when they changed.

    Returns the text shard rows of the captions (reused and new), one per text_key.
    """
    cfg, text_dir = params.cache, plan.output_dir / TEXT_DIR
    device = device or _slot(params, None).device
    captions = sorted({source.caption for source, _, _ in plan.sources})
    keys = {c: text_key(c, plan.text_id) for c in captions}
    available = read_shard_tables([text_dir])
    have = set(available[TextRows.TEXT_KEY]) if len(available) else set()
    todo = [c for c in captions if keys[c] not in have]
    specials = {"negative": params.model.negative_prompt, "empty": ""}
    stale = {
        name: p
        for name, p in specials.items()
        if _special_key(text_dir / f"{name}.safetensors") != text_key(p, plan.text_id)
    }
    if todo or stale:
        tokenizer, encoder = _text_encoder(params.model.model_dump_json(), device)
        truncated = count_truncated(tokenizer, todo, params.model.max_sequence_length) if todo else []
        if truncated:
            log.warning(
                "%d caption(s) are longer than model.max_sequence_length=%d tokens and are truncated, as "
                "WanPipeline truncates them; e.g. %r",
                len(truncated),
                params.model.max_sequence_length,
                todo[truncated[0]][:120],
            )
        embed = functools.partial(
            _embed, tokenizer=tokenizer, encoder=encoder, max_len=params.model.max_sequence_length
        )
        for name, prompt in stale.items():
            embeds, _ = embed([prompt])
            write_shard(
                text_dir / f"{name}.safetensors",
                {PROMPT_EMBEDS_TENSOR: embeds},
                compress=False,
                extra={TEXT_KEY_METADATA: text_key(prompt, plan.text_id)},
            )
        tensors, rows = {}, []
        for i in range(0, len(todo), cfg.text_batch_size):
            batch = todo[i : i + cfg.text_batch_size]
            embeds, lengths = embed(batch)
            for caption, e, n in zip(batch, embeds, lengths):
                tensors[prompt_embeds_tensor(keys[caption])] = e[:n].clone()
                rows.append(
                    {
                        TextRows.TEXT_KEY: keys[caption],
                        TextRows.CAPTION: caption,
                        TextRows.TEXT_LENGTH: int(n),
                        TextRows.DTYPE: str(e.dtype).removeprefix("torch."),
                    }
                )
        if rows:
            name = "shard-" + content_digest(sorted(r[TextRows.TEXT_KEY] for r in rows))[:20]
            write_shard(text_dir / f"{name}.safetensors", tensors, cfg.compress_disk_cache)
            table = pd.DataFrame(rows).assign(**{TextRows.SHARD: f"{name}.safetensors"})
            write_parquet(text_dir / f"{name}.parquet", table)
        _text_encoder.cache_clear()  # the text encoder is not needed again in this run; free its memory
        log.info(
            "text: %d caption(s) embedded, %d reused; special prompts re-embedded: %s",
            len(todo),
            len(captions) - len(todo),
            sorted(stale) or "none",
        )
        available = read_shard_tables([text_dir])
    if not len(available):
        columns = [TextRows.TEXT_KEY, TextRows.CAPTION, TextRows.TEXT_LENGTH, TextRows.DTYPE, TextRows.SHARD]
        return pd.DataFrame(columns=[*columns, TextRows.PATH, "new"])
    available = available[available[TextRows.TEXT_KEY].isin(set(keys.values()))].drop_duplicates(
        TextRows.TEXT_KEY
    )
    return available.assign(new=available[TextRows.TEXT_KEY].isin({keys[c] for c in todo}))


def _embed(prompts: list[str], tokenizer, encoder, max_len: int) -> tuple[torch.Tensor, list[int]]:
    with _MODEL_LOCK:
        embeds = encode_prompts(tokenizer, encoder, prompts, max_len).cpu()
    lengths = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True).attention_mask
    return embeds, [int(sum(m)) for m in lengths]


def _special_key(path: Path) -> str | None:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(TEXT_KEY_METADATA)


# --------------------------------------------------------------------------------------------------------------
# Finishing: index, problems, metadata, clean-up


@dataclass
class CacheSummary:
    sources: int
    samples: int  # rows of the index
    encoded: int  # clips whose latents were computed in this run (VAE or teacher)
    from_teacher: int
    reused: int
    captions_embedded: int
    problems: dict[str, int]
    seconds: float
    buckets: dict[str, int]

    @property
    def clips_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        probs = ", ".join(f"{k} {v}" for k, v in self.problems.items()) or "none"
        return (
            f"{self.samples} samples cached ({self.encoded} encoded, {self.from_teacher} from teacher latents, "
            f"{self.reused} reused) from {self.sources} sources in {self.seconds:.1f}s "
            f"({self.clips_per_second:.2f} clips/s); {self.captions_embedded} captions embedded; "
            f"problems: {probs}; buckets: {self.buckets}"
        )


def finalize_cache(
    params: Params, plan: Plan, results: list[ChunkResult], text_rows: pd.DataFrame
) -> CacheSummary:
    """Write index.parquet, problems.parquet, meta.json and summary.json; delete unreferenced shards."""
    cfg, out = params.cache, plan.output_dir
    new_rows = [r.rows for r in results if len(r.rows)]
    latents = (
        pd.concat([plan.available.reset_index(drop=True), *new_rows], ignore_index=True)
        if new_rows
        else plan.available
    )
    if len(latents):
        latents = latents.drop_duplicates(LatentRows.LATENT_KEY, keep="last").set_index(
            LatentRows.LATENT_KEY, drop=False
        )
    problems = list(plan.problems) + [p for r in results for p in r.problems]
    problem_sha = {**plan.problem_sha, **{k: v for r in results for k, v in r.problem_sha.items()}}
    failed = {p.path for p in problems}
    texts = text_rows.set_index(TextRows.TEXT_KEY, drop=False) if len(text_rows) else pd.DataFrame()

    rows, seen = [], set()
    for source, sha, key in plan.sources:
        if str(source.path) in failed or key not in latents.index:
            continue
        entry = latents.loc[key]
        if not meets_minimum_size(
            int(entry[LatentRows.SOURCE_HEIGHT]),
            int(entry[LatentRows.SOURCE_WIDTH]),
            source.settings.resolution_type,
            source.settings.minimum_image_size,
        ):
            problems.append(
                Problem(
                    source.dataset,
                    str(source.path),
                    "too_small",
                    f"{source.path}: {entry[LatentRows.SOURCE_WIDTH]}x{entry[LatentRows.SOURCE_HEIGHT]} is below minimum_image_size={source.settings.minimum_image_size}",
                )
            )
            problem_sha[str(source.path)] = sha
            continue
        tk = text_key(source.caption, plan.text_id)
        key_ = sample_key(key, tk)
        if key_ in seen:
            continue
        seen.add(key_)
        text = texts.loc[tk]
        rows.append(
            {
                Index.KEY: key_,
                Index.DATASET: source.dataset,
                Index.SOURCE: str(source.path),
                Index.CAPTION: source.caption,
                Index.BUCKET: entry[LatentRows.BUCKET],
                Index.LATENT_SHAPE: [int(v) for v in entry[LatentRows.LATENT_SHAPE]],
                Index.DTYPE: entry[LatentRows.DTYPE],
                Index.SHARD: os.path.relpath(entry[LatentRows.PATH], out),
                Index.LATENT_KEY: key,
                Index.TEXT_KEY: tk,
                Index.TEXT_SHARD: os.path.relpath(Path(text[TextRows.PATH]), out),
                Index.TEXT_LENGTH: int(text[TextRows.TEXT_LENGTH]),
                Index.HAS_NOISE: bool(entry[LatentRows.HAS_NOISE]),
                Index.LATENTS_FROM: entry[LatentRows.LATENTS_FROM],
                Index.REPEATS: source.settings.repeats,
                Index.SOURCE_SHA256: sha,
                Index.SOURCE_FRAMES: int(entry[LatentRows.SOURCE_FRAMES]),
                Index.SOURCE_HEIGHT: int(entry[LatentRows.SOURCE_HEIGHT]),
                Index.SOURCE_WIDTH: int(entry[LatentRows.SOURCE_WIDTH]),
                Index.TRAJECTORY_SIGMAS: _trajectory_sigmas(entry),
            }
        )
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    problem_table = _problem_table(problems, problem_sha, cfg.delete_problematic_images)
    write_parquet(out / PROBLEMS, problem_table)
    counts = problem_table["kind"].value_counts().to_dict()
    if index.empty:
        examples = "\n".join(f"  {p.kind}: {p.reason}" for p in problems[:10])
        raise NoUsableSamplesError(
            f"no usable sample among {len(plan.sources) + len(plan.problems)} source(s) of cache.datasets "
            f"{[d.id for d in cfg.datasets if not d.disabled]}; problems by kind {counts} "
            f"(all listed in {out / PROBLEMS}):\n{examples}"
        )
    write_parquet(out / INDEX, index)
    write_json(
        out / META,
        {
            "format": FORMAT_VERSION,
            "vae": plan.vae_id,
            "text_encoder": plan.text_id,
            "max_sequence_length": params.model.max_sequence_length,
            "latent_channels": plan.geometry.latent_channels,
            "temporal_factor": plan.geometry.temporal_factor,
            "spatial_factor": plan.geometry.spatial_factor,
            "alignment": plan.geometry.alignment,
            "latents_mean": list(plan.geometry.latents_mean),
            "latents_std": list(plan.geometry.latents_std),
            "disable_bucket_pruning": cfg.disable_bucket_pruning,
        },
    )
    _remove_unreferenced(out, plan.shard_dirs, index)
    _vae.cache_clear()
    encoded = sum(len(r.rows) for r in results)
    encoded_keys = {k for r in results if len(r.rows) for k in r.rows[LatentRows.LATENT_KEY]}
    summary = CacheSummary(
        sources=len(plan.sources) + len(plan.problems),
        samples=len(index),
        encoded=encoded,
        from_teacher=sum(
            int((r.rows[LatentRows.LATENTS_FROM] == "teacher").sum()) for r in results if len(r.rows)
        ),
        reused=len(index) - int(index[Index.LATENT_KEY].isin(encoded_keys).sum()),
        captions_embedded=int(text_rows["new"].sum()) if "new" in text_rows else 0,
        problems={k: int(counts.get(k, 0)) for k in PROBLEM_KINDS if counts.get(k)},
        seconds=time.perf_counter() - plan.started,
        buckets=index[Index.BUCKET].value_counts().sort_index().to_dict(),
    )
    # what the cache holds, not what this run did: a rerun that changes nothing rewrites the same bytes
    write_json(
        out / SUMMARY,
        {
            "sources": summary.sources,
            "samples": summary.samples,
            "teacher_latents": int((index[Index.LATENTS_FROM] == "teacher").sum()),
            "problems": summary.problems,
            "buckets": summary.buckets,
        },
    )
    log.info("cache: %s", summary.line())
    return summary


def _trajectory_sigmas(entry: pd.Series) -> list[float] | None:
    """A latents entry's trajectory σs; row tables written before trajectories have no such column."""
    sigmas = sigmas_cell(entry.get(LatentRows.TRAJECTORY_SIGMAS))
    return None if sigmas is None else list(sigmas)


def _problem_table(problems: list[Problem], problem_sha: dict[str, str], delete: bool) -> pd.DataFrame:
    rows = []
    for p in problems:
        deleted = False
        if delete and p.kind in UNUSABLE_KINDS and Path(p.path).is_file():
            Path(p.path).unlink()
            deleted = True
            log.warning("deleted problematic file %s (%s)", p.path, p.kind)
        rows.append({**p.__dict__, "source_sha256": problem_sha.get(p.path), "deleted": deleted})
    table = pd.DataFrame(rows, columns=PROBLEM_COLUMNS).astype({"source_sha256": "string"})
    # one order whether a problem was found in this run or remembered from the last one
    return table.sort_values(["dataset", "path", "kind"], kind="stable", ignore_index=True)


def _remove_unreferenced(out: Path, shard_dirs: list[Path], index: pd.DataFrame) -> None:
    """Delete shards (and their row tables) that no index row refers to any more."""
    shards = [*index[Index.SHARD], *index[Index.TEXT_SHARD]]
    used = {(out / s).resolve() for s in shards}
    for folder in [*shard_dirs, out / TEXT_DIR]:
        for shard in Path(folder).glob("shard-*.safetensors"):
            if shard.resolve() not in used:
                shard.with_suffix(".parquet").unlink(missing_ok=True)
                shard.unlink(missing_ok=True)


# (params, plan, chunks, device slots) -> one ChunkResult per chunk, in the chunks' order
ChunkEncoder = Callable[[Params, Plan, list[list[WorkItem]], list[DeviceSlot]], list[ChunkResult]]


def encode_in_order(
    params: Params, plan: Plan, chunks: list[list[WorkItem]], slots: list[DeviceSlot]
) -> list[ChunkResult]:
    """The plain ChunkEncoder: one chunk after another, on the first slot."""
    results = []
    for chunk in chunks:
        results.append(encode_chunk(params, plan, chunk, slots[0]))
        log.info("cache %s", progress_line(results, len(chunks)))
    return results


def build_cache(
    params: Params, device: str | None = None, encode_chunks: ChunkEncoder = encode_in_order
) -> CacheSummary:
    """The whole stage: plan, embed captions, encode chunks (`encode_chunks` decides where: in order on the first
    device by default, on every device of cache.device in the flow), finish. `device` overrides cache.device with
    one device (tests, benchmarks)."""
    slots = [DeviceSlot(0, device)] if device else cache_devices(params)
    plan = plan_cache(params)
    text_rows = encode_texts(params, plan, slots[0].device)
    results = encode_chunks(params, plan, plan.chunks(params.cache.chunk_size), slots)
    return finalize_cache(params, plan, results, text_rows)


def progress_line(results: list[ChunkResult], total_chunks: int) -> str:
    """`chunk i/n: clips, clips/s, problems` over the chunks done so far."""
    clips = sum(r.clips for r in results)
    seconds = sum(r.seconds for r in results)
    problems = sum(len(r.problems) for r in results)
    return (
        f"chunk {len(results)}/{total_chunks}: {clips} clips, {clips / max(seconds, 1e-9):.2f} clips/s, "
        f"{problems} problems"
    )


def write_effective_params(params: Params) -> Path:
    """The settings this cache was built with, beside it (`params.effective.yaml`)."""
    path = Path(params.cache.output_dir) / "params.effective.yaml"
    write_text(path, dump_stage(params, "cache"))
    return path


# --------------------------------------------------------------------------------------------------------------
# Threads


def _map_threads(fn: Callable, items: list, workers: int) -> list:
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _map_threads_ordered(fn: Callable, items: list, workers: int, window: int) -> Iterator:
    """`map(fn, items)` in `workers` background threads, at most `window` results ahead of the consumer."""
    if workers == 0:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="cache-read") as pool:
        it = iter(items)
        pending = deque(pool.submit(fn, x) for x in islice(it, window))
        while pending:
            result = pending.popleft().result()
            for x in islice(it, 1):
                pending.append(pool.submit(fn, x))
            yield result
