"""Resize / crop / aspect-bucket maths against hand-derived values."""

from __future__ import annotations

import math

import pytest
import torch

from dmd.data.buckets import (
    Bucket,
    bucket_size,
    frame_indices,
    meets_minimum_size,
    resize_clip,
    round_to_multiple,
    snap_frames,
    target_area,
)


def test_frames_snap_down_to_4k_plus_1():
    assert [snap_frames(n) for n in (1, 4, 5, 20, 21, 120, 121)] == [1, 1, 5, 17, 21, 117, 121]
    with pytest.raises(ValueError, match="at least 1"):
        snap_frames(0)


def test_frame_indices_step_by_interval():
    assert frame_indices(5, 1) == [0, 1, 2, 3, 4]
    assert frame_indices(5, 3) == [0, 3, 6, 9, 12]


def test_pixel_area_is_a_square_of_side_resolution():
    assert target_area("pixel_area", 480) == 480 * 480
    assert target_area("area", 0.5) == 500_000
    assert target_area("pixel", 480) is None


def test_wan_480p_bucket():
    # 832×480 at pixel_area 480, rounding 2, alignment 16 (VAE 8 × patch 2):
    # aspect round(832/480, 2) = 1.73; W = sqrt(480²·1.73) = 631.3 → 39.46·16 → 624; H = 631.3/1.73 = 364.9 → 368
    assert bucket_size(480, 832, "pixel_area", 480, 2, 16) == (368, 624)
    # the same clip in portrait swaps the sides' roles: aspect round(480/832, 2) = 0.58;
    # W = sqrt(230400·0.58) = 365.6 → 22.85·16 → 368; H = 365.6/0.58 = 630.3 → 39.4·16 → 624
    assert bucket_size(832, 480, "pixel_area", 480, 2, 16) == (624, 368)


def test_square_and_pixel_and_area_modes():
    assert bucket_size(100, 100, "pixel_area", 32, 2, 8) == (32, 32)  # upscaled or not, a square is res × res
    # pixel: the shorter edge is the resolution; 1.73 · 480 = 830.4 → 832
    assert bucket_size(480, 832, "pixel", 480, 2, 16) == (480, 832)
    # area 0.25 MP, square: side sqrt(250000) = 500 → 31.25·16 → 496
    assert bucket_size(720, 720, "area", 0.25, 2, 16) == (496, 496)


def test_rounding_decimals_merge_close_aspects():
    # 1.76 and 1.78 differ at 2 decimals but are both 1.8 at 1 decimal
    assert bucket_size(100, 176, "pixel_area", 480, 2, 16) != bucket_size(100, 178, "pixel_area", 480, 2, 16)
    assert bucket_size(100, 176, "pixel_area", 480, 1, 16) == bucket_size(100, 178, "pixel_area", 480, 1, 16)


def test_round_to_multiple_never_returns_zero():
    assert round_to_multiple(3, 16) == 16
    assert round_to_multiple(24, 16) == 32  # round half to even: 1.5 → 2
    assert round_to_multiple(40, 16) == 32  # 2.5 → 2


def test_minimum_size_is_measured_like_resolution():
    assert meets_minimum_size(24, 24, "pixel_area", 0)
    assert meets_minimum_size(20, 80, "pixel_area", 40)  # sqrt(1600) = 40
    assert not meets_minimum_size(20, 79, "pixel_area", 40)
    assert meets_minimum_size(1000, 1000, "area", 1.0) and not meets_minimum_size(999, 1000, "area", 1.0)
    assert meets_minimum_size(480, 832, "pixel", 480) and not meets_minimum_size(479, 832, "pixel", 480)


def test_bucket_names_round_trip():
    assert Bucket.parse(Bucket(21, 32, 48).name) == Bucket(21, 32, 48)


def test_resize_maps_to_minus_one_one_and_keeps_unchanged_sizes_exact():
    frames = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    out = resize_clip(frames, 8, 8, crop=False)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, frames.permute(3, 0, 1, 2).float() / 127.5 - 1)


def test_crop_keeps_the_center_and_no_crop_squeezes():
    # left third black, middle third white, right third black: 12 wide, 4 high
    frames = torch.zeros(1, 4, 12, 3, dtype=torch.uint8)
    frames[:, :, 4:8] = 255
    cropped = resize_clip(frames, 4, 4, crop=True)  # covers 4×4 already at scale 1: center 4 columns
    assert torch.all(cropped == 1.0)
    squeezed = resize_clip(frames, 4, 4, crop=False)  # whole width squeezed: black edges stay
    assert squeezed.shape == (3, 1, 4, 4)
    assert squeezed[:, :, :, 0].max() < 0 and squeezed[:, :, :, 1:3].min() > 0
    # crop from a larger frame: scale = max(4/8, 4/24) = 0.5 → 4×12; the center 4 columns come from source
    # columns 8..15 (± the 2-pixel antialiasing support), all inside the white band 6..17
    big = torch.zeros(1, 8, 24, 3, dtype=torch.uint8)
    big[:, :, 6:18] = 255
    assert torch.allclose(resize_clip(big, 4, 4, crop=True), torch.ones(3, 1, 4, 4))
    assert math.isclose(float(resize_clip(big, 4, 4, crop=False).mean()), 0.0, abs_tol=0.05)  # half white
