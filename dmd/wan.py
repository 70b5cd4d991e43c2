"""Wan 2.1 components through diffusers: loading at a precision, int8 quantization, LoRA, prompt encoding.

Everything that touches a teacher goes through here, so real Wan 2.1 weights and the toy teacher take the same path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from peft import LoraConfig
from transformers import AutoTokenizer, UMT5EncoderModel

from dmd.config import ModelConfig

log = logging.getLogger(__name__)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    pass


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


def _dtype(precision: str, default: torch.dtype = torch.float32) -> torch.dtype:
    return DTYPES.get(precision, default)


def quantize_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Quantize linear weights to int8 with optimum-quanto and freeze them (activations stay float)."""
    from optimum.quanto import freeze, qint8, quantize

    quantize(module, weights=qint8)
    freeze(module)
    return module


def load_transformer(cfg: ModelConfig, device: str | torch.device = "cpu") -> WanTransformer3DModel:
    src = model_source(cfg.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    dtype = _dtype(cfg.base_model_precision)
    model = WanTransformer3DModel.from_pretrained(
        src, subfolder="transformer", torch_dtype=dtype, revision=cfg.revision
    )
    if cfg.attention_mechanism != "diffusers":
        model.set_attention_backend(cfg.attention_mechanism)
    return _place(model, cfg.base_model_precision, cfg.quantize_via, device)


def load_vae(cfg: ModelConfig, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    src = model_source(cfg.pretrained_model_name_or_path, "model.pretrained_model_name_or_path")
    # Wan's VAE runs in fp32 in diffusers' own examples; it is small next to the transformer.
    vae = AutoencoderKLWan.from_pretrained(
        src, subfolder="vae", torch_dtype=torch.float32, revision=cfg.revision
    )
    return vae.to(device).eval().requires_grad_(False)


def load_text_encoder(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """(tokenizer, text_encoder) from model.pretrained_t5_model_name_or_path, at text_encoder_1_precision."""
    src = model_source(cfg.text_encoder_path, "model.pretrained_t5_model_name_or_path")
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
