"""The student's files in diffusers' own formats: the LoRA weights `WanPipeline.load_lora_weights` reads and the
few-step scheduler `FlowMatchEulerDiscreteScheduler.from_pretrained` reads. Written by diffusers' own savers, so
plain diffusers loads what the export writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name WanPipeline.load_lora_weights looks for


def save_lora_weights(directory: str | Path, transformer: WanTransformer3DModel, adapter_name: str) -> Path:
    """The adapter `adapter_name` of `transformer` as `directory/LORA_WEIGHTS`, rank and alpha in its metadata."""
    from peft.utils import get_peft_model_state_dict

    WanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=adapter_name),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(),
    )
    return Path(directory) / LORA_WEIGHTS


def save_scheduler(directory: str | Path, config: dict) -> None:
    FlowMatchEulerDiscreteScheduler(**config).save_pretrained(directory)


def scheduler_sigmas(config: dict, num_steps: int) -> np.ndarray:
    """The σs FlowMatchEulerDiscreteScheduler(**config) steps through for `num_steps` (terminal 0 dropped)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas[:-1].numpy().astype(np.float64)
