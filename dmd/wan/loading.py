"""Wan 2.1 components through diffusers: loading at a precision, int8 quantization, LoRA, prompt encoding.

Everything that touches a teacher goes through here, so real Wan 2.1 weights and the toy teacher take the same path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from peft import LoraConfig
from transformers import AutoTokenizer, UMT5EncoderModel

from dmd.core.config import ConfigError, ModelConfig
from dmd.core.io import sha256_file

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# the float dtype of each train.mixed_precision: an int8-quanto base keeps its other weights, and computes, in it
MIXED_PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    pass


class WanModelError(ConfigError):
    """One problem with a Wan model directory or its precision on a device: one line naming the setting, what was
    found and the fix."""

    def __init__(self, setting: str, message: str):
        super().__init__(setting, [message])

    def __str__(self) -> str:
        return f"{self.source}: {self.problems[0]}"

    def __reduce__(self):
        # stage workers may run in other processes; the exception must cross back intact
        return (type(self), (self.source, self.problems[0]))


TEACHER_KEY = "model.pretrained_model_name_or_path"
TEXT_ENCODER_KEY = "model.pretrained_t5_model_name_or_path"
WAN_PIPELINE = "WanPipeline"
# folder -> (config file, the class it must name); the tokenizer folder only has to be there
WAN_COMPONENTS = {
    "transformer": ("config.json", "WanTransformer3DModel"),
    "vae": ("config.json", "AutoencoderKLWan"),
    "scheduler": ("scheduler_config.json", None),
    "text_encoder": ("config.json", None),
    "tokenizer": (None, None),
}
# Weight files above this size are identified by their size and three sampled windows rather than a full hash,
# so that checking a 14B teacher costs seconds, not minutes; retraining changes every window.
FULL_HASH_LIMIT = 256 << 20
HASH_WINDOW = 4 << 20
FIX_MISSING = (
    "re-download the model (e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir DIR`), "
    "or write a random-weight directory of the real shapes for a dry run with `dmd wan-skeleton DIR`"
)


def expect_class(file: Path, config: dict, expected: str, setting: str) -> None:
    found = config.get("_class_name")
    if found != expected:
        raise WanModelError(
            setting,
            f"{file} names class {found!r}, not {expected}: this is not a Wan 2.1 text-to-video directory; point "
            f"{setting} at a diffusers Wan 2.1 T2V directory (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers), or write one "
            f"for a dry run with `dmd wan-skeleton DIR`",
        )


def _json(file: Path, setting: str, why_needed: str) -> dict:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise WanModelError(setting, f"{file}: missing ({why_needed}); {FIX_MISSING}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WanModelError(setting, f"{file}: not valid JSON ({e}); {FIX_MISSING}") from None


def _check_components(root: Path, setting: str, folders: tuple[str, ...]) -> None:
    for folder in folders:
        if not (root / folder).is_dir():
            raise WanModelError(setting, f"{root}: no {folder}/ folder; {FIX_MISSING}")
        config_file, expected = WAN_COMPONENTS[folder]
        if config_file is None:
            continue
        config = _json(root / folder / config_file, setting, f"the {folder}'s config")
        if expected is not None:
            expect_class(root / folder / config_file, config, expected, setting)
        elif folder == "text_encoder" and config.get("model_type") != "umt5":
            raise WanModelError(
                setting,
                f"{root / folder / config_file} has model_type {config.get('model_type')!r}, not 'umt5': Wan 2.1 "
                f"uses the UMT5-XXL encoder; point {setting} at a Wan 2.1 diffusers directory",
            )


def _local_dir(path_or_id: str, setting: str) -> Path | None:
    """The local directory to check, or None for a hub id (checked by the hub when it is fetched)."""
    p = Path(path_or_id)
    if not p.exists():
        return None
    if not p.is_dir():
        raise WanModelError(setting, f"{p} is a file; point {setting} at a diffusers Wan directory")
    return p


@functools.cache
def matmul_error(device: str, dtype: torch.dtype) -> str | None:
    """Why torch cannot multiply two `dtype` matrices on `device`, or None when it can (probed once per pair)."""
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        (a @ a).sum().item()
    except Exception as e:  # the kernels' own errors vary by torch version and backend
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
    return None


def _has_accelerator() -> bool:
    if torch.cuda.is_available():
        return True
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator is not None and accelerator.is_available())


def _check_precision(cfg: ModelConfig, key: str, device) -> None:
    precision = getattr(cfg, key)
    dtype = DTYPES.get(precision)
    if dtype is not None and dtype != torch.float32:
        device_name = str(torch.device(device))
        error = matmul_error(device_name, dtype)
        if error is not None:
            raise WanModelError(
                f"model.{key}",
                f"{precision}: torch cannot run a {precision} matmul on {device_name} ({error}); set model.{key} "
                f"to {'bf16 or ' if precision == 'fp16' else ''}fp32, or run on a device that supports {precision}",
            )
    if precision == "int8-quanto" and cfg.quantize_via == "accelerator" and not _has_accelerator():
        raise WanModelError(
            "model.quantize_via",
            f"accelerator, with model.{key}: int8-quanto, but there is no CUDA (or other accelerator) device here; "
            f"set model.quantize_via: cpu, or run on a machine with a GPU",
        )


def check_model_dir(
    cfg: ModelConfig, device: str | torch.device = "cpu", component: str | None = None
) -> None:
    """Reject, before any weights are read, what cannot work: a local teacher directory that is not a complete
    diffusers Wan 2.1 text-to-video directory, or a precision `device` cannot run.

    The directories are checked whole whatever `component` is loaded, so the first loader of a stage stops it; the
    precision checked is `component`'s own (the transformer's `base_model_precision`, the text encoder's
    `text_encoder_1_precision`, none for the VAE, which stays fp32), since stages place components on different
    devices. `component=None` checks both. Raises WanModelError (a ConfigError) naming the setting and the fix.
    """
    separate_text = cfg.pretrained_t5_model_name_or_path not in (None, cfg.pretrained_model_name_or_path)
    root = _local_dir(cfg.pretrained_model_name_or_path, TEACHER_KEY)
    if root is not None:
        index = _json(
            root / "model_index.json", TEACHER_KEY, "it is what makes a folder a diffusers pipeline"
        )
        expect_class(root / "model_index.json", index, WAN_PIPELINE, TEACHER_KEY)
        folders = ("transformer", "vae", "scheduler")
        _check_components(
            root, TEACHER_KEY, folders if separate_text else folders + ("text_encoder", "tokenizer")
        )
    text_root = _local_dir(cfg.text_encoder_path, TEXT_ENCODER_KEY) if separate_text else None
    if text_root is not None:
        _check_components(text_root, TEXT_ENCODER_KEY, ("text_encoder", "tokenizer"))
    keys = {
        "transformer": ("base_model_precision",),
        "text_encoder": ("text_encoder_1_precision",),
        "vae": (),
        None: ("base_model_precision", "text_encoder_1_precision"),
    }[component]
    for key in keys:
        _check_precision(cfg, key, device)


def model_source(path_or_id: str, what: str) -> str:
    """Check that a local path exists, or that a hub id may be fetched; say how to fix it otherwise."""
    p = Path(path_or_id)
    if p.exists():
        return str(p)
    looks_local = path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") != 1
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if looks_local or offline:
        why = (
            "this path does not exist"
            if looks_local
            else "HF_HUB_OFFLINE is set and it is not a local directory"
        )
        raise ModelNotFoundError(
            f"{what} '{path_or_id}': {why}. Download the model once elsewhere (e.g. `huggingface-cli download "
            f"{path_or_id if not looks_local else 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'} --local-dir DIR`) and set "
            f"model.pretrained_model_name_or_path (and model.pretrained_t5_model_name_or_path) to DIR."
        )
    return path_or_id


def teacher_revision(cfg: ModelConfig) -> str:
    """`model.revision` when set; for local directories a digest of their files (weights, configs, tokenizer):
    what identifies the teacher in the generated data's fingerprints and the evaluation's teacher reference."""
    if cfg.revision:
        return cfg.revision
    paths = dict.fromkeys([cfg.pretrained_model_name_or_path, cfg.text_encoder_path])
    h = hashlib.sha256()
    for p in paths:
        root = Path(p)
        if not root.is_dir():
            h.update(f"hub:{p}".encode())
            continue
        for file in sorted(f for f in root.rglob("*") if f.is_file() and not _hidden(f.relative_to(root))):
            h.update(
                f"{file.relative_to(root).as_posix()}:{file.stat().st_size}:{sampled_file_digest(file)}\n".encode()
            )
    return "sha256:" + h.hexdigest()


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def sampled_file_digest(path: Path) -> str:
    """A file's sha256, or for a file above FULL_HASH_LIMIT the sha256 of three windows of it (start, middle, end):
    what tells weight files apart quickly, not a checksum of the whole file."""
    size = path.stat().st_size
    if size <= FULL_HASH_LIMIT:
        return sha256_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for start in (0, size // 2, size - HASH_WINDOW):
            f.seek(start)
            h.update(f.read(HASH_WINDOW))
    return "windows:" + h.hexdigest()


def load_transformer_folder(folder: str | Path, precision: str) -> WanTransformer3DModel:
    """A transformer saved whole under `folder/transformer`, held at `precision`'s float dtype (diffusers would
    upcast it to float32 otherwise)."""
    return WanTransformer3DModel.from_pretrained(
        folder, subfolder="transformer", torch_dtype=DTYPES.get(precision)
    )


def _dtype(precision: str, default: torch.dtype = torch.float32) -> torch.dtype:
    return DTYPES.get(precision, default)


# Left in float when a Wan transformer is quantized: the timestep and text embedders and the output projection are
# a few percent of the weights, and diffusers feeds the time embedder float32 sinusoids whenever its first weight is
# int8, which quanto's CPU kernel cannot multiply with scales of another float dtype.
WAN_INT8_EXCLUDE = ["condition_embedder.*", "proj_out"]


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Quantize linear weights to int8 with optimum-quanto and freeze them (activations stay float)."""
    from optimum.quanto import freeze, qint8, quantize

    exclude = list(WAN_INT8_EXCLUDE) if isinstance(module, WanTransformer3DModel) else []
    # torch's CPU int8 matmul crashes on bf16/fp16 inputs whose width is not a multiple of 16: every real Wan and
    # UMT5 width is, only tiny test models have such layers, and those stay float
    exclude += [
        n
        for n, m in module.named_modules()
        if isinstance(m, torch.nn.Linear) and m.in_features % 16 and m.weight.dtype != torch.float32
    ]
    quantize(module, weights=qint8, exclude=exclude or None)
    freeze(module)
    return module


def is_int8(module: torch.nn.Module) -> bool:
    """Whether `module` holds optimum-quanto quantized layers (whose weights cannot absorb a fused LoRA)."""
    from optimum.quanto import QModuleMixin

    return any(isinstance(m, QModuleMixin) for m in module.modules())


def load_transformer(
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    *,
    int8_float_dtype: torch.dtype = torch.float32,
    quantize: bool = True,
) -> WanTransformer3DModel:
    """The teacher's transformer at `model.base_model_precision`, frozen, on `device`.

    An int8-quanto base keeps its other weights, and computes, in `int8_float_dtype` (training passes its mixed
    precision: quanto's int8 kernels need activations of their scales' dtype). `quantize=False` returns that base
    still in float, for a caller that copies the float weights first and then calls `place_int8`.
    """
    src = model_source(cfg.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    check_model_dir(cfg, device, "transformer")
    int8 = cfg.base_model_precision == "int8-quanto"
    dtype = int8_float_dtype if int8 else _dtype(cfg.base_model_precision)
    model = WanTransformer3DModel.from_pretrained(
        src, subfolder="transformer", torch_dtype=dtype, revision=cfg.revision
    )
    if cfg.attention_mechanism != "diffusers":
        model.set_attention_backend(cfg.attention_mechanism)
    if int8 and not quantize:
        return model.eval().requires_grad_(False).to(device)
    return _place(model, cfg.base_model_precision, cfg.quantize_via, device)


def place_int8(model: torch.nn.Module, quantize_via: str, device) -> torch.nn.Module:
    """Quantize a float model to int8 (on the accelerator first with quantize_via: accelerator) and place it."""
    return _place(model, "int8-quanto", quantize_via, device)


def load_vae(cfg: ModelConfig, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    src = model_source(cfg.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    check_model_dir(cfg, device, "vae")
    # Wan's VAE runs in fp32 in diffusers' own examples; it is small next to the transformer.
    vae = AutoencoderKLWan.from_pretrained(
        src, subfolder="vae", torch_dtype=torch.float32, revision=cfg.revision
    )
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """(tokenizer, text_encoder) from model.pretrained_t5_model_name_or_path, at text_encoder_1_precision."""
    src = model_source(cfg.text_encoder_path, "model.pretrained_t5_model_name_or_path")
    check_model_dir(cfg, device, "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", revision=cfg.revision)
    dtype = _dtype(cfg.text_encoder_1_precision)
    encoder = UMT5EncoderModel.from_pretrained(
        src, subfolder="text_encoder", torch_dtype=dtype, revision=cfg.revision
    )
    return tokenizer, _place(encoder, cfg.text_encoder_1_precision, cfg.quantize_via, device)


def _place(model: torch.nn.Module, precision: str, quantize_via: str, device) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    if precision == "int8-quanto":
        # quantize_via=accelerator moves first, so the quantization itself runs on the accelerator
        if quantize_via == "accelerator":
            model.to(device)
        quantize_int8(model)
    return model.to(device)


def add_lora(
    transformer: WanTransformer3DModel, rank: int, alpha: float, adapter_name: str = "default"
) -> WanTransformer3DModel:
    """Add a peft LoRA adapter (diffusers' PEFT integration, so `save_lora_weights` / `load_lora_weights` work)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=LORA_TARGETS)
    transformer.add_adapter(config, adapter_name=adapter_name)
    return transformer


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = 512
) -> torch.Tensor:
    """T5 embeddings exactly as WanPipeline computes them: positions past each prompt's length set to zero."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    mask = inputs.attention_mask
    hidden = text_encoder(inputs.input_ids.to(device), mask.to(device)).last_hidden_state
    return hidden * mask.to(hidden.device, hidden.dtype).unsqueeze(-1)


def count_truncated(tokenizer, prompts: list[str], max_sequence_length: int) -> list[int]:
    """Indices of prompts longer than the text encoder's window (they would be truncated)."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True).input_ids]
    return [i for i, n in enumerate(lengths) if n > max_sequence_length]
