"""Synthetic video content for tests and benchmarks of the data stages (no model involved)."""

from __future__ import annotations

import numpy as np


def synthetic_clip(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """A coloured blob drifting over a gradient: smooth content a small VAE can represent. uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    color, background = rng.uniform(0.3, 1, 3), rng.uniform(0, 0.5, 3)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    vy, vx = rng.uniform(-0.015, 0.015, 2)
    clip = [
        background * (1 - yy[..., None])
        + np.exp(-((yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2) / 0.02)[..., None] * color
        for t in range(frames)
    ]
    return (np.clip(np.stack(clip), 0, 1) * 255).round().astype(np.uint8)
