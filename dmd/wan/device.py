"""Where the stages run: the accelerator when there is one, else the CPU; and, for the data stages, which of a
machine's devices each task runs on.

A device setting (`generate.device`, `cache.device`) is `auto` (every visible CUDA device, else the CPU), one torch
device name, or a comma-separated list of them (`cuda:0,cuda:1`). Each entry of the list is a *slot*: one model
(teacher, VAE) is loaded per slot and the tasks of a process share the slots, the least busy first
(`DevicePool`). A name may repeat: `cpu,cpu` is two slots on the CPU, each with its own model, which is how a
machine without GPUs runs the multi-device code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dmd.core.config import AUTO, device_setting_problem


class DeviceError(ValueError):
    """A device setting that names no device of this machine; the message names the key and the fix."""


def cuda_device_count() -> int:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies); the one place the stages ask."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pick_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str) -> torch.device:
    """A single-device setting: `auto` is `pick_device()`, anything else a torch device name."""
    return pick_device() if name == AUTO else torch.device(name)


@dataclass(frozen=True, order=True)
class DeviceSlot:
    """One entry of a device setting: its position in the list and its torch device name."""

    index: int
    device: str

    def __str__(self) -> str:
        return f"{self.index}:{self.device}"


def resolve_devices(value: str, key: str, present: bool = True) -> list[DeviceSlot]:
    """The slots of the device setting `key` on this machine: `auto` is one per visible CUDA device (the CPU when
    there is none); a list is taken as written, each CUDA index checked against the devices this process sees
    unless not `present` (the devices are another machine's)."""
    problem = device_setting_problem(value)
    if problem:
        raise DeviceError(f"{key}: {problem}")
    count = cuda_device_count()
    if value.strip() == AUTO:
        names = [f"cuda:{i}" for i in range(count)] or ["cpu"]
    else:
        names = [e.strip() for e in value.split(",")]
    slots = []
    for i, name in enumerate(names):
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise DeviceError(
                f"{key}: {name!r} is not a torch device ({e}); use e.g. 'cuda:0' or 'cpu'"
            ) from None
        if present and device.type == "cuda" and (count == 0 or (device.index or 0) >= count):
            seen = f"cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise DeviceError(
                f"{key}: {name!r}, but this process sees {seen} (CUDA_VISIBLE_DEVICES applies); "
                f"use 'auto' or name devices that exist"
            )
        slots.append(DeviceSlot(i, str(device)))
    return slots


def resolve_num_processes(value: int | str) -> int:
    """`train.num_processes`: a number as given; `auto` is one process per visible CUDA device, and one process on
    a machine without CUDA (several CPU processes are asked for by number)."""
    if value == AUTO:
        return max(1, cuda_device_count())
    return int(value)


class DevicePool:
    """The slots of one device setting, leased to the tasks of this process: each lease takes the slot with the
    fewest tasks on it (the lowest index among equals), so N slots and N tasks put one task on each, and a task
    that finishes frees its slot for the next. It places tasks; which task runs when is the task runner's."""

    def __init__(self, slots: list[DeviceSlot]):
        if not slots:
            raise ValueError("a device pool needs at least one slot")
        self.slots = list(slots)
        self._busy = [0] * len(self.slots)
        self._lock = threading.Lock()

    @contextmanager
    def lease(self) -> Iterator[DeviceSlot]:
        with self._lock:
            i = min(range(len(self.slots)), key=lambda k: (self._busy[k], k))
            self._busy[i] += 1
        try:
            yield self.slots[i]
        finally:
            with self._lock:
                self._busy[i] -= 1


_pools: dict[tuple[str, str], DevicePool] = {}
_pools_lock = threading.Lock()
_pinned: DeviceSlot | None = None


def device_pool(value: str, key: str) -> DevicePool:
    """This process's pool for the device setting `key` = `value`: one pool per setting, shared by every task of the
    process, or only the slot the process is pinned to (`pin_slot`)."""
    if _pinned is not None:
        return DevicePool([_pinned])
    with _pools_lock:
        if (key, value) not in _pools:
            _pools[key, value] = DevicePool(resolve_devices(value, key))
        return _pools[key, value]


def pin_slot(slot: DeviceSlot | None) -> None:
    """Make `slot` the only one this process's tasks lease, whatever their setting lists (a worker process of a
    local Dask cluster, one per slot); None unpins."""
    global _pinned
    _pinned = slot


def pinned_slot() -> DeviceSlot | None:
    return _pinned
