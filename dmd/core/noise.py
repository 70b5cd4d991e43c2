"""Random draws, written once: every draw comes from an explicit `torch.Generator`, is made on that generator's
device and then moved to where it is used.

A CPU generator therefore gives the same numbers whatever device the model runs on; drawing on a CUDA device
(`torch.randn(..., device="cuda")`, or a CUDA generator) would use that device's own random stream, which differs
from the CPU's for the same seed.
"""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws of `shape` from `generator`, made on its device, returned on `device`."""
    out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return out if device is None else out.to(device)
