"""The evaluation report: `eval.md` with speed and quality tables, a PNG grid (rows: prompts; columns: runs; a
few frames per clip), the same rows and columns as one labelled GIF whose clips play in step, and links to every
mp4."""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dmd.core.io import atomic_path, write_text

CELL_HEIGHT = 128  # frames are scaled to this height in the pictures (nearest-neighbour when enlarged)
LABEL_WIDTH = 220
HEADER_HEIGHT = 28
GAP = 6
COLUMN_GAP = 18  # wider than the gap between frames, so the runs read as separate columns
LINE_HEIGHT = 14
# The animation's columns are one frame wide, narrower than a run's label: the label wraps onto a second line.
ANIMATION_HEADER_LINES = 2
ANIMATION_HEADER_HEIGHT = HEADER_HEIGHT + LINE_HEIGHT * (ANIMATION_HEADER_LINES - 1)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
ANIMATION = "eval_side_by_side.gif"

PHASE_NAMES = {"text_encoding": "text encoding", "dit": "DiT", "vae_decode": "VAE decode"}
PEAK_MEMORY_KINDS = {
    "cuda_max_allocated": "the peak CUDA memory allocated while a video was generated, with every loaded model's "
    "weights (the teacher's and the student's are resident together)",
    "cpu_peak_rss_delta": "the peak working memory of a video: the process's resident memory above its level "
    "before that video, with every model already loaded (activations and buffers, not weights)",
    "cpu_max_rss_delta": "the peak working memory of a video as getrusage reports it (its peak cannot be reset, "
    "so a lower bound)",
}


# --------------------------------------------------------------------------------------------------------------
# Pictures


def fit_frame(frame: np.ndarray, height: int = CELL_HEIGHT) -> Image.Image:
    """A uint8 (H, W, 3) frame scaled to `height`: nearest-neighbour when enlarging (keeps tiny clips crisp)."""
    image = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    width = max(1, round(image.width * height / image.height))
    resample = Image.NEAREST if height >= image.height else Image.LANCZOS
    return image.resize((width, height), resample)


def frame_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame."""
    count = min(count, num_frames)
    if count == 1:
        return [0]
    return [round(i * (num_frames - 1) / (count - 1)) for i in range(count)]


def clip_strip(clip: np.ndarray, count: int, height: int = CELL_HEIGHT) -> Image.Image:
    """`count` frames of a (T, H, W, 3) clip side by side."""
    frames = [fit_frame(clip[i], height) for i in frame_indices(len(clip), count)]
    strip = Image.new(
        "RGB", (sum(f.width for f in frames) + GAP // 2 * (len(frames) - 1), height), BACKGROUND
    )
    x = 0
    for f in frames:
        strip.paste(f, (x, 0))
        x += f.width + GAP // 2
    return strip


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, max_lines: int) -> list[str]:
    chars = max(8, width_px // 7)
    lines = textwrap.wrap(text, chars) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: chars - 1] + "…"
    return lines


def comparison_grid(
    prompts: list[str],
    clips: dict[str, list[np.ndarray]],
    labels: dict[str, str],
    frames_per_clip: int,
    height: int = CELL_HEIGHT,
) -> Image.Image:
    """Rows: prompts; columns: runs (in `clips` order); each cell `frames_per_clip` frames of that run's clip."""
    columns = list(clips)
    for name in columns:
        if len(clips[name]) != len(prompts):
            raise ValueError(f"run '{name}' has {len(clips[name])} clips for {len(prompts)} prompts")
    cells = [
        [clip_strip(clips[name][r], frames_per_clip, height) for name in columns] for r in range(len(prompts))
    ]
    col_widths = [max(cells[r][c].width for r in range(len(prompts))) for c in range(len(columns))]
    width = LABEL_WIDTH + sum(col_widths) + COLUMN_GAP * len(columns)
    total_height = HEADER_HEIGHT + len(prompts) * (height + GAP) + GAP
    grid = Image.new("RGB", (width, total_height), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font()
    x = LABEL_WIDTH + GAP
    for name, w in zip(columns, col_widths):
        draw.text((x, 8), labels.get(name, name), fill=INK, font=font)
        x += w + COLUMN_GAP
    for r, prompt in enumerate(prompts):
        y = HEADER_HEIGHT + r * (height + GAP)
        for i, line in enumerate(_wrap(prompt, LABEL_WIDTH - 2 * GAP, max(1, height // LINE_HEIGHT))):
            draw.text((GAP, y + 2 + LINE_HEIGHT * i), line, fill=INK, font=font)
        x = LABEL_WIDTH + GAP
        for c, w in enumerate(col_widths):
            grid.paste(cells[r][c], (x, y))
            x += w + COLUMN_GAP
    return grid


def comparison_frames(
    prompts: list[str],
    clips: dict[str, list[np.ndarray]],
    labels: dict[str, str],
    height: int = CELL_HEIGHT,
) -> list[Image.Image]:
    """The frames of the side-by-side animation: rows are prompts (numbered as the report lists them, with their
    caption), columns are runs (in `clips` order, headed by their label), and frame t of the animation shows frame
    t of every clip, so the runs play in step and a difference in motion is seen at the moment it happens."""
    columns = list(clips)
    for name in columns:
        if len(clips[name]) != len(prompts):
            raise ValueError(f"run '{name}' has {len(clips[name])} clips for {len(prompts)} prompts")
    num_frames = min(len(clip) for name in columns for clip in clips[name])
    col_widths = [max(fit_frame(clip[0], height).width for clip in clips[name]) for name in columns]
    width = LABEL_WIDTH + sum(col_widths) + COLUMN_GAP * len(columns)
    background = Image.new(
        "RGB", (width, ANIMATION_HEADER_HEIGHT + len(prompts) * (height + GAP) + GAP), BACKGROUND
    )
    draw = ImageDraw.Draw(background)
    # Text without anti-aliasing adds one colour, not a ramp of greys: a GIF frame holds 256 colours, and they are
    # left to the clips, which then play exactly as sampled whenever they have fewer.
    draw.fontmode = "1"
    font = _font()
    x = LABEL_WIDTH + GAP
    for name, w in zip(columns, col_widths):
        for i, line in enumerate(_wrap(labels.get(name, name), w, ANIMATION_HEADER_LINES)):
            draw.text((x, 6 + LINE_HEIGHT * i), line, fill=INK, font=font)
        x += w + COLUMN_GAP
    for r, prompt in enumerate(prompts):
        y = ANIMATION_HEADER_HEIGHT + r * (height + GAP)
        for i, line in enumerate(
            _wrap(f"{r + 1}. {prompt}", LABEL_WIDTH - 2 * GAP, max(1, height // LINE_HEIGHT))
        ):
            draw.text((GAP, y + 2 + LINE_HEIGHT * i), line, fill=INK, font=font)
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        for r in range(len(prompts)):
            x = LABEL_WIDTH + GAP
            for name, w in zip(columns, col_widths):
                frame.paste(
                    fit_frame(clips[name][r][t], height), (x, ANIMATION_HEADER_HEIGHT + r * (height + GAP))
                )
                x += w + COLUMN_GAP
        frames.append(frame)
    return frames


def save_png(path: Path, image: Image.Image) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_gif(path: Path, frames: list[Image.Image], fps: int) -> Path:
    with atomic_path(path) as tmp:
        frames[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=frames[1:],
            duration=max(20, round(1000 / fps)),
            loop=0,
            disposal=1,
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        tiny_or_huge = value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)
        return f"{value:.{digits}g}" if tiny_or_huge else f"{value:.{digits}f}"
    return str(value)


def _delta(a, b) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return "—"
    return f"{a - b:+.3f}"


def _pct(value) -> str:
    return "—" if value is None else f"{round(100 * value)}%"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _spread(quartiles) -> str:
    return f" ({_fmt(quartiles[0])}–{_fmt(quartiles[-1])})" if quartiles else ""


def _times(quartiles) -> str:
    return f"{quartiles[0]:.1f}–{quartiles[-1]:.1f}×"


def _speed_section(metrics: dict, runs: list[str], labels: dict[str, str]) -> str:
    rows = []
    for name in runs:
        m = metrics[name]
        b = m["breakdown_seconds"]
        rows.append(
            [
                labels.get(name, name),
                _fmt(m["steps"]),
                _fmt(float(m["guidance"]), 2),
                _fmt(float(m["nfe"]), 3),
                _fmt(m["timed_videos"]) + (" (clips reused)" if m.get("clips_from_reference") else ""),
                _fmt(m["seconds_per_video"]) + _spread(m.get("seconds_per_video_quartiles")),
                _fmt(b["text_encoding"]),
                _fmt(b["dit"]) + _spread(m.get("dit_seconds_quartiles")),
                _fmt(b["vae_decode"]),
                _fmt(m.get("transformer_weights_mb"), 1),
                _fmt(m["peak_memory_mb"], 1),
            ]
        )
    first = metrics[runs[0]]
    cpu = first["peak_memory_kind"].startswith("cpu")
    header = [
        "run",
        "steps",
        "CFG",
        "NFE / video",
        "timed videos",
        "end to end s / video",
        "text encoding s",
        "DiT s",
        "VAE decode s",
        "transformer weights MiB",
        "peak working memory MiB" if cpu else "peak allocated MiB",
    ]
    student = metrics["student"]
    total = student["seconds_per_video"]
    shares = ", ".join(
        f"{PHASE_NAMES.get(phase, phase)} {_pct(seconds / total if total else None)}"
        for phase, seconds in student["breakdown_seconds"].items()
    )
    kind = PEAK_MEMORY_KINDS.get(first["peak_memory_kind"], first["peak_memory_kind"])
    paired = "speedup_dit_quartiles" in metrics
    pairs = f" of {metrics['speedup_paired_videos']} videos" if "speedup_paired_videos" in metrics else ""
    spread = (
        f" Speed-ups are medians of the per-video ratios{pairs} (the same prompt and seed, timed next to each "
        f"other), interquartile range DiT {_times(metrics['speedup_dit_quartiles'])}, end to end "
        f"{_times(metrics['speedup_end_to_end_quartiles'])}."
        if paired
        else ""
    )
    timed = {metrics[name]["timed_videos"] for name in runs}
    per_run = f"over {timed.pop()} videos per run" if len(timed) == 1 else "over the timed videos of each run"
    reused = [labels.get(name, name) for name in runs if metrics[name].get("clips_from_reference")]
    reference = metrics.get("setup", {}).get("teacher_reference_dir")
    reuse = (
        f" The clips of {', '.join(reused)} come from the teacher reference (`{reference}`), kept by an earlier "
        "evaluation under a key of everything they depend on (teacher, settings, prompt, seed); those runs were "
        "sampled on the first items only, interleaved with the student as above, for their timings, NFE and "
        "memory, and their speed-ups pair them with the student's same items."
        if reused
        else ""
    )
    return "\n".join(
        [
            "## Speed",
            "",
            _table(header, rows),
            "",
            f"**Speed-up of the student over the full teacher: {metrics['speedup_dit']:.1f}× DiT-only, "
            f"{metrics['speedup_end_to_end']:.1f}× end to end** (NFE ratio {metrics['nfe_ratio']:.1f}).",
            "",
            f"Where the student's time goes: {shares}.",
            "",
            f"Times are medians per video on `{first['device']}` {per_run} "
            "(interquartile range in brackets), after "
            f"{first['warmup_videos']} warm-up video(s) per run in the same process. The runs are interleaved: "
            "each prompt and seed is generated by every run in turn, the order rotating, so a change in the "
            f"machine's load reaches every run alike.{spread}{reuse} NFE is counted by a forward hook on the "
            f"transformer (a CFG step is 2). Memory: the transformer's weights (parameters and buffers), and {kind}.",
        ]
    )


def _judge_section(metrics: dict, runs: list[str], labels: dict[str, str]) -> str:
    attributes = list(metrics[runs[0]]["judge"]["accuracy"])
    header = ["run", *attributes, "all", "sharpness ↑", "FD to real ↓", "diversity ↑", "motion consistency ↑"]
    rows = []
    for name in runs:
        j = metrics[name]["judge"]
        rows.append(
            [
                labels.get(name, name),
                *[_fmt(j["accuracy"][a]) for a in attributes],
                _fmt(j.get("accuracy_all")),
                _fmt(j.get("sharpness")),
                _fmt(j.get("fd")),
                _fmt(j.get("diversity"))
                + (f" ± {_fmt(j['diversity_spread'])}" if j.get("diversity_spread") is not None else ""),
                _fmt(j.get("motion_consistency")),
            ]
        )
    if {"student", "teacher_full"} <= set(runs):
        student, full = metrics["student"]["judge"], metrics["teacher_full"]["judge"]
        rows.append(
            [
                "*student − teacher full*",
                *[_delta(student["accuracy"][a], full["accuracy"][a]) for a in attributes],
                *[
                    _delta(student.get(k), full.get(k))
                    for k in ("accuracy_all", "sharpness", "fd", "diversity", "motion_consistency")
                ],
            ]
        )
    closed = metrics.get("gap_closed", {})
    gap = ", ".join(f"{k} {_pct(v)}" for k, v in closed.items()) or "—"
    return "\n".join(
        [
            "### Toy-world judge",
            "",
            "Attribute accuracy of each clip against its caption, sharpness (real clips score 1), the Fréchet "
            "distance of judge features to real clips of the same captions, diversity of start positions across "
            "seeds relative to real clips (± its bootstrap spread over seeds), and how well the motion follows one straight line.",
            "",
            _table(header, rows),
            "",
            f"Share of the few-step teacher → full teacher gap closed by the student: {gap}.",
        ]
    )


def _feature_section(metrics: dict, runs: list[str], labels: dict[str, str]) -> str:
    setup = metrics.get("setup", {})
    feature, clip = setup.get("feature_model"), setup.get("clip_model")
    lines = ["### Feature-space metrics", ""]
    if not feature and not clip:
        lines.append(
            "No feature model was set (`evaluate.feature_model` is null), so the Fréchet distance between "
            "student and teacher samples and the CLIP text–video score were skipped. Set "
            "`evaluate.feature_model` (and optionally `evaluate.clip_model`) to a CLIP id or directory to "
            "compute them."
        )
        return "\n".join(lines)
    if feature:
        lines.append(
            f"Fréchet distance to the full teacher's samples in the feature space of `{feature}` (per-frame "
            "image features averaged over time)."
        )
    if clip:
        lines.append(f"CLIP score (100·max(cos, 0), frames vs caption, averaged) with `{clip}`.")
    if setup.get("clip_score_skipped"):
        lines.append(f"CLIP score skipped: {setup['clip_score_skipped']}.")
    rows = [
        [
            labels.get(n, n),
            _fmt(metrics[n].get("fd_to_teacher_full")),
            _fmt(metrics[n].get("clip_score")),
        ]
        for n in runs
    ]
    lines += ["", _table(["run", "FD to full teacher ↓", "CLIP score ↑"], rows)]
    return "\n".join(lines)


def _setup_section(metrics: dict, labels: dict[str, str], runs: list[str]) -> str:
    s = metrics.get("setup", {})
    ema = s.get("student_ema")
    sigmas = s.get("student_sigmas")
    parts = [
        f"Teacher `{s.get('teacher')}`"
        + (f" ({s['teacher_scheduler']})" if s.get("teacher_scheduler") else ""),
        f"student `{s.get('student_dir')}`"
        + (f", EMA weights: {_fmt(ema)}" if ema is not None else "")
        + (", LoRA merged into the base weights" if s.get("student_lora_fused") else "")
        + (f", σ {', '.join(f'{x:.3f}' for x in sigmas)}" if sigmas else ""),
        f"{s.get('prompts')} prompt(s) × {s.get('seeds_per_prompt')} seed(s) = {s.get('videos_per_run')} videos per "
        "run, the same initial noise for every run of a (prompt, seed)",
    ]
    return "; ".join(p for p in parts if p) + "."


def _videos_section(
    report_dir: Path, videos: dict[str, list[tuple[str, Path]]], runs: list[str], labels: dict[str, str]
) -> str:
    stems = [stem for stem, _ in videos[runs[0]]]
    by_run = {name: dict(videos[name]) for name in runs}
    rows = [
        [stem]
        + [f"[mp4]({_rel(by_run[name][stem], report_dir)})" if stem in by_run[name] else "—" for name in runs]
        for stem in stems
    ]
    return "\n".join(["## Videos", "", _table(["prompt / seed", *[labels.get(n, n) for n in runs]], rows)])


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def figure_rows(metrics: dict, labels: dict[str, str]) -> list[dict]:
    """The report's headline figures, one row per run (the table a dashboard shows): cost, speed-up, quality,
    each to 4 significant digits."""

    def figure(value):
        return float(f"{value:.4g}") if isinstance(value, float) else value

    rows = []
    for name, label in labels.items():
        m = metrics[name]
        row = {
            "run": label,
            "NFE / video": m["nfe"],
            "end to end s / video": m["seconds_per_video"],
            "DiT s / video": m["dit_seconds_per_video"],
            "DiT speed-up vs teacher full": m.get("speedup_dit"),
            "end-to-end speed-up vs teacher full": m.get("speedup_end_to_end"),
        }
        judge = m.get("judge", {})
        for key, column in (("accuracy_all", "judge: all attributes"), ("sharpness", "sharpness ↑"),
                            ("fd", "FD to real ↓"), ("diversity", "diversity ↑"),
                            ("motion_consistency", "motion consistency ↑")):  # fmt: skip
            if key in judge:
                row[column] = judge[key]
        for key, column in (("fd_to_teacher_full", "FD to teacher full ↓"), ("clip_score", "CLIP score ↑")):
            if key in m:
                row[column] = m[key]
        rows.append({k: figure(v) for k, v in row.items()})
    return rows


def self_contained(markdown: str, base_dir: Path, max_image_bytes: int = 1 << 20) -> str:
    """`markdown` readable away from its folder (a dashboard): PNG/GIF images it links are inlined as data URIs
    (up to `max_image_bytes` each), other relative links become their path as text."""
    import base64
    import re

    base_dir = Path(base_dir)

    def image(match: re.Match) -> str:
        alt, target = match.group(1), match.group(2)
        path = base_dir / target
        kind = {".png": "png", ".gif": "gif"}.get(path.suffix.lower())
        if kind is None or not path.is_file() or path.stat().st_size > max_image_bytes:
            return f"{alt} (`{path}`)"
        return f"![{alt}](data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()})"

    def link(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        return match.group(0) if "://" in target else f"{text} `{base_dir / target}`"

    markdown = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", image, markdown)
    return re.sub(r"(?<![!\w])\[([^\]]*)\]\(([^)\s]+)\)", link, markdown)


def write_report(
    report_dir: Path,
    metrics: dict,
    prompts: list[str],
    clips: dict[str, list[np.ndarray]],
    videos: dict[str, list[tuple[str, Path]]],
    labels: dict[str, str],
    fps: int = 8,
    grid_frames: int = 4,
) -> Path:
    """Write `eval.md`, `eval_grid.png` and the side-by-side animation ANIMATION into `report_dir`; return the
    markdown's path.

    `clips`: per run (in column order) one clip per prompt; `videos`: per run, (name, mp4 path) of every video.
    """
    report_dir = Path(report_dir)
    runs = list(clips)
    grid = save_png(report_dir / "eval_grid.png", comparison_grid(prompts, clips, labels, grid_frames))
    animation = save_gif(report_dir / ANIMATION, comparison_frames(prompts, clips, labels), fps)
    # Earlier versions wrote one GIF per run; left beside this report they would show an older evaluation.
    for name in runs:
        (report_dir / f"eval_{name}.gif").unlink(missing_ok=True)

    sections = [
        "# Evaluation: few-step student vs teacher",
        "",
        _setup_section(metrics, labels, runs),
        "",
        _speed_section(metrics, runs, labels),
        "",
        "## Quality",
        "",
    ]
    if "judge" in metrics[runs[0]]:
        sections += [_judge_section(metrics, runs, labels), ""]
    sections += [_feature_section(metrics, runs, labels), ""]
    sections += [
        "## Samples",
        "",
        f"Rows: prompts (first seed); columns: {', '.join(labels.get(n, n) for n in runs)}; "
        f"{grid_frames} frames per clip from first to last.",
        "",
        f"![comparison grid]({_rel(grid, report_dir)})",
        "",
        "The same rows and columns as an animation, every clip playing in step (rows numbered as the prompts "
        "below):",
        "",
        f"![side-by-side animation]({_rel(animation, report_dir)})",
        "",
        "Prompts, top to bottom:",
        "",
        *[f"{i + 1}. {p}" for i, p in enumerate(prompts)],
        "",
        _videos_section(report_dir, videos, runs, labels),
        "",
    ]
    path = report_dir / "eval.md"
    write_text(path, "\n".join(sections))
    return path
