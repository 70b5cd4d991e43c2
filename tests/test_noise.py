"""Random draws come from the caller's generator, made on its device and moved: a CPU generator gives the same numbers
whatever device the tensor is for."""

from __future__ import annotations

import pytest
import torch

from dmd.core.noise import randn
from dmd.wan.latents import initial_noise

SHAPE = (1, 4, 3, 8, 8)
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_cpu_generator_draws_the_same_numbers_for_any_device(device):
    expected = torch.Generator("cpu").manual_seed(3)
    first, second = torch.randn(SHAPE, generator=expected), torch.randn(SHAPE, generator=expected)

    generator = torch.Generator("cpu").manual_seed(3)
    x = randn(SHAPE, generator, device)
    assert x.device.type == device and x.dtype == torch.float32 and x.shape == SHAPE
    if device != "meta":  # a meta tensor has a shape and no numbers
        assert torch.equal(x.cpu(), first)
    # the draw came out of the CPU generator's stream (a draw on `device` would have left it where it was)
    assert torch.equal(torch.randn(SHAPE, generator=generator), second)


def test_initial_noise_is_the_first_draw_of_a_cpu_generator_seeded_with_the_seed():
    # `dmd sample`, the evaluation's student and WanPipeline with `generator=` all start from this draw
    torch.manual_seed(0)
    a = initial_noise(11, SHAPE)
    torch.manual_seed(1)
    assert torch.equal(a, initial_noise(11, SHAPE))
    assert torch.equal(a, torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(11)))
    assert not torch.equal(a, initial_noise(12, SHAPE))
