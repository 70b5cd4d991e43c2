"""What training reads from a built cache: `LatentCache` (the index and one sample at a time) and `CacheLoader`
(bucketed, shuffled, resumable batches over it).

Latents are normalised as diffusers' WanPipeline expects (`(z - latents_mean) / latents_std`). Text embeddings
are stored without their zero tail and padded back to `max_sequence_length` on load, so they equal
`WanPipeline.encode_prompt`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dmd.data.cache.shards import ShardReader, content_digest
from dmd.data.schema import (
    EMPTY_PROMPT_FILE,
    INDEX,
    META,
    NEGATIVE_PROMPT_FILE,
    PROMPT_EMBEDS_TENSOR,
    Index,
    latents_tensor,
    noise_tensor,
    prompt_embeds_tensor,
    sigmas_cell,
    trajectory_tensor,
)

log = logging.getLogger(__name__)


class LatentCache:
    """A built cache directory: `.index` (DataFrame, INDEX_COLUMNS), the special prompts, `.load(key)`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        for name in (INDEX, META, NEGATIVE_PROMPT_FILE, EMPTY_PROMPT_FILE):
            if not (self.root / name).is_file():
                raise FileNotFoundError(f"{self.root / name}: missing; build the cache with `dmd cache`")
        self.index = pd.read_parquet(self.root / INDEX)
        self.meta = json.loads((self.root / META).read_text())
        self.max_sequence_length = int(self.meta["max_sequence_length"])
        self._rows = {k: i for i, k in enumerate(self.index[Index.KEY])}
        self._reader = ShardReader()
        self.negative_prompt_embeds = self._reader.get(self.root / NEGATIVE_PROMPT_FILE, PROMPT_EMBEDS_TENSOR)
        self.empty_prompt_embeds = self._reader.get(self.root / EMPTY_PROMPT_FILE, PROMPT_EMBEDS_TENSOR)

    def __len__(self) -> int:
        return len(self.index)

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """latents (C,T,H,W), prompt_embeds (L,D) zero past the caption's length, noise (C,T,H,W) if any, and the
        teacher's trajectory (K,C,T,H,W) with its σs (K,) as `trajectory` and `trajectory_sigmas` if any."""
        row = self.index.iloc[self._rows[key]]
        shard = self.root / row[Index.SHARD]
        out = {"latents": self._reader.get(shard, latents_tensor(row[Index.LATENT_KEY]))}
        text_shard = self.root / row[Index.TEXT_SHARD]
        embeds = self._reader.get(text_shard, prompt_embeds_tensor(row[Index.TEXT_KEY]))
        out["prompt_embeds"] = torch.cat(
            [embeds, embeds.new_zeros(self.max_sequence_length - embeds.shape[0], embeds.shape[1])]
        )
        if row[Index.HAS_NOISE]:
            out["noise"] = self._reader.get(shard, noise_tensor(row[Index.LATENT_KEY]))
        # an index written before trajectories existed has no such column
        sigmas = sigmas_cell(row.get(Index.TRAJECTORY_SIGMAS))
        if sigmas is not None:
            out["trajectory"] = self._reader.get(shard, trajectory_tensor(row[Index.LATENT_KEY]))
            out["trajectory_sigmas"] = torch.tensor(sigmas, dtype=torch.float32)
        return out


def open_cache(cache_dir: str | Path) -> LatentCache:
    return LatentCache(cache_dir)


@dataclass
class Batch:
    """Samples of one bucket, so all latents share a shape."""

    latents_BCTHW: torch.Tensor
    prompt_embeds_BLD: torch.Tensor
    captions: list[str]
    keys: list[str]
    noise_BCTHW: torch.Tensor | None  # the teacher's initial noise, when every sample has it
    # the teacher's trajectory at the σs of trajectory_sigmas_K (kept float32 by `to`), when every sample has one
    # at the same σs
    trajectory_BKCTHW: torch.Tensor | None = None
    trajectory_sigmas_K: torch.Tensor | None = None

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Batch(
            move(self.latents_BCTHW),
            move(self.prompt_embeds_BLD),
            self.captions,
            self.keys,
            move(self.noise_BCTHW),
            move(self.trajectory_BKCTHW),
            None if self.trajectory_sigmas_K is None else self.trajectory_sigmas_K.to(device),
        )


class CacheLoader:
    """Bucketed batches over a LatentCache, endless over epochs, in an order fixed by (seed, epoch).

    Each epoch every sample appears `1 + repeats` times (`repeats=None`: each dataset's own `repeats`). Per bucket
    the copies are shuffled and cut into batches; the batches of all buckets are then shuffled together. A bucket
    with fewer copies than `batch_size` is dropped when the cache was built with `disable_bucket_pruning: false`
    (logged), and otherwise filled to one full batch by cycling its samples; a larger bucket's last partial
    batch is dropped when `drop_last`. With `world_size > 1` each rank takes every `world_size`-th batch of the
    same order. `state_dict()` after n batches, loaded into a new loader, continues at batch n + 1.
    """

    def __init__(
        self,
        cache: LatentCache,
        batch_size: int,
        seed: int,
        repeats: int | None = None,
        drop_last: bool = True,
        prune_small_buckets: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.cache, self.batch_size, self.seed, self.drop_last = cache, batch_size, seed, drop_last
        self.rank, self.world_size = rank, world_size
        index = cache.index
        copies = 1 + (index[Index.REPEATS].to_numpy() if repeats is None else np.full(len(index), repeats))
        prune = (
            not cache.meta.get("disable_bucket_pruning", True)
            if prune_small_buckets is None
            else prune_small_buckets
        )
        self._buckets: list[np.ndarray] = []  # per bucket: row numbers, each repeated by its copies
        pruned = []
        for name, rows in sorted(index.groupby(Index.BUCKET).indices.items()):
            expanded = np.repeat(rows, copies[rows])
            if prune and len(expanded) < batch_size:
                pruned.append(f"{name} ({len(expanded)})")
                continue
            self._buckets.append(expanded)
        if pruned:
            log.warning(
                "bucket pruning: dropped %d bucket(s) with fewer samples than batch_size=%d: %s "
                "(set cache.disable_bucket_pruning: true to keep them)",
                len(pruned),
                batch_size,
                ", ".join(pruned),
            )
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[np.ndarray]] | None = None
        # which samples: a resume needs the same ones
        self.fingerprint = content_digest(sorted(index[Index.KEY]))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the cache at {cache.root} gives no batch of {batch_size} per rank ({len(index)} samples, "
                f"buckets {index[Index.BUCKET].value_counts().to_dict()}); lower the batch size, add data or "
                f"set cache.disable_bucket_pruning: true"
            )

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for rows in self._buckets:
            perm = rng.permutation(rows)
            if len(perm) < self.batch_size:
                batches.append(np.resize(perm, self.batch_size))
                continue
            full = len(perm) // self.batch_size * self.batch_size
            batches += np.split(perm[:full], full // self.batch_size)
            if not self.drop_last and full < len(perm):
                batches.append(perm[full:])
        batches = [batches[i] for i in rng.permutation(len(batches))]
        per_rank = len(batches) // self.world_size
        mine = batches[self.rank : per_rank * self.world_size : self.world_size]
        self._order = (epoch, mine)
        return mine

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batches = self._epoch_batches(self.epoch)
            while self.position < len(batches):
                rows = batches[self.position]
                self.position += 1
                yield self._collate(rows)
            self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _collate(self, rows: np.ndarray) -> Batch:
        keys = [str(self.cache.index[Index.KEY].iat[r]) for r in rows]
        items = [self.cache.load(k) for k in keys]
        noise = [it.get("noise") for it in items]
        sigmas = [it.get("trajectory_sigmas") for it in items]
        trajectories = all(s is not None for s in sigmas) and all(torch.equal(s, sigmas[0]) for s in sigmas)
        return Batch(
            latents_BCTHW=torch.stack([it["latents"] for it in items]),
            prompt_embeds_BLD=torch.stack([it["prompt_embeds"] for it in items]),
            captions=[str(self.cache.index[Index.CAPTION].iat[r]) for r in rows],
            keys=keys,
            noise_BCTHW=torch.stack(noise) if all(n is not None for n in noise) else None,
            trajectory_BKCTHW=torch.stack([it["trajectory"] for it in items]) if trajectories else None,
            trajectory_sigmas_K=sigmas[0] if trajectories else None,
        )

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(
                f"loader state has seed {state['seed']}, this loader {self.seed}; resume with the same seed"
            )
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"the cache at {self.cache.root} changed since this loader state was saved (different samples); "
                f"an exact resume needs the same cache: rebuild it as it was or start the data order afresh"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
