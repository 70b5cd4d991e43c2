"""Variety across seeds on the toy world: how far the start positions of one caption's clips spread, relative to
the world's own clips of that caption, with the spread of that figure over seeds (a bootstrap)."""

from __future__ import annotations

import numpy as np


def _start_spread(points_N2: np.ndarray) -> float:
    """√(total variance) of 2-D points: the judge's spread of start positions."""
    return float(np.sqrt(points_N2.var(axis=0, ddof=1).sum()))


def _mean_pairwise_distance(points_N2: np.ndarray) -> float:
    """Mean Euclidean distance over the distinct pairs of points (an unbiased U-statistic, whatever N ≥ 2)."""
    diff = points_N2[:, None, :] - points_N2[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    n = len(points_N2)
    return float(dist.sum() / (n * (n - 1)))


def _variety_point(groups: list[list], real: dict) -> tuple[float, float]:
    """(diversity, pairwise diversity) of start positions grouped by caption, each relative to real clips."""
    clamped, pairwise = [], []
    for caption, starts in groups:
        points = np.array([s for s in starts if s is not None], dtype=np.float64).reshape(-1, 2)
        spread_real, pairwise_real = real[caption]
        enough = len(points) >= 2
        clamped.append(min(1.0, _start_spread(points) / spread_real) if enough else 0.0)
        pairwise.append(_mean_pairwise_distance(points) / pairwise_real if enough else 0.0)
    return float(np.mean(clamped)), float(np.mean(pairwise))


def start_position_variety(
    starts: list,
    captions: list[str],
    real_starts: list,
    real_captions: list[str],
    num_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """How varied a set of clips is across seeds of one caption, with the spread of that figure over seeds.

    `starts`: one (x, y) start position per clip (None: no object found), `captions` the clip's caption; the real
    ones are the world's own clips of the same captions. Two figures, each a mean over captions with ≥ 2 clips:

    - `diversity`: min(1, spread of starts / spread of real starts), spread = √(total variance): the toy judge's;
    - `pairwise_diversity`: mean pairwise distance of starts / that of real starts, not clamped, so a set more
      varied than the world reads above 1, and unbiased in the number of clips per caption (the judge's
      square-root spread of a few clips reads low).

    `*_spread` is the standard deviation of each figure over `num_resamples` bootstrap resamples of the seeds
    within each caption: how far it would move with other seeds. The real clips are a fixed reference shared by
    every run compared, so their own sampling noise is left out.
    """
    real_by_caption: dict[str, tuple[float, float]] = {}
    for caption in sorted(set(captions)):
        points = np.array(
            [s for s, c in zip(real_starts, real_captions) if c == caption and s is not None],
            dtype=np.float64,
        ).reshape(-1, 2)
        if len(points) >= 2 and _start_spread(points) > 0:
            real_by_caption[caption] = (_start_spread(points), _mean_pairwise_distance(points))
    groups = [
        (caption, [s for s, c in zip(starts, captions) if c == caption])
        for caption in sorted(real_by_caption)
    ]
    groups = [(caption, group) for caption, group in groups if len(group) >= 2]
    if not groups:
        return {"diversity": None, "diversity_spread": None, "pairwise_diversity": None,
                "pairwise_diversity_spread": None, "clips_per_caption": 0}  # fmt: skip
    diversity, pairwise = _variety_point(groups, real_by_caption)
    rng = np.random.default_rng(seed)
    resampled = np.array(
        [
            _variety_point(
                [(c, [g[i] for i in rng.integers(0, len(g), len(g))]) for c, g in groups], real_by_caption
            )
            for _ in range(num_resamples)
        ]
    )
    return {
        "diversity": diversity,
        "diversity_spread": float(resampled[:, 0].std(ddof=1)),
        "pairwise_diversity": pairwise,
        "pairwise_diversity_spread": float(resampled[:, 1].std(ddof=1)),
        "clips_per_caption": min(len(g) for _, g in groups),
    }
