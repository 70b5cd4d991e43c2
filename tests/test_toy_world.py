"""The toy world: deterministic by seed, a held-out split disjoint from training, real multi-modality."""

import numpy as np
import pytest

from dmd.core.config import ToyConfig
from dmd.toy.world import ATTRIBUTES, COLOURS, OBJECT_SIZE, SPEEDS, ToyWorld, parse_caption, shape_mask
from dmd.wan.tiny import build_tokenizer


@pytest.fixture(scope="module")
def world():
    return ToyWorld(ToyConfig())


def test_clips_are_deterministic_by_seed(world):
    caption = world.captions()[0]
    a = world.sample_clip(caption, np.random.default_rng(3))
    b = world.sample_clip(caption, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (21, 32, 32, 3)
    np.testing.assert_array_equal(a, b)
    clips_a, caps_a = world.sample_dataset(40, seed=5)
    clips_b, caps_b = world.sample_dataset(40, seed=5)
    np.testing.assert_array_equal(clips_a, clips_b)
    assert caps_a == caps_b
    assert world.sample_dataset(40, seed=6)[1] != caps_a


def test_held_out_split_is_disjoint_and_keeps_every_value_in_training(world):
    train, held = world.captions("train"), world.captions("held_out")
    assert len(held) == ToyConfig().num_held_out
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(set(train) | set(held))
    for attribute in ATTRIBUTES:
        held_values = {parse_caption(c).attributes()[attribute] for c in held}
        train_values = {parse_caption(c).attributes()[attribute] for c in train}
        assert held_values <= train_values
    assert ToyWorld(ToyConfig()).captions("held_out") == held
    assert ToyWorld(ToyConfig(seed=1)).captions("held_out") != held
    _, captions = world.sample_dataset(200, seed=0)
    assert not set(captions) & set(held)


def test_one_caption_allows_many_clips_all_in_frame(world):
    caption = "a blue cross moving up slowly"
    rng = np.random.default_rng(0)
    clips = [world.sample_clip(caption, rng) for _ in range(16)]
    distinct = {clip.tobytes() for clip in clips}
    assert len(distinct) >= 12
    area = shape_mask("cross").sum()
    for clip in clips:
        object_pixels = (clip == COLOURS["blue"]).all(-1).sum(axis=(1, 2))
        np.testing.assert_array_equal(object_pixels, area)  # never cut by the border


@pytest.mark.parametrize(
    "direction,step", [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))]
)
@pytest.mark.parametrize("speed", list(SPEEDS))
def test_object_moves_as_captioned(world, direction, step, speed):
    caption = f"a red square moving {direction} {speed}"
    clip = world.sample_clip(caption, np.random.default_rng(1))
    ys, xs = np.nonzero((clip[0] == COLOURS["red"]).all(-1))
    ye, xe = np.nonzero((clip[-1] == COLOURS["red"]).all(-1))
    travel = int(SPEEDS[speed] * (clip.shape[0] - 1))  # 10 px slowly, 20 px quickly over 21 frames
    assert (xe.min() - xs.min(), ye.min() - ys.min()) == (step[0] * travel, step[1] * travel)
    assert xs.max() - xs.min() + 1 == OBJECT_SIZE


def test_vocabulary_tokenizes_every_caption_without_unknown_words(world):
    tokenizer = build_tokenizer(world.vocabulary())
    for caption in world.captions("train") + world.captions("held_out"):
        assert tokenizer.unk_token_id not in tokenizer(caption).input_ids


def test_bad_captions_and_sizes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="toy grammar"):
        parse_caption("a purple square moving left slowly")
    with pytest.raises(ValueError, match="too small"):
        ToyWorld(ToyConfig(height=16, width=16))
