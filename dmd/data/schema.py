"""The contracts between stages: every file name, table column and tensor name that one stage writes and another
reads, written once so that writer and reader cannot drift apart.

generate → cache
    `manifest.parquet` per shard (`MANIFEST_COLUMNS`, paths relative to the shard) and at the top (the same
    rows with a `MANIFEST_SHARD` column first); beside the videos, per sample, a latents file holding the tensor
    `TEACHER_LATENTS_TENSOR`, a noise file holding `TEACHER_NOISE_TENSOR` and, with `generate.save_trajectory`, a
    trajectory file holding `TEACHER_TRAJECTORY_TENSOR`: the teacher's latents at the student's σs, which the
    file's metadata (`TRAJECTORY_SIGMAS_METADATA`) and the manifest (`Manifest.TRAJECTORY_SIGMAS`) list.
cache → train, evaluate
    `index.parquet` (`INDEX_COLUMNS`), one row per usable sample; `problems.parquet` (`PROBLEM_COLUMNS`);
    `meta.json`; shards whose tensors are named by `latents_tensor`, `noise_tensor`, `trajectory_tensor` and
    `prompt_embeds_tensor`, each with a row table (`LatentRows`, `TextRows`); the special prompts' files, holding
    `PROMPT_EMBEDS_TENSOR`.

Names are plain strings (not enums), so the tables and files written with them stay byte for byte what they were.
"""

from __future__ import annotations


def _columns(namespace: type) -> list[str]:
    """The column names a namespace class defines, in the order it defines them."""
    return [value for name, value in vars(namespace).items() if name.isupper()]


# --------------------------------------------------------------------------------------------------------------
# generate stage → cache stage

MANIFEST = "manifest.parquet"

TEACHER_LATENTS_TENSOR = "latents"  # in `{id}.latents.safetensors`: (C,T,H,W), normalised
TEACHER_NOISE_TENSOR = "noise"  # in `{id}.noise.safetensors`: (C,T,H,W), the sample's initial noise
# in `{id}.trajectory.safetensors`: (K,C,T,H,W) float32, normalised like the latents; point k is the teacher's
# sampling run at σ_k, the linear interpolation in σ of the Euler iterates on either side (a partial Euler step)
TEACHER_TRAJECTORY_TENSOR = "trajectory"
TRAJECTORY_SIGMAS_METADATA = "sigmas"  # the trajectory file's metadata: its σs (0–1 scale), a JSON list


def teacher_shard_name(shard: int) -> str:
    """The folder of the generate stage's shard number `shard`, as the top-level manifest's MANIFEST_SHARD
    column numbers it."""
    return f"shard-{shard:05d}"


class Manifest:
    """Columns of a shard's manifest.parquet: one row per teacher video."""

    ID = "id"
    PROMPT = "prompt"
    NEGATIVE_PROMPT = "negative_prompt"
    SEED = "seed"
    STEPS = "steps"
    GUIDANCE = "guidance"
    SHIFT = "shift"
    FRAMES = "frames"
    FPS = "fps"
    WIDTH = "width"
    HEIGHT = "height"
    TEACHER = "teacher"  # the model path or hub id that sampled it
    TEACHER_REVISION = "teacher_revision"
    VIDEO = "video"  # file name, relative to the shard
    SHA256 = "sha256"  # of the video file
    LATENTS = "latents"  # file name or None (generate.save_latents)
    NOISE = "noise"  # file name or None (generate.save_noise)
    INDEX = "index"  # the sample's global index
    PROMPT_ID = "prompt_id"
    FINGERPRINT = "fingerprint"  # of everything that determined the shard's content
    TRAJECTORY = "trajectory"  # file name or None (generate.save_trajectory)
    TRAJECTORY_SIGMAS = "trajectory_sigmas"  # the trajectory's σs (list of floats) or None


MANIFEST_COLUMNS = _columns(Manifest)


def sigmas_cell(value) -> tuple[float, ...] | None:
    """A `trajectory_sigmas` cell as a table gives it back (a list or an array; None, NaN or absent when there is no
    trajectory) as a tuple of floats, or None."""
    if value is None or isinstance(value, float):
        return None
    return tuple(float(v) for v in value)


MANIFEST_SHARD = "shard"  # the top-level manifest's first column: the shard each row's paths are relative to


# --------------------------------------------------------------------------------------------------------------
# cache stage → train and evaluate stages

INDEX = "index.parquet"
PROBLEMS = "problems.parquet"
META = "meta.json"
SUMMARY = "summary.json"
LATENTS_DIR = "latents"  # latents/<dataset>/ unless the dataset sets its own cache_dir
TEXT_DIR = "text"
NEGATIVE_PROMPT_FILE = "text/negative.safetensors"
EMPTY_PROMPT_FILE = "text/empty.safetensors"
PROMPT_EMBEDS_TENSOR = "prompt_embeds"  # in the special prompts' files: (1,L,D), zero past the prompt
TEXT_KEY_METADATA = "text_key"  # the special prompts' files' metadata: which text_key they hold

PROBLEM_COLUMNS = ["dataset", "path", "kind", "reason", "source_sha256", "deleted"]


def latents_tensor(latent_key: str) -> str:
    """A clip's latents (C,T,H,W) in its latents shard."""
    return f"{latent_key}.latents"


def noise_tensor(latent_key: str) -> str:
    """A clip's initial teacher noise (C,T,H,W) in its latents shard, when the index says `has_noise`."""
    return f"{latent_key}.noise"


def trajectory_tensor(latent_key: str) -> str:
    """A clip's teacher trajectory (K,C,T,H,W) in its latents shard, when the index lists `trajectory_sigmas`."""
    return f"{latent_key}.trajectory"


def prompt_embeds_tensor(text_key: str) -> str:
    """A caption's embedding (text_length, D), without the zero tail, in its text shard."""
    return f"{text_key}.prompt_embeds"


class Index:
    """Columns of index.parquet: one row per usable sample of the current sources."""

    KEY = "key"  # sample key: latent_key + text_key
    DATASET = "dataset"
    SOURCE = "source"  # the video file
    CAPTION = "caption"
    BUCKET = "bucket"  # "FxHxW" in pixels; one latent shape per bucket
    LATENT_SHAPE = "latent_shape"  # [C, T, H, W]
    DTYPE = "dtype"
    SHARD = "shard"  # latents shard, relative to the cache directory
    LATENT_KEY = "latent_key"
    TEXT_KEY = "text_key"
    TEXT_SHARD = "text_shard"
    TEXT_LENGTH = "text_length"  # tokens before the zero padding
    HAS_NOISE = "has_noise"
    LATENTS_FROM = "latents_from"  # "vae" or "teacher"
    REPEATS = "repeats"
    SOURCE_SHA256 = "source_sha256"
    SOURCE_FRAMES = "source_frames"
    SOURCE_HEIGHT = "source_height"
    SOURCE_WIDTH = "source_width"
    TRAJECTORY_SIGMAS = "trajectory_sigmas"  # the σs of its teacher trajectory (list); None: none cached


INDEX_COLUMNS = _columns(Index)


class LatentRows:
    """Columns of a latents shard's row table (`shard-<hash>.parquet` beside its `.safetensors`): one row per
    latent_key. The index copies them under the same names."""

    LATENT_KEY = Index.LATENT_KEY
    BUCKET = Index.BUCKET
    LATENT_SHAPE = Index.LATENT_SHAPE
    DTYPE = Index.DTYPE
    COMPRESSION = "compression"
    HAS_NOISE = Index.HAS_NOISE
    LATENTS_FROM = Index.LATENTS_FROM
    SOURCE_FRAMES = Index.SOURCE_FRAMES
    SOURCE_HEIGHT = Index.SOURCE_HEIGHT
    SOURCE_WIDTH = Index.SOURCE_WIDTH
    TRAJECTORY_SIGMAS = Index.TRAJECTORY_SIGMAS  # absent from row tables written before trajectories
    SHARD = "shard"  # the shard's file name
    PATH = "path"  # not stored: added on reading, the shard's full path


class TextRows:
    """Columns of a text shard's row table: one row per text_key."""

    TEXT_KEY = Index.TEXT_KEY
    CAPTION = Index.CAPTION
    TEXT_LENGTH = Index.TEXT_LENGTH
    DTYPE = Index.DTYPE
    SHARD = "shard"
    PATH = LatentRows.PATH
