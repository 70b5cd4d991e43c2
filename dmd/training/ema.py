"""Exponential moving average of the student's trainable weights (fp32 shadows), swappable in for validation/export.

Written here rather than with diffusers' `EMAModel` because the student is a LoRA adapter on a shared base: the
average covers exactly the student's parameters (a list of tensors), and its state is plain tensors for
safetensors checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from dmd.training.sharding import copy_full_into


def ema_decay_at(update: int, decay: float) -> float:
    """The decay of the `update`-th fold (1, 2, …): 0 for the first, then min(decay, (1 + n)/(10 + n)) with
    n = update − 1, the warm-up of diffusers' `EMAModel` (and of the seed's trainer).

    Without the warm-up the shadow keeps decay^updates of the initial weights, which is most of them on a short
    run with a long `update_interval`."""
    n = update - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


class EMA:
    """shadow ← d·shadow + (1 − d)·weights with d = ema_decay_at(update, decay), every `update_interval`-th call
    to `step`."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, update_interval: int = 1):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay={decay}: must lie in (0, 1), e.g. 0.99")
        self.params = list(params)
        self.decay = decay
        self.update_interval = update_interval
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_calls = 0

    @property
    def num_updates(self) -> int:
        """Folds so far; 0 means the shadow still holds the weights training started from."""
        return self.num_calls // self.update_interval

    @torch.no_grad()
    def step(self) -> bool:
        """Count one optimizer step of the student; fold the weights in on every `update_interval`-th. True if it did."""
        self.num_calls += 1
        if self.num_calls % self.update_interval:
            return False
        weight = 1 - ema_decay_at(self.num_updates, self.decay)
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), weight)
        return True

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the EMA weights; the live weights come back afterwards."""
        live = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, w in zip(self.params, live):
                p.copy_(w)

    def state_dict(self) -> dict:
        return {
            "weights": {f"shadow.{i:05d}": s for i, s in enumerate(self.shadow)},
            "num_calls": self.num_calls,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["weights"]
        shadows = [saved[f"shadow.{i:05d}"] for i in range(len(self.shadow)) if f"shadow.{i:05d}" in saved]
        if len(shadows) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadows, self.shadow)):
            raise ValueError(
                f"EMA state holds {len(shadows)} tensors, the student has {len(self.shadow)} with other shapes; "
                "the checkpoint comes from a different model (check train.model_type / lora_rank)"
            )
        for s, tensor in zip(self.shadow, shadows):
            copy_full_into(s, tensor)  # a sharded student's shadows are sharded alike
        self.num_calls = int(state["num_calls"])
