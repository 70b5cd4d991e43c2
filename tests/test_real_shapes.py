"""The seed's own config on the real Wan 2.1 1.3B shapes, end to end on the CPU.

`dmd config import-simpletuner` of the seed's config.json + multidatabackend.json, pointed at a random Wan
directory of the real 1.3B widths (`dmd wan-skeleton`, depth cut to one layer), with only sizes and counts reduced
by `--set`: int8-quanto base and text encoder, bf16 mixed precision, LoRA rank 128, gradient checkpointing,
adamw_bf16, EMA every 5 steps, the 7-block rollout (3 latent frames per block over 21), validation with the seed's
negative prompt and prompt library, its webhook (a loopback server here). Then the same training with a bf16 and
an fp16 base and with a LoRA critic. Plain `WanPipeline` loads every export.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dmd.core.config import load

pytestmark = pytest.mark.slow

SEED = Path(__file__).parent / "fixtures" / "seed"
DMD = str(Path(sys.executable).with_name("dmd"))

# Sizes and counts only: 16×16 pixels, 81 frames (the 21 latent frames of the seed's 7 blocks), one video, two
# training steps, one evaluation clip. The real-width VAE's decode of 81 frames is most of the time.
SIZES = [
    "generate.height=16",
    "generate.width=16",
    "generate.num_frames=81",
    "generate.num_videos=1",
    "generate.shard_size=1",
    "generate.batch_size=1",
    "generate.num_inference_steps=2",
    "cache.resolution=16",
    "cache.datasets.0.resolution=16",
    "cache.datasets.0.num_frames=81",
    "train.max_train_steps=2",
    "train.lr_warmup_steps=1",
    "train.checkpoint_step_interval=1",
    "train.validation_step_interval=2",
    "train.validation_resolution=16x16",
    "train.validation_num_video_frames=81",
    "evaluate.num_seeds=1",
    "evaluate.teacher_steps=2",
    "evaluate.num_frames=81",
]


class _Hooks(BaseHTTPRequestHandler):
    events: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.events.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = HTTPServer(("127.0.0.1", 0), _Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", _Hooks.events
    server.shutdown()


@pytest.fixture(scope="module")
def wan_13b(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wan") / "wan2.1-t2v-1.3b"
    args = [
        DMD,
        "wan-skeleton",
        str(out),
        "--config",
        "1.3b",
        "--num-layers",
        "1",
        "--text-encoder-layers",
        "1",
    ]
    subprocess.run(args, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, wan_13b, webhook) -> dict:
    """The seed's config imported as its users would, its linked files in place, every stage run once."""
    from dmd.data import generate
    from dmd.data.cache.build import build_cache
    from dmd.evaluation.evaluate import evaluate
    from dmd.training.loop import train

    root = tmp_path_factory.mktemp("seed-run")
    imported = subprocess.run(
        [DMD, "config", "import-simpletuner", str(SEED / "config.json"), "--backend",
         str(SEED / "multidatabackend.json"), "-o", str(root / "params.yaml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    (root / "config" / "wan").mkdir(parents=True)
    seed = json.loads((SEED / "config.json").read_text())
    library = {"seed": seed["validation_prompt"]}
    (root / "config" / "wan" / "validation_prompts_dmd.json").write_text(json.dumps(library))
    (root / "config" / "wan" / "webhook.json").write_text(json.dumps({"webhook_url": webhook[0]}))
    here = [
        f"model.pretrained_model_name_or_path={wan_13b}",
        f"model.pretrained_t5_model_name_or_path={wan_13b}",
        f"generate.output_dir={root / 'data'}",
        f"cache.output_dir={root / 'cache'}",
        f"cache.datasets.0.manifest={root / 'data'}",
        f"train.output_dir={root / 'student'}",
        f"train.checkpoint_dir={root / 'checkpoints'}",
        f"train.metrics_dir={root / 'metrics'}",
        f"train.validation_prompt_library={root / 'config/wan/validation_prompts_dmd.json'}",
        f"train.webhook_config={root / 'config/wan/webhook.json'}",
        f"evaluate.prompts={root / 'config/wan/validation_prompts_dmd.json'}",
        f"evaluate.metrics_path={root / 'eval.json'}",
        f"evaluate.report_dir={root / 'reports'}",
        f"evaluate.videos_dir={root / 'reports/videos'}",
        f"evaluate.teacher_reference_dir={root / 'eval_reference'}",
    ]
    params = load(root / "params.yaml", here + SIZES)
    generate.generate_teacher_data(params)
    build_cache(params)
    student = train(params, progress=False)
    metrics = evaluate(params, progress=False)
    return {
        "root": root,
        "params": params,
        "student": student,
        "metrics": metrics,
        "here": here,
        "seed": seed,
    }


def test_the_seed_settings_are_the_ones_that_ran(seed_run):
    params, seed = seed_run["params"], seed_run["seed"]
    assert params.model.base_model_precision == "int8-quanto" == params.model.text_encoder_1_precision
    t, dc = params.train, params.train.distillation_config
    assert (t.run.mixed_precision, t.optim.optimizer, t.student.model_type, t.student.lora_rank, t.student.lora_alpha) == (
        "bf16", "adamw_bf16", "lora", 128, 128,
    )  # fmt: skip
    assert t.student.gradient_checkpointing and t.ema.use_ema and t.ema.ema_update_interval == 5
    assert (dc.num_frame_per_block, dc.num_training_frames, dc.fake_score_lora_rank) == (3, 21, None)
    assert params.model.negative_prompt == seed["validation_negative_prompt"]
    config = json.loads((seed_run["root"] / "student" / "student.json").read_text())
    assert config["num_frame_per_block"] == 3 and not config["single_block_training"]


def test_the_seed_run_trains_a_rank_128_lora_of_the_real_widths(seed_run, wan_13b):
    weights = load_file(seed_run["student"] / "pytorch_lora_weights.safetensors")
    q_a = next(v for k, v in weights.items() if k.endswith("attn1.to_q.lora_A.weight"))
    q_b = next(v for k, v in weights.items() if k.endswith("attn1.to_q.lora_B.weight"))
    assert q_a.shape == (128, 1536) and q_b.shape == (1536, 128)
    # LoRA B starts at zero: trained weights have moved it
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
    # checkpoints at every step, the validation grid of the seed's prompt library
    assert sorted(p.name for p in (seed_run["root"] / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-0000001", "checkpoint-0000002",
    ]  # fmt: skip
    assert list((seed_run["student"] / "validation").glob("step-*/*seed*"))


def test_the_seed_webhook_hears_the_run(seed_run, webhook):
    events = {e.get("event") for e in webhook[1]}
    assert {"start", "checkpoint", "finish"} <= events, events


def test_the_seed_run_evaluates_student_against_teacher(seed_run):
    headline = json.loads((seed_run["root"] / "eval.json").read_text())
    assert headline["speedup_dit"] == pytest.approx(seed_run["metrics"]["speedup_dit"])
    assert headline["speedup_dit"] > 0 and headline["student"]["nfe"] == seed_run["metrics"]["student"]["nfe"]
    assert (seed_run["root"] / "reports" / "eval.md").is_file()


def _plain_diffusers_loads(wan_dir: Path, student: Path, precision: str) -> None:
    """What the model card tells a user: WanPipeline from the teacher directory plus the student's LoRA."""
    from diffusers import WanPipeline

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    pipe = WanPipeline.from_pretrained(str(wan_dir), torch_dtype=dtype)
    pipe.load_lora_weights(str(student), weight_name="pytorch_lora_weights.safetensors")
    assert "default_0" in pipe.transformer.peft_config or pipe.transformer.peft_config


def test_plain_wan_pipeline_loads_the_seed_export(seed_run, wan_13b):
    _plain_diffusers_loads(wan_13b, seed_run["student"], "int8-quanto")


@pytest.mark.parametrize(
    "variant",
    [
        ["model.base_model_precision=bf16"],
        ["model.base_model_precision=fp16", "train.mixed_precision=fp16"],
        ["train.distillation_config.fake_score_lora_rank=64"],
    ],
    ids=["bf16-base", "fp16-base", "lora-critic"],
)
def test_the_seed_run_with_another_base_or_critic(seed_run, wan_13b, variant, tmp_path):
    """Each variant trains in its own process, as `accelerate launch` / `dmd train` run it (accelerate keeps one
    mixed precision per process), then loads in plain diffusers and samples with `dmd sample`'s code."""
    from dmd.student.sample import sample_student

    mine = [
        f"train.output_dir={tmp_path / 'student'}",
        f"train.checkpoint_dir={tmp_path / 'checkpoints'}",
        f"train.metrics_dir={tmp_path / 'metrics'}",
        "train.max_train_steps=1",
        "train.lr_warmup_steps=0",
        "train.disable_benchmark=true",
    ]
    overrides = seed_run["here"] + SIZES + mine + variant
    trained = subprocess.run(
        [sys.executable, "-m", "dmd.training.loop", str(seed_run["root"] / "params.yaml"), *overrides],
        capture_output=True, text=True,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    params = load(seed_run["root"] / "params.yaml", overrides)
    student = tmp_path / "student"
    card = json.loads((student / "student.json").read_text())
    assert card["train_steps"] == 1
    _plain_diffusers_loads(wan_13b, student, params.model.base_model_precision)
    videos = sample_student(
        params, student, ["a red square moving right slowly"], seed=0, output_dir=tmp_path / "s"
    )
    assert len(videos) == 1 and Path(videos[0]).stat().st_size > 0
