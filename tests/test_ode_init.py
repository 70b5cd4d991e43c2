"""The ODE initialisation stage: trajectory points drawn per block, the regression against a hand-written loss,
the stage's output, and training starting from it."""

from __future__ import annotations

import json

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from train_world import FIXTURES, run_params

from dmd.core.config import load, validate
from dmd.data.cache.loader import CacheLoader, open_cache
from dmd.distill.roles import build_roles
from dmd.distill.rollout import RolloutSchedule, transformer_velocity
from dmd.training.ode_init import (
    CARD,
    OdeInitError,
    draw_trajectory_points,
    load_initial_student,
    ode_init,
    ode_regression_loss,
)
from dmd.wan.causal import block_causal
from dmd.wan.formats import LORA_WEIGHTS
from dmd.wan.loading import load_transformer

pytestmark = pytest.mark.slow


def test_each_block_takes_its_own_trajectory_point():
    b, k, t = 3, 4, 7
    # point k of sample i holds the value 100·i + k everywhere, so each frame says where it came from
    trajectory = (100 * torch.arange(b)[:, None] + torch.arange(k)[None, :]).float()
    trajectory = trajectory[:, :, None, None, None, None].expand(b, k, 2, t, 2, 2)
    ranges = [(0, 1), (1, 4), (4, 7)]
    inputs, steps = draw_trajectory_points(trajectory, ranges, torch.Generator().manual_seed(0))
    assert steps.shape == (b, 3)
    for i in range(b):
        for n, (start, end) in enumerate(ranges):
            assert torch.all(inputs[i, :, start:end] == 100 * i + steps[i, n])
    assert len({tuple(s.tolist()) for s in steps}) > 1  # drawn, not fixed


@pytest.fixture(scope="module")
def trajectory_world(tmp_path_factory, tiny_wan_dir):
    """The tiny world's teacher data with trajectories at the student's σs, cached."""
    import yaml

    from dmd.data.cache.build import build_cache
    from dmd.data.generate import generate_teacher_data

    root = tmp_path_factory.mktemp("ode-world")
    raw = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    raw["model"]["pretrained_model_name_or_path"] = str(tiny_wan_dir)
    raw["generate"].update(output_dir=str(root / "data"), save_trajectory=True)
    raw["cache"]["output_dir"] = str(root / "cache")
    raw["cache"]["datasets"][0]["manifest"] = str(root / "data")
    raw["ode_init"]["output_dir"] = str(root / "ode-init")
    raw["train"]["causal"] = True
    raw["train"]["validation_guidance"] = 1.0
    params = validate(raw)
    generate_teacher_data(params)
    build_cache(params)
    return raw


def test_the_loss_is_the_x0_error_of_a_block_causal_pass_over_the_drawn_points(trajectory_world):
    params = validate(trajectory_world)
    schedule = RolloutSchedule.from_params(params)
    batch = next(iter(CacheLoader(open_cache(params.cache.output_dir), 2, 0)))
    assert batch.trajectory_BKCTHW is not None
    model = load_transformer(params.model)
    ranges = schedule.block_ranges(batch.latents_BCTHW.shape[2])
    with torch.no_grad(), block_causal(model) as causal:
        loss = ode_regression_loss(
            transformer_velocity(model),
            causal,
            batch,
            batch.trajectory_sigmas_K,
            ranges,
            torch.Generator().manual_seed(1),
        )
        # by hand: the same draws, each block's σ on its frames, x0 = x − σ·v, mean squared error
        inputs, steps = draw_trajectory_points(
            batch.trajectory_BKCTHW, ranges, torch.Generator().manual_seed(1)
        )
        per_frame = [steps[:, n] for n, (start, end) in enumerate(ranges) for _ in range(start, end)]
        sigmas = batch.trajectory_sigmas_K[torch.stack(per_frame, dim=1)]
        _, p_h, p_w = model.config.patch_size
        tokens_per_frame = (inputs.shape[3] // p_h) * (inputs.shape[4] // p_w)
        with causal.full(ranges):
            v = model(hidden_states=inputs, timestep=(1000 * sigmas).repeat_interleave(tokens_per_frame, 1),
                      encoder_hidden_states=batch.prompt_embeds_BLD, return_dict=False)[0]  # fmt: skip
        expected = ((inputs - sigmas[:, None, :, None, None] * v - batch.latents_BCTHW) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_the_stage_lowers_the_loss_and_training_starts_from_its_student(trajectory_world, tmp_path):
    run = tmp_path / "run"
    here = [f"ode_init.output_dir={run / 'ode-init'}", "ode_init.enabled=true"]
    params = load(
        run_params(trajectory_world, run),
        [*here, "ode_init.max_train_steps=30", "ode_init.learning_rate=3e-3"],
    )
    out = ode_init(params, progress=False)
    card = json.loads((out / CARD).read_text())
    assert card["enabled"] and card["steps"] == 30 and card["student"]["causal"] is True
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero

    # the train stage's student starts from exactly those weights
    roles = build_roles(params)
    assert load_initial_student(params, roles.student_transformer) == card["weights_sha256"]
    loaded = get_peft_model_state_dict(roles.base, adapter_name="student")
    reference = load_file(out / LORA_WEIGHTS)
    assert set(loaded) == {k.removeprefix("transformer.") for k in reference}
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in reference.items())

    # and regresses the trajectories better than the teacher's weights do, on the same draws of the whole cache
    schedule = RolloutSchedule.from_params(params)
    batch = next(iter(CacheLoader(open_cache(params.cache.output_dir), 6, 0)))
    ranges = schedule.block_ranges(batch.latents_BCTHW.shape[2])
    losses = {}
    with torch.no_grad(), block_causal(roles.base) as causal:
        for name, role in (("teacher", roles.real), ("initialised", roles.student)):
            generator = torch.Generator().manual_seed(0)
            losses[name] = ode_regression_loss(
                role, causal, batch, batch.trajectory_sigmas_K, ranges, generator
            )
    assert losses["initialised"] < 0.9 * losses["teacher"], losses

    # a student of another form is refused, with the fix
    other = load(run_params(trajectory_world, tmp_path / "other", lora_rank=8), here)
    with pytest.raises(OdeInitError, match="rerun `dmd ode-init`"):
        load_initial_student(other, build_roles(other).student_transformer)


def test_disabled_writes_only_the_card_and_bad_input_names_the_fix(trajectory_world, tmp_path):
    here = [f"ode_init.output_dir={tmp_path / 'ode-init'}"]
    params = load(run_params(trajectory_world, tmp_path / "run"), here)
    out = ode_init(params, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [CARD] and json.loads((out / CARD).read_text()) == {
        "enabled": False
    }
    assert load_initial_student(params, None) is None
    enabled = load(run_params(trajectory_world, tmp_path / "run"), [*here, "ode_init.enabled=true"])
    with pytest.raises(OdeInitError, match="holds no ODE-initialised student"):
        load_initial_student(enabled, None)
    other_steps = load(
        run_params(trajectory_world, tmp_path / "run"),
        [*here, "ode_init.enabled=true", "train.distillation_config.dmd_denoising_steps=[1000, 500]"],
    )
    with pytest.raises(OdeInitError, match="are at σ .* regenerate and re-cache"):
        ode_init(other_steps, progress=False)
    assert json.loads((out / CARD).read_text()) == {"enabled": False}  # the failed run replaced nothing
