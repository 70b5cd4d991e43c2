"""Checkpoints: exact round trips without pickle, atomic writes, `latest`, rotation, bad paths, EMA."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dmd.core import io
from dmd.training.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    flatten_state,
    restore_rng_state,
    unflatten_state,
)
from dmd.training.ema import EMA


def _save(manager: CheckpointManager, step: int) -> None:
    manager.write(step, {"student": {"00000": torch.full((3,), float(step))}}, {"step": step})


def test_nested_state_round_trips_exactly():
    p = torch.randn(4, requires_grad=True)
    opt = torch.optim.AdamW([p], betas=(0.5, 0.9))
    p.grad = torch.randn(4)
    opt.step()
    state = {"opt": opt.state_dict(), "rng": capture_rng_state(), "ints": {3: "three"}, "t": (1, [2.5, None])}
    structure, tensors = flatten_state(state)
    json.dumps(structure)  # plain JSON, no pickle
    back = unflatten_state(json.loads(json.dumps(structure)), tensors)
    assert back["ints"] == {3: "three"} and back["t"] == (1, [2.5, None])
    assert back["opt"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_states_restore_the_same_draws():
    saved = capture_rng_state()
    structure, tensors = flatten_state(saved)
    draws = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(unflatten_state(json.loads(json.dumps(structure)), tensors))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_save_load_latest_and_rotation(tmp_path):
    manager = CheckpointManager(tmp_path, total_limit=2)
    for step in (2, 4, 6):
        _save(manager, step)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-0000004", "checkpoint-0000006"]
    groups, state = manager.load(manager.latest())
    assert state == {"step": 6} and torch.equal(groups["student"]["00000"], torch.full((3,), 6.0))
    one = CheckpointManager(tmp_path, total_limit=1)
    _save(one, 8)
    assert [p.name for p in one.checkpoints()] == ["checkpoint-0000008"]


def test_half_written_checkpoints_are_never_latest_and_get_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path, total_limit=3)
    _save(manager, 2)
    (tmp_path / ".checkpoint-0000004.abc123.tmp").mkdir()  # a write killed mid-way
    (tmp_path / "checkpoint-0000006").mkdir()  # a folder without its state file
    assert manager.latest().name == "checkpoint-0000002"
    manager.rotate()
    assert not (tmp_path / ".checkpoint-0000004.abc123.tmp").exists()
    assert manager.latest().name == "checkpoint-0000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0000002"
    ]  # no checkpoint-* but complete ones


def test_a_crash_while_saving_leaves_the_previous_checkpoint_alone(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, total_limit=1)
    _save(manager, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dmd.training.checkpoint.write_json", crash)
    with pytest.raises(OSError):
        _save(manager, 4)
    monkeypatch.setattr("dmd.training.checkpoint.write_json", io.write_json)
    assert [p.name for p in manager.checkpoints()] == ["checkpoint-0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000002"]


def test_resolve(tmp_path):
    manager = CheckpointManager(tmp_path, total_limit=2)
    assert manager.resolve("latest") is None and manager.resolve(None) is None
    _save(manager, 2)
    assert manager.resolve("latest") == tmp_path / "checkpoint-0000002"
    assert manager.resolve("checkpoint-0000002") == tmp_path / "checkpoint-0000002"
    with pytest.raises(CheckpointError, match="resume_from_checkpoint.*checkpoint-0000002"):
        manager.resolve(str(tmp_path / "checkpoint-0000009"))


def test_ema_follows_its_formula_and_swaps_in_and_out():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9, update_interval=2)
    with torch.no_grad():
        p.fill_(1.0)
    assert ema.step() is False  # first call of the interval: no update
    assert ema.step() is True  # the first fold copies the weights (warm-up decay 0)
    assert torch.equal(ema.shadow[0], torch.ones(3))
    with torch.no_grad():
        p.fill_(3.0)
    ema.step(), ema.step()  # second fold: decay min(0.9, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 2 / 11 * 1.0 + 9 / 11 * 3.0))
    with ema.swapped_in():
        assert torch.allclose(p, torch.full((3,), 2 / 11 + 27 / 11))
    assert torch.equal(p.detach(), torch.full((3,), 3.0))
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9, update_interval=2)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow[0], ema.shadow[0]) and other.num_calls == 4


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_ema_keeps_nothing_of_the_initial_weights(interval):
    """400 student steps: the exported EMA must not hold the weights training started from (the plain EMA kept
    decay**(400/interval) of them). The weights move to 1 at the first step and stay there."""
    p = torch.nn.Parameter(torch.zeros(4))
    ema = EMA([p], decay=0.99, update_interval=interval)
    with torch.no_grad():
        p.fill_(1.0)
    for _ in range(400):
        ema.step()
    assert torch.allclose(ema.shadow[0], torch.ones(4), atol=1e-6)


def test_ema_decay_warms_up_to_its_setting():
    from dmd.training.ema import ema_decay_at

    assert [ema_decay_at(n, 0.99) for n in (1, 2, 3)] == pytest.approx([0.0, 2 / 11, 3 / 12])
    assert ema_decay_at(10_000, 0.99) == 0.99


def test_registered_parts_are_saved_and_loaded_once_each(tmp_path):
    """Every part registered once; `save` writes all of them, `load_into` restores all of them, weights in their
    own safetensors file."""
    from dmd.training.checkpoint import GlobalRNG
    from dmd.training.optim import TrainableGroup

    def group():
        p = torch.nn.Parameter(torch.zeros(3))
        opt = torch.optim.AdamW([p], lr=0.1)
        return TrainableGroup(
            "student", [p], opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s), "norm", 0
        )

    def manager(student, ema):
        m = CheckpointManager(tmp_path, total_limit=2)
        m.register(student=student, ema=ema, nothing=None, rng=GlobalRNG())
        return m

    student = group()
    ema = EMA(student.params, decay=0.9)
    student.update(lambda batch: (((student.params[0] - 1) ** 2).sum(), {}), [None])
    ema.step()
    path = manager(student, ema).save(1)
    draws = torch.rand(2)
    assert {"student.safetensors", "ema.safetensors", "state.json"} <= {p.name for p in path.iterdir()}

    again = group()
    again_ema = EMA(again.params, decay=0.9)
    manager(again, again_ema).load_into(path)
    assert torch.equal(again.params[0], student.params[0]) and again.lr == student.lr
    assert again.optimizer.state_dict()["state"][0]["exp_avg"].equal(
        student.optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert torch.equal(again_ema.shadow[0], ema.shadow[0]) and again_ema.num_calls == 1
    assert torch.equal(torch.rand(2), draws)  # the global generators are back where the checkpoint left them

    with torch.no_grad():
        student.params[0].fill_(float("nan"))
    assert manager(student, ema).save(2) is None and [
        p.name for p in CheckpointManager(tmp_path, 2).checkpoints()
    ] == ["checkpoint-0000001"]
