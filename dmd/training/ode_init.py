"""The ODE initialisation stage (`dmd ode-init`): before DMD, the student regresses the teacher's own sampling
trajectories, so that DMD starts from a few-step model that already samples (CausVid, Self-Forcing). It matters
most for a block-causal student (`train.causal`), which starts from a bidirectional teacher that has never seen a
clip whose earlier frames are cleaner than its later ones.

One step, per sample: each time block draws one of the student's steps k (a bidirectional student: one k for the
whole clip); its input is the teacher's trajectory at σ_k (`generate.save_trajectory`), so the clip holds every
block at its own noise level, as the teacher ran it; a block-causal student sees its own block and the earlier ones
(teacher forcing on the trajectory). The loss is the mean squared error of the student's x̂0 against the teacher's
clean latents, the end of the same trajectory.

`ode_init.output_dir` gets the student's weights as training loads them (`pytorch_lora_weights.safetensors` or
`transformer/`) and `ode_init.json`, the whole folder replaced at once. With `ode_init.enabled: false` the folder
holds only the card, saying so: the train stage depends on this stage's output either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from dmd.core.config import Params
from dmd.core.flow_matching import sigma_to_timestep, x0_from_velocity
from dmd.core.io import atomic_dir, sha256_file, write_json
from dmd.core.progress import Progress
from dmd.data.cache.loader import Batch, CacheLoader, open_cache
from dmd.distill.roles import STUDENT_ADAPTER
from dmd.distill.rollout import RolloutSchedule, transformer_velocity
from dmd.training.optim import build_optimizer
from dmd.training.sharding import copy_full_into
from dmd.wan.causal import block_causal
from dmd.wan.device import pick_device
from dmd.wan.formats import LORA_WEIGHTS, load_lora_weights, save_lora_weights
from dmd.wan.loading import add_lora, load_transformer, load_transformer_folder

log = logging.getLogger(__name__)

CARD = "ode_init.json"
FULL_STUDENT = "transformer"


class OdeInitError(ValueError):
    """The cache or the settings cannot give an ODE initialisation; the message says which key to change."""


def draw_trajectory_points(
    trajectory_BKCTHW: torch.Tensor, block_ranges: list[tuple[int, int]], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, step index per block (B, n_blocks)): block b of sample i is the trajectory's point k[i, b]."""
    b, k = trajectory_BKCTHW.shape[:2]
    steps_BN = torch.randint(0, k, (b, len(block_ranges)), generator=generator)
    blocks = [
        trajectory_BKCTHW[torch.arange(b), steps_BN[:, n], :, start:end]
        for n, (start, end) in enumerate(block_ranges)
    ]
    return torch.cat(blocks, dim=2), steps_BN


def ode_regression_loss(
    model, causal, batch: Batch, sigmas_K: torch.Tensor, block_ranges, generator: torch.Generator
) -> torch.Tensor:
    """MSE of the student's x̂0 against the clean latents, from trajectory points drawn per block (module doc)."""
    inputs, steps_BN = draw_trajectory_points(batch.trajectory_BKCTHW, block_ranges, generator)
    frames_per_block = torch.tensor([end - start for start, end in block_ranges])
    # the draws and the σ table on the CPU (where the generator draws), then the σs to the batch's device
    frame_sigmas_BT = sigmas_K.cpu()[steps_BN].repeat_interleave(frames_per_block, dim=1).to(inputs.device)
    if causal is None:
        velocity = model(inputs, sigma_to_timestep(frame_sigmas_BT), batch.prompt_embeds_BLD)
    else:
        with causal.full(block_ranges):
            velocity = model(inputs, sigma_to_timestep(frame_sigmas_BT), batch.prompt_embeds_BLD)
    x0 = x0_from_velocity(inputs, velocity, frame_sigmas_BT[:, None, :, None, None])
    return torch.nn.functional.mse_loss(x0, batch.latents_BCTHW)


def ode_init(params: Params, *, progress: bool = True) -> Path:
    """Run the stage per `params.ode_init`; returns its output folder."""
    cfg, out = params.ode_init, Path(params.ode_init.output_dir)
    if not cfg.enabled:
        with atomic_dir(out) as tmp:
            write_json(tmp / CARD, {"enabled": False})
        log.info("ode_init.enabled is false: DMD starts from the teacher's weights")
        return out
    schedule = RolloutSchedule.from_params(params)
    loader = CacheLoader(open_cache(params.cache.output_dir), cfg.train_batch_size, cfg.seed)
    device = pick_device()
    student = _student(params, device)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = build_optimizer(parameters, params.train.optim.optimizer, cfg.learning_rate)
    model = transformer_velocity(student)
    generator = torch.Generator().manual_seed(cfg.seed)
    data = iter(loader)
    losses = []
    with (
        block_causal(student) if schedule.causal else contextlib.nullcontext() as causal,
        Progress(cfg.max_train_steps, "ode init", log, enabled=progress) as bar,
    ):
        for _ in range(cfg.max_train_steps):
            batch = _with_trajectory(next(data), schedule, params).to(device)
            frames = batch.latents_BCTHW.shape[2]
            ranges = schedule.block_ranges(frames) if schedule.causal else [(0, frames)]
            loss = ode_regression_loss(model, causal, batch, batch.trajectory_sigmas_K, ranges, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, params.train.optim.max_grad_norm or float("inf"))
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update(loss=losses[-1])
    with atomic_dir(out) as tmp:
        if params.train.student.model_type == "lora":
            weights = save_lora_weights(tmp, student, STUDENT_ADAPTER)
        else:
            student.save_pretrained(tmp / FULL_STUDENT, safe_serialization=True)
            weights = next((tmp / FULL_STUDENT).glob("*.safetensors"))
        write_json(tmp / CARD, _card(params, schedule, losses, sha256_file(weights)))
    log.info(
        "ODE initialisation: %d steps, loss %.4f → %.4f; the student is in %s",
        len(losses),
        losses[0],
        losses[-1],
        out,
    )
    return out


def load_initial_student(params: Params, student_transformer) -> str | None:
    """Put the ODE-initialised weights into the student (the base's student adapter, or the full copy) when
    `ode_init.enabled`; returns what was loaded, for the run's identity, or None."""
    if not params.ode_init.enabled:
        return None
    out = Path(params.ode_init.output_dir)
    card = json.loads((out / CARD).read_text()) if (out / CARD).is_file() else {}
    if not card.get("enabled"):
        raise OdeInitError(
            f"ode_init.enabled is true but {out} holds no ODE-initialised student; run `dmd ode-init` (or "
            "`dvc repro ode_init`) first"
        )
    wanted = _student_form(params)
    if card["student"] != wanted:
        raise OdeInitError(
            f"{out / CARD}: the ODE-initialised student is {card['student']}, train wants {wanted}; rerun "
            "`dmd ode-init` with the current settings"
        )
    if params.train.student.model_type == "lora":
        load_lora_weights(student_transformer, out / LORA_WEIGHTS, STUDENT_ADAPTER)
    else:
        trained = load_transformer_folder(out, params.model.base_model_precision).state_dict()
        for name, tensor in student_transformer.state_dict().items():
            copy_full_into(tensor, trained[name])  # into its shard when the student is sharded (train.fsdp)
    log.info("the student starts from the ODE initialisation in %s (%d steps)", out, card["steps"])
    return card["weights_sha256"]


def _student(params: Params, device: torch.device):
    if params.model.base_model_precision == "int8-quanto":
        raise OdeInitError(
            "ode_init on an int8-quanto base is not supported: set model.base_model_precision to a float "
            "precision for the ode_init stage, or ode_init.enabled: false"
        )
    transformer = load_transformer(params.model, device)
    if params.train.student.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if params.train.student.model_type == "lora":
        transformer.requires_grad_(False)
        add_lora(
            transformer, params.train.student.lora_rank, params.train.student.lora_alpha, STUDENT_ADAPTER
        )
        return transformer.train()
    return transformer.train().requires_grad_(True)


def _with_trajectory(batch: Batch, schedule: RolloutSchedule, params: Params) -> Batch:
    if batch.trajectory_BKCTHW is None:
        raise OdeInitError(
            f"the cache {params.cache.output_dir} holds no teacher trajectories: set generate.save_trajectory: "
            "true, then `dmd generate` (it adds them to the shards already made) and `dmd cache`"
        )
    got = [round(float(s), 6) for s in batch.trajectory_sigmas_K]
    want = [round(float(s), 6) for s in schedule.sigmas]
    if got != want:
        raise OdeInitError(
            f"the cached trajectories are at σ {got}, the student's steps (train.distillation_config."
            f"dmd_denoising_steps / warp_denoising_steps) are at σ {want}: regenerate and re-cache"
        )
    return batch


def _student_form(params: Params) -> dict:
    """What must agree between the ODE-initialised student and the one DMD trains."""
    train = params.train
    form = {"model_type": train.student.model_type, "causal": train.student.causal}
    if train.student.model_type == "lora":
        form.update(lora_rank=train.student.lora_rank, lora_alpha=train.student.lora_alpha)
    return form


def _card(params: Params, schedule: RolloutSchedule, losses: list[float], weights_sha256: str) -> dict:
    return {
        "enabled": True,
        "student": _student_form(params),
        "teacher": params.model.pretrained_model_name_or_path,
        "sigmas": list(schedule.sigmas),
        "num_frame_per_block": schedule.num_frame_per_block,
        "independent_first_frame": schedule.independent_first_frame,
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "weights_sha256": weights_sha256,
    }
