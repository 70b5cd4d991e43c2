"""Training checkpoints: every stateful part registered once, saved complete, atomic, rotated, loadable without
pickle.

Each part of the run that has state (the student's and the critic's weights with their optimizer and schedule,
the EMA, the data position, the run's counters and settings, the global random generators) exposes
`state_dict` / `load_state_dict` and is registered once with the `CheckpointManager`; `save(step)` and
`load_into(path)` then cover all of them.

A checkpoint is a folder `checkpoint-NNNNNNN` (the step) under `train.checkpoint_dir`. The `weights` entry of a
part's state (name → tensor) goes to `<part>.safetensors`, so weights read alone; everything else goes to
`state.json`, its tensors (optimizer moments, RNG states) to `state.safetensors`, referenced by name. It is
written into a hidden temporary folder and renamed into place, so a folder named `checkpoint-*` is always
complete and a run killed mid-write leaves only a hidden temporary, which the next run removes. Rotation runs
after the new checkpoint is in place and keeps the newest `checkpoints_total_limit`, so it never deletes the
newest complete one; it renames a checkpoint to a hidden name before deleting its files, so a kill mid-deletion
leaves no half-deleted `checkpoint-*` either.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file

from dmd.core.io import atomic_dir, write_json, write_safetensors
from dmd.training.sharding import gather_full

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
# checkpoint folder -> the open lock file of the run in this process that holds it
_HELD: dict[Path, Any] = {}
_NAME = re.compile(rf"^{PREFIX}(\d+)$")
_STALE = re.compile(rf"^\.{PREFIX}\d+(\..*\.tmp|\.old)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and says what to do."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


class GlobalRNG:
    """The process's global generators as a checkpointed part: every draw of a step comes from its own generator,
    but libraries may still draw from these."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)


# --------------------------------------------------------------------------------------------------------------


class CheckpointManager:
    """Save / find / load / rotate the checkpoints under one folder, of the parts registered with it."""

    def __init__(self, root: str | Path, total_limit: int):
        self.root = Path(root)
        self.total_limit = total_limit
        self.parts: dict[str, Stateful] = {}

    def register(self, **parts: Stateful | None) -> None:
        """Parts by name, loaded in this order; a None part is one this run does not have (no EMA)."""
        self.parts.update({name: part for name, part in parts.items() if part is not None})

    def save(self, step: int, write: bool = True) -> Path | None:
        """Checkpoint `step` of every registered part; None, and nothing written, when any weights are not finite
        (a checkpoint is a state to go back to) or on a process that does not `write`. Sharded tensors are
        gathered whole (every process of a sharded run must call this; only the writing one keeps them)."""
        weights, state = {}, {}
        for name, part in self.parts.items():
            part_state = gather_full(dict(part.state_dict()), keep=write)
            if not write:
                continue
            if "weights" in part_state:
                weights[name] = part_state.pop("weights")
            state[name] = part_state
        if not write:
            return None
        if not all(bool(torch.isfinite(t).all()) for group in weights.values() for t in group.values()):
            log.warning("step %d: no checkpoint, the weights hold non-finite values", step)
            return None
        return self.write(step, weights, state)

    def load_into(self, path: str | Path) -> None:
        """Load checkpoint `path` into every registered part."""
        weights, state = self.load(path)
        for name, part in self.parts.items():
            if name not in state:
                raise CheckpointError(
                    f"{path} holds no {name} state (written by a run without it); resume another checkpoint "
                    "or start over"
                )
            part_state = dict(state[name])
            if name in weights:
                part_state["weights"] = weights[name]
            try:
                part.load_state_dict(part_state)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from e

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

    def write(self, step: int, tensor_groups: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
        """Write checkpoint `step` atomically, then rotate: each tensor group to its own safetensors file, `state`
        to state.json (its tensors to state.safetensors)."""
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

    def hold(self):
        """Take the checkpoint folder for this run (an exclusive lock on `<root>/.lock`, held while the returned
        file is open and released by the OS when the process ends, however it ends). A second run on the same
        folder would resume, rotate and overwrite the first one's checkpoints: it stops here, naming the holder."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; runs are not guarded there
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        # a run in this process that ended with an exception may still hold it (its frame is referenced)
        earlier = _HELD.pop(self.root.resolve(), None)
        if earlier is not None:
            earlier.close()
        lock = open(self.root / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            lock.close()
            raise CheckpointError(
                f"{self.root} is in use by another training run (PID {holder}); wait for it to finish or stop "
                "it, or give this run its own train.checkpoint_dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _HELD[self.root.resolve()] = lock
        return lock

    def move_aside(self, label: str, checkpoints: list[Path]) -> Path | None:
        """Move `checkpoints` into `<root>/<label>-<time>/` (renames, nothing is deleted), where `latest` no
        longer finds them and rotation no longer counts them; returns that folder (None when there is nothing)."""
        if not checkpoints:
            return None
        aside = self.root / time.strftime(f"{label}-%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for path in checkpoints:
            os.replace(path, aside / path.name)
        return aside

    def rotate(self) -> list[Path]:
        """Delete the oldest complete checkpoints beyond the limit, folders named like a checkpoint that are not
        one (no state file: an unusable leftover), and leftovers of interrupted writes and deletions.

        A checkpoint is renamed to a hidden `.checkpoint-N.old` before its files are deleted: a run killed while
        deleting leaves that hidden folder (removed here next time), never a `checkpoint-N` with files missing."""
        removed = []
        complete = self.checkpoints()
        doomed = complete[: max(len(complete) - self.total_limit, 0)]
        if self.root.is_dir():
            doomed += [
                p for p in self.root.iterdir() if _NAME.match(p.name) and p.is_dir() and p not in complete
            ]
        for path in doomed:
            aside = path.with_name(f".{path.name}.old")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            shutil.rmtree(aside)
            removed.append(path)
        if self.root.is_dir():
            for path in self.root.iterdir():
                if _STALE.match(path.name):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        for path in removed:
            log.info("removed checkpoint %s", path.name)
        return removed
