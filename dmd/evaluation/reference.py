"""The teacher reference: the evaluation's teacher clips, kept across evaluations (`evaluate.teacher_reference_dir`).

A teacher run's clips depend on the teacher and how it samples, the prompt and the seed, never on the student; yet
they are most of an evaluation's cost. Each clip is kept as one safetensors file (uint8 frames, `FRAMES`) named by
its content key, a hash of everything it depends on (`teacher_identity`, the run's steps and guidance, the item's
prompt and seed), so an entry made under other settings is simply never read. Files no current item refers to are
removed at the end of an evaluation (`prune`), as the cache stage removes entries no source refers to any more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from dmd.core.config import Params
from dmd.core.io import remove_stale_temporaries, write_safetensors

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # raised when what a file holds, or how its key is made, changes
FRAMES = "frames"
SUFFIX = ".safetensors"
_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors$")


def teacher_identity(params: Params, noise_shape: tuple[int, ...], device: torch.device) -> dict:
    """What every teacher clip of an evaluation depends on besides the run's steps and guidance and the item: the
    teacher's files, how they are loaded and run, the latent size, and the software and hardware that sample."""
    import diffusers

    from dmd.wan.loading import teacher_revision

    model = params.model
    return {
        "format": FORMAT_VERSION,
        "teacher": teacher_revision(model),
        "base_model_precision": model.base_model_precision,
        "text_encoder_1_precision": model.text_encoder_1_precision,
        "quantize_via": model.quantize_via,
        "attention_mechanism": model.attention_mechanism,
        "flow_shift": model.flow_schedule_shift,
        "max_sequence_length": model.max_sequence_length,
        "negative_prompt": params.model.negative_prompt,
        "noise_shape": list(noise_shape),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }


def clip_key(identity: dict, steps: int, guidance: float, prompt: str, seed: int) -> str:
    content = {"identity": identity, "steps": steps, "guidance": guidance, "prompt": prompt, "seed": seed}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _frames_digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


class TeacherReference:
    """The folder of stored teacher clips, for one evaluation's `teacher_identity`."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.identity = identity

    def keys(self, steps: int, guidance: float, items) -> list[str]:
        """The key of each item's clip (items: anything with `prompt` and `seed`), in order."""
        return [clip_key(self.identity, steps, guidance, it.prompt, it.seed) for it in items]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def load(self, run: str, steps: int, guidance: float, items) -> list[np.ndarray] | None:
        """Every item's clip of the run `run` (its steps and guidance), or None when any is missing or unreadable: a
        run takes all its clips from here or none (an unreadable file is logged and left to be rewritten)."""
        keys = self.keys(steps, guidance, items)
        missing = [k for k in keys if not self.path(k).is_file()]
        if missing:
            if len(missing) < len(keys):
                log.info(
                    "%s: %d of %d clips in the teacher reference %s; sampling every item",
                    run, len(keys) - len(missing), len(keys), self.folder,
                )  # fmt: skip
            return None
        clips = []
        for key in keys:
            clip = self._read(key)
            if clip is None:
                return None
            clips.append(clip)
        if len({c.shape for c in clips}) != 1:
            log.warning("%s: the teacher reference's clips differ in shape; sampling every item", run)
            return None
        return clips

    def _read(self, key: str) -> np.ndarray | None:
        from safetensors import safe_open

        path = self.path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                frames = f.get_tensor(FRAMES).numpy()
        # a truncated or foreign file is as good as none: the run is sampled afresh and the file rewritten
        except Exception as e:
            log.warning("teacher reference %s is unreadable (%s); sampling that run afresh", path, e)
            return None
        valid = (
            metadata.get("key") == key
            and frames.dtype == np.uint8
            and frames.ndim == 4
            and frames.shape[-1] == 3
            and metadata.get("sha256") == _frames_digest(frames)
        )
        if not valid:
            log.warning(
                "teacher reference %s does not hold the clip its name says; sampling that run afresh", path
            )
            return None
        return frames

    def save(self, steps: int, guidance: float, items, clips: list[np.ndarray]) -> None:
        """One file per clip, each written atomically (an interrupted evaluation leaves whole entries only); the
        metadata names what the clip is, for a person looking in the folder."""
        for key, item, clip in zip(self.keys(steps, guidance, items), items, clips, strict=True):
            metadata = {"key": key, "sha256": _frames_digest(clip), "prompt": item.prompt, "seed": str(item.seed),
                        "steps": str(steps), "guidance": str(guidance)}  # fmt: skip
            write_safetensors(
                self.path(key), {FRAMES: torch.from_numpy(np.ascontiguousarray(clip))}, metadata
            )

    def prune(self, keep: set[str]) -> list[Path]:
        """Remove the entries whose key is not in `keep`, and what killed writers left behind; returns them."""
        if not self.folder.is_dir():
            return []
        removed = remove_stale_temporaries(self.folder)
        for path in sorted(self.folder.iterdir()):
            if _ENTRY.match(path.name) and path.name.removesuffix(SUFFIX) not in keep:
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("teacher reference %s: removed %d stale files", self.folder, len(removed))
        return removed
