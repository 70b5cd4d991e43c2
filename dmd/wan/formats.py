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


def load_lora_weights(transformer: WanTransformer3DModel, path: str | Path, adapter_name: str) -> None:
    """Weights `save_lora_weights` wrote into the existing adapter `adapter_name` of `transformer` (same rank and
    targets), as its starting point; every one of the adapter's weights must be in the file."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    prefix = "transformer."
    state = {k.removeprefix(prefix): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: LoRA weights that do not fit adapter {adapter_name!r}: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}; the adapter's rank or targets differ from the file's"
        )


def save_scheduler(directory: str | Path, config: dict) -> None:
    FlowMatchEulerDiscreteScheduler(**config).save_pretrained(directory)


def scheduler_sigmas(config: dict, num_steps: int) -> np.ndarray:
    """The σs FlowMatchEulerDiscreteScheduler(**config) steps through for `num_steps` (terminal 0 dropped)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas[:-1].numpy().astype(np.float64)
