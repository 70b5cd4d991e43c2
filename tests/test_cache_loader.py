"""CacheLoader over a real cache: one latent shape per batch, repeats, order fixed by (seed, epoch), exact resume."""

from __future__ import annotations

import logging
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from dmd.core.config import Params
from dmd.core.video import write_video
from dmd.data.cache.build import build_cache
from dmd.data.cache.loader import CacheLoader, open_cache

MAX_LEN = 16


def write_clip(folder: Path, name: str, caption: str, height: int, width: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, height, width, 3))
    frames = np.clip(base + np.arange(9)[:, None, None, None] * 8, 0, 255).astype(np.uint8)
    write_video(folder / f"{name}.mp4", frames)
    (folder / f"{name}.txt").write_text(caption)


@pytest.fixture(scope="module")
def cache_dirs(tiny_wan_dir, tmp_path_factory) -> dict[str, Path]:
    """Two caches of 9-frame clips: 'main' (buckets of 5 square + 3 wide clips, the wide dataset repeated once)
    and 'odd' (4 square + 1 wide, for pruning); built with and without bucket pruning."""
    root = tmp_path_factory.mktemp("loader")
    square, wide, odd = root / "square", root / "wide", root / "odd"
    for folder in (square, wide, odd):
        folder.mkdir()
    for i in range(5):
        write_clip(square, f"s{i}", f"a red ball moving left {i}", 32, 32, i)
    for i in range(3):
        write_clip(wide, f"w{i}", f"a blue box moving right {i}", 32, 64, 10 + i)
    for i in range(4):
        write_clip(odd, f"o{i}", f"a green ring moving up {i}", 32, 32, 20 + i)
    write_clip(odd, "lonely", "a white dot alone", 32, 64, 30)

    def build(name: str, datasets: list[dict], pruning: bool) -> Path:
        out = root / name
        params = Params.model_validate(
            {
                "model": {"pretrained_model_name_or_path": str(tiny_wan_dir), "max_sequence_length": MAX_LEN},
                "cache": {
                    "output_dir": str(out),
                    "datasets": datasets,
                    "disable_bucket_pruning": not pruning,
                    "num_workers": 0,
                },
            }
        )
        build_cache(params, "cpu")
        return out

    main = [
        {"id": "square", "instance_data_dir": str(square), "num_frames": 9},
        {"id": "wide", "instance_data_dir": str(wide), "num_frames": 9, "repeats": 1},
    ]
    odd_ds = [{"id": "odd", "instance_data_dir": str(odd), "num_frames": 9}]
    return {
        "main": build("main", main, pruning=False),
        "odd_pruned": build("odd_pruned", odd_ds, pruning=True),
        "odd_kept": build("odd_kept", odd_ds, pruning=False),
    }


def keys_of(loader, n: int) -> list[list[str]]:
    return [b.keys for b in islice(loader, n)]


def test_batches_have_one_shape_and_cover_each_epoch(cache_dirs):
    cache = open_cache(cache_dirs["main"])
    index = cache.index.set_index("key")
    loader = CacheLoader(cache, batch_size=2, seed=3, drop_last=False)
    # square: 5 copies → batches of 2, 2, 1; wide: 3 clips × 2 copies = 6 → 2, 2, 2
    assert loader.batches_per_epoch == 6
    seen = Counter()
    for batch in islice(loader, loader.batches_per_epoch):
        shapes = {tuple(index.loc[k, "latent_shape"]) for k in batch.keys}
        assert len(shapes) == 1
        assert batch.latents_BCTHW.shape == (len(batch.keys), *shapes.pop())
        assert batch.prompt_embeds_BLD.shape == (len(batch.keys), MAX_LEN, 32)
        assert batch.captions == [index.loc[k, "caption"] for k in batch.keys]
        for k, latents in zip(batch.keys, batch.latents_BCTHW):
            torch.testing.assert_close(latents, cache.load(k)["latents"])
        seen.update(batch.keys)
    expected = {k: 1 + int(index.loc[k, "repeats"]) for k in index.index}
    assert seen == expected
    assert sorted(set(index["bucket"])) == ["9x24x48", "9x32x32"]


def test_drop_last_drops_partial_batches(cache_dirs):
    loader = CacheLoader(open_cache(cache_dirs["main"]), batch_size=2, seed=3)
    assert loader.batches_per_epoch == 5
    assert all(len(k) == 2 for k in keys_of(loader, 15))


def test_repeats_argument_overrides_the_datasets(cache_dirs):
    cache = open_cache(cache_dirs["main"])
    loader = CacheLoader(cache, batch_size=1, seed=0, repeats=2)
    counts = Counter(k for keys in keys_of(loader, loader.batches_per_epoch) for k in keys)
    assert set(counts.values()) == {3} and len(counts) == 8


def test_order_is_fixed_by_seed_and_epoch(cache_dirs):
    cache = open_cache(cache_dirs["main"])
    a = keys_of(CacheLoader(cache, batch_size=2, seed=7), 15)
    b = keys_of(CacheLoader(open_cache(cache_dirs["main"]), batch_size=2, seed=7), 15)
    c = keys_of(CacheLoader(cache, batch_size=2, seed=8), 15)
    assert a == b
    assert a != c
    assert a[:5] != a[5:10]  # epochs are shuffled differently


def test_state_dict_resumes_exactly(cache_dirs):
    cache = open_cache(cache_dirs["main"])
    reference = list(islice(CacheLoader(cache, batch_size=2, seed=5), 13))
    for stop in (0, 3, 5, 7):  # 5 is an epoch boundary
        first = CacheLoader(cache, batch_size=2, seed=5)
        done = list(islice(first, stop))
        state = first.state_dict()
        resumed = CacheLoader(open_cache(cache_dirs["main"]), batch_size=2, seed=5)
        resumed.load_state_dict(state)
        rest = list(islice(resumed, 13 - stop))
        for got, want in zip(done + rest, reference):
            assert got.keys == want.keys
            torch.testing.assert_close(got.latents_BCTHW, want.latents_BCTHW, atol=0, rtol=0)
            torch.testing.assert_close(got.prompt_embeds_BLD, want.prompt_embeds_BLD, atol=0, rtol=0)
    with pytest.raises(ValueError, match="same seed"):
        CacheLoader(cache, batch_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="changed since"):
        other = CacheLoader(open_cache(cache_dirs["odd_kept"]), batch_size=2, seed=5)
        other.load_state_dict(state)


def test_ranks_split_the_same_order(cache_dirs):
    cache = open_cache(cache_dirs["main"])
    single = keys_of(CacheLoader(cache, batch_size=1, seed=2), 11)
    rank0 = keys_of(CacheLoader(cache, batch_size=1, seed=2, rank=0, world_size=2), 5)
    rank1 = keys_of(CacheLoader(cache, batch_size=1, seed=2, rank=1, world_size=2), 5)
    assert rank0 == single[0:10:2] and rank1 == single[1:10:2]


def test_small_buckets_pruned_or_kept(cache_dirs, caplog):
    lonely = "a white dot alone"
    with caplog.at_level(logging.WARNING, logger="dmd.data.cache.loader"):
        pruned = CacheLoader(open_cache(cache_dirs["odd_pruned"]), batch_size=2, seed=0)
    assert "dropped 1 bucket(s)" in caplog.text and "9x24x48 (1)" in caplog.text
    assert pruned.batches_per_epoch == 2
    assert all(lonely not in b.captions for b in islice(pruned, 6))

    kept = CacheLoader(open_cache(cache_dirs["odd_kept"]), batch_size=2, seed=0)
    assert kept.batches_per_epoch == 3
    batches = list(islice(kept, 3))
    assert [b.captions for b in batches if lonely in b.captions] == [[lonely, lonely]]

    with pytest.raises(ValueError, match="no batch of 8"):
        CacheLoader(open_cache(cache_dirs["odd_pruned"]), batch_size=8, seed=0)
