"""Optimisation: AdamW (plain, or with fp32 master weights for bf16 parameters), lr schedules, clipping, the
one-update unit `TrainableGroup` (accumulate micro-batches → average across processes → check → clip → step), and
the student's and the critic's groups as the settings define them (`build_groups`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import get_scheduler

from dmd.core.config import Params, TrainConfig
from dmd.training.sharding import copy_full_into, is_sharded, shard_optimizer_state, sharded_grad_norm

# train.lr_scheduler values → transformers' scheduler names (they share the names; listed so a new value fails here)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_min_lr")

# One all-reduce carries at most this many gradient elements, so the flat buffer stays small next to the model.
REDUCE_BUCKET_ELEMENTS = 1 << 25


class AdamWMasterWeights(torch.optim.Optimizer):
    """AdamW whose update runs on an fp32 master copy of every non-fp32 parameter.

    Plain AdamW on bf16 weights loses every update smaller than half a bf16 ulp (≈0.4% of the weight), so a
    small learning rate stops training. Here the optimizer state holds `master` (fp32) next to `exp_avg` and
    `exp_avg_sq` (fp32); each step updates the master exactly as `torch.optim.AdamW` would update an fp32
    parameter and writes it back rounded to the parameter's dtype. fp32 parameters are updated in place.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float().clone()
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                weights = state.get("master", p)
                grad = p.grad.float()
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # the order of operations of torch.optim.AdamW's single-tensor path, so fp32 results are identical
                weights.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                bias_correction1 = 1 - beta1**step
                bias_correction2_sqrt = math.sqrt(1 - beta2**step)
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                weights.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
                if weights is not p:
                    p.copy_(weights)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts floating state to the parameter's dtype on load; the master and moments must stay fp32
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for index, saved in state_dict["state"].items():
            state = self.state[params[index]]
            for key in ("master", "exp_avg", "exp_avg_sq"):
                if key in saved:
                    state[key] = saved[key].to(device=params[index].device, dtype=torch.float32).clone()


def build_optimizer(
    params: Sequence[torch.Tensor],
    kind: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.optim.Optimizer:
    """`adamw`: torch's AdamW; `adamw_bf16`: AdamW with fp32 master weights for low-precision parameters."""
    params = list(params)
    if not params:
        raise ValueError("the optimizer got no trainable parameters; check train.model_type and the roles")
    if kind == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False
        )
    if kind == "adamw_bf16":
        return AdamWMasterWeights(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer={kind!r}: use 'adamw' or 'adamw_bf16'")


def build_critic_optimizer(params: Params, parameters: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    """The critic's own optimizer: `train.optimizer` from the distillation_config.fake_score_* keys."""
    dc = params.train.distillation_config
    return build_optimizer(
        parameters, params.train.optim.optimizer, dc.fake_score_lr, tuple(dc.fake_score_betas), dc.fake_score_eps,
        dc.fake_score_weight_decay,
    )  # fmt: skip


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """transformers' schedule named by `train.lr_scheduler`, over `num_training_steps` optimizer steps.

    `constant` ignores the warm-up (as in transformers and diffusers); `constant_with_warmup`, `linear`, `cosine`
    and `cosine_with_min_lr` ramp linearly over `lr_warmup_steps`; `cosine_with_min_lr` then decays along a half
    cosine to `lr_min_ratio`·lr at the last step.
    """
    if cfg.optim.lr_scheduler not in LR_SCHEDULERS:
        raise ValueError(
            f"train.lr_scheduler={cfg.optim.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}"
        )
    if cfg.optim.lr_scheduler != "constant" and cfg.optim.lr_warmup_steps >= max(num_training_steps, 1) > 1:
        raise ValueError(
            f"train.lr_warmup_steps={cfg.optim.lr_warmup_steps} is not below the run's {num_training_steps} steps; "
            "lower it or train longer"
        )
    extra = (
        {"min_lr_rate": cfg.optim.lr_min_ratio} if cfg.optim.lr_scheduler == "cosine_with_min_lr" else None
    )
    return get_scheduler(
        cfg.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.lr_warmup_steps,
        num_training_steps=max(num_training_steps, 1),
        scheduler_specific_kwargs=extra,
    )


def grad_norm(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (0 when there are none); non-finite when any gradient is. Sharded
    gradients (train.fsdp) count with all their shards, so every process gets the same norm."""
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    sharded = [p.grad for p in params if is_sharded(p.grad)]
    norm = torch.tensor(0.0)
    if grads:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    if sharded:
        norm = torch.linalg.vector_norm(torch.stack([norm.cpu(), sharded_grad_norm(sharded)]))
    return norm


def clip_gradients(
    params: Sequence[torch.Tensor], method: str, limit: float, norm: torch.Tensor | None = None
) -> None:
    """`norm`: rescale all gradients so their global L2 norm (`norm`, measured before) is at most `limit`;
    `value`: clamp each element to [−limit, limit]. `limit` 0 disables clipping."""
    if limit <= 0:
        return
    if method == "norm" and any(is_sharded(p.grad) for p in params):
        # torch's clip_grad_norm_ cannot mix sharded and whole gradients; the same rescaling, on the global norm
        scale = torch.clamp(limit / (norm + 1e-6), max=1.0).item()
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    elif method == "norm":
        torch.nn.utils.clip_grad_norm_(params, limit, foreach=False)
    elif method == "value":
        torch.nn.utils.clip_grad_value_(params, limit, foreach=False)
    else:
        raise ValueError(f"grad_clip_method={method!r}: use 'norm' or 'value'")


@dataclass
class UpdateResult:
    """What one update did: the mean loss over micro-batches (and processes), the gradient norm before clipping,
    whether the step was taken (False: non-finite loss or gradient, nothing changed), and the method's metrics."""

    loss: float
    grad_norm: float
    finite: bool
    metrics: dict[str, float] = field(default_factory=dict)


class TrainableGroup:
    """Parameters with their optimizer, lr schedule and clipping: one call to `update` is one optimizer step.

    `update(loss_fn, batches)` sums the gradients of `loss_fn(batch)/len(batches)` over the micro-batches (so
    accumulating n micro-batches of size b equals one batch of n·b for a per-sample-mean loss), averages
    gradients and loss across processes with one all-reduce per bucket (DDP's arithmetic; the models are not
    wrapped in DDP because student, real score and critic share one base module; sharded gradients come averaged
    from FSDP), then skips the step when anything is non-finite, else clips and steps. Every process takes the
    same decision because it sees the same sums.

    `before_backward` restores the module state the loss's graph was built in: with gradient checkpointing the
    backward pass re-runs the forward, and by then the loss function may have switched LoRA adapters.
    """

    def __init__(
        self,
        name: str,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        clip_method: str,
        clip_limit: float,
        accelerator=None,
        before_backward: Callable[[], None] | None = None,
    ):
        self.name = name
        self.before_backward = before_backward
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_method = clip_method
        self.clip_limit = clip_limit
        self.accelerator = accelerator

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def set_base_lr(self, lr: float) -> None:
        """A new peak learning rate for a resumed run: the schedule goes on from its step, scaled to `lr`
        (transformers' schedules are base_lr × a factor of the step). Nothing changes when `lr` is the old one."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            if base != lr:
                group["lr"] = group["lr"] / base * lr
                group["initial_lr"] = lr
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]

    def state_dict(self) -> dict:
        return {
            "weights": {f"{i:05d}": p for i, p in enumerate(self.params)},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state["weights"]
        if len(saved) != len(self.params) or any(
            saved[f"{i:05d}"].shape != p.shape for i, p in enumerate(self.params)
        ):
            raise ValueError(
                f"the {self.name} weights there do not match this model (other model_type or rank?)"
            )
        for i, p in enumerate(self.params):
            copy_full_into(p, saved[f"{i:05d}"])
        self.optimizer.load_state_dict(state["optimizer"])
        shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])

    def update(self, loss_fn: Callable, batches: Sequence) -> UpdateResult:
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = torch.zeros((), dtype=torch.float32)
        metrics: dict[str, float] = {}
        for batch in batches:
            with self._autocast():
                loss, batch_metrics = loss_fn(batch)
            scaled = loss / len(batches)
            if self.before_backward is not None:
                self.before_backward()
            if self.accelerator is not None:
                self.accelerator.backward(scaled)
            else:
                scaled.backward()
            total_loss += scaled.detach().float().cpu()
            for k, v in batch_metrics.items():
                metrics[k] = metrics.get(k, 0.0) + float(v) / len(batches)
        scaler = None if self.accelerator is None else self.accelerator.scaler
        if scaler is not None:
            self.accelerator.unscale_gradients(optimizer=self.optimizer)
        total_loss = self._all_reduce_mean(total_loss)
        norm = grad_norm(self.params)
        loss_ok, grads_ok = bool(torch.isfinite(total_loss)), bool(torch.isfinite(norm))
        if loss_ok and grads_ok:
            clip_gradients(self.params, self.clip_method, self.clip_limit, norm)
            self.optimizer.step()
            self.scheduler.step()
        elif loss_ok and scaler is not None:
            self.optimizer.step()  # fp16: GradScaler skips this update and lowers its scale; not a failure
        self.optimizer.zero_grad(set_to_none=True)
        finite = loss_ok and (grads_ok or scaler is not None)
        return UpdateResult(float(total_loss), float(norm), finite, metrics)

    def _autocast(self):
        if self.accelerator is None:
            return torch.autocast("cpu", enabled=False)
        return self.accelerator.autocast()

    def _all_reduce_mean(self, loss: torch.Tensor) -> torch.Tensor:
        """Average gradients (and the loss) across processes; a no-op for one process. Sharded gradients are
        averaged by FSDP's reduce-scatter already."""
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return loss
        grads = [p.grad for p in self.params if p.grad is not None and not is_sharded(p.grad)]
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for g in grads:
            if size + g.numel() > REDUCE_BUCKET_ELEMENTS and buckets[-1]:
                buckets.append([])
                size = 0
            buckets[-1].append(g)
            size += g.numel()
        for i, bucket in enumerate(buckets):
            flat = (
                torch.cat([g.reshape(-1).float() for g in bucket])
                if bucket
                else torch.zeros(0, device=acc.device)
            )
            if i == 0:  # the loss rides along, so every process sees the same mean loss and the same decision
                flat = torch.cat([flat, loss.to(flat.device).reshape(1)])
            flat = acc.reduce(flat, reduction="mean")
            if i == 0:
                loss, flat = flat[-1].cpu(), flat[:-1]
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return loss


def build_groups(
    params: Params, method, total_steps: int, accelerator=None
) -> tuple[TrainableGroup, TrainableGroup]:
    """The student's and the critic's parameters with their optimizer, schedule and clipping. The student steps
    once per `generator_update_interval` steps, so its schedule spans that many fewer steps."""
    cfg, dc = params.train, params.train.distillation_config
    student_opt = build_optimizer(method.student_parameters(), cfg.optim.optimizer, cfg.optim.learning_rate)
    critic_opt = build_critic_optimizer(params, method.critic_parameters())
    if accelerator is not None and accelerator.scaler is not None:  # fp16: the gradient scaler wraps them
        student_opt, critic_opt = accelerator.prepare(student_opt, critic_opt)
    student_steps = -(-total_steps // dc.generator_update_interval)
    student = TrainableGroup(
        "student", method.student_parameters(), student_opt, build_lr_scheduler(student_opt, cfg, student_steps),
        cfg.optim.grad_clip_method, cfg.optim.max_grad_norm, accelerator,
        before_backward=method.roles.activate_student,  # the scores ran last; the recomputed forward is the student's
    )  # fmt: skip
    critic = TrainableGroup(
        "critic", method.critic_parameters(), critic_opt, build_lr_scheduler(critic_opt, cfg, total_steps),
        "norm", dc.fake_score_grad_clip, accelerator,
    )  # fmt: skip
    return student, critic
