"""Resize, crop and aspect-bucket maths for video clips: pure functions of sizes, no I/O.

A clip of `height × width` goes to a bucket `(frames, H, W)`: the aspect ratio `width / height` is rounded to
`aspect_bucket_rounding` decimals, the target pixel area comes from `resolution_type` + `resolution`, and H, W are
rounded to multiples of `alignment` (the VAE's spatial factor × the transformer's patch size: 16 for Wan 2.1, 8 for
the tiny Wan), so every clip of a bucket has the same latent shape and patchifies exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bucket:
    """Pixel frames, height and width shared by every clip in the bucket."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, name: str) -> Bucket:
        f, h, w = (int(v) for v in name.split("x"))
        return cls(f, h, w)


def snap_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """The largest `k·temporal_factor + 1` not above `num_frames` (Wan's VAE packs 4 frames per latent frame)."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}: need at least 1 frame")
    return (num_frames - 1) // temporal_factor * temporal_factor + 1


def frame_indices(num_frames: int, frame_interval: int) -> list[int]:
    """Source frames used for a clip: the first `num_frames`, every `frame_interval`-th."""
    return list(range(0, (num_frames - 1) * frame_interval + 1, frame_interval))


def target_area(resolution_type: str, resolution: float) -> float | None:
    """Pixel area of a bucket; None for `pixel`, which fixes the shorter edge instead."""
    if resolution_type == "pixel_area":
        return float(resolution) ** 2
    if resolution_type == "area":
        return float(resolution) * 1e6
    if resolution_type == "pixel":
        return None
    raise ValueError(f"resolution_type '{resolution_type}': use pixel_area, area or pixel")


def round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def bucket_size(
    height: int,
    width: int,
    resolution_type: str,
    resolution: float,
    aspect_bucket_rounding: int,
    alignment: int,
) -> tuple[int, int]:
    """(H, W) of the bucket a `height × width` source goes to."""
    aspect = round(width / height, aspect_bucket_rounding)
    if aspect <= 0:  # rounding of an extreme ratio to 0 decimals
        aspect = 10.0**-aspect_bucket_rounding
    area = target_area(resolution_type, resolution)
    if area is None:
        short = float(resolution)
        h, w = (short, short * aspect) if aspect >= 1 else (short / aspect, short)
    else:
        w = math.sqrt(area * aspect)
        h = w / aspect
    return round_to_multiple(h, alignment), round_to_multiple(w, alignment)


def meets_minimum_size(height: int, width: int, resolution_type: str, minimum: float) -> bool:
    """`minimum` is measured like `resolution`: sqrt(area) in pixels, megapixels, or the shorter edge."""
    if not minimum:
        return True
    if resolution_type == "pixel_area":
        return math.sqrt(height * width) >= minimum
    if resolution_type == "area":
        return height * width / 1e6 >= minimum
    return min(height, width) >= minimum


def resize_clip(frames_THWC: torch.Tensor, height: int, width: int, crop: bool) -> torch.Tensor:
    """uint8 (T,H,W,3) → float (3,T,height,width) in [-1, 1], the range Wan's VAE is trained on.

    crop=False resizes straight to the bucket; crop=True resizes to cover it keeping aspect, then center-crops.
    """
    x = frames_THWC.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # T,3,H,W
    src_h, src_w = x.shape[-2:]
    if crop:
        scale = max(height / src_h, width / src_w)
        cover_h, cover_w = max(height, math.ceil(src_h * scale)), max(width, math.ceil(src_w * scale))
        x = _resize(x, cover_h, cover_w)
        top, left = (cover_h - height) // 2, (cover_w - width) // 2
        x = x[:, :, top : top + height, left : left + width]
    else:
        x = _resize(x, height, width)
    return x.clamp_(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if x.shape[-2:] == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
