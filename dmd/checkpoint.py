"""Training checkpoints: complete, atomic, rotated, and loadable without pickle.

A checkpoint is a folder `checkpoint-NNNNNNN` (the step) under `train.checkpoint_dir` holding one safetensors
file per tensor group (student, critic, EMA, optimizers, RNG states) and `state.json` (step, data position,
schedulers, counters, and the structure of the optimizer states with their tensors referenced by name). It is
written into a hidden temporary folder and renamed into place, so a folder named `checkpoint-*` is always
complete and a run killed mid-write leaves only a hidden temporary, which the next run removes. Rotation runs
after the new checkpoint is in place and keeps the newest `checkpoints_total_limit`, so it never deletes the
newest complete one.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from dmd.io import atomic_dir, write_json, write_safetensors

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_STALE = re.compile(rf"^\.{PREFIX}\d+(\..*\.tmp|\.old)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says what to do."""


# --------------------------------------------------------------------------------------------------------------
# Nested state (optimizer / scheduler / RNG state dicts) ↔ safetensors + JSON, no pickle


def flatten_state(obj: Any, prefix: str = "t") -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors): every tensor or ndarray is replaced by a reference to a named tensor.

    Tuples and dicts with non-string keys are tagged so `unflatten_state` rebuilds them exactly.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(x))
            return {"__ndarray__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {
                "__items__": [
                    [enc(k, f"{path}.k{i}"), enc(v, f"{path}.{i}")] for i, (k, v) in enumerate(x.items())
                ]
            }
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, (np.integer, np.floating)):
            return x.item()
        raise TypeError(f"cannot store {type(x).__name__} at {path} in a checkpoint")

    return enc(obj, prefix), tensors


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__items__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def capture_rng_state() -> dict:
    """The global generators' states: torch (CPU and every CUDA device), numpy, Python's `random`."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save / find / load / rotate the checkpoints under one folder."""

    def __init__(self, root: str | Path, total_limit: int):
        self.root = Path(root)
        self.total_limit = total_limit

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            (int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
        ]
        return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def resolve(self, resume_from: str | None) -> Path | None:
        """`train.resume_from_checkpoint` → a checkpoint folder, or None to start fresh."""
        if resume_from is None:
            return None
        if resume_from == "latest":
            return self.latest()
        path = Path(resume_from)
        if not path.is_absolute() and not path.exists():
            path = self.root / resume_from
        if not (path / STATE_FILE).is_file():
            have = ", ".join(p.name for p in self.checkpoints()) or "none"
            raise CheckpointError(
                f"train.resume_from_checkpoint={resume_from!r}: {path} is not a complete checkpoint "
                f"(no {STATE_FILE}); checkpoints under {self.root}: {have}. Use 'latest', one of those, or null."
            )
        return path

    def save(self, step: int, tensor_groups: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Write checkpoint `step` atomically, then rotate. `state` may hold tensors (they go to safetensors)."""
        target = self.root / f"{PREFIX}{step:07d}"
        structure, state_tensors = flatten_state(state)
        with atomic_dir(target) as tmp:
            for name, tensors in tensor_groups.items():
                write_safetensors(tmp / f"{name}.safetensors", tensors)
            write_safetensors(tmp / "state.safetensors", state_tensors)
            write_json(tmp / STATE_FILE, {"step": step, "state": structure})
        self.rotate()
        return target

    def load(self, path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensor groups by name, state) of a checkpoint folder."""
        path = Path(path)
        try:
            meta = json.loads((path / STATE_FILE).read_text())
            groups = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
        except (OSError, json.JSONDecodeError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: unreadable checkpoint ({e}); resume from another or delete it"
            ) from e
        state = unflatten_state(meta["state"], groups.pop("state", {}))
        return groups, state

    def rotate(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond the limit and leftovers of interrupted writes."""
        removed = []
        complete = self.checkpoints()
        for path in complete[: max(len(complete) - self.total_limit, 0)]:
            shutil.rmtree(path)
            removed.append(path)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if _STALE.match(path.name):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        for path in removed:
            log.info("removed checkpoint %s", path.name)
        return removed
