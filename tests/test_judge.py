"""The judge: real clips score near perfect; each kind of damage lowers the measure made for it."""

import json
from argparse import Namespace

import numpy as np
import pytest
from scipy import ndimage

from dmd.core.config import ToyConfig
from dmd.core.video import read_video, write_video
from dmd.toy.judge import frechet_distance, judge_clips, main, reference_clips
from dmd.toy.world import COLOURS, ToyWorld, parse_caption


@pytest.fixture(scope="module")
def world():
    return ToyWorld(ToyConfig())


@pytest.fixture(scope="module")
def real(world):
    rng = np.random.default_rng(11)
    captions = [c for c in world.captions("held_out") for _ in range(3)]
    return [world.sample_clip(c, rng) for c in captions], captions


@pytest.fixture(scope="module")
def reference(world, real):
    return reference_clips(world, real[1], per_caption=8)


def test_real_clips_score_perfectly(world, real, reference):
    result = judge_clips(*real, world, reference)
    assert result["accuracy"] == {"colour": 1.0, "shape": 1.0, "direction": 1.0, "speed": 1.0}
    assert result["sharpness"] == 1.0
    assert result["motion_consistency"] == 1.0
    assert result["diversity"] > 0.6
    assert len(result["clips"]) == len(real[0])


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_damage(world, real):
    clips, captions = real
    same = judge_clips(clips, captions, world, reference=(clips, captions))
    assert same["fd"] == pytest.approx(0.0, abs=1e-4)
    blurred = [ndimage.gaussian_filter(c.astype(float), (0, 1, 1, 0)).round().astype(np.uint8) for c in clips]
    assert judge_clips(blurred, captions, world, reference=(clips, captions))["fd"] > 0.1


def test_frechet_distance_matches_the_one_dimensional_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (400, 1)), rng.normal(2, 3, (400, 1))
    ma, mb, sa, sb = a.mean(), b.mean(), a.std(ddof=1), b.std(ddof=1)
    assert frechet_distance(a, b) == pytest.approx((ma - mb) ** 2 + (sa - sb) ** 2, rel=1e-4)


def test_blur_lowers_sharpness(world, real, reference):
    clips, captions = real
    blurred = [ndimage.gaussian_filter(c.astype(float), (0, 1, 1, 0)).round().astype(np.uint8) for c in clips]
    result = judge_clips(blurred, captions, world, reference)
    assert result["sharpness"] < 0.5
    assert result["accuracy"]["colour"] == 1.0  # blur is not a colour error


def test_mode_averaged_clips_are_blurry_and_inaccurate(world, real, reference):
    clips, captions = real
    rng = np.random.default_rng(5)
    averaged = [
        np.mean([world.sample_clip(c, rng) for _ in range(8)], axis=0).round().astype(np.uint8)
        for c in captions
    ]
    result = judge_clips(averaged, captions, world, reference)
    assert result["sharpness"] < 0.3
    assert result["fd"] > 10 * judge_clips(clips, captions, world, reference)["fd"]


def test_wrong_colour_is_a_colour_error_only(world, real, reference):
    _, captions = real
    rng = np.random.default_rng(2)
    names = list(COLOURS)
    swapped = []
    for caption in captions:
        c = parse_caption(caption)
        other = names[(names.index(c.colour) + 1) % len(names)]
        swapped.append(world.sample_clip(caption.replace(c.colour, other), rng))
    result = judge_clips(swapped, captions, world, reference)
    assert result["accuracy"]["colour"] == 0.0
    assert (
        result["accuracy"]["shape"] == result["accuracy"]["direction"] == result["accuracy"]["speed"] == 1.0
    )
    assert result["sharpness"] == 1.0


def test_frozen_clips_fail_direction_and_speed(world, real, reference):
    clips, captions = real
    frozen = [np.repeat(c[:1], len(c), axis=0) for c in clips]
    result = judge_clips(frozen, captions, world, reference)
    assert result["accuracy"]["direction"] == 0.0 and result["accuracy"]["speed"] == 0.0
    assert result["accuracy"]["colour"] == result["accuracy"]["shape"] == 1.0


def test_jumbled_frames_lower_motion_consistency(world, real, reference):
    clips, captions = real
    order = np.random.default_rng(0).permutation(len(clips[0]))
    result = judge_clips([c[order] for c in clips], captions, world, reference)
    assert result["motion_consistency"] < 0.7


def test_identical_seeds_have_no_diversity(world, real, reference):
    clips, captions = real
    copies = [clips[i - i % 3] for i in range(len(clips))]  # every seed repeats the caption's first clip
    assert judge_clips(copies, captions, world, reference)["diversity"] == pytest.approx(0.0)


def test_judge_cli_on_mp4_files(tmp_path, world, real, capsys):
    clips, captions = real
    videos = [str(write_video(tmp_path / f"{i}.mp4", clip, fps=8)) for i, clip in enumerate(clips[:6])]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(captions[:6]))
    (tmp_path / "params.yaml").write_text("toy:\n  seed: 0\n")
    out = tmp_path / "judge.json"
    args = Namespace(
        videos=videos, prompts=[str(prompts)], params=str(tmp_path / "params.yaml"), output=str(out)
    )
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["accuracy"]
    assert all(v == 1.0 for v in result["accuracy"].values())
    assert result["sharpness"] > 0.85  # H.264's 4:2:0 chroma costs a little at object edges
    assert result["clips"][0]["video"] == videos[0]
    assert read_video(videos[0]).shape == clips[0].shape

    bad = Namespace(videos=videos, prompts=captions[:2], params=args.params, output=None)
    assert main(bad) == 2
    assert "6 videos but 2 prompts" in capsys.readouterr().err
