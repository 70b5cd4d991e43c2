"""The cache's shard format: safetensors files of named tensors, each with a parquet row table beside it.

A shard `shard-<hash>.safetensors` holds one tensor per entry, named as `dmd.data.schema` says
(`latents_tensor`, `noise_tensor`, `prompt_embeds_tensor`); its row table `shard-<hash>.parquet` lists the entries
(`schema.LatentRows`, `schema.TextRows`). A shard is written (atomically) before its row table, so a row table
always speaks of a complete shard.

`compress_disk_cache` stores every tensor zstd-compressed (pyarrow's codec) as a uint8 tensor inside the same
safetensors shard; dtype and shape sit in the shard's metadata, so reading one sample still reads only its bytes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open

from dmd.core.io import write_safetensors
from dmd.data.schema import LatentRows

FORMAT_VERSION = 1
COMPRESSION = "zstd"


def content_digest(obj) -> str:
    """sha256 of `obj` as canonical JSON: the content addresses of entries and shards."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_shard(
    path: Path, tensors: dict[str, torch.Tensor], compress: bool, extra: dict[str, str] | None = None
) -> None:
    metadata = {
        "format": f"dmd-cache-{FORMAT_VERSION}",
        "compression": COMPRESSION if compress else "none",
        **(extra or {}),
    }
    if compress:
        stored = {}
        for name, t in tensors.items():
            t = t.detach().contiguous().cpu()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            stored[name] = torch.frombuffer(
                bytearray(pa.compress(raw, codec=COMPRESSION, asbytes=True)), dtype=torch.uint8
            )
            metadata[name] = json.dumps(
                {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            )
        tensors = stored
    write_safetensors(path, tensors, metadata)


class ShardReader:
    """Reads one tensor at a time (memory-mapped, or decompressed when stored so), keeping the most recently used
    `max_open` shards open."""

    def __init__(self, max_open: int = 64):
        self._open: OrderedDict[Path, object] = OrderedDict()
        self._lock = threading.Lock()
        self.max_open = max_open

    def get(self, path: Path, name: str) -> torch.Tensor:
        with self._lock:
            handle = self._open.pop(path, None) or safe_open(str(path), framework="pt")
            self._open[path] = handle
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        meta = handle.metadata() or {}
        tensor = handle.get_tensor(name)
        if meta.get("compression", "none") == "none":
            return tensor
        info = json.loads(meta[name])
        dtype = getattr(torch, info["dtype"])
        size = int(np.prod(info["shape"])) * torch.empty((), dtype=dtype).element_size()
        raw = pa.decompress(
            tensor.numpy().tobytes(), decompressed_size=size, codec=meta["compression"], asbytes=True
        )
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(info["shape"])


def read_shard_tables(folders: Iterable[Path]) -> pd.DataFrame:
    """The row tables of every complete shard (its .safetensors present) in `folders`, with a `path` column."""
    tables = []
    for folder in folders:
        for table in sorted(Path(folder).glob("shard-*.parquet")):
            shard = table.with_suffix(".safetensors")
            if shard.is_file():
                tables.append(pd.read_parquet(table).assign(**{LatentRows.PATH: str(shard)}))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
