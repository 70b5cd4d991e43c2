"""Where the stages run: the accelerator when there is one, else the CPU."""

from __future__ import annotations

import torch


def pick_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str) -> torch.device:
    """A device setting: `auto` is `pick_device()`, anything else a torch device name."""
    return pick_device() if name == "auto" else torch.device(name)
