"""benchmarks/causal_student.py: one fast run of its whole code path (a few training steps, 2 seeds per caption, a tiny
model for the step comparison) reports every row and figure, finite; the first-frame and cached/re-fed ratios are
the ones its side-by-side measurements give; the long clip's first window is row 4's clip; and the per-window
helpers say what the world's own clips do."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "causal_student.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("causal_student", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_script()
ATTRIBUTES = ("colour", "shape", "direction", "speed")
FIGURES = ("fd", "motion_consistency", "diversity", "sharpness") + tuple(f"acc_{a}" for a in ATTRIBUTES)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value) -> bool:
    return _finite(value) and value > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[str, dict, Path]:
    """The benchmark as a user runs it, with every size turned down; 2 seeds per caption, since diversity needs two
    clips of a caption. One thread, to check OMP_NUM_THREADS is what it runs with."""
    out = tmp_path_factory.mktemp("causal-benchmark") / "causal_student.json"
    flags = {
        "--steps": 2,
        "--eval-seeds": 2,
        "--teacher-clips": 8,
        "--ode-steps": 2,
        "--ode-batch-size": 4,
        "--timing-clips": 2,
        "--memory-rounds": 2,
        "--memory-steps": 1,
        "--memory-layers": 1,
        "--memory-heads": 1,
        "--memory-head-dim": 16,
        "--memory-latent": 4,
        "--memory-device": "cpu",
        "--output": out,
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *(str(x) for kv in flags.items() for x in kv)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text()), out


@pytest.mark.slow
def test_every_row_and_figure_is_there_and_finite(run):
    stdout, report, _ = run
    assert report["threads"] == 1
    assert list(report["rows"]) == list(bench.ROWS)
    settings = report["settings"]
    assert settings["causal_blocks"] == [[0, 3], [3, 6]] and settings["bidirectional_blocks"] == [[0, 6]]
    assert settings["windows_pixel"] == [[0, 21], [21, 45]] and settings["long_latent_frames"] == 12
    for name in bench.ROWS:
        row = report["rows"][name]
        assert all(_finite(row["judge"][k]) for k in FIGURES), (name, row["judge"])
        assert _positive(row["time_to_first_frame_s"]) and _positive(row["seconds_per_clip"])
    for name in (bench.BIDIRECTIONAL, bench.CAUSAL, bench.CAUSAL_ODE):
        assert report["rows"][name]["train"]["steps"] == 2
        assert _positive(report["rows"][name]["train"]["seconds_per_step"])
    ode = report["rows"][bench.CAUSAL_ODE]["ode_init"]
    assert ode["steps"] == 2 and _positive(ode["first_loss"]) and _positive(ode["last_loss"])
    for name, checks in report["goals"].items():
        assert checks and all(isinstance(v, bool) for v in checks.values()), name
    for name in bench.ROWS[:4]:
        assert f"{bench.ROWS.index(name) + 1}. {name} |" in stdout
    assert "goals:" in stdout and "cached / re-fed: step time" in stdout


@pytest.mark.slow
def test_long_clips_are_judged_per_window_and_start_as_row_4(run):
    _, report, _ = run
    long = report["rows"][bench.CAUSAL_LONG]
    windows = long["windows"]
    assert [w["pixel_frames"] for w in windows] == [[0, 21], [21, 45]]
    assert [w["comparable_with_real_clips"] for w in windows] == [True, False]
    for w in windows:
        assert all(_finite(w["judge"][k]) for k in FIGURES), w
        assert 0 <= w["world_keeps_in_frame"] <= 1 and 0 <= w["object_tracked"] <= 1
        for value in w["accuracy_where_world_keeps_in_frame"].values():
            assert value is None or 0 <= value <= 1
    assert set(long["not_judgeable_past_window_0"]) == {"fd", "diversity", "direction", "speed"}
    # the rolling cache changes nothing in the trained length: window 0 is row 4's clip, latent for latent
    assert long["first_window_latents_max_abs_diff_to_row_4"] == 0.0
    row4 = report["rows"][bench.CAUSAL_ODE]["judge"]
    for key in FIGURES:
        assert windows[0]["judge"][key] == pytest.approx(row4[key], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_first_frame_ratios_come_from_the_interleaved_timings(run):
    _, report, _ = run
    timing = report["timing"]
    assert timing["first_block_latent_frames"] == 3
    assert timing["first_block_alone_equals_whole_clip"] == {bench.CAUSAL: True, bench.CAUSAL_ODE: True}
    rows = timing["rows"]
    assert list(rows) == list(bench.ROWS) and len(timing["clips"]) == 2
    for name, t in rows.items():
        firsts, totals = np.array(t["per_clip_first"]), np.array(t["per_clip_total"])
        assert len(firsts) == len(totals) == 2 and (firsts > 0).all()
        assert t["time_to_first_frame"]["median"] == pytest.approx(np.median(firsts))
        assert t["seconds_per_clip"]["median"] == pytest.approx(np.median(totals))
        assert report["rows"][name]["seconds_per_clip"] == t["seconds_per_clip"]["median"]
        if name in (bench.TEACHER, bench.BIDIRECTIONAL):  # a whole clip before its first frame
            assert (firsts == totals).all()
    whole = np.array(rows[bench.BIDIRECTIONAL]["per_clip_total"])
    for name in bench.CAUSAL_ROWS:
        t = rows[name]
        first, total = np.array(t["per_clip_first"]), np.array(t["per_clip_total"])
        assert t["first_frame_speedup_vs_bidirectional_clip"] == pytest.approx(
            np.median(whole) / np.median(first)
        )
        assert t["first_frame_speedup_vs_bidirectional_clip_per_clip_median"] == pytest.approx(
            np.median(whole / first)
        )
        assert t["first_frame_speedup_vs_own_clip"] == pytest.approx(np.median(total) / np.median(first))
        goal = report["goals"].get(name, {}).get("first_frame_3x_sooner_than_bidirectional_clip")
        if goal is not None:
            assert goal == (t["first_frame_speedup_vs_bidirectional_clip"] >= 3.0)


@pytest.mark.slow
def test_cached_over_refed_ratios_come_from_side_by_side_subprocesses(run):
    _, report, _ = run
    memory = report["memory"]
    assert memory["layout"] == {"blocks": 7, "frames_per_block": 3}
    assert memory["model"]["latent"] == [16, 21, 4, 4] and memory["model"]["device"] == "cpu"
    assert memory["order_per_round"] == [["cached", "refed"], ["refed", "cached"]]
    runs, summary, ratio = memory["runs"], memory["summary"], memory["ratio_cached_over_refed"]
    assert set(runs) == {"cached", "refed"}
    for variant, rs in runs.items():
        assert len(rs) == 2 and all(r["variant"] == variant for r in rs)
        assert {r["parameters"] for r in rs} == {memory["model"]["parameters"]}
        assert all(_positive(s) for r in rs for s in r["seconds_per_step"])
        assert all(_finite(r["peak_memory_mib"]) and r["peak_memory_mib"] >= 0 for r in rs)
        assert {r["peak_memory_kind"] for r in rs} == {summary[variant]["peak_memory_kind"]}
        seconds = [s for r in rs for s in r["seconds_per_step"]]
        assert summary[variant]["median_seconds_per_step"] == pytest.approx(np.median(seconds))
        assert summary[variant]["median_peak_memory_mib"] == pytest.approx(
            np.median([r["peak_memory_mib"] for r in rs])
        )
    cached, refed = summary["cached"], summary["refed"]
    assert ratio["seconds_per_step"] == pytest.approx(
        cached["median_seconds_per_step"] / refed["median_seconds_per_step"]
    )
    assert _positive(refed["median_peak_memory_mib"])
    assert ratio["peak_memory"] == pytest.approx(
        cached["median_peak_memory_mib"] / refed["median_peak_memory_mib"]
    )
    assert ratio["per_round_seconds_per_step"] == pytest.approx(
        [
            np.median(c["seconds_per_step"]) / np.median(f["seconds_per_step"])
            for c, f in zip(runs["cached"], runs["refed"])
        ]
    )
    assert ratio["process_peak_rss"] == pytest.approx(
        cached["median_process_peak_rss_mib"] / refed["median_process_peak_rss_mib"]
    )


@pytest.mark.slow
def test_gif_streams_the_long_clips_and_the_grid_is_written(run):
    _, report, out = run
    gif = out.with_name("causal_student_stream.gif")
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 45  # every frame of the 2x clip
    with Image.open(out.with_suffix(".png")) as image:
        assert image.format == "PNG" and image.width > image.height


def test_pixel_ranges_follow_the_causal_vae():
    assert bench.pixel_range(0, 6, 4) == (0, 21)  # the toy clip: 6 latent frames, 21 frames
    assert bench.pixel_range(6, 12, 4) == (21, 45)
    assert bench.pixel_range(0, 3, 4) == (0, 9)  # the first causal block


def test_world_keeps_its_own_clips_in_frame_for_their_length_only():
    """On the world's own clips, with the start the judge finds: wholly in frame for the trained length, and the
    quick ones out of frame in the second window, as the docstring says."""
    from dmd.core.config import load
    from dmd.toy.judge import score_clip
    from dmd.toy.world import ToyWorld, parse_caption

    params = load(REPO / "params.yaml")
    world = ToyWorld(params.toy)
    rng = np.random.default_rng(0)
    h, w = params.toy.height, params.toy.width
    for caption in world.captions("train"):
        start = score_clip(world.sample_clip(caption, rng), world).start_xy
        assert bench.world_keeps_in_frame(caption, start, range(0, 21), h, w), caption
        if parse_caption(caption).speed == "quickly":
            assert not bench.world_keeps_in_frame(caption, start, range(21, 45), h, w), caption
    assert not bench.world_keeps_in_frame("a red square moving right slowly", None, range(0, 21), h, w)
