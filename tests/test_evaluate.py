"""The evaluation stage: prompts, the teacher run against plain diffusers, scoring and the report on hand-made
runs, and the whole stage end to end on the tiny profile."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dmd.core.config import ToyConfig
from dmd.core.video import read_video, write_video
from dmd.distill.rollout import RolloutSchedule
from dmd.evaluation import evaluate as ev
from dmd.evaluation.metrics import SpeedStats
from dmd.evaluation.report import (
    ANIMATION,
    ANIMATION_HEADER_HEIGHT,
    CELL_HEIGHT,
    COLUMN_GAP,
    GAP,
    HEADER_HEIGHT,
    LABEL_WIDTH,
)
from dmd.toy.world import ToyWorld
from dmd.wan.decode import LatentDecoder
from dmd.wan.latents import initial_noise
from dmd.wan.sampler import TeacherSampler, load_teacher_pipeline


def test_load_prompts_toy_and_json(tiny_params, tmp_path):
    assert ev.load_prompts(tiny_params) == ToyWorld(tiny_params.toy).captions("held_out")

    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"one": "a red square", "two": "a blue ring"}))
    tiny_params.evaluate.prompts = str(library)
    assert ev.load_prompts(tiny_params) == ["a red square", "a blue ring"]
    library.write_text(json.dumps(["a", "b"]))
    assert ev.load_prompts(tiny_params) == ["a", "b"]

    library.write_text(json.dumps({"one": 3}))
    with pytest.raises(ev.EvaluationError, match="prompts.json: expected a non-empty list"):
        ev.load_prompts(tiny_params)
    library.write_text(json.dumps(["only one"]))
    tiny_params.evaluate.feature_model = "any-clip"
    with pytest.raises(ev.EvaluationError, match="at least 2 videos per run"):
        ev.plan(tiny_params)
    tiny_params.evaluate.prompts = str(tmp_path / "missing.json")
    with pytest.raises(ev.EvaluationError, match="evaluate.prompts: .*missing.json not found"):
        ev.load_prompts(tiny_params)


def test_eval_items_pair_every_prompt_with_every_seed():
    items = ev.eval_items(["a", "b"], seed=7, num_seeds=3)
    assert [(i.prompt, i.seed) for i in items] == [(p, s) for p in "ab" for s in (7, 8, 9)]
    assert len({i.stem for i in items}) == 6
    # the same seed gives the same initial noise whichever run or prompt asks
    torch.testing.assert_close(initial_noise(7, (1, 2, 3, 4, 4)), initial_noise(7, (1, 2, 3, 4, 4)))


def test_teacher_run_matches_plain_wan_pipeline(tiny_params, tiny_wan_dir, tmp_path):
    from diffusers import WanPipeline

    device = torch.device("cpu")
    items = ev.eval_items(["a red square moving left slowly", "a blue circle moving up quickly"], 3, 1)
    pipe = load_teacher_pipeline(tiny_params.model, device, tiny_params.model.flow_schedule_shift)
    video = ev.VideoSpec(height=32, width=32, num_frames=9, fps=8)
    shape = ev.video_noise_shape(pipe.transformer, pipe.vae, video)
    sampler = TeacherSampler(pipe, steps=3, guidance=4.0, negative_prompt="", max_sequence_length=16)
    run = ev.run_sampler(
        "teacher_full", sampler, LatentDecoder(pipe.vae), items, shape, device, 2, tmp_path, 8, False
    )

    # the measured NFE: 3 steps × (cond + uncond), warm-up videos excluded
    assert run.speed.nfe == 6 and run.speed.timed_videos == 2 and run.speed.warmup_videos == 2
    assert set(run.speed.seconds) == {"text_encoding", "dit", "vae_decode", "end_to_end"}
    assert run.speed.seconds["end_to_end"] == pytest.approx(
        sum(run.speed.seconds[p] for p in ("text_encoding", "dit", "vae_decode"))
    )

    reference = WanPipeline.from_pretrained(tiny_wan_dir)
    reference.set_progress_bar_config(disable=True)
    for item, clip, path in zip(items, run.clips, run.videos):
        frames = reference(
            prompt=item.prompt,
            negative_prompt="",
            height=32,
            width=32,
            num_frames=9,
            num_inference_steps=3,
            guidance_scale=4.0,
            latents=initial_noise(item.seed, shape),
            max_sequence_length=16,
            output_type="np",
        ).frames[0]
        assert clip.shape == (9, 32, 32, 3) and clip.dtype == np.uint8
        np.testing.assert_allclose(clip / 255.0, frames, atol=0.6 / 255)
        assert read_video(path).shape == clip.shape


def test_video_noise_shape_rejects_sizes_the_vae_cannot_pack(tiny_params):
    pipe = load_teacher_pipeline(tiny_params.model, "cpu", tiny_params.model.flow_schedule_shift)
    with pytest.raises(ev.EvaluationError, match="multiple of 8"):
        ev.video_noise_shape(
            pipe.transformer, pipe.vae, ev.VideoSpec(height=36, width=32, num_frames=9, fps=8)
        )


def test_missing_student_says_how_to_make_one(tiny_params):
    with pytest.raises(ev.EvaluationError, match=r"run `dmd train`.*evaluate\.student_dir"):
        ev.run_all(tiny_params, ev.eval_items(["a"], 0, 1), torch.device("cpu"), progress=False)


# --------------------------------------------------------------------------------------------------------------
# Scoring and the report on hand-made runs


def _speed(nfe: float, dit: float) -> SpeedStats:
    seconds = {"text_encoding": 0.01, "dit": dit, "vae_decode": 0.1}
    seconds["end_to_end"] = sum(seconds.values())
    return SpeedStats(nfe, seconds, 12.0, "cpu_peak_rss_delta", 4, 1, "cpu")


def _blur(clip: np.ndarray, passes: int) -> np.ndarray:
    out = clip.astype(np.float64)
    for _ in range(passes):
        out = (out + np.roll(out, 1, 1) + np.roll(out, -1, 1) + np.roll(out, 1, 2) + np.roll(out, -1, 2)) / 5
    return out.round().astype(np.uint8)


def _synthetic_runs(params, tmp_path: Path) -> tuple[list[ev.EvalItem], dict[str, ev.RunOutput]]:
    """Real toy clips as the full teacher, heavily blurred ones as the few-step teacher, lightly blurred ones as
    the student: a judge must rank them full > student > few on sharpness."""
    world = ToyWorld(params.toy)
    captions = world.captions("held_out")[:3]
    items = ev.eval_items(captions, params.evaluate.seed, 2)
    real = [world.sample_clip(it.prompt, np.random.default_rng(i)) for i, it in enumerate(items)]
    clips = {
        "teacher_full": real,
        "teacher_few": [_blur(c, 4) for c in real],
        "student": [_blur(c, 1) for c in real],
    }
    speeds = {"teacher_full": _speed(100, 5.0), "teacher_few": _speed(6, 0.3), "student": _speed(6, 0.2)}
    runs = {}
    for name in ev.RUNS:
        videos = [
            write_video(tmp_path / "videos" / name / f"{it.stem}.mp4", c) for it, c in zip(items, clips[name])
        ]
        steps, guidance = {"teacher_full": (50, 3.0), "teacher_few": (3, 3.0), "student": (3, 1.0)}[name]
        runs[name] = ev.RunOutput(name, steps, guidance, clips[name], videos, speeds[name])
    runs["student"].info = {"dir": "output/student", "ema": True, "sigmas": [1.0, 0.757, 0.522]}
    return items, runs


def test_scores_and_report_on_hand_made_runs(tiny_params, tmp_path):
    items, runs = _synthetic_runs(tiny_params, tmp_path)
    metrics = ev.score_runs(tiny_params, items, runs, torch.device("cpu"))

    assert metrics["speedup_dit"] == pytest.approx(5.0 / 0.2)
    assert metrics["speedup_end_to_end"] == pytest.approx(5.11 / 0.31)
    assert metrics["nfe_ratio"] == pytest.approx(100 / 6)
    judged = {name: metrics[name]["judge"] for name in ev.RUNS}
    assert judged["teacher_full"]["accuracy"]["colour"] == 1.0  # real clips
    assert (
        judged["teacher_full"]["sharpness"]
        > judged["student"]["sharpness"]
        > judged["teacher_few"]["sharpness"]
    )
    few, full, student = (judged[n]["sharpness"] for n in ("teacher_few", "teacher_full", "student"))
    assert metrics["gap_closed"]["sharpness"] == pytest.approx((student - few) / (full - few))
    assert "fd_to_teacher_full" not in metrics["student"] and metrics["setup"]["feature_model"] is None
    json.dumps(metrics)  # JSON-ready

    stale = Path(tiny_params.evaluate.report_dir) / "eval_student.gif"  # as earlier versions wrote it
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"GIF89a")
    report = ev.write_outputs(tiny_params, items, runs, metrics)
    assert not stale.exists()
    saved = json.loads(Path(tiny_params.evaluate.metrics_path).read_text())
    assert saved["speedup_dit"] == pytest.approx(metrics["speedup_dit"])
    # the file DVC tracks holds the headline only; every run's details are beside the report
    assert set(saved) == {
        "speedup_dit", "speedup_end_to_end", "nfe_ratio", "gap_closed", "student", "variety", "timed_videos",
        "clips_from_reference",
    }  # fmt: skip
    assert saved["timed_videos"] == {name: 4 for name in ev.RUNS}
    assert saved["clips_from_reference"] == {"teacher_full": False, "teacher_few": False}
    assert saved["student"]["sharpness"] == metrics["student"]["judge"]["sharpness"]
    details = json.loads((report.parent / ev.DETAILS).read_text())
    assert details["teacher_full"]["dit_seconds_per_video"] == pytest.approx(5.0)

    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert all((report.parent / link).is_file() for link in links), links
    assert sum(link.endswith(".mp4") for link in links) == 3 * len(items)
    assert {link for link in links if not link.endswith(".mp4")} == {"eval_grid.png", ANIMATION}
    assert "`evaluate.feature_model` is null" in text and "25.0× DiT-only" in text

    grid = Image.open(report.parent / "eval_grid.png")
    num_prompts = len({it.prompt for it in items})
    assert grid.height == HEADER_HEIGHT + num_prompts * (CELL_HEIGHT + GAP) + GAP
    # three columns of grid_frames frames each, every frame CELL_HEIGHT wide (square clips)
    assert grid.width > 3 * tiny_params.evaluate.grid_frames * CELL_HEIGHT
    first_seed = [it.seed == tiny_params.evaluate.seed for it in items]
    _assert_side_by_side(
        report.parent / ANIMATION,
        {name: [c for c, f in zip(runs[name].clips, first_seed) if f] for name in ev.RUNS},
    )


def _assert_side_by_side(path: Path, clips: dict[str, list[np.ndarray]]) -> None:
    """The animation: one row per prompt, one column per run (in ev.RUNS order); its frame t holds frame t of
    every clip, pixel for pixel (each enlarged to CELL_HEIGHT by repeating pixels), under a label per column and
    beside a label per row."""
    rows, num_frames, height = len(clips["student"]), len(clips["student"][0]), clips["student"][0].shape[1]
    scale = CELL_HEIGHT // height
    gif = Image.open(path)
    assert gif.n_frames == num_frames
    assert gif.size == (
        LABEL_WIDTH + len(ev.RUNS) * (CELL_HEIGHT + COLUMN_GAP),
        ANIMATION_HEADER_HEIGHT + rows * (CELL_HEIGHT + GAP) + GAP,
    )
    # fewer colours than a GIF frame holds (with the labels' ink): the GIF needs no approximation of them
    assert (
        len(np.unique(np.concatenate([c.reshape(-1, 3) for cs in clips.values() for c in cs]), axis=0)) < 255
    )
    x = [LABEL_WIDTH + GAP + c * (CELL_HEIGHT + COLUMN_GAP) for c in range(len(ev.RUNS))]
    y = [ANIMATION_HEADER_HEIGHT + r * (CELL_HEIGHT + GAP) for r in range(rows)]
    for t in range(num_frames):
        gif.seek(t)
        frame = np.asarray(gif.convert("RGB"))
        for c, name in enumerate(ev.RUNS):
            for r in range(rows):
                expected = clips[name][r][t].repeat(scale, 0).repeat(scale, 1)
                tile = frame[y[r] : y[r] + CELL_HEIGHT, x[c] : x[c] + CELL_HEIGHT]
                np.testing.assert_array_equal(tile, expected, err_msg=f"frame {t}, row {r}, {name}")
    # labels: ink in the strip above each column and beside each row, a different text on each
    headers = [frame[:ANIMATION_HEADER_HEIGHT, x[c] : x[c] + CELL_HEIGHT] for c in range(len(ev.RUNS))]
    captions = [frame[y[r] : y[r] + CELL_HEIGHT, :LABEL_WIDTH] for r in range(rows)]
    for strips in (headers, captions):
        assert all((strip < 100).all(axis=-1).any() for strip in strips)
        assert all(not np.array_equal(a, b) for i, a in enumerate(strips) for b in strips[i + 1 :])


def _random_tiny_clip(path: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dmd.wan.tiny import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(ToyWorld(ToyConfig()).vocabulary())
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=1,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


def test_feature_metrics_and_their_report_section(tiny_params, tmp_path):
    items, runs = _synthetic_runs(tiny_params, tmp_path)
    runs["student"].clips = list(runs["teacher_full"].clips)  # a student indistinguishable from the teacher
    tiny_params.evaluate.feature_model = str(_random_tiny_clip(tmp_path / "clip"))
    metrics = ev.score_runs(tiny_params, items, runs, torch.device("cpu"))

    assert metrics["teacher_full"]["fd_to_teacher_full"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["student"]["fd_to_teacher_full"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["teacher_few"]["fd_to_teacher_full"] > 1e-4
    assert metrics["student"]["clip_score"] == pytest.approx(metrics["teacher_full"]["clip_score"])
    assert metrics["setup"]["clip_model"] == tiny_params.evaluate.feature_model

    text = ev.write_outputs(tiny_params, items, runs, metrics).read_text()
    assert f"`{tiny_params.evaluate.feature_model}`" in text and "FD to full teacher" in text


# --------------------------------------------------------------------------------------------------------------
# The student


def _export_lora_student(params) -> Path:
    """A LoRA student with non-zero weights, exported as training exports it (EMA weights flagged)."""
    from dmd.student.export import export_student
    from dmd.wan.loading import add_lora, load_transformer

    transformer = add_lora(load_transformer(params.model), 4, 4, adapter_name="student")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return export_student(
        transformer,
        params,
        RolloutSchedule.from_params(params),
        params.train.run.output_dir,
        ema=True,
        step=0,
    )


def test_fused_lora_student_samples_like_the_adapter(tiny_params):
    from dmd.distill.rollout import sample
    from dmd.student.export import load_student

    path = _export_lora_student(tiny_params)
    adapter, schedule = load_student(path, tiny_params)
    fused, _ = load_student(path, tiny_params)
    assert ev.fuse_student_lora(fused, tiny_params)
    assert not any("lora" in name for name, _ in fused.named_modules())
    embeds = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    noise = initial_noise(3, (1, 4, 6, 8, 8))
    expected = sample(adapter, embeds, noise, schedule, torch.Generator().manual_seed(3))
    got = sample(fused, embeds, noise, schedule, torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    adapter.disable_lora()  # the base alone: the LoRA must matter, or the comparison above proves nothing
    base = sample(adapter, embeds, noise, schedule, torch.Generator().manual_seed(3))
    assert (base - expected).abs().max() > 1e-2

    tiny_params.evaluate.fuse_lora = False
    assert not ev.fuse_student_lora(load_student(path, tiny_params)[0], tiny_params)


# --------------------------------------------------------------------------------------------------------------
# The teacher reference: teacher clips reused across evaluations


class TransformerPasses:
    """Counts forward passes of every WanTransformer3DModel (teacher and student alike) while active: a global
    module hook, independent of the NFE counters the evaluation keeps."""

    def __enter__(self):
        from diffusers import WanTransformer3DModel

        self.calls = 0

        def hook(module, args, output):
            if isinstance(module, WanTransformer3DModel):
                self.calls += 1

        self._handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _evaluation(params, items) -> tuple[dict[str, ev.RunOutput], dict, int]:
    with TransformerPasses() as passes:
        runs = ev.run_all(params, items, torch.device("cpu"), progress=False)
    return runs, ev.score_runs(params, items, runs, torch.device("cpu")), passes.calls


def _reference_files(params) -> dict[tuple[str, int, int], Path]:
    """{(prompt, seed, steps): file} of the teacher reference, read from each file's own metadata."""
    from safetensors import safe_open

    files = {}
    for path in sorted(Path(params.evaluate.teacher_reference_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        files[meta["prompt"], int(meta["seed"]), int(meta["steps"])] = path
    return files


def _quality(metrics: dict) -> dict:
    return {"gap_closed": metrics["gap_closed"], **{name: metrics[name]["judge"] for name in ev.RUNS}}


def test_a_second_evaluation_reuses_the_teacher_reference(tiny_params, caplog):
    from dmd.core.io import write_safetensors
    from dmd.evaluation.reference import FRAMES

    _export_lora_student(tiny_params)
    items = ev.plan(tiny_params)[:2]
    tiny_params.evaluate.timed_reference_videos = 1
    teacher_steps, student_steps = (
        tiny_params.evaluate.teacher_steps,
        RolloutSchedule.from_params(tiny_params).num_steps,
    )
    first, first_metrics, first_passes = _evaluation(tiny_params, items)
    files = _reference_files(tiny_params)
    assert set(files) == {(it.prompt, it.seed, s) for it in items for s in (teacher_steps, student_steps)}

    again, metrics, passes = _evaluation(tiny_params, items)
    # the teacher sampled on the timed item only: two teacher runs, CFG (cond + uncond) at each step
    assert first_passes - passes == (len(items) - 1) * 2 * (teacher_steps + student_steps)
    assert (
        metrics["teacher_full"]["nfe"] == 2 * teacher_steps
        and metrics["teacher_few"]["nfe"] == 2 * student_steps
    )
    for name in ev.TEACHER_RUNS:
        assert again[name].clips_from_reference and metrics[name]["clips_from_reference"] is True
        assert metrics[name]["timed_videos"] == len(again[name].speed.per_video) == 1
    assert metrics["student"]["timed_videos"] == len(items) and not metrics["student"]["clips_from_reference"]
    assert metrics["speedup_paired_videos"] == 1  # the teacher's timed video against the student's same item
    for name in ev.RUNS:
        assert all(np.array_equal(a, b) for a, b in zip(again[name].clips, first[name].clips, strict=True))
    assert _quality(metrics) == _quality(first_metrics)
    headline = ev.headline(metrics)
    assert headline["timed_videos"] == {"teacher_full": 1, "teacher_few": 1, "student": len(items)}
    assert headline["clips_from_reference"] == {"teacher_full": True, "teacher_few": True}
    text = ev.write_outputs(tiny_params, items, again, metrics).read_text()
    assert "| 1 (clips reused) |" in text and "come from the teacher reference" in text

    # a truncated file: its run is sampled in full and the file rewritten, without an error
    broken = files[items[-1].prompt, items[-1].seed, teacher_steps]
    broken.write_bytes(broken.read_bytes()[:-100])
    # a well-formed file whose clip is not what the teacher samples, on the timed item: the fresh clip is used
    wrong = files[items[0].prompt, items[0].seed, student_steps]
    zeros = np.zeros_like(first["teacher_few"].clips[0])
    digest = hashlib.sha256(zeros.tobytes()).hexdigest()
    write_safetensors(wrong, {FRAMES: torch.from_numpy(zeros)}, {"key": wrong.stem, "sha256": digest})
    caplog.clear()
    with caplog.at_level("WARNING"):
        third, metrics, passes = _evaluation(tiny_params, items)
    assert not third["teacher_full"].clips_from_reference and metrics["teacher_full"]["timed_videos"] == len(
        items
    )
    assert third["teacher_few"].clips_from_reference and metrics["teacher_few"]["timed_videos"] == 1
    assert first_passes - passes == (len(items) - 1) * 2 * student_steps
    assert str(broken) in caplog.text
    assert "teacher_few: 1 of 1 re-sampled clips differ from the teacher reference" in caplog.text
    assert _quality(metrics) == _quality(first_metrics)
    rewritten = load_file(broken)[FRAMES].numpy()
    np.testing.assert_array_equal(rewritten, first["teacher_full"].clips[-1])


def test_a_changed_teacher_setting_resamples_every_item(tiny_params):
    _export_lora_student(tiny_params)
    items = ev.plan(tiny_params)[:2]
    tiny_params.evaluate.timed_reference_videos = 1
    first, _, first_passes = _evaluation(tiny_params, items)
    old_files = set(_reference_files(tiny_params).values())

    tiny_params.evaluate.teacher_guidance = 4.0  # the teacher's CFG: every teacher clip changes
    changed, metrics, passes = _evaluation(tiny_params, items)
    assert passes == first_passes
    for name in ev.TEACHER_RUNS:
        assert not changed[name].clips_from_reference and metrics[name]["timed_videos"] == len(items)
        assert not np.array_equal(changed[name].clips[-1], first[name].clips[-1])
    # the entries of the old guidance are removed; the folder holds the current ones
    files = _reference_files(tiny_params)
    assert len(files) == 2 * len(items) and not set(files.values()) & old_files


# --------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_evaluate_stage_end_to_end_on_tiny_profile(tiny_params_file, tiny_params, prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main

    _export_lora_student(tiny_params)
    # Prefect may have read its settings before the session's server set PREFECT_API_URL (another test module
    # imported it first): name the server explicitly for the run and for the look-up of its artifacts
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        assert main(["evaluate", "--params", str(tiny_params_file)]) == 0

    cfg = tiny_params.evaluate
    metrics = json.loads((Path(cfg.report_dir) / ev.DETAILS).read_text())
    schedule = RolloutSchedule.from_params(tiny_params)
    latent_frames = (tiny_params.toy.num_frames - 1) // 4 + 1
    blocks = len(schedule.block_ranges(latent_frames))
    assert metrics["teacher_full"]["nfe"] == 2 * cfg.teacher_steps  # CFG: cond + uncond
    assert metrics["teacher_few"]["nfe"] == 2 * schedule.num_steps
    assert metrics["student"]["nfe"] == schedule.num_steps * blocks  # one pass per step per time block
    assert metrics["teacher_few"]["steps"] == metrics["student"]["steps"] == schedule.num_steps
    for name in ev.RUNS:
        m = metrics[name]
        assert m["seconds_per_video"] > 0 and m["peak_memory_mb"] >= 0 and "judge" in m
        assert m["timed_videos"] == len(ToyWorld(tiny_params.toy).captions("held_out")) * cfg.num_seeds
    # the median of the per-video ratios, inside its interquartile range
    q1, q3 = metrics["speedup_dit_quartiles"]
    assert q1 <= metrics["speedup_dit"] <= q3
    assert json.loads(Path(cfg.metrics_path).read_text())["speedup_dit"] == metrics["speedup_dit"]
    assert metrics["setup"]["student_ema"] is True
    card = (Path(cfg.report_dir) / "model_card.md").read_text()
    assert f"| speedup_dit | {metrics['speedup_dit']:.4g} |" in card

    report_dir = Path(cfg.report_dir)
    text = (report_dir / "eval.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links and all((report_dir / link).is_file() for link in links)
    gif = Image.open(report_dir / ANIMATION)
    assert gif.n_frames == tiny_params.toy.num_frames
    assert gif.width == LABEL_WIDTH + len(ev.RUNS) * (CELL_HEIGHT + COLUMN_GAP)
    assert list(report_dir.glob("eval_*.gif")) == [report_dir / ANIMATION]
    for name in ev.RUNS:
        assert len(list((Path(cfg.videos_dir) / name).glob("*.mp4"))) == metrics[name]["timed_videos"]
    assert (report_dir / "params.effective.yaml").is_file()
    with temporary_settings({PREFECT_API_URL: prefect_server}):
        _assert_published(metrics)
    # the student's clips differ from the few-step teacher's (different weights and sampler)
    student = read_video(next((Path(cfg.videos_dir) / "student").glob("*.mp4")))
    few = read_video(next((Path(cfg.videos_dir) / "teacher_few").glob("*.mp4")))
    assert np.abs(student.astype(int) - few.astype(int)).mean() > 1


def _assert_published(metrics: dict) -> None:
    """The evaluate run's page on the Prefect server carries the report and the figures as artifacts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["evaluate"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    by_key = {a.key: a for a in artifacts}
    assert by_key["eval-report"].type == "markdown" and by_key["eval-figures"].type == "table"
    report = by_key["eval-report"].data
    assert report.startswith("# Evaluation") and "data:image/png;base64," in report  # the grid travels inline
    # the animation too, or its path where it is too large to inline
    assert "data:image/gif;base64," in report or f"{ANIMATION}`" in report
    rows = (
        json.loads(by_key["eval-figures"].data)
        if isinstance(by_key["eval-figures"].data, str)
        else by_key["eval-figures"].data
    )
    assert [r["run"].split(" (")[0] for r in rows] == ["teacher full", "teacher few-step", "student"]
    assert rows[2]["sharpness ↑"] == float(f"{metrics['student']['judge']['sharpness']:.4g}")
    assert rows[2]["DiT speed-up vs teacher full"] == float(f"{metrics['speedup_dit']:.4g}")  # the headline's
    assert by_key["eval-report"].task_run_id is None  # the flow run's own, listed on its page
