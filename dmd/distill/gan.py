"""DMD2's GAN term: a small classification head on the critic's intermediate features.

The critic (fake score) already sees noised student clips for its flow-matching loss; a forward hook on one of
its transformer blocks hands those tokens to a head that outputs one logit per clip. The critic and the head learn
to tell noised teacher clips (the cache) from noised student clips; the student gets the non-saturating GAN loss
of the same head on its own clip, with the gradient flowing through the critic into the student's x̂0.

The losses are small pure functions of the logits; `FeatureTap` and `ClassificationHead` are the two modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def gan_critic_loss(real_logits_B: torch.Tensor, fake_logits_B: torch.Tensor) -> torch.Tensor:
    """softplus(−D(real)) + softplus(D(fake)), means over the batch: −log σ(D(real)) − log(1 − σ(D(fake)))."""
    return F.softplus(-real_logits_B).mean() + F.softplus(fake_logits_B).mean()


def gan_generator_loss(fake_logits_B: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss softplus(−D(fake)) = −log σ(D(fake)), mean over the batch."""
    return F.softplus(-fake_logits_B).mean()


class ClassificationHead(torch.nn.Module):
    """Tokens (B, L, D) → one real-vs-student logit per clip: mean over tokens, then Linear → SiLU → Linear.

    Kept in float32 whatever the transformer computes in: it is small and its logits feed a softplus."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.proj = torch.nn.Linear(dim, hidden)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, tokens_BLD: torch.Tensor) -> torch.Tensor:
        pooled_BD = tokens_BLD.float().mean(dim=1)
        return self.out(F.silu(self.proj(pooled_BD))).squeeze(-1)


class FeatureTap:
    """Records the output tokens of `transformer.blocks[layer]` during `capture()`, and only then.

    Outside `capture()` the hook returns at once, so the same block can serve the teacher or the student (a LoRA
    critic shares its base) and recomputation under gradient checkpointing records nothing."""

    def __init__(self, transformer: torch.nn.Module, layer: int | None):
        blocks = transformer.blocks
        self.layer = len(blocks) // 2 if layer is None else layer
        if not 0 <= self.layer < len(blocks):
            raise ValueError(
                f"train.distillation_config.cls_feature_layer={layer}: the transformer has {len(blocks)} blocks; "
                f"use 0 … {len(blocks) - 1} or null (the middle block)"
            )
        self.dim = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        self._armed = False
        self._features: torch.Tensor | None = None
        self._handle = blocks[self.layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        if self._armed:
            self._features = output[0] if isinstance(output, tuple) else output

    @contextlib.contextmanager
    def capture(self) -> Iterator[FeatureTap]:
        self._armed, self._features = True, None
        try:
            yield self
        finally:
            self._armed = False

    @property
    def features(self) -> torch.Tensor:
        if self._features is None:
            raise RuntimeError("the critic ran no forward pass through the tapped block during capture()")
        return self._features

    def remove(self) -> None:
        self._handle.remove()
