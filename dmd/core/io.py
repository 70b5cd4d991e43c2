"""Atomic artifact writes: everything goes to a temporary name in the same folder and is renamed into place.

Temporary names carry the writer's process id (`.NAME.PID.XXXXXXXX.tmp[.SUFFIX]`), so a stage can remove what a
killed run left behind without touching what a running one is writing (`remove_stale_temporaries`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; artifacts get ordinary file modes
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (a complete unit), else is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


# `.NAME.PID.XXXXXXXX.tmp[.SUFFIX]`, and `.NAME.XXXXXXXX.tmp[.SUFFIX]` as written before names carried the PID
_TEMPORARY = re.compile(r"^\..+?(?:\.(?P<pid>\d+))?\.[a-z0-9_]{8}\.tmp(?:\.[^.]+)?$")


def process_running(pid: int) -> bool:
    """Whether a process with this id exists (a writer, a lock holder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders of atomic writes under `folder` whose writer is no longer running
    (a killed run's leftovers); returns what was deleted. Temporaries of running writers are left alone."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            match = _TEMPORARY.match(name)
            if match is None or (match["pid"] is not None and process_running(int(match["pid"]))):
                continue
            path = Path(root) / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                dirs.remove(name)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def write_safetensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
):
    """Equal tensors and metadata give equal bytes, in every process (see `_canonical_header`)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        _canonical_header(tmp)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys.

    safetensors writes `__metadata__` from a hash map whose order changes from one process to the next, so the
    same tensors and metadata would give files of different bytes (and a moving DVC hash). The header is
    re-serialised with sorted keys and padded with spaces (as safetensors pads it) to its old length; the
    tensor data, whose offsets are relative to the header's end, is left where it is."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # escapes written differently; the header keeps the writer's own order
            return
        f.seek(8)
        f.write(text.ljust(length))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
