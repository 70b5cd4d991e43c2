"""Real Wan 2.1 shapes: the shipped configs, `dmd wan-skeleton`, and the checks on a teacher directory."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file
from transformers import UMT5Config, UMT5EncoderModel

from dmd.core.config import ConfigError, ModelConfig
from dmd.core.flow_matching import shift_sigma
from dmd.wan import loading as wan
from dmd.wan.loading import WanModelError, check_model_dir, load_text_encoder, load_transformer, load_vae
from dmd.wan.skeleton import (
    CONFIG_FILES,
    NAMED_CONFIGS,
    WAN_CONFIGS,
    build_skeleton,
    config_folder,
    save_skeleton,
)
from dmd.wan.tiny import build_tokenizer

DMD = Path(sys.executable).parent / "dmd"
SMALL = dict(num_layers=1, text_encoder_layers=1)  # real widths, one block each: what a CPU test can afford
WEIGHTS = {
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def skeleton(tmp_path_factory) -> Path:
    """The 1.3B configs' widths with one transformer block and one text-encoder block, seed 0."""
    return save_skeleton(tmp_path_factory.mktemp("skeleton") / "wan-1.3b", config="1.3b", seed=0, **SMALL)


# --- the shipped configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_shipped_configs_are_what_diffusers_and_transformers_accept(name):
    folder = config_folder(name)
    assert folder.parent == WAN_CONFIGS and all((folder / rel).is_file() for rel in CONFIG_FILES.values())
    index = WanPipeline.load_config(folder)
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    for cls, sub in (
        (WanTransformer3DModel, "transformer"),
        (AutoencoderKLWan, "vae"),
        (UniPCMultistepScheduler, "scheduler"),
    ):
        config = cls.load_config(folder, subfolder=sub)
        assert config["_class_name"] == cls.__name__
        _, unused, _ = cls.extract_init_dict(config)
        assert unused == {}, f"{sub}: keys {cls.__name__} does not take: {sorted(unused)}"
    text = UMT5Config.from_pretrained(folder / "text_encoder")
    assert (text.d_model, text.d_ff, text.d_kv, text.num_heads, text.num_layers) == (4096, 10240, 64, 64, 24)
    assert (text.vocab_size, text.feed_forward_proj, text.relative_attention_num_buckets) == (
        256384,
        "gated-gelu",
        32,
    )


def test_every_shipped_config_is_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    package = Path(__import__("dmd").__file__).parent
    shipped = {
        p
        for pattern in pyproject["tool"]["setuptools"]["package-data"]["dmd"]
        for p in package.glob(pattern)
        if p.suffix == ".json"
    }
    assert set(WAN_CONFIGS.rglob("*.json")) == shipped and len(shipped) == 5 * len(NAMED_CONFIGS)


@pytest.mark.parametrize(
    "name, width, layers, low, high",
    # the models' published sizes: 1.3B and 14B parameters in the transformer
    [("1.3b", 1536, 30, 1.3e9, 1.5e9), ("14b", 5120, 40, 13.5e9, 15e9)],
)
def test_transformer_configs_build_the_published_model_sizes(name, width, layers, low, high):
    config = WanTransformer3DModel.load_config(config_folder(name), subfolder="transformer")
    with torch.device("meta"):  # the shapes only; no memory for the weights
        model = WanTransformer3DModel.from_config(config)
        encoder = UMT5EncoderModel(UMT5Config.from_pretrained(config_folder(name) / "text_encoder"))
    assert model.config.num_attention_heads * model.config.attention_head_dim == width
    assert len(model.blocks) == layers and model.config.text_dim == encoder.config.d_model
    assert model.blocks[0].ffn.net[0].proj.weight.shape[1] == width
    assert low < sum(p.numel() for p in model.parameters()) < high
    assert encoder.shared.weight.shape == (256384, 4096) and len(encoder.encoder.block) == 24


@pytest.mark.parametrize("name", sorted(NAMED_CONFIGS))
def test_shipped_scheduler_is_flow_matching_with_the_configured_shift(name):
    config = UniPCMultistepScheduler.load_config(config_folder(name), subfolder="scheduler")
    scheduler = UniPCMultistepScheduler.from_config(config)
    steps = 10
    scheduler.set_timesteps(steps)
    # the project's convention (dmd/core/flow_matching.py): σ shifted from an even grid; 1000·σ is the timestep
    grid = torch.linspace(1, 1 / config["num_train_timesteps"], steps + 1)[:-1]
    expected = shift_sigma(grid, config["flow_shift"])
    torch.testing.assert_close(scheduler.sigmas[:-1].float(), expected, atol=2e-3, rtol=0)
    assert config["flow_shift"] == 3.0 and float(scheduler.sigmas[-1]) == 0.0


# --- the skeleton ---------------------------------------------------------------------------------------------


def test_skeleton_keeps_the_real_widths_with_the_depth_asked_for(skeleton):
    real = json.loads((config_folder("1.3b") / "transformer/config.json").read_text())
    written = json.loads((skeleton / "transformer/config.json").read_text())
    for key, value in real.items():
        if not key.startswith("_") and key != "num_layers":
            assert written[key] == value, key
    assert written["num_layers"] == 1
    text = json.loads((skeleton / "text_encoder/config.json").read_text())
    assert (text["d_model"], text["d_ff"], text["num_heads"], text["num_layers"]) == (4096, 10240, 64, 1)
    assert text["vocab_size"] == len(build_tokenizer())  # the local tokenizer, not 256k random rows
    state = load_file(skeleton / WEIGHTS["text_encoder"])
    assert state["shared.weight"].shape == (len(build_tokenizer()), 4096)
    assert all(t.dtype == torch.float32 for t in state.values())
    vae = json.loads((skeleton / "vae/config.json").read_text())
    assert vae["base_dim"] == 96 and vae["z_dim"] == 16 and vae["dim_mult"] == [1, 2, 4, 4]


def test_plain_diffusers_loads_the_skeleton_and_generates(skeleton):
    pipe = WanPipeline.from_pretrained(skeleton)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 1536
    out = pipe(
        "a red square moving left",
        negative_prompt="",
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        max_sequence_length=8,
    )
    assert out.frames.shape == (1, 5, 16, 16, 3)
    assert torch.isfinite(torch.from_numpy(out.frames)).all()


def test_cli_writes_the_same_bytes_for_the_same_seed(skeleton, tmp_path):
    out = tmp_path / "again"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(DMD), "wan-skeleton", str(out), "--config", "1.3b", "--seed", "0"]
    args += ["--num-layers", "1", "--text-encoder-layers", "1"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert _files(out) == _files(skeleton)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_another_seed_gives_other_weights_and_one_component_does_not_move_another(skeleton):
    other = build_skeleton("1.3b", seed=1, **SMALL)
    for name, rel in WEIGHTS.items():
        ours = load_file(skeleton / rel)
        theirs = getattr(other, name).state_dict()
        assert set(theirs) >= set(ours), name
        random = [k for k, t in ours.items() if t.numel() > 1 and t.float().std() > 0]
        assert random, name
        same = [k for k in random if torch.equal(ours[k], theirs[k])]
        assert not same, f"{name}: {same[:5]} identical under seeds 0 and 1"
    deeper = build_skeleton("1.3b", seed=0, num_layers=2, text_encoder_layers=1)
    for name in ("vae", "text_encoder"):
        ours = load_file(skeleton / WEIGHTS[name])
        theirs = getattr(deeper, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_skeleton_bf16_writes_bf16_weights(tmp_path):
    # Small widths from a config folder of the user's: the --config PATH form and --dtype together
    folder = tmp_path / "cfg"
    shutil.copytree(config_folder("1.3b"), folder)
    config = json.loads((folder / "transformer/config.json").read_text())
    config.update(num_attention_heads=2, attention_head_dim=16, ffn_dim=32, text_dim=32)
    (folder / "transformer/config.json").write_text(json.dumps(config))
    text = json.loads((folder / "text_encoder/config.json").read_text())
    text.update(d_model=32, d_ff=64, d_kv=8, num_heads=4)
    (folder / "text_encoder/config.json").write_text(json.dumps(text))
    vae = json.loads((folder / "vae/config.json").read_text())
    vae.update(base_dim=8)
    (folder / "vae/config.json").write_text(json.dumps(vae))
    out = save_skeleton(tmp_path / "bf16", config=folder, dtype="bf16", vocab_size=1000, **SMALL)
    for rel in WEIGHTS.values():
        assert {t.dtype for t in load_file(out / rel).values()} == {torch.bfloat16}, rel
    assert json.loads((out / "text_encoder/config.json").read_text())["vocab_size"] == 1000
    assert WanPipeline.from_pretrained(out).transformer.config.num_attention_heads == 2


def test_skeleton_rejects_bad_arguments_before_building(tmp_path):
    with pytest.raises(WanModelError, match=r"--vocab-size: 3 is below the local tokenizer's \d+ tokens"):
        build_skeleton("1.3b", vocab_size=3)
    with pytest.raises(WanModelError, match="--num-layers: 0"):
        build_skeleton("1.3b", num_layers=0)
    with pytest.raises(WanModelError, match="neither one of 1.3b, 14b nor a folder"):
        build_skeleton(tmp_path / "nothing")
    folder = tmp_path / "flux"
    shutil.copytree(config_folder("1.3b"), folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxPipeline"}))
    with pytest.raises(WanModelError, match="model_index.json names class 'FluxPipeline', not WanPipeline"):
        build_skeleton(folder)


def test_cli_prints_one_line_for_a_bad_config(tmp_path):
    proc = subprocess.run(
        [str(DMD), "wan-skeleton", str(tmp_path / "out"), "--config", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config:"), proc.stderr
    assert not (tmp_path / "out").exists()


# --- checks on the teacher directory and the precisions, before any weights are read ---------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert isinstance(error.value, ConfigError)
    text = str(error.value)
    assert "\n" not in text
    return text


def test_the_real_shaped_skeleton_and_the_tiny_teacher_pass_the_checks(skeleton, tiny_wan_dir):
    for root in (skeleton, tiny_wan_dir):
        check_model_dir(ModelConfig(pretrained_model_name_or_path=str(root)))
    assert load_transformer(ModelConfig(pretrained_model_name_or_path=str(tiny_wan_dir))) is not None


def test_a_pipeline_that_is_not_wan_is_named_with_its_class(tiny_wan_dir, tmp_path):
    root = _copy(tiny_wan_dir, tmp_path / "flux")
    _edit_json(root / "model_index.json", _class_name="FluxPipeline")
    with pytest.raises(WanModelError) as e:
        load_transformer(ModelConfig(pretrained_model_name_or_path=str(root)))
    text = _one_line(e)
    assert text.startswith("model.pretrained_model_name_or_path: ")
    assert f"{root / 'model_index.json'} names class 'FluxPipeline', not WanPipeline" in text
    assert "dmd wan-skeleton" in text


def test_a_transformer_that_is_not_wan_stops_every_loader(tiny_wan_dir, tmp_path):
    root = _copy(tiny_wan_dir, tmp_path / "other")
    _edit_json(root / "transformer/config.json", _class_name="FluxTransformer2DModel")
    cfg = ModelConfig(pretrained_model_name_or_path=str(root))
    for loader in (load_transformer, load_vae, load_text_encoder):
        with pytest.raises(WanModelError) as e:
            loader(cfg)
        text = _one_line(e)
        assert f"{root / 'transformer/config.json'} names class 'FluxTransformer2DModel'" in text, loader


def test_no_model_index_is_named(tiny_wan_dir, tmp_path):
    root = _copy(tiny_wan_dir, tmp_path / "bare")
    (root / "model_index.json").unlink()
    with pytest.raises(WanModelError) as e:
        load_vae(ModelConfig(pretrained_model_name_or_path=str(root)))
    assert f"{root / 'model_index.json'}: missing" in _one_line(e)


@pytest.mark.parametrize("folder", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_missing_component_is_named_with_the_fix(tiny_wan_dir, tmp_path, folder):
    root = _copy(tiny_wan_dir, tmp_path / "partial")
    shutil.rmtree(root / folder)
    with pytest.raises(WanModelError) as e:
        load_text_encoder(ModelConfig(pretrained_model_name_or_path=str(root)))
    text = _one_line(e)
    assert text.startswith("model.pretrained_model_name_or_path: ")
    assert f"no {folder}/ folder" in text and "dmd wan-skeleton" in text and "download" in text


def test_a_separate_text_encoder_directory_is_checked_under_its_own_key(tiny_wan_dir, tmp_path):
    text_root = _copy(tiny_wan_dir, tmp_path / "t5")
    shutil.rmtree(text_root / "tokenizer")
    teacher = _copy(tiny_wan_dir, tmp_path / "teacher")
    shutil.rmtree(teacher / "text_encoder")  # not needed there: the text encoder comes from text_root
    cfg = ModelConfig(
        pretrained_model_name_or_path=str(teacher), pretrained_t5_model_name_or_path=str(text_root)
    )
    with pytest.raises(WanModelError) as e:
        load_transformer(cfg)
    assert _one_line(e).startswith(
        f"model.pretrained_t5_model_name_or_path: {text_root}: no tokenizer/ folder"
    )


REAL_PROBE = wan.matmul_error


def _fp16_fails(device: str, dtype: torch.dtype) -> str | None:
    """The probe as on a CPU without half-precision matmul kernels (the error older torch builds raise)."""
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        return "RuntimeError: \"addmm_impl_cpu_\" not implemented for 'Half'"
    return REAL_PROBE(device, dtype)


@pytest.mark.parametrize(
    "key, loader",
    [("base_model_precision", load_transformer), ("text_encoder_1_precision", load_text_encoder)],
)
def test_fp16_where_the_cpu_cannot_run_it_is_named_with_the_fix(tiny_wan_dir, monkeypatch, key, loader):
    monkeypatch.setattr(wan, "matmul_error", _fp16_fails)  # only the probe: the check itself runs as shipped
    cfg = ModelConfig(pretrained_model_name_or_path=str(tiny_wan_dir), **{key: "fp16"})
    with pytest.raises(WanModelError) as e:
        loader(cfg, "cpu")
    text = _one_line(e)
    assert text.startswith(f"model.{key}: fp16: torch cannot run a fp16 matmul on cpu")
    assert "not implemented for 'Half'" in text and "bf16" in text
    load_vae(cfg, "cpu")  # the VAE runs in fp32 whatever the precisions say
    ok = ModelConfig(pretrained_model_name_or_path=str(tiny_wan_dir), **{key: "bf16"})
    check_model_dir(ok, "cpu")


def test_the_probe_tells_a_working_precision_from_a_missing_device(tiny_wan_dir):
    assert wan.matmul_error("cpu", torch.float32) is None
    if wan.matmul_error("cpu", torch.float16) is None:  # this CPU runs fp16: the check lets it through
        check_model_dir(
            ModelConfig(pretrained_model_name_or_path=str(tiny_wan_dir), base_model_precision="fp16"), "cpu"
        )
    if not torch.cuda.is_available():
        assert wan.matmul_error("cuda", torch.float16) is not None


def test_int8_quantized_on_an_accelerator_without_one_is_named(tiny_wan_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch, "accelerator", None) is not None:
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    cfg = ModelConfig(
        pretrained_model_name_or_path=str(tiny_wan_dir),
        base_model_precision="int8-quanto",
        quantize_via="accelerator",
    )
    with pytest.raises(WanModelError) as e:
        load_transformer(cfg, "cpu")
    text = _one_line(e)
    assert text.startswith("model.quantize_via: accelerator, with model.base_model_precision: int8-quanto")
    assert "set model.quantize_via: cpu" in text
    load_text_encoder(cfg, "cpu")  # its own precision is not int8: nothing to refuse


def test_the_error_crosses_process_boundaries_intact():
    error = WanModelError("model.base_model_precision", "fp16: cannot")
    again = pickle.loads(pickle.dumps(error))
    assert (
        type(again) is WanModelError
        and str(again) == str(error) == "model.base_model_precision: fp16: cannot"
    )
