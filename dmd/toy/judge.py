"""The toy world's judge: exact scores of clips against their captions, from pixels alone.

Per clip: which colour, shape, direction and speed it shows (each compared with the caption), how sharp it is
(the fraction of pixels around the object at one of the world's true colours, times the edge contrast relative
to a true object edge), and how consistent its motion is (frames whose object centre lies on one constant-velocity
line). Per set: a Fréchet distance between judge features of the clips and of real clips of the world for the
same captions, and diversity: how widely start positions spread across seeds, relative to real clips.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import linalg, ndimage

from dmd.toy.world import (
    ATTRIBUTES,
    COLOURS,
    DIRECTIONS,
    OBJECT_SIZE,
    SHAPES,
    SPEEDS,
    ToyWorld,
    parse_caption,
    shape_mask,
)

log = logging.getLogger(__name__)

PURITY_TOLERANCE = 80.0  # RGB distance within which a pixel counts as one of the true colours (H.264 chroma
# subsampling moves real object edges by up to ~70)
MIN_OBJECT_PIXELS = 5  # fewer object pixels in a frame: no object there
ON_LINE_TOLERANCE = 1.0  # pixels between a frame's object centre and the fitted constant-velocity line
STATIC_SPEED = 0.25  # pixels per frame below which a clip counts as not moving
REFERENCE_CLIPS_PER_CAPTION = 16
REFERENCE_SEED = 20_240_601
FEATURE_NAMES = (
    "red",
    "green",
    "blue",
    "area",
    "iou_square",
    "iou_circle",
    "iou_cross",
    "start_x",
    "start_y",
    "velocity_x",
    "velocity_y",
    "purity",
    "edge",
    "motion_consistency",
)


@dataclass
class ClipScore:
    """What the judge sees in one clip."""

    predicted: dict[str, str | None]
    purity: float
    edge: float
    sharpness: float
    motion_consistency: float
    start_xy: tuple[float, float] | None
    velocity_xy: tuple[float, float] | None
    features: list[float]


def _object_mask(clip: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(T,H,W) bool: pixels farther from the background than half the nearest colour's distance to it."""
    background = palette[0]
    threshold = 0.5 * np.linalg.norm(palette[1:] - background, axis=1).min()
    return np.linalg.norm(clip - background, axis=-1) > threshold


def _best_iou(mask: np.ndarray, template: np.ndarray, centre_yx: tuple[float, float]) -> float:
    """Highest IoU of `template` placed with its centre within ±1 px of `centre_yx` against one frame's mask."""
    h, w = mask.shape
    size = template.shape[0]
    half = (size - 1) / 2
    best = 0.0
    area = mask.sum()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            y0 = int(round(centre_yx[0] - half)) + dy
            x0 = int(round(centre_yx[1] - half)) + dx
            ys, xs = slice(max(y0, 0), min(y0 + size, h)), slice(max(x0, 0), min(x0 + size, w))
            if ys.start >= ys.stop or xs.start >= xs.stop:
                continue
            placed = template[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
            inter = np.logical_and(mask[ys, xs], placed).sum()
            best = max(best, inter / (area + placed.sum() - inter))
    return float(best)


def score_clip(clip: np.ndarray, world: ToyWorld) -> ClipScore:
    """Judge one uint8 (T,H,W,3) clip without looking at its caption."""
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"a clip must be (frames, height, width, 3); got shape {clip.shape}")
    pixels = clip.astype(np.float32)
    palette = world.true_colours()
    mask = _object_mask(pixels, palette)
    counts = mask.sum(axis=(1, 2))
    present = counts >= MIN_OBJECT_PIXELS
    num_frames = clip.shape[0]
    if not present.any():
        features = [*(pixels.reshape(-1, 3).mean(0) / 255), 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0, 0, 0]
        return ClipScore(dict.fromkeys(ATTRIBUTES), 0.0, 0.0, 0.0, 0.0, None, None, features)

    # colour: a vote of the object pixels for their nearest palette colour
    object_pixels = pixels[mask]
    nearest = np.linalg.norm(object_pixels[:, None] - palette[None, 1:], axis=-1).argmin(1)
    colour_index = int(np.bincount(nearest, minlength=len(COLOURS)).argmax())
    colour = list(COLOURS)[colour_index]

    # shape: template IoU around each frame's object centre
    ys, xs = np.mgrid[0 : clip.shape[1], 0 : clip.shape[2]]
    frames = np.flatnonzero(present)
    centres = np.array([(ys[mask[t]].mean(), xs[mask[t]].mean()) for t in frames])  # (n, 2) as (y, x)
    templates = [shape_mask(s) for s in SHAPES]
    ious = np.array([[_best_iou(mask[t], tm, c) for tm in templates] for t, c in zip(frames, centres)])
    mean_iou = ious.mean(0)
    shape = SHAPES[int(mean_iou.argmax())]

    # motion: least-squares constant velocity through the object centres
    direction = speed = None
    velocity = start = None
    consistency = 0.0
    if len(frames) >= 3:
        design = np.stack([np.ones(len(frames)), frames], axis=1)
        coef, *_ = np.linalg.lstsq(design, centres, rcond=None)  # rows: intercept, velocity; cols: y, x
        vy, vx = coef[1]
        residual = np.linalg.norm(design @ coef - centres, axis=1)
        consistency = float((residual <= ON_LINE_TOLERANCE).sum() / num_frames)
        velocity = (float(vx), float(vy))
        start = (float(coef[0, 1] - (OBJECT_SIZE - 1) / 2), float(coef[0, 0] - (OBJECT_SIZE - 1) / 2))
        major = max(abs(vx), abs(vy))
        if major >= STATIC_SPEED:
            step = (int(np.sign(vx)), 0) if abs(vx) >= abs(vy) else (0, int(np.sign(vy)))
            direction = next(d for d, s in DIRECTIONS.items() if s == step)
            threshold = float(np.mean(list(SPEEDS.values())))
            speed = "slowly" if major < threshold else "quickly"

    # sharpness: true colours around the object, and edges as steep as a real object edge
    region = ndimage.binary_dilation(mask, structure=np.ones((1, 5, 5), dtype=bool))
    distance = np.linalg.norm(pixels[region][:, None] - palette[None], axis=-1).min(1)
    purity = float((distance <= PURITY_TOLERANCE).mean())
    contrast = float(np.linalg.norm(palette[1 + colour_index] - palette[0]))
    grad_x = np.linalg.norm(np.diff(pixels, axis=2), axis=-1).max(axis=(1, 2))
    grad_y = np.linalg.norm(np.diff(pixels, axis=1), axis=-1).max(axis=(1, 2))
    edge = float(np.minimum(np.maximum(grad_x, grad_y)[frames] / contrast, 1.0).mean())
    sharpness = purity * edge

    height, width = clip.shape[1:3]
    features = [
        *(object_pixels.mean(0) / 255),
        float(counts[frames].mean() / OBJECT_SIZE**2),
        *mean_iou.tolist(),
        (start[0] / width) if start else 0.5,
        (start[1] / height) if start else 0.5,
        velocity[0] if velocity else 0.0,
        velocity[1] if velocity else 0.0,
        purity,
        edge,
        consistency,
    ]
    predicted = {"colour": colour, "shape": shape, "direction": direction, "speed": speed}
    return ClipScore(predicted, purity, edge, sharpness, consistency, start, velocity, features)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2(ΣaΣb)^½) between Gaussian fits of two (N, D) feature sets."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    eps = 1e-6 * np.eye(features_a.shape[1])
    cov_a = np.atleast_2d(np.cov(features_a, rowvar=False)) + eps
    cov_b = np.atleast_2d(np.cov(features_b, rowvar=False)) + eps
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    return max(value, 0.0)


def reference_clips(world: ToyWorld, captions: list[str], per_caption: int = REFERENCE_CLIPS_PER_CAPTION):
    """Real clips of the world for each distinct caption, from a fixed seed: (clips, captions)."""
    rng = np.random.default_rng(REFERENCE_SEED)
    unique = sorted(set(captions))
    ref_captions = [c for c in unique for _ in range(per_caption)]
    return [world.sample_clip(c, rng) for c in ref_captions], ref_captions


def _spread(starts: list[tuple[float, float]]) -> float:
    points = np.array(starts)
    return float(np.sqrt(points.var(axis=0, ddof=1).sum()))


def _diversity(scores: list[ClipScore], captions, ref_scores: list[ClipScore], ref_captions) -> float | None:
    """Mean over captions with ≥ 2 clips of min(1, spread of start positions / spread in real clips)."""
    ratios = []
    for caption in sorted(set(captions)):
        group = [s for s, c in zip(scores, captions) if c == caption]
        if len(group) < 2:
            continue
        starts = [s.start_xy for s in group if s.start_xy is not None]
        real = [s.start_xy for s, c in zip(ref_scores, ref_captions) if c == caption and s.start_xy]
        real_spread = _spread(real) if len(real) >= 2 else 0.0
        if real_spread == 0:
            continue
        ratios.append(min(1.0, _spread(starts) / real_spread) if len(starts) >= 2 else 0.0)
    return float(np.mean(ratios)) if ratios else None


def start_variety(judged: dict, world: ToyWorld, num_resamples: int = 1000) -> dict:
    """`dmd.toy.variety.start_position_variety` of clips `judge_clips` scored (its per-clip details), against the
    world's fixed reference clips of the same captions: diversity and pairwise diversity, each with its spread
    over seeds."""
    from dmd.toy.variety import start_position_variety

    captions = [c["caption"] for c in judged["clips"]]
    starts = [c["start_xy"] for c in judged["clips"]]
    ref_clips, ref_captions = reference_clips(world, captions)
    ref_starts = [score_clip(clip, world).start_xy for clip in ref_clips]
    return start_position_variety(starts, captions, ref_starts, ref_captions, num_resamples=num_resamples)


def judge_clips(clips, captions: list[str], world: ToyWorld, reference=None) -> dict:
    """Scores of uint8 (T,H,W,3) clips against their captions; `reference`: real clips + captions, or None
    to sample them from the world for the same captions."""
    clips = list(clips)
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips but {len(captions)} captions; give one caption per clip")
    if not clips:
        raise ValueError("no clips to judge")
    truths = [parse_caption(c).attributes() for c in captions]
    scores = [score_clip(clip, world) for clip in clips]
    ref_clips, ref_captions = reference if reference is not None else reference_clips(world, captions)
    ref_scores = [score_clip(clip, world) for clip in ref_clips]

    correct = {a: [s.predicted[a] == t[a] for s, t in zip(scores, truths)] for a in ATTRIBUTES}
    features = np.array([s.features for s in scores], dtype=np.float64)
    ref_features = np.array([s.features for s in ref_scores], dtype=np.float64)
    per_clip = [
        {
            "caption": caption,
            "predicted": s.predicted,
            "correct": {a: correct[a][i] for a in ATTRIBUTES},
            "sharpness": s.sharpness,
            "purity": s.purity,
            "edge": s.edge,
            "motion_consistency": s.motion_consistency,
            "start_xy": s.start_xy,
            "velocity_xy": s.velocity_xy,
        }
        for i, (s, caption) in enumerate(zip(scores, captions))
    ]
    return {
        "num_clips": len(clips),
        "accuracy": {a: float(np.mean(correct[a])) for a in ATTRIBUTES},
        "accuracy_all": float(np.mean([all(correct[a][i] for a in ATTRIBUTES) for i in range(len(clips))])),
        "sharpness": float(np.mean([s.sharpness for s in scores])),
        "purity": float(np.mean([s.purity for s in scores])),
        "edge": float(np.mean([s.edge for s in scores])),
        "motion_consistency": float(np.mean([s.motion_consistency for s in scores])),
        "fd": frechet_distance(features, ref_features) if len(clips) >= 2 else None,
        "diversity": _diversity(scores, captions, ref_scores, ref_captions),
        "num_reference_clips": len(ref_clips),
        "clips": per_clip,
    }


def _read_prompts(prompts: list[str] | None, videos: list[Path]) -> list[str]:
    if not prompts:
        sidecars = [v.with_suffix(".txt") for v in videos]
        missing = [str(s) for s in sidecars if not s.exists()]
        if missing:
            raise ValueError(
                f"no --prompts given and no caption file beside {missing[0]}: pass --prompts with one caption "
                "per video (or one .txt/.json file of captions), or write VIDEO.txt beside each video"
            )
        return [s.read_text().strip() for s in sidecars]
    if len(prompts) == 1 and Path(prompts[0]).suffix in (".txt", ".json") and Path(prompts[0]).is_file():
        path = Path(prompts[0])
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
                raise ValueError(f"{path}: expected a JSON list of caption strings")
            return data
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(prompts)


def main(args) -> int:
    """`dmd judge VIDEOS… [--prompts …] [--params FILE] [--output FILE]`."""
    from dmd.core.config import load
    from dmd.core.io import write_json
    from dmd.core.video import VideoReadError, read_video

    params = load(args.params, getattr(args, "overrides", None))
    videos = [Path(v) for v in args.videos]
    try:
        prompts = _read_prompts(args.prompts, videos)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts; give one prompt per video")
        for p in prompts:
            parse_caption(p)
        clips = [read_video(v) for v in videos]
    except (ValueError, VideoReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = judge_clips(clips, prompts, ToyWorld(params.toy))
    for entry, video in zip(result["clips"], videos):
        entry["video"] = str(video)
    if args.output:
        write_json(args.output, result)
    summary = {k: v for k, v in result.items() if k != "clips"}
    print(json.dumps(summary, indent=2))
    return 0
