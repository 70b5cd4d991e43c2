"""The DMD training run: `train(params) -> exported student dir`.

`train` reads top to bottom in the order of the algorithm; the parts it calls live in optim / ema / checkpoint /
tracking / webhooks / hub / validation / export. One step = one student update (when
`updates_generator(step)`), then one critic update, each over `gradient_accumulation_steps` micro-batches of
`train_batch_size` per process.

Randomness: every draw of step s on process r comes from a CPU `torch.Generator` seeded from (train.seed, s, r),
so a resumed run draws exactly what the uninterrupted run drew; the data position, optimizers, schedulers, EMA
and global RNG states come from the checkpoint. On CPU a resumed run is bit-identical.

Length: `max_train_steps` when set; otherwise `num_train_epochs` × (batches per epoch per process ÷
gradient_accumulation_steps). With both set, `ignore_final_epochs: true` lets max_train_steps decide and `false`
ends at whichever comes first.

Processes: run under torchrun (dmd/training/launch.py; the train flow does that for `train.num_processes > 1`, or
`accelerate launch` across machines), every process
holds all weights, gradients are averaged across processes before each update, and only the main process
validates, writes checkpoints, tracks and exports.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dmd.core.config import Params, TrainConfig, dump
from dmd.core.progress import Progress
from dmd.training.optim import TrainableGroup, UpdateResult, build_lr_scheduler, build_optimizer

log = logging.getLogger("dmd.training.loop")  # the same name under `python -m dmd.training.loop`

# Keys that may change between a checkpoint and its resumption (length, logging, outputs); any other train/model
# key that differs means the checkpoint belongs to another run.
RESUMABLE_CHANGES = {
    "max_train_steps", "num_train_epochs", "ignore_final_epochs", "output_dir", "checkpoint_dir",
    "checkpoint_step_interval", "checkpoints_total_limit", "resume_from_checkpoint", "report_to", "metrics_dir",
    "tracker_project_name", "tracker_run_name", "webhook_config", "push_to_hub", "push_checkpoints_to_hub",
    "hub_model_id", "disable_benchmark", "max_consecutive_nonfinite",
    # the step sizes and clipping that a non-finite streak asks to lower before resuming its intact checkpoint
    "learning_rate", "max_grad_norm",
}  # fmt: skip
RESUMABLE_DISTILLATION_CHANGES = {"fake_score_lr", "fake_score_grad_clip"}


# Learning-rate schedules whose value at a step does not depend on the run's length: only under these does a
# checkpoint of a run planned for another number of steps lie on this run's own trajectory.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup")


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class RunState:
    step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    total_steps: int | None = None  # the length the run was planned for (None: a checkpoint that predates it)


def train(params: Params, *, progress: bool = True) -> Path:
    """Train the student with DMD per `params.train`; returns the exported student directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from dmd.data.cache import CacheLoader, open_cache
    from dmd.distill.method import DMDMethod
    from dmd.distill.roles import build_roles
    from dmd.student.export import export_student
    from dmd.training.checkpoint import CheckpointManager
    from dmd.training.ema import EMA
    from dmd.training.hub import HubPusher
    from dmd.training.tracking import Tracker
    from dmd.training.webhooks import Notifier

    cfg = params.train
    if not torch.distributed.is_initialized():
        # accelerate keeps the first Accelerator's precision for the whole process; a process that trains twice
        # (a Prefect worker, a notebook) with another `mixed_precision` would be refused without this reset
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_seed(cfg.seed)  # the same LoRA initialisation on every process
    cache = open_cache(params.cache.output_dir)
    roles = build_roles(params, acc.device)
    if cfg.gradient_checkpointing:
        for module in {
            id(m): m for m in (roles.base, roles.student_copy, roles.critic_copy) if m is not None
        }.values():
            module.enable_gradient_checkpointing()
    method = DMDMethod(params, roles, cache.negative_prompt_embeds, cache.empty_prompt_embeds)
    loader = CacheLoader(
        cache, cfg.train_batch_size, cfg.seed, rank=acc.process_index, world_size=acc.num_processes
    )
    total_steps = planned_steps(cfg, loader.batches_per_epoch)
    student, critic = build_groups(params, method, total_steps, acc)
    ema = EMA(student.params, cfg.ema_decay, cfg.ema_update_interval) if cfg.use_ema else None
    checkpoints = CheckpointManager(cfg.checkpoint_dir, cfg.checkpoints_total_limit)
    held = checkpoints.hold() if main else None  # one run per checkpoint folder; released when this run ends
    state = resume(params, checkpoints, student, critic, ema, loader, acc.num_processes, main, total_steps)
    notify = Notifier(cfg.webhook_config, enabled=main)
    tracker = Tracker(cfg, params.model_dump(mode="json"), start_step=state.step, enabled=main,
                      wandb_run_id=state.wandb_run_id)  # fmt: skip
    state.wandb_run_id = tracker.wandb_run_id
    hub = HubPusher(cfg, enabled=main)
    validate = Validation(params, acc, roles, ema, tracker, notify) if main and has_validation(cfg) else None
    data = iter(loader)
    bar = Progress(total_steps, "train", log, initial=state.step, enabled=main and progress)
    notify(
        "start", f"training {state.step}/{total_steps} steps on {acc.num_processes} process(es)", state.step
    )
    try:
        if validate and state.step == 0 and not cfg.disable_benchmark:
            validate(0)
        for step in range(state.step, total_steps):
            started = time.perf_counter()
            batches = [next(data) for _ in range(cfg.gradient_accumulation_steps)]
            generator = step_generator(cfg.seed, step, acc.process_index)
            updates: dict[str, UpdateResult] = {}
            if method.updates_generator(step):
                updates["student"] = student.update(
                    partial(method.generator_loss, generator=generator), batches
                )
                if ema is not None and updates["student"].finite:
                    ema.step()
            updates["critic"] = critic.update(partial(method.critic_loss, generator=generator), batches)
            check_finite(state, updates, step, cfg, checkpoints, main)
            state.step = step + 1
            scalars = step_scalars(updates, student, critic, state, time.perf_counter() - started)
            tracker.log(scalars, state.step)
            bar.update(1, **{k: scalars[k] for k in ("dmd_loss", "fake_score_loss") if k in scalars})
            if state.step % cfg.checkpoint_step_interval == 0 or state.step == total_steps:
                save_checkpoint(checkpoints, state, student, critic, ema, loader, params, acc, notify, hub)
            if validate and state.step % cfg.validation_step_interval == 0:
                validate(state.step)
            acc.wait_for_everyone()
        student_dir = Path(cfg.output_dir)
        if main:
            roles.activate_student()
            exports_ema = ema is not None and ema.num_updates > 0
            if ema is not None and not exports_ema:
                log.warning(
                    "train.ema_update_interval=%d is more than the run's %d student steps: the EMA never folded "
                    "the weights in, so the live weights are exported",
                    cfg.ema_update_interval,
                    ema.num_calls,
                )
            with ema.swapped_in() if exports_ema else contextlib.nullcontext():
                export_student(
                    roles.student_transformer, params, student_dir, ema=exports_ema, step=state.step
                )
            hub.push_student(student_dir)
        acc.wait_for_everyone()
        notify("finish", f"training finished at step {state.step}; student in {student_dir}", state.step,
               skipped_steps=state.skipped_steps)  # fmt: skip
        return student_dir
    except BaseException as e:
        notify("failure", f"training failed at step {state.step}: {e.__class__.__name__}: {e}", state.step)
        raise
    finally:
        bar.close()
        tracker.finish()
        acc.end_training()
        if held is not None:
            held.close()


# --------------------------------------------------------------------------------------------------------------
# The parts of the loop


def planned_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """The run's length in steps (see the module docstring)."""
    steps_per_epoch = batches_per_epoch // cfg.gradient_accumulation_steps
    if cfg.num_train_epochs and steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has {batches_per_epoch} batches per process, fewer than gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps}; lower it or use train.max_train_steps"
        )
    by_epochs = cfg.num_train_epochs * steps_per_epoch
    if cfg.max_train_steps and cfg.num_train_epochs:
        return cfg.max_train_steps if cfg.ignore_final_epochs else min(cfg.max_train_steps, by_epochs)
    return cfg.max_train_steps or by_epochs


def build_groups(params: Params, method, total_steps: int, acc) -> tuple[TrainableGroup, TrainableGroup]:
    """The student's and the critic's optimizer + schedule + clipping. The critic takes `DMDMethod.critic_optimizer`
    (fake_score_* keys) unless `optimizer: adamw_bf16` asks for master weights, built from the same keys."""
    cfg, dc = params.train, params.train.distillation_config
    student_opt = build_optimizer(method.student_parameters(), cfg.optimizer, cfg.learning_rate)
    if cfg.optimizer == "adamw":
        critic_opt = method.critic_optimizer()
    else:
        critic_opt = build_optimizer(
            method.critic_parameters(), cfg.optimizer, dc.fake_score_lr, tuple(dc.fake_score_betas),
            dc.fake_score_eps, dc.fake_score_weight_decay,
        )  # fmt: skip
    if acc.scaler is not None:  # fp16: accelerate's gradient scaler wraps the optimizers
        student_opt, critic_opt = acc.prepare(student_opt, critic_opt)
    student_steps = -(-total_steps // dc.generator_update_interval)
    student = TrainableGroup(
        "student", method.student_parameters(), student_opt, build_lr_scheduler(student_opt, cfg, student_steps),
        cfg.grad_clip_method, cfg.max_grad_norm, acc,
        before_backward=method.roles.activate_student,  # the scores ran last; the recomputed forward is the student's
    )  # fmt: skip
    critic = TrainableGroup(
        "critic", method.critic_parameters(), critic_opt, build_lr_scheduler(critic_opt, cfg, total_steps),
        "norm", dc.fake_score_grad_clip, acc,
    )  # fmt: skip
    return student, critic


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of all draws of one step on one process, a function of (seed, step, rank) only."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(mixed))


def check_finite(
    state: RunState,
    updates: dict[str, UpdateResult],
    step: int,
    cfg: TrainConfig,
    checkpoints,
    main: bool = True,
) -> None:
    """Count a step with a non-finite loss or gradient (its update was skipped); stop after too many in a row.

    No checkpoint is written during a streak (`save_checkpoint`). When the run stops, a checkpoint written right
    before the streak holds the update that led into it and is moved aside (`nonfinite-<time>/`): the checkpoint
    the message calls intact, and `latest` resumes, is from before that update."""
    bad = {name: u for name, u in updates.items() if not u.finite}
    if not bad:
        state.consecutive_nonfinite = 0
        return
    state.consecutive_nonfinite += 1
    state.skipped_steps += 1
    what = ", ".join(f"{n} loss={u.loss:.4g} grad_norm={u.grad_norm:.4g}" for n, u in bad.items())
    log.warning(
        "step %d: non-finite %s; update skipped (%d in a row)", step, what, state.consecutive_nonfinite
    )
    if state.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
        first_bad = step - state.consecutive_nonfinite + 1  # checkpoint N holds the updates of steps 0..N-1
        suspect = [p for p in checkpoints.checkpoints() if int(p.name.rsplit("-", 1)[1]) >= first_bad]
        aside = checkpoints.move_aside("nonfinite", suspect) if main else None
        latest = checkpoints.latest()
        moved = ""
        if aside is not None:
            names = ", ".join(p.name for p in suspect)
            moved = f" {names}, written after the update that led into it, was moved to {aside}."
        raise NonFiniteError(
            f"{state.consecutive_nonfinite} consecutive steps from step {first_bad} to {step} had a non-finite loss "
            f"or gradient ({what}).{moved} The last checkpoint, {latest or 'none'}, is intact. Lower "
            "train.learning_rate or distillation_config.fake_score_lr, set train.max_grad_norm, or check the cache "
            "for bad latents; then rerun (resume_from_checkpoint: latest continues from that checkpoint with the "
            "new learning rates and clipping)."
        )


def step_scalars(updates: dict[str, UpdateResult], student, critic, state: RunState, seconds: float) -> dict:
    scalars = {"fake_score_loss": updates["critic"].loss, "grad_norm_critic": updates["critic"].grad_norm,
               "lr_student": student.lr, "lr_critic": critic.lr, "step_time": seconds,
               "skipped_steps": float(state.skipped_steps)}  # fmt: skip
    critic_metrics = updates["critic"].metrics
    if "critic_sigma" in critic_metrics:
        scalars["critic_timestep"] = 1000 * critic_metrics["critic_sigma"]
    if "student" in updates:
        s = updates["student"]
        scalars.update(grad_norm_student=s.grad_norm, generator_loss=s.loss)
        scalars.update(
            {
                k: v
                for k, v in s.metrics.items()
                if k in ("dmd_loss", "regression_loss", "gen_cls_loss", "consistency_loss", "exit_step")
            }
        )
        if "score_sigma" in s.metrics:
            scalars["score_timestep"] = 1000 * s.metrics["score_sigma"]
    if "guidance_cls_loss" in critic_metrics:
        scalars["guidance_cls_loss"] = critic_metrics["guidance_cls_loss"]
    return scalars


def run_settings(params: Params, num_processes: int) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    train = fixed_train_settings(params.train.model_dump(mode="json"))
    return {"train": train, "model": params.model.model_dump(mode="json"), "cache": params.cache.output_dir,
            "num_processes": num_processes}  # fmt: skip


def fixed_train_settings(train: dict) -> dict:
    """`train` settings less those a resumed run may change (RESUMABLE_CHANGES, validation_*); applied to a
    checkpoint's recorded settings too, so checkpoints written before a key became resumable still resume."""
    fixed = {k: v for k, v in train.items() if k not in RESUMABLE_CHANGES and not k.startswith("validation_")}
    if isinstance(fixed.get("distillation_config"), dict):
        fixed["distillation_config"] = {
            k: v for k, v in fixed["distillation_config"].items() if k not in RESUMABLE_DISTILLATION_CHANGES
        }
    return fixed


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} → {b!r}"]


def resume(
    params, checkpoints, student, critic, ema, loader, num_processes: int, main: bool, total_steps: int
) -> RunState:
    """Load the checkpoint `resume_from_checkpoint` names into every part, or start fresh; log which and why.

    `latest` resumes only a checkpoint on this run's own trajectory: the same settings except RESUMABLE_CHANGES,
    the same samples in the cache (`dvc repro` after a new teacher or new data rebuilds the cache under the same
    path), and a step this run reaches. The length (max_train_steps / num_train_epochs) changes no step before
    the end when the learning-rate schedule is one of LENGTH_FREE_SCHEDULES: a longer run continues a shorter
    run's checkpoint, and a shorter run resumes the newest checkpoint at or before its own end, never one past
    it (that would hand back a longer-trained student under the shorter run's name). A schedule that spans the
    run's length resumes only a checkpoint planned for the same length. When nothing qualifies the checkpoints
    are moved aside into `superseded-<time>/`, so they neither get resumed nor rotate the new ones out.
    """
    from dmd.training.checkpoint import CheckpointError, restore_rng_state

    cfg = params.train
    if main:
        checkpoints.rotate()  # leftovers of a write that was killed
    path = checkpoints.resolve(cfg.resume_from_checkpoint)
    settings = run_settings(params, num_processes)
    if path is not None and cfg.resume_from_checkpoint == "latest":
        path = _latest_on_trajectory(checkpoints, settings, loader, cfg, total_steps)
    elif path is not None:
        summary = _checkpoint_summary(path)
        if summary["run"]["step"] > total_steps:
            raise CheckpointError(
                f"train.resume_from_checkpoint={cfg.resume_from_checkpoint!r}: {path} is at step "
                f"{summary['run']['step']}, past this run's {total_steps} steps; resuming it would hand back a "
                "longer-trained student. Resume an earlier checkpoint, train longer, or use 'latest'."
            )
        changed = _mismatches(summary, settings, loader, cfg, total_steps)
        if changed:
            log.warning("resuming %s although it differs: %s", path, "; ".join(changed))
    if path is None:
        aside = checkpoints.move_aside("superseded", checkpoints.checkpoints()) if main else None
        if aside is not None:
            log.warning("moved the checkpoints of an earlier run to %s", aside)
        log.info("training a new run of %d steps", total_steps)
        return RunState(total_steps=total_steps)
    groups, state = checkpoints.load(path)
    load_params(student.params, groups["student"], "student", path)
    load_params(critic.params, groups["critic"], "critic", path)
    student.optimizer.load_state_dict(state["optimizer_student"])
    critic.optimizer.load_state_dict(state["optimizer_critic"])
    student.scheduler.load_state_dict(state["scheduler_student"])
    critic.scheduler.load_state_dict(state["scheduler_critic"])
    student.set_base_lr(cfg.learning_rate)  # a resumable change (RESUMABLE_CHANGES)
    critic.set_base_lr(cfg.distillation_config.fake_score_lr)
    if ema is not None:
        if "ema" not in groups:
            raise ValueError(
                f"{path} has no EMA weights but train.use_ema is true; resume without EMA or start over"
            )
        ema.load_state_dict(groups["ema"])
    loader.load_state_dict(state["loader"])
    restore_rng_state(state["rng"])
    for scheduler, key, value in (
        (state["scheduler_student"], "train.learning_rate", cfg.learning_rate),
        (
            state["scheduler_critic"],
            "train.distillation_config.fake_score_lr",
            cfg.distillation_config.fake_score_lr,
        ),
    ):
        before = scheduler.get("base_lrs", [value])[0]
        if before != value:  # resumable (a non-finite streak asks for it), but the run then mixes the two
            log.warning(
                "%s: %s=%g from step %d on; the steps before it were taken at %g, so this run is not the one a "
                "fresh start at %g would make", path, key, value, state["run"]["step"], before, value,
            )  # fmt: skip
    planned = state["run"].get("total_steps")
    log.info(
        "resumed from %s at step %d of %d%s", path, state["run"]["step"], total_steps,
        f" (written by a run planned for {planned} steps; train.lr_scheduler={cfg.lr_scheduler} makes their steps "
        "the same)" if planned not in (None, total_steps) else "",
    )  # fmt: skip
    return RunState(**{**state["run"], "total_steps": total_steps})


def _checkpoint_summary(path: Path) -> dict:
    """The plain part of a checkpoint's state (run counters, settings, data position), without its tensors."""
    import json

    from dmd.training.checkpoint import STATE_FILE

    return json.loads((Path(path) / STATE_FILE).read_text())["state"]


def _mismatches(summary: dict, settings: dict, loader, cfg: TrainConfig, total_steps: int) -> list[str]:
    """Why the checkpoint `summary` is not on the trajectory of a run with `settings` and `total_steps`, apart
    from lying past its end; empty when it is."""
    saved = {**summary["settings"], "train": fixed_train_settings(summary["settings"]["train"])}
    changed = _differences(saved, settings)
    if summary["loader"]["fingerprint"] != loader.fingerprint:
        changed.append(f"the samples in {settings['cache']}, rebuilt since")
    planned = summary["run"].get("total_steps")
    if cfg.lr_scheduler not in LENGTH_FREE_SCHEDULES and planned != total_steps:
        changed.append(
            f"planned for {planned or 'an unrecorded number of'} steps, this run for {total_steps}: "
            f"train.lr_scheduler={cfg.lr_scheduler} spans the run's length, so every step differs"
        )
    return changed


def _latest_on_trajectory(
    checkpoints, settings: dict, loader, cfg: TrainConfig, total_steps: int
) -> Path | None:
    """The newest checkpoint this run can continue (see `resume`), or None after logging why there is none."""
    found = checkpoints.checkpoints()
    newest = found[-1]
    changed = _mismatches(_checkpoint_summary(newest), settings, loader, cfg, total_steps)
    if changed:
        log.warning("%s was written with other settings (%s); starting a new run", newest, "; ".join(changed))
        return None
    for path in reversed(found):
        summary = _checkpoint_summary(path)
        if summary["run"]["step"] <= total_steps and not _mismatches(
            summary, settings, loader, cfg, total_steps
        ):
            if path != newest:
                log.warning(
                    "%s is at step %d, past this run's %d steps; resuming the newest checkpoint at or before "
                    "the end instead: %s", newest, _checkpoint_summary(newest)["run"]["step"], total_steps, path,
                )  # fmt: skip
            return path
    log.warning(
        "%s is at step %d, past this run's %d steps (train.max_train_steps / num_train_epochs), and no earlier "
        "checkpoint is at or before step %d; starting a new %d-step run rather than handing back a longer-trained "
        "student", newest, _checkpoint_summary(newest)["run"]["step"], total_steps, total_steps, total_steps,
    )  # fmt: skip
    return None


def load_params(params: list[torch.Tensor], saved: dict[str, torch.Tensor], what: str, path: Path) -> None:
    if len(saved) != len(params) or any(saved[f"{i:05d}"].shape != p.shape for i, p in enumerate(params)):
        raise ValueError(
            f"{path}: the {what} weights there do not match this model (other model_type or rank?)"
        )
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(saved[f"{i:05d}"])


def weights_digest(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def verify_replicas(acc, student: TrainableGroup, critic: TrainableGroup) -> None:
    """Every process must hold the same student and critic weights; a clear error when they diverged."""
    if acc.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = gather_object([(weights_digest(student.params), weights_digest(critic.params))])
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"process replicas diverged: (student, critic) weight digests per process {digests}"
        )
    log.info("replicas identical on %d processes (student %s, critic %s)", acc.num_processes, *digests[0])


def save_checkpoint(checkpoints, state, student, critic, ema, loader, params, acc, notify, hub) -> None:
    """Main process writes; all processes hold the same weights (checked), so one copy is the run's state.

    Not during a non-finite streak, and not with non-finite weights: a checkpoint is a state to go back to.
    Every process takes the same decision (the same counters, identical replicas)."""
    from dmd.training.checkpoint import capture_rng_state

    if state.consecutive_nonfinite:
        log.warning("step %d: no checkpoint during a run of non-finite steps", state.step)
        return
    weights = [*student.params, *critic.params, *(ema.shadow if ema is not None else [])]
    if not all(bool(torch.isfinite(p).all()) for p in weights):
        log.warning("step %d: no checkpoint, the weights hold non-finite values", state.step)
        return
    verify_replicas(acc, student, critic)
    if not acc.is_main_process:
        return
    groups = {"student": {f"{i:05d}": p for i, p in enumerate(student.params)},
              "critic": {f"{i:05d}": p for i, p in enumerate(critic.params)}}  # fmt: skip
    if ema is not None:
        groups["ema"] = ema.state_dict()
    run = {"step": state.step, "consecutive_nonfinite": state.consecutive_nonfinite,
           "skipped_steps": state.skipped_steps, "wandb_run_id": state.wandb_run_id,
           "total_steps": state.total_steps}  # fmt: skip
    path = checkpoints.save(state.step, groups, {
        "run": run, "settings": run_settings(params, acc.num_processes), "loader": loader.state_dict(),
        "optimizer_student": student.optimizer.state_dict(), "optimizer_critic": critic.optimizer.state_dict(),
        "scheduler_student": student.scheduler.state_dict(), "scheduler_critic": critic.scheduler.state_dict(),
        "rng": capture_rng_state(),
    })  # fmt: skip
    notify("checkpoint", f"checkpoint {path.name} saved", state.step, path=str(path))
    hub.push_checkpoint(path)


def has_validation(cfg: TrainConfig) -> bool:
    return bool(cfg.validation_prompt or cfg.validation_prompt_library)


class Validation:
    """Runs the Validator on the student's module and reports to the tracker and the webhook."""

    def __init__(self, params, acc, roles, ema, tracker, notify):
        from dmd.training.validation import Validator

        self.validator = Validator(params, acc.device)
        self.roles, self.ema, self.tracker, self.notify = roles, ema, tracker, notify
        self.fps = params.generate.fps

    def __call__(self, step: int) -> None:
        self.roles.activate_student()
        result = self.validator.run(step, self.roles.student_transformer, self.ema)
        self.tracker.log_media({"validation/grid": result.grid}, result.videos, step, fps=self.fps)
        if result.scores:
            self.tracker.log(result.scores, step)
        scores = ", ".join(f"{k.rsplit('/', 1)[-1]}={v:.3g}" for k, v in sorted(result.scores.items()))
        self.notify("validation", f"validation at step {step}: {result.grid}" + (f" ({scores})" if scores else ""),
                    step, grid=str(result.grid), scores=result.scores)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m dmd.training.loop PARAMS [section.key=value ...]`: one training process (what dmd.training.launch runs)."""
    from dmd.core.config import load

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m dmd.training.loop PARAMS_FILE [section.key=value ...]", file=sys.stderr)
        return 2
    from dmd.core.process import stop_with_parent

    stop_with_parent()  # a worker whose launcher was killed stops, instead of training on as an orphan
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = load(argv[0], argv[1:])
    log.debug("effective settings:\n%s", dump(params))
    print(train(params))
    return 0


if __name__ == "__main__":
    sys.exit(main())
