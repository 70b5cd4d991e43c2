"""The three DMD roles on one teacher: student (generator), real score (teacher), fake score (critic).

One copy of the big weights serves all three when the student and the critic are LoRA adapters: the base
model is frozen; the student is its adapter "student"; the real score is the base with every adapter disabled
(never the student); the critic is its adapter "critic". A full student or a full critic is a trainable copy
of the teacher instead (the seed trainer's way). With `base_model_precision: int8-quanto` the frozen base is
quantized and the adapters train on top of it in float.

peft's `set_adapter` also flips `requires_grad` of the adapters it (de)activates; the roles restore the
trainable flags after every switch, so which weights train never depends on which role ran last.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from dmd.core.config import Params, TrainConfig
from dmd.distill.rollout import transformer_velocity
from dmd.wan.loading import MIXED_PRECISION_DTYPES, add_lora, load_transformer, place_int8

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel

log = logging.getLogger(__name__)

STUDENT_ADAPTER = "student"
CRITIC_ADAPTER = "critic"
_REAL = "real"  # the activation state "no adapter" (the teacher)


class RoleError(RuntimeError):
    """A role is wired wrongly (teacher trainable, critic frozen, shapes that differ, ...)."""


class Roles:
    """Student, real score and fake score as VelocityFns over one frozen base, plus their trainable weights."""

    def __init__(
        self,
        base: WanTransformer3DModel,
        student_copy: WanTransformer3DModel | None = None,
        critic_copy: WanTransformer3DModel | None = None,
    ):
        self.base = base
        self.student_copy = student_copy
        self.critic_copy = critic_copy
        adapters = set(getattr(base, "peft_config", {}) or {})
        self.student_adapter = STUDENT_ADAPTER if student_copy is None else None
        self.critic_adapter = CRITIC_ADAPTER if critic_copy is None else None
        for name in (self.student_adapter, self.critic_adapter):
            if name is not None and name not in adapters:
                raise RoleError(
                    f"the base model has no '{name}' adapter (found {sorted(adapters) or 'none'})"
                )
        self._active: str | None = None
        self._base_velocity = transformer_velocity(base)
        self._student_velocity = transformer_velocity(student_copy) if student_copy is not None else None
        self._critic_velocity = transformer_velocity(critic_copy) if critic_copy is not None else None
        self._trainable = self.student_parameters() + self.critic_parameters()
        for p in self._trainable:  # peft marks only the most recently added adapter trainable
            p.requires_grad_(True)
        self.check()

    # ---- the roles as functions -----------------------------------------------------------------------------

    def student(self, x_BCTHW: torch.Tensor, frame_timesteps_BT: torch.Tensor, c_BLD: torch.Tensor):
        if self._student_velocity is not None:
            return self._student_velocity(x_BCTHW, frame_timesteps_BT, c_BLD)
        self._activate(STUDENT_ADAPTER)
        return self._base_velocity(x_BCTHW, frame_timesteps_BT, c_BLD)

    def real(self, x_BCTHW: torch.Tensor, frame_timesteps_BT: torch.Tensor, c_BLD: torch.Tensor):
        self._activate(_REAL)
        return self._base_velocity(x_BCTHW, frame_timesteps_BT, c_BLD)

    def fake(self, x_BCTHW: torch.Tensor, frame_timesteps_BT: torch.Tensor, c_BLD: torch.Tensor):
        if self._critic_velocity is not None:
            return self._critic_velocity(x_BCTHW, frame_timesteps_BT, c_BLD)
        self._activate(CRITIC_ADAPTER)
        return self._base_velocity(x_BCTHW, frame_timesteps_BT, c_BLD)

    # ---- weights ------------------------------------------------------------------------------------------------

    @property
    def student_transformer(self) -> WanTransformer3DModel:
        """The module holding the student's weights (the base with its "student" adapter, or the full copy)."""
        return self.base if self.student_copy is None else self.student_copy

    @property
    def critic_transformer(self) -> WanTransformer3DModel:
        """The module the critic runs through (the base with its "critic" adapter, or the full copy)."""
        return self.base if self.critic_copy is None else self.critic_copy

    def student_parameters(self) -> list[torch.nn.Parameter]:
        if self.student_copy is not None:
            return list(self.student_copy.parameters())
        return _adapter_parameters(self.base, STUDENT_ADAPTER)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        if self.critic_copy is not None:
            return list(self.critic_copy.parameters())
        return _adapter_parameters(self.base, CRITIC_ADAPTER)

    def activate_student(self) -> None:
        """Leave the base in the student's state (e.g. before saving or sampling with the base module)."""
        if self.student_adapter is not None:
            self._active = None  # someone else may have switched adapters since
            self._activate(STUDENT_ADAPTER)

    def _activate(self, role: str) -> None:
        if role == self._active:
            return
        if role == _REAL:
            if getattr(self.base, "peft_config", None):
                self.base.disable_adapters()
        else:
            self.base.enable_adapters()
            self.base.set_adapter(role)
        for p in self._trainable:
            p.requires_grad_(True)
        self._active = role

    # ---- start-up checks ----------------------------------------------------------------------------------------

    def check(self) -> None:
        """Teacher frozen, student and critic trainable and disjoint, all three of the same architecture."""
        trainable_ids = {id(p) for p in self._trainable}
        teacher_trainable = [
            n for n, p in self.base.named_parameters() if p.requires_grad and id(p) not in trainable_ids
        ]
        if teacher_trainable:
            raise RoleError(f"the teacher's weights must be frozen; trainable: {teacher_trainable[:3]} ...")
        for what, params in (("student", self.student_parameters()), ("critic", self.critic_parameters())):
            if not params:
                raise RoleError(f"the {what} has no weights")
            if not all(p.requires_grad for p in params):
                raise RoleError(f"the {what}'s weights must all be trainable")
        if {id(p) for p in self.student_parameters()} & {id(p) for p in self.critic_parameters()}:
            raise RoleError("the student and the critic share weights")
        base_shapes = _weight_shapes(self.base)
        for what, copy_ in (("student", self.student_copy), ("critic", self.critic_copy)):
            if copy_ is not None and _weight_shapes(copy_) != base_shapes:
                diff = sorted(set(base_shapes.items()) ^ set(_weight_shapes(copy_).items()))
                raise RoleError(f"the {what} copy's weights differ in shape from the teacher's: {diff[:3]}")


def _weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the architecture's own weights (LoRA factors left out, peft's wrapping undone)."""
    return {
        n.replace(".base_layer", ""): tuple(p.shape) for n, p in model.named_parameters() if "lora_" not in n
    }


def _adapter_parameters(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if f".{adapter}." in n]


def make_roles(
    base: WanTransformer3DModel,
    train: TrainConfig,
    quantize_base: Callable[[WanTransformer3DModel], WanTransformer3DModel] | None = None,
    shard: Callable[[WanTransformer3DModel], None] | None = None,
) -> Roles:
    """Wire the roles on a loaded teacher (frozen here), per `train.model_type` and the critic keys.

    `quantize_base` (an int8-quanto base) runs after the full copies are taken, so a full student or a full-copy
    critic trains float weights while the teacher and the adapters' base are int8. `shard` (train.fsdp) shards
    each full copy as soon as it is taken, so at most the teacher and one whole copy are in memory at once; the
    base, frozen and shared by the adapters, stays whole."""
    dc = train.distillation_config
    full_student = train.student.model_type == "full"
    lora_critic = dc.fake_score_lora_rank is not None
    base.eval().requires_grad_(False)
    student_copy = critic_copy = None
    if full_student:
        student_copy = copy.deepcopy(base).train().requires_grad_(True)
        if shard is not None:
            shard(student_copy)
    if not lora_critic:
        critic_copy = copy.deepcopy(base).train().requires_grad_(True)
        if shard is not None:
            shard(critic_copy)
    if quantize_base is not None:
        base = quantize_base(base).eval().requires_grad_(False)  # quanto's new weights come back trainable
    with warnings.catch_warnings():
        # a second adapter on one model is the point here, not an accident
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if not full_student:
            add_lora(base, train.student.lora_rank, train.student.lora_alpha, STUDENT_ADAPTER)
        if lora_critic:
            alpha = (
                dc.fake_score_lora_alpha if dc.fake_score_lora_alpha is not None else dc.fake_score_lora_rank
            )
            add_lora(base, dc.fake_score_lora_rank, alpha, CRITIC_ADAPTER)
    roles = Roles(base, student_copy, critic_copy)
    log.info(
        "roles: student=%s (%d params), critic=%s (%d params), real score = base with adapters off",
        "full copy" if full_student else f"LoRA r{train.student.lora_rank}",
        sum(p.numel() for p in roles.student_parameters()),
        "full copy" if not lora_critic else f"LoRA r{dc.fake_score_lora_rank}",
        sum(p.numel() for p in roles.critic_parameters()),
    )
    return roles


def build_roles(
    params: Params,
    device: str | torch.device = "cpu",
    shard: Callable[[WanTransformer3DModel], None] | None = None,
) -> Roles:
    """Load the teacher (at `model.base_model_precision`) and wire the three roles on it (`shard`: make_roles).

    An int8-quanto base computes in the run's mixed precision (quanto's int8 kernels take activations of their
    scales' dtype), and is quantized only after the full copies, if any, are taken from its float weights."""
    model = params.model
    if model.base_model_precision != "int8-quanto":
        return make_roles(load_transformer(model, device), params.train, shard=shard)
    base = load_transformer(
        model,
        device,
        int8_float_dtype=MIXED_PRECISION_DTYPES[params.train.run.mixed_precision],
        quantize=False,
    )
    return make_roles(
        base, params.train, quantize_base=lambda m: place_int8(m, model.quantize_via, device), shard=shard
    )
