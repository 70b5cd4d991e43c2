"""Dataset discovery: which videos, with which captions, under which preprocessing settings.

Two kinds of dataset (`cache.datasets[i]`):
- `manifest`: the generate stage's output (`manifest.parquet` rows with `video` relative to the row's shard,
  optional exact `latents` / `noise` files), or any parquet in that format;
- `instance_data_dir`: a folder of videos, each with a sidecar caption `clip.txt` beside `clip.mp4`
  (`caption_strategy: textfile`) or captioned by its file name (`caption_strategy: filename`).

Files that cannot be used are returned as `Problem`s (never raised), so one bad file never stops the stage.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dmd.core.config import CacheConfig, DatasetConfig
from dmd.data.buckets import snap_frames
from dmd.data.schema import MANIFEST, MANIFEST_SHARD, Manifest, teacher_shard_name

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")


class DatasetError(ValueError):
    """A dataset that cannot be listed at all (missing folder or manifest, missing column)."""


@dataclass(frozen=True)
class Problem:
    """A file left out of the cache. `kind` is one of PROBLEM_KINDS; `reason` says what was found."""

    dataset: str
    path: str
    kind: str
    reason: str


PROBLEM_KINDS = (
    "missing_file",  # the path does not exist
    "unreadable",  # exists but cannot be read (permissions, a directory)
    "empty_file",  # 0 bytes
    "not_a_video",  # no known video container signature
    "corrupt",  # a video container that does not decode (truncated, damaged)
    "too_few_frames",  # shorter than num_frames at frame_interval
    "too_small",  # below minimum_image_size
    "missing_caption",  # no sidecar .txt / no caption in the manifest row
    "empty_caption",  # caption is blank
)
# Kinds whose file is unusable as video data at all: the only ones `cache.delete_problematic_images` deletes.
# The others are valid videos left out for their caption, size or length, or files this process cannot read.
UNUSABLE_KINDS = ("empty_file", "not_a_video", "corrupt")


@dataclass(frozen=True)
class DatasetSettings:
    """A dataset's settings with the `cache` section's defaults filled in and frames snapped to 4k+1."""

    id: str
    num_frames: int
    frame_interval: int
    resolution_type: str
    resolution: float
    minimum_image_size: float
    crop: bool
    repeats: int
    shard_dir: Path

    def preprocessing(self) -> dict:
        """Everything that changes the pixels given to the VAE (part of each cache key)."""
        return {
            "num_frames": self.num_frames,
            "frame_interval": self.frame_interval,
            "resolution_type": self.resolution_type,
            "resolution": float(self.resolution),
            "crop": self.crop,
        }


@dataclass(frozen=True)
class TeacherFiles:
    """What the generate stage recorded for a video: its exact latents/noise/trajectory and the video it wrote."""

    latents: Path | None
    noise: Path | None
    sha256: str | None
    frames: int | None
    height: int | None
    width: int | None
    teacher: str | None
    trajectory: Path | None = None


@dataclass(frozen=True)
class Source:
    """One candidate sample: a video file and its caption."""

    settings: DatasetSettings
    path: Path
    caption: str
    teacher: TeacherFiles | None = None

    @property
    def dataset(self) -> str:
        return self.settings.id


def resolve_settings(cfg: CacheConfig, ds: DatasetConfig, temporal_factor: int = 4) -> DatasetSettings:
    frames = snap_frames(ds.num_frames, temporal_factor)
    if frames != ds.num_frames:
        log.warning(
            "dataset '%s': num_frames=%d snapped to %d (%dk+1 frames per clip)",
            ds.id,
            ds.num_frames,
            frames,
            temporal_factor,
        )
    return DatasetSettings(
        id=ds.id,
        num_frames=frames,
        frame_interval=ds.frame_interval,
        resolution_type=ds.resolution_type or cfg.resolution_type,
        resolution=ds.resolution if ds.resolution is not None else cfg.resolution,
        minimum_image_size=ds.minimum_image_size
        if ds.minimum_image_size is not None
        else cfg.minimum_image_size,
        crop=ds.crop,
        repeats=ds.repeats,
        shard_dir=Path(ds.cache_dir) if ds.cache_dir else Path(cfg.output_dir) / "latents" / ds.id,
    )


def check_datasets(cfg: CacheConfig) -> None:
    """Raise a DatasetError naming the key and the fix for a dataset that cannot be listed at all: an id used
    twice, a manifest that is not there, a folder that is not a directory. No file is read, so the `dmd cache`
    command checks this before Prefect starts."""
    ids = [ds.id for ds in cfg.datasets]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DatasetError(
            f"cache.datasets: ids {dupes} are used more than once; give each dataset its own id"
        )
    for i, ds in enumerate(cfg.datasets):
        key = f"cache.datasets[{i}]"
        if ds.disabled:
            continue
        if ds.manifest is not None and not manifest_files(Path(ds.manifest)):
            raise DatasetError(
                f"{key}.manifest: '{ds.manifest}' has no {MANIFEST} (nor shard-*/{MANIFEST}); run `dmd generate` "
                "first or point it at a manifest"
            )
        if ds.instance_data_dir is not None and not Path(ds.instance_data_dir).is_dir():
            raise DatasetError(
                f"{key}.instance_data_dir: '{ds.instance_data_dir}' is not a directory; point it at a folder of "
                "videos with their captions"
            )


def discover(cfg: CacheConfig, temporal_factor: int = 4) -> tuple[list[Source], list[Problem]]:
    """All enabled datasets' candidate samples, and the files already known to be unusable (caption problems)."""
    check_datasets(cfg)
    sources: list[Source] = []
    problems: list[Problem] = []
    for i, ds in enumerate(cfg.datasets):
        if ds.disabled:
            continue
        settings = resolve_settings(cfg, ds, temporal_factor)
        if ds.manifest is not None:
            found, bad = _from_manifest(settings, ds, f"cache.datasets[{i}]")
        else:
            found, bad = _from_folder(settings, ds)
        sources += found
        problems += bad
    return sources, problems


def manifest_files(path: Path) -> list[tuple[Path, Path]]:
    """(manifest parquet, directory its paths are relative to) for a manifest file or a generate output dir."""
    if path.is_file():
        return [(path, path.parent)]
    top = path / MANIFEST
    if top.is_file():
        return [(top, path)]
    return [(m, m.parent) for m in sorted(path.glob(f"shard-*/{MANIFEST}"))]


def _from_manifest(
    settings: DatasetSettings, ds: DatasetConfig, key: str
) -> tuple[list[Source], list[Problem]]:
    sources, problems = [], []
    for manifest, base in manifest_files(Path(ds.manifest)):  # check_datasets found at least one
        table = pd.read_parquet(manifest)
        for column in (Manifest.VIDEO, ds.caption_column):
            if column not in table.columns:
                raise DatasetError(
                    f"{manifest}: no column '{column}' (columns: {list(table.columns)}); "
                    f"set {key}.caption_column to the caption column"
                    if column == ds.caption_column
                    else f"{manifest}: no column '{Manifest.VIDEO}' with the clip paths"
                )
        for row in table.to_dict("records"):
            shard_dir = _shard_dir(base, row.get(MANIFEST_SHARD))
            video = shard_dir / str(row[Manifest.VIDEO])
            caption = row[ds.caption_column]
            problem = _caption_problem(settings.id, video, caption, f"column '{ds.caption_column}'")
            if problem:
                problems.append(problem)
                continue
            sources.append(Source(settings, video, str(caption).strip(), _teacher_files(row, shard_dir)))
    return sources, problems


def _from_folder(settings: DatasetSettings, ds: DatasetConfig) -> tuple[list[Source], list[Problem]]:
    videos, problems = _find_videos(settings.id, Path(ds.instance_data_dir))  # a directory (check_datasets)
    sources = []
    for video in videos:
        if ds.caption_strategy == "filename":
            caption = " ".join(video.stem.replace("_", " ").split())
            problem = _caption_problem(settings.id, video, caption, "file name")
            if problem:
                problems.append(problem)
            else:
                sources.append(Source(settings, video, caption))
            continue
        sidecar = video.with_suffix(".txt")
        try:
            caption = sidecar.read_text(encoding="utf-8") if sidecar.is_file() else None
        except (OSError, UnicodeDecodeError) as e:
            problems.append(
                Problem(settings.id, str(video), "missing_caption", f"{sidecar}: unreadable ({e})")
            )
            continue
        problem = _caption_problem(settings.id, video, caption, f"sidecar {sidecar.name}")
        if problem:
            problems.append(problem)
            continue
        sources.append(Source(settings, video, caption.strip()))
    return sources, problems


def _find_videos(dataset: str, root: Path) -> tuple[list[Path], list[Problem]]:
    """Video paths under `root`, sorted (symlinked folders are not entered, as rglob does not), and a problem
    for every folder that cannot be listed: the videos in it would otherwise vanish without a trace."""
    found, problems = [], []

    def unlistable(e: OSError) -> None:
        path = Path(e.filename) if e.filename else root
        problems.append(
            Problem(dataset, str(path), "unreadable", f"{path}: folder cannot be listed ({e.strerror or e})")
        )

    for folder, dirs, files in os.walk(root, onerror=unlistable):
        found += [Path(folder) / n for n in [*dirs, *files] if Path(n).suffix.lower() in VIDEO_EXTENSIONS]
    return sorted(found), sorted(problems, key=lambda p: p.path)


def file_problem(dataset: str, path: Path) -> Problem | None:
    """Missing, not a regular file, unreadable or empty: what can be told without reading the contents."""
    kind, reason = None, None
    try:
        if not path.exists():
            kind, reason = "missing_file", "no such file"
        elif not path.is_file():
            kind, reason = "unreadable", "not a regular file"
        elif not os.access(path, os.R_OK):
            kind, reason = "unreadable", "no read permission"
        elif path.stat().st_size == 0:
            kind, reason = "empty_file", "empty file (0 bytes)"
    except OSError as e:
        kind, reason = "unreadable", f"cannot be read ({e.strerror or e})"
    return None if kind is None else Problem(dataset, str(path), kind, f"{path}: {reason}")


def _caption_problem(dataset: str, video: Path, caption, where: str) -> Problem | None:
    """A file problem comes first (it is the more basic one); then a missing or blank caption."""
    problem = file_problem(dataset, video)
    if problem is not None:
        return problem
    if caption is None or (isinstance(caption, float) and math.isnan(caption)):
        return Problem(dataset, str(video), "missing_caption", f"no caption ({where} missing)")
    if not str(caption).strip():
        return Problem(dataset, str(video), "empty_caption", f"empty caption ({where} is blank)")
    return None


def _shard_dir(base: Path, shard) -> Path:
    """A top-level manifest's `shard` column names the folder its paths are relative to."""
    if shard is None or (isinstance(shard, float) and math.isnan(shard)):
        return base
    name = teacher_shard_name(int(shard)) if str(shard).isdigit() else str(shard)
    return base if base.name == name else base / name


def _teacher_files(row: dict, shard_dir: Path) -> TeacherFiles | None:
    def path(column: str) -> Path | None:
        value = row.get(column)
        return shard_dir / str(value) if isinstance(value, str) and value else None

    def integer(column: str) -> int | None:
        value = row.get(column)
        return (
            int(value) if value is not None and not (isinstance(value, float) and math.isnan(value)) else None
        )

    latents = path(Manifest.LATENTS)
    if latents is None:
        return None
    sha = row.get(Manifest.SHA256)
    teacher = row.get(Manifest.TEACHER)
    return TeacherFiles(
        latents=latents,
        noise=path(Manifest.NOISE),
        sha256=sha if isinstance(sha, str) and sha else None,
        frames=integer(Manifest.FRAMES),
        height=integer(Manifest.HEIGHT),
        width=integer(Manifest.WIDTH),
        teacher=teacher if isinstance(teacher, str) and teacher else None,
        trajectory=path(Manifest.TRAJECTORY),
    )


def sniff_video(path: Path) -> bool:
    """Whether the first bytes carry a known video container signature (MP4/MOV, Matroska/WebM, AVI, MPEG)."""
    with open(path, "rb") as f:
        head = f.read(188 * 2 + 1)
    return (
        head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
        or head[:4] == b"\x1a\x45\xdf\xa3"  # Matroska / WebM (EBML)
        or (head[:4] == b"RIFF" and head[8:12] == b"AVI ")
        or head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3")  # MPEG program stream / video
        or (len(head) > 188 and head[0] == head[188] == 0x47)  # MPEG transport stream sync bytes
    )
