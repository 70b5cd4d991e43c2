"""benchmarks/wan_scale.py: its CPU smoke run reports every figure the GPU run reports, each ratio consistent with
the seconds and megabytes it was computed from; the 14B search steps down past out-of-memory errors; the full
scale is the one the issue asks for; and the models it builds are held as diffusers' loader holds them."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import weakref
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from dmd.core.config import DistillationConfig
from dmd.evaluation.metrics import dmd_step_pass_counts
from dmd.wan.loading import WanModelError
from dmd.wan.skeleton import build_transformer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "wan_scale.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("wan_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


wan_scale = _load_script()
SMOKE = wan_scale.SMOKE


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    """One run as a user without a GPU runs it: no --smoke, so it must fall back by itself (--device cpu keeps a
    machine that has CUDA on the smoke path too)."""
    out = tmp_path_factory.mktemp("wan-scale") / "wan_scale.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--threads", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, json.loads(out.read_text())


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def test_smoke_run_falls_back_and_says_so(smoke):
    stdout, report = smoke
    assert "falling back to the smoke configuration" in stdout and "SMOKE RUN" in stdout
    assert report["smoke"] is True and "no CUDA" in report["smoke_reason"]
    assert report["complete"] is True and report["parts"] == list(wan_scale.PARTS)
    assert report["scale"] == json.loads(json.dumps(asdict(SMOKE)))
    env = report["environment"]
    assert env["device_type"] == "cpu" and env["device_name"]
    assert (env["torch"], env["diffusers"]) == (torch.__version__, diffusers.__version__)
    assert all(_positive(report["part_seconds"][p]) for p in wan_scale.PARTS)


def test_sampling_reports_teacher_and_student_dit_and_vae_seconds(smoke):
    s = smoke[1]["sampling"]
    t, h, w = SMOKE.latent_frames, SMOKE.latent_height, SMOKE.latent_width
    assert s["latent_shape"] == [1, 16, t, h, w]
    assert s["video"] == {"height": 8 * h, "width": 8 * w, "frames": 4 * (t - 1) + 1}
    teacher, student = s["teacher"], s["student"]
    # CFG as WanPipeline runs it: two transformer passes per step; the student one per step
    assert (
        teacher["steps"] == SMOKE.teacher_steps and teacher["transformer_passes"] == 2 * SMOKE.teacher_steps
    )
    assert student["transformer_passes"] == student["steps"] == len(student["sigmas"]) == 3
    assert len(teacher["dit_seconds"]) == 1 and len(student["dit_seconds"]) == SMOKE.student_repeats
    assert len(s["vae_decode_seconds"]) == SMOKE.decode_repeats
    for key, values in (
        ("teacher", teacher["dit_seconds"]),
        ("student", student["dit_seconds"]),
        ("vae", s["vae_decode_seconds"]),
    ):
        assert all(_positive(v) for v in values), key
    assert _close(teacher["dit_seconds_median"], float(np.median(teacher["dit_seconds"])))
    assert _close(student["dit_seconds_median"], float(np.median(student["dit_seconds"])))
    assert _close(s["vae_decode_seconds_median"], float(np.median(s["vae_decode_seconds"])))
    assert _close(s["dit_speedup"], teacher["dit_seconds_median"] / student["dit_seconds_median"])
    vae = s["vae_decode_seconds_median"]
    assert _close(
        s["dit_and_vae_speedup"],
        (teacher["dit_seconds_median"] + vae) / (student["dit_seconds_median"] + vae),
    )
    # interleaved, the warm-up left out of the medians, and the lists are the events' own seconds
    order = s["order"]
    assert [e["what"] for e in order] == [
        "student (warm-up)",
        "teacher",
        "vae decode (teacher latents)",
        "student",
        "vae decode (student latents)",
        "student",
    ]
    assert [e["seconds"] for e in order if e["what"] == "student"] == student["dit_seconds"]
    assert [e["seconds"] for e in order if e["what"].startswith("vae")] == s["vae_decode_seconds"]


def test_dmd_step_reports_memory_and_seconds_per_configuration(smoke):
    d = smoke[1]["dmd_step"]
    configs = d["configs"]
    assert list(configs) == list(wan_scale.CONFIGS)
    ref = configs[wan_scale.REFERENCE]
    for name, r in configs.items():
        assert _positive(r["peak_memory_mib"]), name
        assert r["peak_memory_kind"].startswith("cpu_"), name  # labelled: not a CUDA allocator figure
        assert len(r["step_seconds"]) == SMOKE.step_repeats and all(_positive(x) for x in r["step_seconds"])
        assert _positive(r["warmup_seconds"])
        assert _close(r["step_seconds_median"], float(np.median(r["step_seconds"])))
        assert _close(r["peak_ratio_to_d"], r["peak_memory_mib"] / ref["peak_memory_mib"])
        assert _close(r["seconds_ratio_to_d"], r["step_seconds_median"] / ref["step_seconds_median"])
        assert all(all(flags.values()) for flags in r["finite"]), name
        assert r["latent_shape"] == d["latent_shape"] and r["model"] == "1.3b"
    # what trains: (d) the student's adapter; (a) and (b) that and a critic adapter of the same rank; (c) that and
    # a full copy of the model
    n, student_lora = ref["parameters"], ref["trainable_parameters"]
    assert configs["a_lora_critic"]["trainable_parameters"] == 2 * student_lora
    assert configs["b_lora_critic_int8"]["trainable_parameters"] == 2 * student_lora
    assert configs["c_full_critic"]["trainable_parameters"] == student_lora + n
    assert d["settings"]["lora_rank"] == wan_scale.LORA_RANK == 128
    assert d["settings"]["gradient_checkpointing"] is True and d["settings"]["mixed_precision"] == "bf16"


def test_dmd_step_is_set_against_the_sum_of_its_passes(smoke):
    a = smoke[1]["dmd_step"]["configs"]["a_lora_critic"]
    passes = a["passes"]
    assert passes["counts"] == {
        "student_forward": 5,  # 2 before the exit in the generator update, 3 in the critic's rollout
        "student_forward_backward": 1,
        "real_forward": 1,
        "fake_forward": 1,
        "fake_forward_backward": 1,
    }
    assert all(_positive(s) for s in passes["seconds"].values())
    total = sum(passes["counts"][k] * passes["seconds"][k] for k in passes["counts"])
    assert _close(passes["sum_seconds"], total)
    assert _close(passes["step_over_sum"], a["step_seconds_median"] / total)


def test_fit_14b_reports_the_longest_clip_that_fits(smoke):
    f = smoke[1]["fit_14b"]
    full = SMOKE.fit_frames[0]
    assert f["tried"] == [{"latent_frames": full, "config": "a_lora_critic", "fits": True, "error": None}]
    assert f["fits_full_length"] is True and f["config"] == "a_lora_critic"
    assert f["largest_latent_frames"] == full and f["largest_video_frames"] == 4 * (full - 1) + 1
    r = f["result"]
    assert r["model"] == "14b" and r["latent_frames"] == full
    assert _positive(r["peak_memory_mib"]) and _positive(r["step_seconds_median"])
    # the 14B layer is wider than the 1.3B one at the same depth
    assert r["parameters"] > smoke[1]["dmd_step"]["configs"]["a_lora_critic"]["parameters"]


def test_search_fit_steps_down_past_out_of_memory_and_frees_each_failure():
    calls, freed, leftovers = [], [], []

    def attempt(frames: int, config: str) -> dict:
        # every earlier failed attempt's tensors must be gone by now (its traceback no longer holds them)
        assert all(ref() is None for ref in leftovers), "a failed attempt's memory was still held"
        calls.append((frames, config))
        held = torch.empty(16)
        leftovers.append(weakref.ref(held))
        if frames > 9 or (frames == 9 and config == "a"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore detail")
        return {"latent_frames": frames, "config": config}

    def free() -> None:
        freed.append(len(calls))
        wan_scale.free_memory(torch.device("cpu"))

    tried, result = wan_scale.search_fit((21, 17, 13, 9, 5), ("a", "b"), attempt, free)
    assert result == {"latent_frames": 9, "config": "b"}
    assert calls == [(21, "a"), (21, "b"), (17, "a"), (17, "b"), (13, "a"), (13, "b"), (9, "a"), (9, "b")]
    assert [t["fits"] for t in tried] == [False] * 7 + [True]
    assert tried[0]["error"] == "CUDA out of memory. Tried to allocate 2.00 GiB."
    assert freed == [1, 2, 3, 4, 5, 6, 7]

    def never(frames: int, config: str) -> dict:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    tried, result = wan_scale.search_fit((5, 1), ("a",), never, lambda: None)
    assert result is None and [t["latent_frames"] for t in tried] == [5, 1]

    def broken(frames: int, config: str) -> dict:
        raise ValueError("a bug, not a memory limit")

    with pytest.raises(ValueError, match="a bug"):
        wan_scale.search_fit((5,), ("a",), broken, lambda: None)


def test_a_model_too_large_to_build_stops_the_search(monkeypatch):
    """Running out of memory while building the model says nothing about whether a step fits."""

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(wan_scale, "build_transformer", out_of_memory)
    acc = SimpleNamespace(device=torch.device("cpu"))

    def attempt(frames: int, config: str) -> dict:
        return wan_scale.run_config(config, "14b", frames, SMOKE, acc, repeats=1)

    with pytest.raises(RuntimeError, match="building the 14b transformer ran out of device memory") as info:
        wan_scale.search_fit((2, 1), wan_scale.FIT_CONFIGS, attempt, lambda: None)
    assert not isinstance(info.value, torch.cuda.OutOfMemoryError)


def test_full_scale_is_the_one_asked_for():
    full = wan_scale.FULL
    assert wan_scale.latent_shape(full) == (1, 16, 21, 60, 104)
    assert full.video == {"height": 480, "width": 832, "frames": 81}
    assert (full.teacher_steps, full.text_tokens, full.num_layers, full.smoke) == (50, 512, None, False)
    assert full.fit_frames == (21, 17, 13, 9, 5, 1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wan_scale.choose_scale(False, cuda) == (full, None)
    assert (
        wan_scale.choose_scale(False, cpu)[0] is SMOKE and "no CUDA" in wan_scale.choose_scale(False, cpu)[1]
    )
    assert wan_scale.choose_scale(True, cuda) == (SMOKE, "--smoke")


def test_earlier_parts_are_kept_only_from_a_run_of_the_same_scale_and_device(tmp_path):
    path = tmp_path / "wan_scale.json"
    report = {
        "smoke": True,
        "scale": json.loads(json.dumps(asdict(SMOKE))),
        "environment": {"device_name": "cpu-x"},
        "part_seconds": {},
    }
    earlier = {**report, "sampling": {"x": 1}, "dmd_step": {"y": 2}, "part_seconds": {"sampling": 3.0}}
    path.write_text(json.dumps(earlier))
    assert wan_scale.earlier_parts(path, report, ["dmd_step", "fit_14b"]) == {"sampling": {"x": 1}}
    assert report["part_seconds"] == {"sampling": 3.0}
    path.write_text(json.dumps({**earlier, "environment": {"device_name": "another"}}))
    assert wan_scale.earlier_parts(path, report, ["fit_14b"]) == {}
    path.write_text(json.dumps({**earlier, "smoke": False}))
    assert wan_scale.earlier_parts(path, report, ["fit_14b"]) == {}
    assert wan_scale.earlier_parts(tmp_path / "missing.json", report, ["fit_14b"]) == {}


def test_a_smoke_run_never_replaces_a_measurement(tmp_path, capsys):
    path = tmp_path / "wan_scale.json"
    measurement = json.dumps({"smoke": False, "sampling": {"dit_speedup": 30.0}})
    path.write_text(measurement)
    with pytest.raises(SystemExit):
        wan_scale.main(["--smoke", "--device", "cpu", "--output", str(path)])
    assert "holds a GPU measurement" in capsys.readouterr().err
    assert path.read_text() == measurement


def test_dmd_step_pass_counts_follow_the_number_of_steps():
    three = DistillationConfig(last_step_only=True)
    four = DistillationConfig(last_step_only=True, dmd_denoising_steps=[1000, 750, 500, 250])
    assert dmd_step_pass_counts(three)["student_forward"] == 5
    assert dmd_step_pass_counts(four)["student_forward"] == 7
    with pytest.raises(ValueError, match="last_step_only"):
        dmd_step_pass_counts(DistillationConfig(last_step_only=False))


TINY = {
    "transformer": dict(
        patch_size=[1, 2, 2],
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=32,
    )  # fmt: skip
}


def test_build_transformer_holds_weights_as_diffusers_loader_does(tmp_path):
    """bf16 in memory = the fp32 weights saved and loaded back with from_pretrained(torch_dtype=bf16): the same
    values, and the modules diffusers keeps in fp32 kept in fp32."""
    build_transformer(TINY, seed=7).save_pretrained(tmp_path)
    loaded = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    built = build_transformer(TINY, seed=7, dtype=torch.bfloat16)
    expected = dict(loaded.named_parameters())
    got = dict(built.named_parameters())
    assert got.keys() == expected.keys()
    assert {n: p.dtype for n, p in got.items()} == {n: p.dtype for n, p in expected.items()}
    assert any(p.dtype == torch.float32 for p in got.values()) and built.dtype == torch.bfloat16
    assert all(torch.equal(got[n], expected[n]) for n in got)
    assert not torch.equal(build_transformer(TINY, seed=8).proj_out.weight, loaded.proj_out.weight.float())
    with pytest.raises(WanModelError, match="at least one layer"):
        build_transformer("1.3b", num_layers=0)
