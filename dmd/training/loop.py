"""The DMD training run: `train(params) -> exported student dir`.

`train` reads top to bottom in the order of the algorithm; the parts it calls live in optim / ema / checkpoint /
export. Every stateful part is registered once with the CheckpointManager; every side effect (tracking, progress,
validation, webhooks, hub pushes) is a callback (dmd/training/callbacks.py). One step = one student update (when
`updates_generator(step)`), then one critic update, each over `gradient_accumulation_steps` micro-batches of
`train_batch_size` per process.

Randomness: every draw of step s on process r comes from a CPU `torch.Generator` seeded from (train.seed, s, r),
so a resumed run draws exactly what the uninterrupted run drew; the data position, optimizers, schedulers, EMA
and global RNG states come from the checkpoint. On CPU a resumed run is bit-identical. On several processes the
student's exit steps come from one generator of (train.seed, s) shared by all: every process then runs the
student equally often, which sharded weights need and Self-Forcing does too.

Length: `max_train_steps` when set; otherwise `num_train_epochs` × (batches per epoch per process ÷
gradient_accumulation_steps). With both set, `ignore_final_epochs: true` lets max_train_steps decide and `false`
ends at whichever comes first.

Processes: run under torchrun (dmd/training/launch.py; the train flow does that for `train.num_processes > 1`, or
`accelerate launch` across machines), every process holds all weights, or, with `train.fsdp`, its shard of the
full copies (dmd/training/sharding.py); gradients are averaged across processes before each update, and only
the main process validates, writes checkpoints, tracks and exports (sharded tensors are gathered to it, and every
process runs a sharded student's validation samples with it).
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
from dmd.training.callbacks import Callback, Callbacks, ProgressBar
from dmd.training.optim import TrainableGroup, UpdateResult, build_groups
from dmd.training.sharding import is_sharded, shard_transformer, unsharded_copy

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
    """The run's counters, checkpointed with it."""

    step: int = 0
    consecutive_nonfinite: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None
    total_steps: int | None = None  # the length this run is planned for

    def state_dict(self) -> dict:
        return {"step": self.step, "consecutive_nonfinite": self.consecutive_nonfinite,
                "skipped_steps": self.skipped_steps, "wandb_run_id": self.wandb_run_id,
                "total_steps": self.total_steps}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        # the checkpoint's planned length decided whether it may be resumed (`resume`); this run keeps its own
        self.step = state["step"]
        self.consecutive_nonfinite = state["consecutive_nonfinite"]
        self.skipped_steps = state["skipped_steps"]
        self.wandb_run_id = state["wandb_run_id"]


class RunSettings:
    """The settings a checkpoint must share with the run that resumes it: written with every checkpoint and
    compared by `resume` before anything is loaded, never loaded back."""

    def __init__(self, params: Params, num_processes: int, initial_student: str | None = None):
        self.settings = run_settings(params, num_processes, initial_student)

    def state_dict(self) -> dict:
        return self.settings

    def load_state_dict(self, state: dict) -> None:
        pass


def train(params: Params, *, progress: bool = True) -> Path:
    """Train the student with DMD per `params.train`; returns the exported student directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from dmd.data.cache.loader import CacheLoader, open_cache
    from dmd.distill.method import DMDMethod
    from dmd.distill.roles import build_roles
    from dmd.distill.rollout import RolloutSchedule
    from dmd.student.export import export_student
    from dmd.training.checkpoint import CheckpointManager, GlobalRNG
    from dmd.training.ema import EMA
    from dmd.training.ode_init import load_initial_student

    cfg = params.train
    if not torch.distributed.is_initialized():
        # accelerate keeps the first Accelerator's precision for the whole process; a process that trains twice
        # (a Prefect worker, a notebook) with another `mixed_precision` would be refused without this reset
        AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=cfg.run.mixed_precision, cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    set_seed(cfg.run.seed)  # the same LoRA initialisation on every process
    cache = open_cache(params.cache.output_dir)
    sharded = cfg.run.fsdp and acc.num_processes > 1
    if cfg.run.fsdp and not sharded:
        log.info("train.fsdp: one process, nothing to shard; the full copies stay whole")
    roles = build_roles(
        params, acc.device, partial(shard_transformer, device=acc.device) if sharded else None
    )
    initial_student = load_initial_student(params, roles.student_transformer)
    if cfg.student.gradient_checkpointing:
        for module in {
            id(m): m for m in (roles.base, roles.student_copy, roles.critic_copy) if m is not None
        }.values():
            module.enable_gradient_checkpointing()
    schedule = RolloutSchedule.from_params(params)
    method = DMDMethod(params, roles, schedule, cache.negative_prompt_embeds, cache.empty_prompt_embeds)
    loader = CacheLoader(
        cache, cfg.batch.train_batch_size, cfg.run.seed, rank=acc.process_index, world_size=acc.num_processes
    )
    total_steps = planned_steps(cfg, loader.batches_per_epoch)
    student, critic = build_groups(params, method, total_steps, acc)
    ema = EMA(student.params, cfg.ema.ema_decay, cfg.ema.ema_update_interval) if cfg.ema.use_ema else None
    state = RunState(total_steps=total_steps)
    checkpoints = CheckpointManager(cfg.checkpoint.checkpoint_dir, cfg.checkpoint.checkpoints_total_limit)
    checkpoints.register(student=student, critic=critic, ema=ema, loader=loader, run=state,
                         settings=RunSettings(params, acc.num_processes, initial_student), rng=GlobalRNG())  # fmt: skip
    held = checkpoints.hold() if main else None  # one run per checkpoint folder; released when this run ends
    resume(params, checkpoints, loader.fingerprint, main, total_steps, student, critic)
    callbacks = build_callbacks(params, acc, state, schedule, roles, ema, progress, sharded)
    data = iter(loader)
    student_dir = Path(cfg.run.output_dir)
    try:
        callbacks.on_train_start(state)
        for step in range(state.step, total_steps):
            started = time.perf_counter()
            batches = [next(data) for _ in range(cfg.batch.gradient_accumulation_steps)]
            draws = dict(
                generator=step_generator(cfg.run.seed, step, acc.process_index),
                exits_generator=shared_step_generator(cfg.run.seed, step) if acc.num_processes > 1 else None,
            )
            updates: dict[str, UpdateResult] = {}
            if method.updates_generator(step):
                updates["student"] = student.update(partial(method.generator_loss, **draws), batches)
                if ema is not None and updates["student"].finite:
                    ema.step()
            updates["critic"] = critic.update(partial(method.critic_loss, **draws), batches)
            check_finite(state, updates, step, cfg, checkpoints, main)
            state.step = step + 1
            callbacks.on_log(
                state.step, step_scalars(updates, student, critic, state, time.perf_counter() - started)
            )
            if state.step % cfg.checkpoint.checkpoint_step_interval == 0 or state.step == total_steps:
                path = save_checkpoint(checkpoints, state, acc, student, critic)
                if path is not None:
                    callbacks.on_checkpoint(state.step, path)
            callbacks.on_step_end(state.step)
            acc.wait_for_everyone()
        if main or sharded:  # a sharded student is gathered by every process
            roles.activate_student()
            exports_ema = ema is not None and ema.num_updates > 0
            if main and ema is not None and not exports_ema:
                log.warning(
                    "train.ema_update_interval=%d is more than the run's %d student steps: the EMA never folded "
                    "the weights in, so the live weights are exported",
                    cfg.ema.ema_update_interval,
                    ema.num_calls,
                )
            with ema.swapped_in() if exports_ema else contextlib.nullcontext():
                transformer = (
                    unsharded_copy(roles.student_transformer, keep=main)
                    if sharded
                    else roles.student_transformer
                )
                if main:
                    export_student(
                        transformer, params, schedule, student_dir, ema=exports_ema, step=state.step
                    )
        acc.wait_for_everyone()
    except BaseException as error:
        callbacks.on_train_end(state, None, error)
        raise
    else:
        callbacks.on_train_end(state, student_dir, None)
        return student_dir
    finally:
        acc.end_training()
        if held is not None:
            held.close()


# --------------------------------------------------------------------------------------------------------------
# The parts of the loop


def planned_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """The run's length in steps (see the module docstring)."""
    steps_per_epoch = batches_per_epoch // cfg.batch.gradient_accumulation_steps
    if cfg.run.num_train_epochs and steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has {batches_per_epoch} batches per process, fewer than gradient_accumulation_steps="
            f"{cfg.batch.gradient_accumulation_steps}; lower it or use train.max_train_steps"
        )
    by_epochs = cfg.run.num_train_epochs * steps_per_epoch
    if cfg.run.max_train_steps and cfg.run.num_train_epochs:
        return (
            cfg.run.max_train_steps
            if cfg.run.ignore_final_epochs
            else min(cfg.run.max_train_steps, by_epochs)
        )
    return cfg.run.max_train_steps or by_epochs


def build_callbacks(
    params: Params, acc, state: RunState, schedule, roles, ema, progress: bool, sharded: bool = False
) -> Callbacks:
    """The run's side effects, on the main process only: webhook events, tracking, the progress bar,
    validation, hub pushes. A sharded student validates on every process (each forward gathers its weights),
    and the main one writes the videos."""
    from dmd.training.hub import HubPusher
    from dmd.training.tracking import Tracker
    from dmd.training.validation import Validation, has_validation
    from dmd.training.webhooks import Notifier

    cfg, main = params.train, acc.is_main_process
    notify = Notifier(cfg.tracking.webhook_config, enabled=main, num_processes=acc.num_processes)
    tracker = Tracker(cfg, params.model_dump(mode="json"), start_step=state.step, enabled=main,
                      wandb_run_id=state.wandb_run_id)  # fmt: skip
    state.wandb_run_id = tracker.wandb_run_id
    bar = ProgressBar(state.total_steps, log, initial=state.step, enabled=main and progress)
    callbacks: list[Callback] = [notify, tracker, bar]
    if (main or sharded) and has_validation(params):
        callbacks.append(Validation(params, acc.device, schedule, roles, ema, tracker, notify, write=main))
    callbacks.append(HubPusher(cfg, enabled=main))
    return Callbacks(callbacks)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of all draws of one step on one process, a function of (seed, step, rank) only."""
    mixed = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(mixed))


def shared_step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the draws of one step that every process must make alike (the exit steps), a function of
    (seed, step) only and apart from every process's own (a spawn key no `step_generator` entropy carries)."""
    mixed = np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(1, dtype=np.uint64)[0]
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
    if state.consecutive_nonfinite >= cfg.run.max_consecutive_nonfinite:
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


def run_settings(params: Params, num_processes: int, initial_student: str | None = None) -> dict:
    """The settings a checkpoint must share with the run that resumes it; `initial_student` identifies the weights
    the student started from when not the teacher's (the ODE initialisation's)."""
    train = fixed_train_settings(params.train.model_dump(mode="json"))
    settings = {
        "train": train,
        "model": params.model.model_dump(mode="json"),
        "cache": params.cache.output_dir,
        "num_processes": num_processes,
    }
    if (
        initial_student is not None
    ):  # absent otherwise, as in checkpoints written before the ODE initialisation
        settings["initial_student"] = initial_student
    return settings


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
    params: Params, checkpoints, fingerprint: str, main: bool, total_steps: int, student, critic
) -> None:
    """Load the checkpoint `resume_from_checkpoint` names into every registered part, or start fresh; log which
    and why.

    `latest` resumes only a checkpoint on this run's own trajectory: the same settings except RESUMABLE_CHANGES,
    the same samples in the cache (`dvc repro` after a new teacher or new data rebuilds the cache under the same
    path), and a step this run reaches. The length (max_train_steps / num_train_epochs) changes no step before
    the end when the learning-rate schedule is one of LENGTH_FREE_SCHEDULES: a longer run continues a shorter
    run's checkpoint, and a shorter run resumes the newest checkpoint at or before its own end, never one past
    it (that would hand back a longer-trained student under the shorter run's name). A schedule that spans the
    run's length resumes only a checkpoint planned for the same length. When nothing qualifies the checkpoints
    are moved aside into `superseded-<time>/`, so they neither get resumed nor rotate the new ones out.
    """
    from dmd.training.checkpoint import CheckpointError

    cfg = params.train
    if main:
        checkpoints.rotate()  # leftovers of a write that was killed
    path = checkpoints.resolve(cfg.checkpoint.resume_from_checkpoint)
    settings = checkpoints.parts["settings"].state_dict()
    if path is not None and cfg.checkpoint.resume_from_checkpoint == "latest":
        path = _latest_on_trajectory(checkpoints, settings, fingerprint, cfg, total_steps)
    elif path is not None:
        summary = _checkpoint_summary(path)
        if summary["run"]["step"] > total_steps:
            raise CheckpointError(
                f"train.resume_from_checkpoint={cfg.checkpoint.resume_from_checkpoint!r}: {path} is at step "
                f"{summary['run']['step']}, past this run's {total_steps} steps; resuming it would hand back a "
                "longer-trained student. Resume an earlier checkpoint, train longer, or use 'latest'."
            )
        changed = _mismatches(summary, settings, fingerprint, cfg, total_steps)
        if changed:
            log.warning("resuming %s although it differs: %s", path, "; ".join(changed))
    if path is None:
        aside = checkpoints.move_aside("superseded", checkpoints.checkpoints()) if main else None
        if aside is not None:
            log.warning("moved the checkpoints of an earlier run to %s", aside)
        log.info("training a new run of %d steps", total_steps)
        return
    checkpoints.load_into(path)
    # the peak learning rates are resumable changes (RESUMABLE_CHANGES): the schedules go on scaled to them
    for group, key, value in (
        (student, "train.learning_rate", cfg.optim.learning_rate),
        (critic, "train.distillation_config.fake_score_lr", cfg.distillation_config.fake_score_lr),
    ):
        before = group.scheduler.base_lrs[0]
        group.set_base_lr(value)
        if before != value:  # resumable (a non-finite streak asks for it), but the run then mixes the two
            log.warning(
                "%s: %s=%g from step %d on; the steps before it were taken at %g, so this run is not the one a "
                "fresh start at %g would make", path, key, value, checkpoints.parts["run"].step, before, value,
            )  # fmt: skip
    planned = _checkpoint_summary(path)["run"].get("total_steps")
    log.info(
        "resumed from %s at step %d of %d%s", path, checkpoints.parts["run"].step, total_steps,
        f" (written by a run planned for {planned} steps; train.lr_scheduler={cfg.optim.lr_scheduler} makes their steps "
        "the same)" if planned not in (None, total_steps) else "",
    )  # fmt: skip


def _checkpoint_summary(path: Path) -> dict:
    """The plain part of a checkpoint's state (run counters, settings, data position), without its tensors."""
    import json

    from dmd.training.checkpoint import STATE_FILE

    return json.loads((Path(path) / STATE_FILE).read_text())["state"]


def _mismatches(
    summary: dict, settings: dict, fingerprint: str, cfg: TrainConfig, total_steps: int
) -> list[str]:
    """Why the checkpoint `summary` is not on the trajectory of a run with `settings` and `total_steps`, apart
    from lying past its end; empty when it is."""
    saved = {**summary["settings"], "train": fixed_train_settings(summary["settings"]["train"])}
    changed = _differences(saved, settings)
    if summary["loader"]["fingerprint"] != fingerprint:
        changed.append(f"the samples in {settings['cache']}, rebuilt since")
    planned = summary["run"].get("total_steps")
    if cfg.optim.lr_scheduler not in LENGTH_FREE_SCHEDULES and planned != total_steps:
        changed.append(
            f"planned for {planned or 'an unrecorded number of'} steps, this run for {total_steps}: "
            f"train.lr_scheduler={cfg.optim.lr_scheduler} spans the run's length, so every step differs"
        )
    return changed


def _latest_on_trajectory(
    checkpoints, settings: dict, fingerprint: str, cfg: TrainConfig, total_steps: int
) -> Path | None:
    """The newest checkpoint this run can continue (see `resume`), or None after logging why there is none."""
    found = checkpoints.checkpoints()
    newest = found[-1]
    changed = _mismatches(_checkpoint_summary(newest), settings, fingerprint, cfg, total_steps)
    if changed:
        log.warning("%s was written with other settings (%s); starting a new run", newest, "; ".join(changed))
        return None
    for path in reversed(found):
        summary = _checkpoint_summary(path)
        if summary["run"]["step"] <= total_steps and not _mismatches(
            summary, settings, fingerprint, cfg, total_steps
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


def weights_digest(params: list[torch.Tensor]) -> str:
    """A digest of the whole (unsharded) weights among `params`: a sharded weight differs across processes by
    design, and FSDP keeps its shards consistent."""
    digest = hashlib.sha256()
    for p in params:
        if not is_sharded(p):
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def verify_replicas(acc, student: TrainableGroup, critic: TrainableGroup) -> None:
    """Every process must hold the same student and critic weights (their unsharded ones); a clear error when
    they diverged."""
    if acc.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = gather_object([(weights_digest(student.params), weights_digest(critic.params))])
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"process replicas diverged: (student, critic) weight digests per process {digests}"
        )
    log.info("replicas identical on %d processes (student %s, critic %s)", acc.num_processes, *digests[0])


def save_checkpoint(checkpoints, state: RunState, acc, student, critic) -> Path | None:
    """Checkpoint every registered part; the path, or None on other processes and when nothing was written.

    All processes hold the same weights (checked), so the main process's copy is the run's state; sharded weights
    are gathered to it. Not during a non-finite streak: a checkpoint is a state to go back to (the manager also
    refuses non-finite weights). Every process takes the same decision (the same counters, identical replicas)."""
    if state.consecutive_nonfinite:
        log.warning("step %d: no checkpoint during a run of non-finite steps", state.step)
        return None
    verify_replicas(acc, student, critic)
    return checkpoints.save(state.step, write=acc.is_main_process)


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
