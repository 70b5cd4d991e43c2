"""Sharded training of the full trainable copies with torch's FSDP2 (`train.fsdp`).

A full student and a full-copy critic are the weights that outgrow one GPU (16 bytes a parameter with AdamW; a
14B copy is 229 GB). Under `train.fsdp` each copy is sharded over the run's processes: `fully_shard` on every
`WanTransformerBlock`, then on the root, so a forward all-gathers one block at a time and the backward
reduce-scatters its gradients, averaged over the processes. The frozen base (the real score, and the LoRA
adapters' base) stays whole on every process: it gets no gradient, and sharding it would cost an all-gather per
forward for memory a GPU can spare.

What changes for the rest of the run lives here, next to the sharding:

- gradient norms add the local shards' squares across processes (`sharded_grad_norm`);
- checkpoints hold full tensors: every process takes part in gathering each sharded tensor, the writing process
  keeps it on the CPU (`gather_full`); loading takes each process's shard of the full tensor back
  (`copy_full_into`, `shard_optimizer_state`), so a sharded checkpoint has the layout of an unsharded one;
- the export gathers the student's full state dict and writes it from an unsharded copy (`unsharded_copy`).

Outside this module: the exit steps are drawn alike on every process (dmd/training/loop.py), since each sharded
forward is a collective that every process must make, and validation runs on every process for the same reason
(dmd/training/validation.py).

Only parameters that are DTensors are touched, so an unsharded run goes through these functions unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor | None) -> bool:
    return isinstance(tensor, DTensor)


def shard_transformer(module: torch.nn.Module, device: torch.device | str) -> None:
    """FSDP2 over every process of the default group: each transformer block a unit, the root the rest."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (torch.distributed.get_world_size(),))
    for block in module.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


def sharded_grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of sharded gradients over all processes: each process's shards are disjoint, so the squares of
    the local norms add up across processes (one all-reduce)."""
    local = torch.stack([torch.linalg.vector_norm(g.to_local().float()) for g in grads]).square().sum()
    torch.distributed.all_reduce(local)
    return local.sqrt().cpu()


def gather_full(state: Any, keep: bool) -> Any:
    """`state` with every DTensor gathered to its full tensor, on the CPU where `keep` (the writing process).

    Every process must call it on a state of the same structure: each gather is a collective. The others drop
    each full tensor as soon as it is gathered, so no process holds more than one of them on its device."""
    if isinstance(state, DTensor):
        full = state.full_tensor()
        return full.cpu() if keep else None
    if isinstance(state, dict):
        return {k: gather_full(v, keep) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(gather_full(v, keep) for v in state)
    return state


@torch.no_grad()
def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor `full` into `target`: its own shard when `target` is sharded."""
    if is_sharded(target):
        full = distribute_tensor(
            full.to(target.device_mesh.device_type), target.device_mesh, target.placements
        )
    target.copy_(full)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a gathered checkpoint: shard each sharded parameter's state tensors
    (moments, master weights) as the parameter is, so the next step computes on matching shards."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_sharded(p):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == p.shape:
                    state[key] = distribute_tensor(
                        value.to(p.device_mesh.device_type), p.device_mesh, p.placements
                    )


def unsharded_copy(module: torch.nn.Module, keep: bool) -> torch.nn.Module | None:
    """A plain copy of the sharded `module` on the CPU for the process that `keep`s it (to export), None on the
    others. Every process must call it: the full state dict is gathered tensor by tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return None
    # fully_shard swapped the module's class for a subclass of (FSDPModule, its class)
    model_class = next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):
        plain = model_class.from_config(module.config)
    plain.load_state_dict(state, assign=True)
    return plain.eval()
