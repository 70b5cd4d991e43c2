"""The cache stage on real mp4 files and a tiny Wan: bad files, latents, embeddings, incremental re-runs, flow."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKLWan, WanPipeline
from safetensors.torch import save_file

from dmd.core.config import Params
from dmd.core.video import read_video, write_video
from dmd.data.cache.build import NoUsableSamplesError, build_cache
from dmd.data.cache.loader import CacheLoader, open_cache
from dmd.data.synthetic import synthetic_clip

LATENTS_MEAN = [0.3, -0.2, 0.1, 0.5]
LATENTS_STD = [0.5, 2.0, 1.5, 0.8]
MAX_LEN = 16


def add_clip(folder: Path, name: str, caption: str | None, frames=21, height=32, width=32, seed=0) -> Path:
    path = write_video(folder / f"{name}.mp4", synthetic_clip(frames, height, width, seed))
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption)
    return path


@pytest.fixture(scope="module")
def wan_dir(tiny_wan_dir, tmp_path_factory) -> Path:
    """The tiny Wan with a non-trivial latents_mean / latents_std, so the normalisation is tested."""
    path = tmp_path_factory.mktemp("wan") / "wan"
    shutil.copytree(tiny_wan_dir, path)
    config = json.loads((path / "vae/config.json").read_text())
    config.update(latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    (path / "vae/config.json").write_text(json.dumps(config))
    return path


def make_params(wan_dir: Path, out: Path, datasets: list[dict], model: dict | None = None, **cache) -> Params:
    return Params.model_validate(
        {
            "model": {
                "pretrained_model_name_or_path": str(wan_dir),
                "max_sequence_length": MAX_LEN,
                **(model or {}),
            },
            "cache": {
                "output_dir": str(out),
                "datasets": datasets,
                "resolution": 32,
                "vae_batch_size": 2,
                "chunk_size": 3,
                "num_workers": 2,
                **cache,
            },
        }
    )


def problems_by_path(out: Path) -> dict[str, str]:
    table = pd.read_parquet(out / "problems.parquet")
    return {Path(p).name: k for p, k in zip(table["path"], table["kind"])}


def test_bad_files_are_listed_and_good_ones_cached(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    add_clip(videos, "good_square", "a red ball moving left", seed=1)
    add_clip(videos, "good_wide", "a blue box moving right", width=64, seed=2)
    add_clip(videos, "good_long", "a green ring moving up", frames=30, seed=3)
    good = add_clip(tmp_path, "source", None, seed=4)
    truncated = (videos / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert truncated
    (videos / "truncated.txt").write_text("a clip cut in half")
    (videos / "zero.mp4").write_bytes(b"")
    (videos / "zero.txt").write_text("an empty file")
    add_clip(videos, "short", "too few frames", frames=9, seed=5)
    add_clip(videos, "small", "too small", height=24, width=24, seed=6)
    add_clip(videos, "no_caption", None, seed=7)
    add_clip(videos, "blank_caption", "  \n", seed=8)
    (videos / "folder.mp4").mkdir()
    (videos / "text.mp4").write_text("this is a caption file with a video extension\n" * 20)
    (videos / "text.txt").write_text("not a video")
    # a second dataset: a manifest whose row points at a file that is not there
    shard = tmp_path / "teacher" / "shard-00000"
    shard.mkdir(parents=True)
    add_clip(shard, "m0", None, seed=9)
    pd.DataFrame({"video": ["m0.mp4", "gone.mp4"], "prompt": ["a white dot moving down", "lost"]}).to_parquet(
        shard / "manifest.parquet"
    )
    out = tmp_path / "cache"
    params = make_params(
        wan_dir,
        out,
        [
            {"id": "folder", "instance_data_dir": str(videos), "minimum_image_size": 28},
            {"id": "teacher", "manifest": str(tmp_path / "teacher")},
        ],
    )
    summary = build_cache(params, "cpu")

    assert problems_by_path(out) == {
        "truncated.mp4": "corrupt",
        "zero.mp4": "empty_file",
        "short.mp4": "too_few_frames",
        "small.mp4": "too_small",
        "no_caption.mp4": "missing_caption",
        "blank_caption.mp4": "empty_caption",
        "folder.mp4": "unreadable",
        "text.mp4": "not_a_video",
        "gone.mp4": "missing_file",
    }
    assert summary.problems == {
        "missing_file": 1,
        "unreadable": 1,
        "empty_file": 1,
        "not_a_video": 1,
        "corrupt": 1,
        "too_few_frames": 1,
        "too_small": 1,
        "missing_caption": 1,
        "empty_caption": 1,
    }
    cache = open_cache(out)
    index = cache.index.set_index(cache.index["source"].map(lambda s: Path(s).name))
    assert sorted(index.index) == ["good_long.mp4", "good_square.mp4", "good_wide.mp4", "m0.mp4"]
    # 32×64 at pixel area 32²: aspect 2.0, W = sqrt(1024·2) = 45.3 → 48, H = 45.3 / 2 = 22.6 → 24 (multiples of
    # 4·2 = 8); 21 frames → 1 + 20/4 = 6 latent frames; the VAE's 4× spatial factor gives 6×12 latents.
    assert index.loc["good_wide.mp4", "bucket"] == "21x24x48"
    assert list(index.loc["good_wide.mp4", "latent_shape"]) == [4, 6, 6, 12]
    assert index.loc["good_long.mp4", "bucket"] == "21x32x32"
    assert index.loc["m0.mp4", "caption"] == "a white dot moving down"
    # nothing was deleted: delete_problematic_images is false
    assert (videos / "text.mp4").exists() and (videos / "zero.mp4").exists()

    loader = CacheLoader(cache, batch_size=2, seed=0, drop_last=False)
    for batch, _ in zip(loader, range(loader.batches_per_epoch)):
        buckets = {cache.index.set_index("key").loc[k, "bucket"] for k in batch.keys}
        assert len(buckets) == 1
        frames, height, width = (int(v) for v in buckets.pop().split("x"))
        assert batch.latents_BCTHW.shape == (
            len(batch.keys),
            4,
            (frames - 1) // 4 + 1,
            height // 4,
            width // 4,
        )
        assert batch.prompt_embeds_BLD.shape == (len(batch.keys), MAX_LEN, 32)
        assert batch.noise_BCTHW is None

    # with delete_problematic_images the files that are no video go; valid videos left out for their caption,
    # size or length stay, as do folders and what cannot be read
    params.cache.delete_problematic_images = True
    build_cache(params, "cpu")
    for name in ("truncated", "zero", "text"):
        assert not (videos / f"{name}.mp4").exists(), name
    for name in ("short", "small", "no_caption", "blank_caption"):
        assert (videos / f"{name}.mp4").is_file(), name
    assert (videos / "folder.mp4").is_dir()
    assert all((videos / f"good_{n}.mp4").exists() for n in ("square", "wide", "long"))
    table = pd.read_parquet(out / "problems.parquet")
    assert sorted(Path(p).name for p in table.loc[table["deleted"], "path"]) == [
        "text.mp4",
        "truncated.mp4",
        "zero.mp4",
    ]


_BUILD_IN_CHILD = """
import sys
from dmd.data.cache.build import build_cache
from dmd.core.config import load
build_cache(load(sys.argv[1]), "cpu")
"""


def test_a_clip_in_a_folder_that_cannot_be_listed_is_a_problem(wan_dir, tmp_path):
    """A non-root user's unreadable sub-folder: its clips must show up in problems.parquet, not vanish."""
    import subprocess
    import sys

    from dmd.core.config import dump

    videos = tmp_path / "videos"
    videos.mkdir()
    add_clip(videos, "good", "a red ball moving left", seed=1)
    locked = videos / "locked"
    locked.mkdir()
    add_clip(locked, "inside", "a blue box moving right", seed=2)
    out = tmp_path / "cache"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(
        dump(make_params(wan_dir, out, [{"id": "folder", "instance_data_dir": str(videos)}]))
    )
    # root reads any folder; without the capabilities that let it, it meets the permissions a user meets
    as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if as_user and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: every folder is readable")
    locked.chmod(0)
    try:
        subprocess.run([*as_user, sys.executable, "-c", _BUILD_IN_CHILD, str(params_file)], check=True)
    finally:
        locked.chmod(0o755)
    assert problems_by_path(out) == {"locked": "unreadable"}
    reason = pd.read_parquet(out / "problems.parquet")["reason"][0]
    assert "cannot be listed" in reason
    assert open_cache(out).index["source"].map(lambda s: Path(s).name).tolist() == ["good.mp4"]


def test_no_usable_sample_fails_and_says_why(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")
    (videos / "a.txt").write_text("x")
    add_clip(videos, "b", None)
    params = make_params(wan_dir, tmp_path / "cache", [{"id": "only", "instance_data_dir": str(videos)}])
    with pytest.raises(NoUsableSamplesError, match=r"no usable sample.*empty_file.*missing_caption"):
        build_cache(params, "cpu")
    assert problems_by_path(tmp_path / "cache") == {"a.mp4": "empty_file", "b.mp4": "missing_caption"}
    assert not (tmp_path / "cache/index.parquet").exists()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of frames in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-12))


def test_latents_are_normalised_and_decode_like_the_vae_itself(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    path = add_clip(videos, "clip", "a red ball moving left", seed=11)
    out = tmp_path / "cache"
    build_cache(make_params(wan_dir, out, [{"id": "d", "instance_data_dir": str(videos)}]), "cpu")
    cache = open_cache(out)
    latents = cache.load(cache.index["key"][0])["latents"]

    vae = AutoencoderKLWan.from_pretrained(wan_dir, subfolder="vae").eval()
    source = torch.from_numpy(read_video(path)).permute(3, 0, 1, 2).float() / 127.5 - 1  # 3,F,H,W
    with torch.no_grad():
        z = vae.encode(source[None]).latent_dist.mode()[0]
        direct = vae.decode(z[None]).sample[0]
        # WanPipeline's inverse: latents / (1 / std) + mean
        mean = torch.tensor(LATENTS_MEAN).view(-1, 1, 1, 1)
        std = torch.tensor(LATENTS_STD).view(-1, 1, 1, 1)
        decoded = vae.decode((latents / (1 / std) + mean)[None]).sample[0]
    torch.testing.assert_close(latents, (z - mean) / std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, direct, atol=1e-4, rtol=1e-4)
    # The cache loses nothing beyond the VAE's own round trip. The random tiny VAE reconstructs poorly: its
    # PSNR against the source is printed for the record, not judged.
    assert abs(psnr(decoded, source) - psnr(direct, source)) < 0.01
    print(f"tiny random VAE: PSNR(decoded cache, source) = {psnr(decoded, source):.2f} dB")


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto"])
def test_embeddings_equal_wan_pipeline(wan_dir, tmp_path, precision):
    videos = tmp_path / "videos"
    videos.mkdir()
    captions = ["a red ball moving left", "a small blue square moving up quickly, with a stripe"]
    for i, caption in enumerate(captions):
        add_clip(videos, f"c{i}", caption, seed=i)
    out = tmp_path / "cache"
    params = make_params(
        wan_dir,
        out,
        [{"id": "d", "instance_data_dir": str(videos)}],
        model={"text_encoder_1_precision": precision},
        compress_disk_cache=True,
    )
    build_cache(params, "cpu")
    cache = open_cache(out)

    pipe = WanPipeline.from_pretrained(wan_dir)
    if precision == "int8-quanto":
        from dmd.wan.loading import quantize_int8

        quantize_int8(pipe.text_encoder)

    def reference(prompt: str) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=MAX_LEN)
        return embeds

    for caption in captions:
        key = cache.index.set_index("caption").loc[caption, "key"]
        torch.testing.assert_close(cache.load(key)["prompt_embeds"], reference(caption)[0], atol=0, rtol=0)
    torch.testing.assert_close(
        cache.negative_prompt_embeds, reference(params.model.negative_prompt), atol=0, rtol=0
    )
    torch.testing.assert_close(cache.empty_prompt_embeds, reference(""), atol=0, rtol=0)


def shard_files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("shard-*.safetensors")}


def test_rerun_encodes_only_what_changed(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        add_clip(videos, f"c{i}", f"a red ball moving left {'slowly' if i % 2 else 'quickly'}", seed=i)
    out = tmp_path / "cache"
    params = make_params(wan_dir, out, [{"id": "d", "instance_data_dir": str(videos)}])
    first = build_cache(params, "cpu")
    assert (first.encoded, first.reused, first.captions_embedded) == (4, 0, 2)
    before_index, before_shards = open_cache(out).index, shard_files(out)

    second = build_cache(params, "cpu")
    assert (second.encoded, second.reused, second.captions_embedded) == (0, 4, 0)
    assert shard_files(out) == before_shards
    pd.testing.assert_frame_equal(open_cache(out).index, before_index)

    add_clip(videos, "c2", "a red ball moving left quickly", seed=99)  # new content, same name and caption
    third = build_cache(params, "cpu")
    assert (third.encoded, third.reused, third.captions_embedded) == (1, 3, 0)
    after = open_cache(out)
    changed = after.index["source"].str.endswith("c2.mp4")
    assert set(after.index["key"][~changed]) == set(
        before_index["key"][~before_index["source"].str.endswith("c2.mp4")]
    )
    assert after.index["key"][changed].item() not in set(before_index["key"])
    assert len(after.index) == 4  # the stale entry of the old c2 is not in the index

    # the re-encoded clip equals a cache built from scratch
    fresh_out = tmp_path / "fresh"
    build_cache(make_params(wan_dir, fresh_out, [{"id": "d", "instance_data_dir": str(videos)}]), "cpu")
    fresh = open_cache(fresh_out)
    key = after.index["key"][changed].item()
    torch.testing.assert_close(after.load(key)["latents"], fresh.load(key)["latents"], atol=0, rtol=0)

    (videos / "c3.txt").write_text("a blue box moving right")  # a caption change embeds, encodes no video
    fourth = build_cache(params, "cpu")
    assert (fourth.encoded, fourth.captions_embedded) == (0, 1)

    params.cache.datasets[0].num_frames = 17  # a preprocessing change re-encodes everything
    fifth = build_cache(params, "cpu")
    assert fifth.encoded == 4
    assert set(open_cache(out).index["bucket"]) == {"17x32x32"}


def write_teacher_shard(root: Path, shard: int, rows: list[dict], latent_shape, seed: int) -> pd.DataFrame:
    """A generate-stage shard in the shared format: mp4 + exact latents + noise + manifest."""
    folder = root / f"shard-{shard:05d}"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for i, row in enumerate(rows):
        vid = f"{shard:05d}-{i:03d}"
        path = write_video(folder / f"{vid}.mp4", synthetic_clip(21, 32, 32, seed + i))
        save_file(
            {"latents": torch.randn(latent_shape, generator=gen)}, str(folder / f"{vid}.latents.safetensors")
        )
        save_file(
            {"noise": torch.randn(latent_shape, generator=gen)}, str(folder / f"{vid}.noise.safetensors")
        )
        from dmd.core.io import sha256_file

        records.append(
            {
                "id": vid,
                "negative_prompt": "",
                "seed": seed + i,
                "steps": 2,
                "guidance": 3.0,
                "shift": 3.0,
                "frames": 21,
                "fps": 8,
                "width": 32,
                "height": 32,
                "teacher_revision": None,
                "video": f"{vid}.mp4",
                "sha256": sha256_file(path),
                "latents": f"{vid}.latents.safetensors",
                "noise": f"{vid}.noise.safetensors",
                **row,
            }
        )
    table = pd.DataFrame(records)
    table.to_parquet(folder / "manifest.parquet")
    return table.assign(shard=shard)


def test_teacher_latents_are_taken_when_exact(wan_dir, tmp_path):
    data = tmp_path / "teacher"
    shape = (4, 6, 8, 8)
    rows = [{"prompt": f"a red ball moving {d}", "teacher": str(wan_dir)} for d in ("left", "right", "up")]
    table = pd.concat([write_teacher_shard(data, s, rows, shape, seed=10 * s) for s in range(2)])
    table.to_parquet(data / "manifest.parquet")
    # the second video of shard 1 changed after generation: its latents are stale, so it is encoded instead
    changed = data / "shard-00001/00001-001.mp4"
    write_video(changed, synthetic_clip(21, 32, 32, seed=77))

    out = tmp_path / "cache"
    params = make_params(wan_dir, out, [{"id": "teacher", "manifest": str(data)}])
    summary = build_cache(params, "cpu")
    assert (summary.encoded, summary.from_teacher) == (6, 5)
    cache = open_cache(out)
    index = cache.index.set_index(cache.index["source"].map(lambda s: Path(s).name))
    for name in index.index:
        item = cache.load(index.loc[name, "key"])
        if name == changed.name:
            assert index.loc[name, "latents_from"] == "vae" and "noise" not in item
            continue
        folder = data / f"shard-{name[:5]}"
        from safetensors.torch import load_file

        torch.testing.assert_close(
            item["latents"], load_file(folder / f"{name[:-4]}.latents.safetensors")["latents"]
        )
        torch.testing.assert_close(
            item["noise"], load_file(folder / f"{name[:-4]}.noise.safetensors")["noise"]
        )
    loader = CacheLoader(cache, batch_size=2, seed=0)
    assert any(batch.noise_BCTHW is not None for batch, _ in zip(loader, range(loader.batches_per_epoch)))

    params.cache.use_teacher_latents = False
    assert build_cache(params, "cpu").from_teacher == 0


def test_compressed_shards_hold_the_same_tensors(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        add_clip(videos, f"c{i}", f"a red ball moving left {i}", seed=i)
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    dataset = [{"id": "d", "instance_data_dir": str(videos)}]
    build_cache(make_params(wan_dir, plain, dataset), "cpu")
    build_cache(make_params(wan_dir, packed, dataset, compress_disk_cache=True), "cpu")
    a, b = open_cache(plain), open_cache(packed)
    assert list(a.index["key"]) == list(b.index["key"])
    for key in a.index["key"]:
        for name, tensor in a.load(key).items():
            torch.testing.assert_close(b.load(key)[name], tensor, atol=0, rtol=0)
    from safetensors import safe_open

    shard = next((packed / "latents/d").glob("shard-*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        assert f.metadata()["compression"] == "zstd"
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())


def test_dataset_cache_dir_and_repeats(wan_dir, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    add_clip(videos, "c0", "a red ball moving left")
    out, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    params = make_params(
        wan_dir,
        out,
        [{"id": "d", "instance_data_dir": str(videos), "cache_dir": str(elsewhere), "repeats": 2}],
    )
    build_cache(params, "cpu")
    assert list(elsewhere.glob("shard-*.safetensors")) and not (out / "latents").exists()
    cache = open_cache(out)
    assert cache.index["repeats"].tolist() == [2]
    assert cache.load(cache.index["key"][0])["latents"].shape == (4, 6, 8, 8)


@pytest.mark.slow
def test_cache_flow_runs_from_the_cli_entry_point(
    tiny_params_file, tiny_params, tiny_wan_dir, monkeypatch, capsys
):
    from flows.cache import main

    # a loaded two-core machine can take longer than Prefect's default 20 s to start its ephemeral API server
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

    data = Path(tiny_params.generate.output_dir)
    rows = [{"prompt": f"a red ball moving {d}", "teacher": str(tiny_wan_dir)} for d in ("left", "right")]
    pd.concat([write_teacher_shard(data, s, rows, (4, 6, 8, 8), seed=s) for s in range(2)]).to_parquet(
        data / "manifest.parquet"
    )
    args = argparse.Namespace(params=str(tiny_params_file), overrides=["cache.chunk_size=3"])
    assert main(args) == 0
    out = Path(tiny_params.cache.output_dir)
    cache = open_cache(out)
    assert len(cache.index) == 4 and set(cache.index["latents_from"]) == {"teacher"}
    assert "chunk_size: 3" in (out / "params.effective.yaml").read_text()
    written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args) == 0  # the warm re-run succeeds, encodes nothing and rewrites the same bytes
    assert "(0 encoded, 0 from teacher latents, 4 reused)" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
    assert json.loads((out / "summary.json").read_text())["samples"] == 4


_KILLED_WHILE_WRITING = """
import os, signal, sys
from dmd.core.io import atomic_path

with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a shard")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_rerun_removes_what_a_killed_run_was_writing_and_nothing_else(wan_dir, tmp_path):
    import subprocess
    import sys

    from dmd.core.io import atomic_path

    videos = tmp_path / "videos"
    videos.mkdir()
    add_clip(videos, "clip", "a red ball moving left", seed=1)
    out = tmp_path / "cache"
    params = make_params(wan_dir, out, [{"id": "folder", "instance_data_dir": str(videos)}])
    build_cache(params, "cpu")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    for target in (out / "index.parquet", out / "latents" / "folder" / "shard-x.safetensors"):
        subprocess.run([sys.executable, "-c", _KILLED_WHILE_WRITING, str(target)], check=False)
    leftovers = [p for p in out.rglob(".*.tmp*")]
    assert len(leftovers) == 2
    with atomic_path(out / "text" / "in-progress.bin") as writing:  # a running writer's (this process's)
        writing.write_bytes(b"still being written")
        build_cache(params, "cpu")
        assert writing.exists()
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.name != "in-progress.bin") == before
