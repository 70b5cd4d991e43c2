"""Teacher data generation: prompt libraries, seeds, shard plans, exactness against plain diffusers, bad input,
and (slow) a real SIGKILL in the middle of a shard followed by a resume that matches an uninterrupted run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dmd.core.config import load
from dmd.core.io import sha256_file
from dmd.core.video import read_video, write_video
from dmd.data.generate import (
    GenerationError,
    ShardsFailedError,
    generate_shard,
    generate_teacher_data,
    missing_shards,
    parse_shard_range,
    prepare,
    prompt_index,
    sample_seed,
    write_manifest,
)
from dmd.data.prompts import PromptLibraryError, load_prompt_library
from dmd.data.schema import MANIFEST
from dmd.wan.decode import LatentDecoder

REPO = Path(__file__).resolve().parents[1]
DMD = str(Path(sys.executable).parent / "dmd")


def _params(tiny_params_file: Path, name: str, **generate) -> Path:
    """The tiny params file with `generate` keys changed, written next to it as `name`."""
    raw = yaml.safe_load(tiny_params_file.read_text())
    raw["generate"].update(generate)
    path = tiny_params_file.with_name(name)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ---------------------------------------------------------------------------------------------------------------
# Pure planning


def test_sample_seeds_are_pure_and_do_not_collide_across_base_seeds():
    seeds = {(b, i): sample_seed(b, i) for b in range(3) for i in range(2000)}
    assert len(set(seeds.values())) == len(seeds)  # base + index would collide: (0, 1) and (1, 0)
    assert all(0 <= s < 2**63 for s in seeds.values())
    assert [sample_seed(1, i) for i in (5, 1999, 0)] == [seeds[1, 5], seeds[1, 1999], seeds[1, 0]]


def test_shard_ranges():
    assert parse_shard_range(None, 5) == range(5)
    assert parse_shard_range("1:3", 5) == range(1, 3)
    assert parse_shard_range("2:", 5) == range(2, 5)
    assert parse_shard_range(":2", 5) == range(0, 2)
    assert parse_shard_range("4", 5) == range(4, 5)
    for bad in ("3:1", "0:6", "a:b", "1:2:3"):
        with pytest.raises(GenerationError, match="--shards"):
            parse_shard_range(bad, 5)


def test_prompt_order_visits_every_prompt_once_per_pass():
    orders = [[prompt_index(3, i, 7) for i in range(c * 7, (c + 1) * 7)] for c in range(3)]
    assert all(sorted(order) == list(range(7)) for order in orders)
    assert len({tuple(o) for o in orders}) == 3  # a new order each pass
    assert [prompt_index(3, i, 7) for i in range(21)] == [
        i for o in orders for i in o
    ]  # pure: recomputed alike
    assert [prompt_index(4, i, 7) for i in range(7)] != orders[0]
    assert all(prompt_index(0, i, 1) == 0 for i in range(5))


def test_plan_sizes_the_last_shard_and_draws_seeds_and_prompts_by_index(tiny_params_file):
    params = load(tiny_params_file, ["generate.num_videos=7", "generate.shard_size=3"])
    plan = prepare(params)
    assert plan.num_shards == 3
    samples = [s for k in range(3) for s in plan.samples(k)]
    assert [s.index for s in samples] == list(range(7)) and [len(plan.samples(k)) for k in range(3)] == [
        3,
        3,
        1,
    ]
    for s in samples:
        prompt = plan.prompts[prompt_index(params.generate.seed, s.index, len(plan.prompts))]
        assert (s.id, s.prompt, s.prompt_id) == (f"{s.index:08d}", prompt.text, prompt.id)
        assert s.seed == sample_seed(params.generate.seed, s.index)


# ---------------------------------------------------------------------------------------------------------------
# Prompt libraries and bad input


def test_prompt_library_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red ball\n\n  a blue box  \n")
    assert [(p.id, p.text, p.row) for p in load_prompt_library(str(txt))] == [
        ("0", "a red ball", 1),
        ("1", "a blue box", 3),
    ]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "x", "prompt": "a red ball"}\n"a blue box"\n{"caption": "a dot", "id": 7}\n')
    assert [(p.id, p.text) for p in load_prompt_library(str(jsonl))] == [
        ("x", "a red ball"),
        ("1", "a blue box"),
        ("7", "a dot"),
    ]
    parquet = tmp_path / "p.parquet"
    pd.DataFrame({"id": ["a", "b"], "text": ["one", "two"]}).to_parquet(parquet)
    assert [(p.id, p.text) for p in load_prompt_library(str(parquet))] == [("a", "one"), ("b", "two")]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "\n\n", "no prompts"),
        (
            "dups.jsonl",
            '{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "b"}\n{"id": 1, "prompt": "c"}\n',
            "rows 1, 3",
        ),
        ("blank.jsonl", '{"prompt": "a"}\n{"prompt": "  "}\n', "empty prompt at row"),
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"title": "a"}\n', "no caption"),
        ("p.csv", "a\n", "suffix"),
    ],
)
def test_prompt_library_errors_name_file_and_rows(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptLibraryError, match=message) as err:
        load_prompt_library(str(path))
    assert name in str(err.value)


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_a_prompt_file_that_is_not_utf8_is_named_with_its_line(tiny_params_file, tmp_path, capsys, name):
    library = tmp_path / name
    lines = ["a red ball", "une balle rouge tr\u00e8s lente"]
    if name.endswith(".jsonl"):
        lines = [json.dumps({"prompt": t}, ensure_ascii=False) for t in lines]
    library.write_bytes("\n".join(lines).encode("latin-1"))
    assert _run_main(tiny_params_file, overrides=[f"generate.prompts={library}"]) == 2
    err = capsys.readouterr().err
    assert f"{name}:2: not UTF-8 text (byte 0xe8" in err and "Traceback" not in err


def test_duplicate_ids_in_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"id": [3, 3], "prompt": ["a", "b"]}).to_parquet(path)
    with pytest.raises(PromptLibraryError, match="id '3' at rows 0, 1"):
        load_prompt_library(str(path))


def test_over_length_prompts_are_counted_with_their_rows(tiny_params_file, tmp_path, caplog):
    library = tmp_path / "long.txt"
    library.write_text(
        "a red ball\n" + " ".join(["red"] * 40) + "\na blue box\n" + " ".join(["box"] * 30) + "\n"
    )
    params = load(tiny_params_file, [f"generate.prompts={library}"])
    with caplog.at_level(logging.WARNING, logger="dmd.data.prompts"):
        prepare(params)
    text = caplog.text
    assert "2 of 4 prompt(s) exceed model.max_sequence_length=16" in text
    assert "row(s) 2, 4" in text


def _run_main(params_file: Path, shards: str | None = None, overrides=()) -> int:
    from flows.generate import main

    args = argparse.Namespace(params=str(params_file), overrides=list(overrides), shards=shards)
    return main(args)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.pretrained_model_name_or_path=./no/such/teacher", "no/such/teacher"),
        ("generate.prompts={tmp}/missing.txt", "missing.txt not found"),
        ("generate.prompts={tmp}/empty.txt", "no prompts"),
        ("generate.output_dir={tmp}/a-file/out", "generate.output_dir="),
    ],
)
def test_bad_input_fails_before_any_sampling(tiny_params_file, tmp_path, capsys, override, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a-file").write_text("a file where a directory should be")
    out = load(tiny_params_file).generate.output_dir
    code = _run_main(tiny_params_file, overrides=[override.format(tmp=tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(Path(out).glob("shard-*")) and not list(Path(out).glob(".shard-*"))


def test_a_size_that_is_not_a_multiple_of_16_stops_at_the_settings(tiny_params_file, capsys):
    from flows.cli import main as dmd

    out = load(tiny_params_file).generate.output_dir
    assert dmd(["generate", "--params", str(tiny_params_file), "--set", "generate.height=36"]) == 2
    assert "generate.height: 36 is not a multiple of 16" in capsys.readouterr().err
    assert not Path(out).exists() or not list(Path(out).iterdir())


def test_shard_range_beyond_target_is_refused(tiny_params_file, capsys):
    assert _run_main(tiny_params_file, shards="0:9") == 2
    assert "the target has 3 shard(s)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Exactness against plain diffusers


def test_shard_matches_plain_diffusers_from_the_saved_noise(tiny_params_file, tiny_wan_dir, tmp_path):
    """A non-default shift; WanPipeline loaded by diffusers itself, run on the shard's batch from the saved
    noise, gives the saved latents exactly and the frames the videos encode; the noise is torch.randn from
    the stored seed."""
    from diffusers import WanPipeline

    params = load(tiny_params_file, ["generate.flow_shift=5.0"])
    assert params.generate.batch_size == params.generate.shard_size == 2  # one batch: one pipeline call
    plan = prepare(params)
    result = generate_shard(plan, 1)
    assert result.videos == 2 and result.sampling_seconds > 0
    shard = plan.shard_dir(1)
    rows = pd.read_parquet(shard / MANIFEST)
    assert list(rows["id"]) == ["00000002", "00000003"]

    noise = torch.stack([load_file(shard / f)["noise"] for f in rows["noise"]])
    for seed, sample_noise in zip(rows["seed"], noise):
        reference = torch.randn(sample_noise.shape, generator=torch.Generator().manual_seed(int(seed)))
        assert torch.equal(sample_noise, reference)

    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=5.0)
    pipe.set_progress_bar_config(disable=True)
    call = dict(
        prompt=list(rows["prompt"]),
        negative_prompt=list(rows["negative_prompt"]),
        height=32,
        width=32,
        num_frames=21,
        num_inference_steps=int(rows["steps"][0]),
        guidance_scale=float(rows["guidance"][0]),
        latents=noise,
        max_sequence_length=params.model.max_sequence_length,
    )
    latents = pipe(**call, output_type="latent").frames
    saved = torch.stack([load_file(shard / f)["latents"] for f in rows["latents"]])
    assert torch.equal(saved, latents)
    frames = pipe(**call, output_type="np").frames
    ours = LatentDecoder(pipe.vae)(latents)
    assert np.array_equal(ours, (frames * 255).round().astype(np.uint8))

    # random weights draw noise-like frames that H.264 keeps only roughly, so each mp4 is compared with an
    # encoding of the expected frames (two encodings of the same frames differ by ~0.05 levels on average)
    videos = []
    for row, expected in zip(rows.itertuples(), ours):
        assert sha256_file(shard / row.video) == row.sha256
        video = read_video(shard / row.video)
        assert video.shape == (21, 32, 32, 3)
        encoded = read_video(write_video(tmp_path / f"{row.id}.mp4", expected, fps=params.generate.fps))
        assert _mean_abs(video, encoded) < 0.5
        videos.append(video)
    assert _mean_abs(*videos) > 5  # the tolerance above tells videos apart


def test_complete_shards_are_skipped_and_stale_or_broken_ones_redone(tiny_params_file):
    params = load(tiny_params_file)
    plan = prepare(params)
    assert missing_shards(plan) == [0, 1, 2]
    generate_shard(plan, 0)
    leftover = plan.output_dir / ".shard-00001.k1ll3d.tmp"
    leftover.mkdir()
    (leftover / "00000002.mp4").write_bytes(b"half")
    assert missing_shards(plan) == [1, 2]
    assert generate_shard(plan, 0).videos == 0  # complete: nothing done
    generate_shard(plan, 1)
    assert not leftover.exists() and missing_shards(plan) == [2]

    changed = prepare(load(tiny_params_file, ["generate.guidance_scale=2.0"]))
    assert changed.status(0) == "stale" and missing_shards(changed, range(2)) == [0, 1]
    (plan.shard_dir(1) / "00000003.mp4").unlink()
    assert plan.status(1) == "stale"

    manifest = write_manifest(plan)
    assert list(manifest["shard"]) == [0, 0]  # shard 1 lost a file, shard 2 was never made
    shard0 = pd.read_parquet(plan.shard_dir(0) / MANIFEST)
    pd.testing.assert_frame_equal(manifest.drop(columns="shard"), shard0)


def test_the_stage_writes_the_manifest_of_what_succeeded_then_names_the_failed_shards(tiny_params_file):
    params = load(tiny_params_file)

    def shard_1_fails(plan, todo):  # as the flow's runner reports a shard whose task failed after its retries
        return [generate_shard(plan, k) for k in todo if k != 1], [1]

    with pytest.raises(ShardsFailedError, match=r"shard\(s\) \[1\] failed after"):
        generate_teacher_data(params, run_shards=shard_1_fails)
    out = Path(params.generate.output_dir)
    assert list(pd.read_parquet(out / MANIFEST)["shard"].unique()) == [0, 2]
    assert (out / "params.effective.yaml").is_file()

    report = generate_teacher_data(params, shards="0:3")  # in order, in this process: only shard 1 is left
    assert (report.generated_shards, report.complete_shards, report.target_shards) == ([1], 3, 3)
    assert generate_teacher_data(params).videos == 0


# ---------------------------------------------------------------------------------------------------------------
# End to end: a real SIGKILL during shard 1


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _generate(params: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [DMD, "generate", "--params", str(params), *extra], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tiny_params_file, prefect_server, tmp_path):
    # 3 videos per shard sampled one by one, so the kill lands between two samples of shard 1
    settings = dict(num_videos=9, shard_size=3, batch_size=1, num_inference_steps=30)
    params = _params(tiny_params_file, "kill.yaml", **settings)
    out = Path(load(params).generate.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    _generate(params, "--shards", "0:3", env=env)
    reference = tmp_path / "reference"
    out.rename(reference)

    proc = subprocess.Popen(
        [DMD, "generate", "--params", str(params), "--shards", "0:3"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(out.glob(".shard-00001.*.tmp/00000003.mp4")):  # the first video of shard 1 is written
        assert proc.poll() is None and time.monotonic() < deadline, (
            "the run ended before shard 1 was under way"
        )
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "shard-00001").exists(), "shard 1 must not count as done"
    assert list(out.glob(".shard-00001.*.tmp")) and not (out / MANIFEST).exists()

    _generate(params, "--shards", "0:3", env=env)
    resumed, expected = _tree(out), _tree(reference)
    assert sorted(resumed) == sorted(expected)
    # Byte for byte, except H.264 bitstreams: the mp4 bytes of two runs can differ (seen in about 1 video of 6
    # here, by ~0.05 levels, although latents are bit-identical), so videos compare decoded and manifests
    # compare without their sha256 column, which must still match each file.
    differing = [k for k in expected if resumed[k] != expected[k]]
    assert all(k.endswith((".mp4", MANIFEST)) for k in differing), differing
    for key in expected:
        if key.endswith(".mp4"):
            assert _mean_abs(read_video(out / key), read_video(reference / key)) < 0.5, key
        elif key.endswith(MANIFEST):
            table, reference_table = pd.read_parquet(out / key), pd.read_parquet(reference / key)
            pd.testing.assert_frame_equal(
                table.drop(columns="sha256"), reference_table.drop(columns="sha256")
            )
            shard_of = (lambda r: f"shard-{r.shard:05d}/") if "shard" in table else (lambda r: "")
            root = out / Path(key).parent
            assert all(sha256_file(root / (shard_of(r) + r.video)) == r.sha256 for r in table.itertuples())

    # shard 2 alone, in a fresh directory, reproduces its latents exactly
    alone = _params(tiny_params_file, "alone.yaml", **settings, output_dir=str(tmp_path / "alone"))
    generate_shard(prepare(load(alone)), 2)
    assert sorted(p.name for p in (tmp_path / "alone").glob("shard-*")) == ["shard-00002"]
    for name in ("00000006", "00000007", "00000008"):
        a = load_file(tmp_path / "alone" / "shard-00002" / f"{name}.latents.safetensors")["latents"]
        b = load_file(reference / "shard-00002" / f"{name}.latents.safetensors")["latents"]
        assert torch.equal(a, b)

    import decord

    manifest = pd.read_parquet(reference / MANIFEST)
    assert (
        list(manifest["index"]) == list(range(9)) and list(manifest["shard"]) == [0] * 3 + [1] * 3 + [2] * 3
    )
    for row in manifest.itertuples():
        vr = decord.VideoReader(str(reference / f"shard-{row.shard:05d}" / row.video))
        assert (len(vr), *vr[0].shape) == (21, 32, 32, 3)
    effective = yaml.safe_load((reference / "params.effective.yaml").read_text())
    assert (effective["generate"]["num_videos"], effective["generate"]["shard_size"]) == (9, 3)
