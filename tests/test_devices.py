"""Every device of a machine busy: device settings, the placement of shards and cache chunks on device slots (one
model per slot, every slot used), runs on two slots that write the same files as runs on one, and
`train.num_processes: auto`.

This machine has no GPU: two devices are simulated with `cpu,cpu` (two slots on the CPU, each with its own teacher
or VAE), and `auto` with a monkeypatched dmd.wan.device.cuda_device_count, the one place the code asks torch."""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

import pytest
import yaml

import dmd.wan.device as device_module
from dmd.core.config import ConfigError, load, stage_settings
from dmd.wan.device import (
    DeviceError,
    DevicePool,
    DeviceSlot,
    device_pool,
    pin_slot,
    resolve_devices,
    resolve_num_processes,
)

REPO = Path(__file__).resolve().parents[1]
TWO = DeviceSlot(0, "cpu"), DeviceSlot(1, "cpu")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_tree(a: Path, b: Path) -> None:
    tree_a, tree_b = _tree(a), _tree(b)
    assert sorted(tree_a) == sorted(tree_b)
    assert [k for k in tree_a if tree_a[k] != tree_b[k]] == []


def _with(params_file: Path, name: str, **sections) -> Path:
    """The params file with keys of `sections` ({"generate": {...}}) changed, written next to it as `name`."""
    raw = yaml.safe_load(params_file.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path = params_file.with_name(name)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "override, expected",
    [
        ("generate.device=cuda:0,", "generate.device: 'cuda:0,' is not a device setting"),
        ("generate.device=auto,cuda:1", "(bad entry 'auto')"),
        ("generate.device=GPU", "generate.device: 'GPU' is not a device setting"),
        ("cache.device=cuda 0", "cache.device: 'cuda 0' is not a device setting"),
        (
            "train.num_processes=0",
            "train.num_processes: 0: expected a whole number of processes (1 or more) or 'auto'",
        ),
        ("train.num_processes=all", "train.num_processes: 'all': expected a whole number"),
        ("train.num_processes=true", "train.num_processes: True: expected"),
    ],
)
def test_bad_device_settings_name_the_key_and_the_fix(override, expected):
    with pytest.raises(ConfigError) as e:
        load(REPO / "params.yaml", [override])
    (problem,) = e.value.problems  # one line, not one per member of the type's union
    assert expected in problem


def test_device_settings_parse_and_stay_out_of_the_recorded_settings():
    params = load(REPO / "params.yaml", ["generate.device=cuda:0, cuda:1", "cache.device=cpu,cpu"])
    assert (params.generate.device, params.cache.device) == ("cuda:0, cuda:1", "cpu,cpu")
    assert load(REPO / "params.yaml", ["train.num_processes=auto"]).train.run.num_processes == "auto"
    assert load(REPO / "params.yaml", ["train.num_processes=3"]).train.run.num_processes == 3
    # a sample does not depend on the device that made it, so the device is not part of what a stage records
    default = load(REPO / "params.yaml")
    assert stage_settings(params, "generate") == stage_settings(default, "generate")
    assert stage_settings(params, "cache") == stage_settings(default, "cache")


def test_auto_is_every_visible_cuda_device_and_lists_are_checked_against_them(monkeypatch):
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 4)
    assert [str(s) for s in resolve_devices("auto", "generate.device")] == [f"{i}:cuda:{i}" for i in range(4)]
    assert resolve_devices("cuda:3,cuda:1", "k") == [DeviceSlot(0, "cuda:3"), DeviceSlot(1, "cuda:1")]
    assert resolve_num_processes("auto") == 4 and resolve_num_processes(2) == 2
    with pytest.raises(
        DeviceError, match=r"generate.device: 'cuda:4', but this process sees cuda:0 to cuda:3"
    ):
        resolve_devices("cuda:0,cuda:4", "generate.device")
    with pytest.raises(DeviceError, match=r"cache.device: 'tpu' is not a torch device"):
        resolve_devices("tpu", "cache.device")

    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 0)
    assert resolve_devices("auto", "generate.device") == [DeviceSlot(0, "cpu")]
    assert resolve_num_processes("auto") == 1  # one process on a machine without CUDA
    with pytest.raises(DeviceError, match=r"cache.device: 'cuda', but this process sees no CUDA device"):
        resolve_devices("cuda", "cache.device")


def test_auto_on_this_machine():
    count = device_module.cuda_device_count()
    assert resolve_num_processes("auto") == max(1, count)
    assert len(resolve_devices("auto", "generate.device")) == max(1, count)


# ---------------------------------------------------------------------------------------------------------------
# Placement


def test_the_pool_gives_each_task_the_least_busy_slot():
    pool = DevicePool([DeviceSlot(i, "cpu") for i in range(3)])
    with pool.lease() as a, pool.lease() as b, pool.lease() as c:
        assert [a.index, b.index, c.index] == [0, 1, 2]  # three tasks, one on each slot
        with pool.lease() as d:
            assert d.index == 0  # all busy: the lowest of the least busy
    with pool.lease() as a:
        with pool.lease() as b:
            pass
        with pool.lease() as c:
            assert (a.index, b.index, c.index) == (0, 1, 1)  # the slot a finished task freed

    # leases from many threads at once: never two tasks on a slot while another slot is free
    peak, lock, busy = [0, 0, 0], threading.Lock(), [0, 0, 0]
    barrier = threading.Barrier(3)

    def task():
        with pool.lease() as slot:
            with lock:
                busy[slot.index] += 1
                peak[slot.index] = max(peak[slot.index], busy[slot.index])
            barrier.wait(timeout=10)
            with lock:
                busy[slot.index] -= 1

    threads = [threading.Thread(target=task) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak == [1, 1, 1]


def test_a_pinned_process_leases_only_its_slot():
    pin_slot(DeviceSlot(1, "cpu"))
    try:
        with device_pool("cpu,cpu", "generate.device").lease() as slot:
            assert slot == DeviceSlot(1, "cpu")
    finally:
        pin_slot(None)
    with device_pool("cpu,cpu", "generate.device").lease() as slot:
        assert slot == DeviceSlot(0, "cpu")


def test_task_runner_layouts(tiny_params_file):
    """Threads: `workers` shards in flight per device. A local Dask cluster: one process per device with `workers`
    threads, or, on one device, `workers` processes as before."""
    from flows.generate import _local_dask_slots, _task_runner

    cfg = load(tiny_params_file, ["generate.workers=3"]).generate
    assert _task_runner(cfg, list(TWO))._max_workers == 6
    assert _task_runner(cfg, [TWO[0]])._max_workers == 3
    assert _local_dask_slots(cfg, list(TWO)) is None  # threads: shards lease from every slot of the process

    dask = load(tiny_params_file, ["generate.workers=3", "generate.task_runner=dask"]).generate
    kwargs = _task_runner(dask, list(TWO)).cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"]) == (2, 3)
    assert _local_dask_slots(dask, list(TWO)) == list(TWO)  # worker i pins itself to slot i
    kwargs = _task_runner(dask, [TWO[0]]).cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"]) == (3, 1)
    assert _local_dask_slots(dask, [TWO[0]]) is None
    remote = dask.model_copy(update={"dask_address": "tcp://127.0.0.1:8786"})
    assert _local_dask_slots(remote, list(TWO)) is None  # each remote worker uses its own machine's devices


def test_a_device_that_is_not_here_stops_the_stage_before_any_work(tiny_params_file, capsys):
    from flows.cache import main as cache_main
    from flows.generate import main as generate_main

    out = Path(load(tiny_params_file).generate.output_dir)
    args = argparse.Namespace(
        params=str(tiny_params_file), overrides=["generate.device=cpu,cuda:7"], shards=None
    )
    assert generate_main(args) == 2
    assert "generate.device: 'cuda:7', but this process sees" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())
    args = argparse.Namespace(params=str(tiny_params_file), overrides=["cache.device=cuda:7"])
    assert cache_main(args) == 2
    assert "cache.device: 'cuda:7', but this process sees" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The training launcher


def test_train_num_processes_auto_is_the_device_count(tiny_params_file, monkeypatch):
    import flows.train as train_flow
    from dmd.training import launch

    auto = _with(tiny_params_file, "auto.yaml", train={"num_processes": "auto"})
    commands = []

    class Done:
        returncode = 0

    monkeypatch.setattr(train_flow.subprocess, "run", lambda command, env: commands.append(command) or Done())
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 3)
    train_flow.train_student.fn(str(auto), [])
    assert commands == [train_flow.launch_command(str(auto), [], 3)]  # torchrun with one process per device

    trained = []
    monkeypatch.setattr(
        "dmd.training.loop.train", lambda params, progress: trained.append(params) or "student"
    )
    monkeypatch.setattr(device_module, "cuda_device_count", lambda: 0)
    assert train_flow.train_student.fn(str(auto), []) == "student"  # no CUDA: one process, this one
    assert len(trained) == 1 and len(commands) == 1

    for bad in ("0", "-1", "many"):  # the launcher refuses before starting anything
        assert launch.main([bad, str(auto)]) == 2


# ---------------------------------------------------------------------------------------------------------------
# Runs on two device slots against runs on one


@pytest.fixture
def no_gpu_limit(prefect_server):
    """No global concurrency limit `gpu` on the session's server (tests/test_backfill.py makes one of one slot,
    which would let one shard run at a time); put back afterwards."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        with get_client(sync_client=True) as client:
            try:
                limit = client.read_global_concurrency_limit_by_name("gpu")
                client.delete_global_concurrency_limit_by_name("gpu")
            except ObjectNotFound:
                limit = None
        yield
        if limit is not None:
            with get_client(sync_client=True) as client:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name="gpu", limit=limit.limit)
                )


def _meet_first(n: int, fn):
    """`fn`, whose first `n` calls wait for each other: tasks that hold their device leases at once, so a pool
    that gave two of them one slot would leave a slot unused however fast the machine runs them."""
    barrier, calls, lock = threading.Barrier(n), [0], threading.Lock()

    def wrapped(*args, **kwargs):
        with lock:
            calls[0] += 1
            first = calls[0] <= n
        if first:
            barrier.wait(timeout=120)
        return fn(*args, **kwargs)

    return wrapped


@pytest.fixture
def fresh_models(monkeypatch):
    """No teacher or VAE loaded by an earlier test; records the slot of every teacher and the device of every VAE
    loaded in this process."""
    from dmd.data.cache import build
    from dmd.data.generate import TeacherWorker

    teachers, vaes = [], []
    monkeypatch.setattr(TeacherWorker, "_shared", {})
    init = TeacherWorker.__init__

    def record_teacher(self, params, slot=None):
        init(self, params, slot)
        teachers.append(self.slot)

    monkeypatch.setattr(TeacherWorker, "__init__", record_teacher)
    # the first two shards ask for their teacher while both hold their lease
    monkeypatch.setattr(TeacherWorker, "shared", _meet_first(2, TeacherWorker.shared))
    load_vae = build.load_vae
    monkeypatch.setattr(
        build, "load_vae", lambda model, device: vaes.append(device) or load_vae(model, device)
    )
    build._vae.cache_clear()
    yield teachers, vaes
    build._vae.cache_clear()


@pytest.mark.slow
def test_two_devices_make_the_same_files_as_one(tiny_params_file, tmp_path, no_gpu_limit, fresh_models, one_thread,
                                                monkeypatch):  # fmt: skip
    """Thread runner: 3 shards on `cpu,cpu` (one thread per device) against `cpu`; then the cache of that data,
    every clip through the VAE, in chunks of 2 on both slots against one."""
    import flows.cache as cache_flow_module
    from flows.cache import cache_flow
    from flows.generate import generate_teacher_data

    teachers, vaes = fresh_models
    out = Path(load(tiny_params_file).generate.output_dir)
    one = _with(tiny_params_file, "one.yaml", generate={"device": "cpu"})
    two = _with(tiny_params_file, "two.yaml", generate={"device": "cpu,cpu", "workers": 1})

    report = generate_teacher_data(str(two))
    assert sorted(teachers) == list(TWO)  # one teacher per device
    assert set(report["placement"]) == {"0:cpu", "1:cpu"}  # every device made shards
    assert sorted(s for shards in report["placement"].values() for s in shards) == [0, 1, 2]
    out.rename(tmp_path / "two")  # the same output_dir, which the settings recorded beside the data name
    assert generate_teacher_data(str(one))["placement"] == {"0:cpu": [0, 1, 2]}
    assert len(teachers) == 2  # the one-device run sampled with slot 0's teacher, already loaded
    _assert_same_tree(out, tmp_path / "two")  # mp4, latents, noise, manifests, effective settings

    chunks = []

    def encode_chunk(params, plan, chunk, slot, real=cache_flow_module.encode_chunk):
        chunks.append(slot)
        return real(params, plan, chunk, slot)

    monkeypatch.setattr(cache_flow_module, "encode_chunk", _meet_first(2, encode_chunk))
    cache = {"use_teacher_latents": False, "chunk_size": 2}  # every clip through the VAE, 3 chunks
    cache_dir = Path(load(tiny_params_file).cache.output_dir)
    for name, devices in (("one", "cpu"), ("two", "cpu,cpu")):
        assert (
            cache_flow(str(_with(one, f"cache-{name}.yaml", cache={**cache, "device": devices}))).encoded == 6
        )
        cache_dir.rename(tmp_path / f"cache-{name}")
    assert vaes == ["cpu", "cpu", "cpu"]  # one VAE for the one-device run, then one per device
    assert len(chunks) == 3 and set(chunks) == set(TWO)  # every device encoded chunks
    _assert_same_tree(tmp_path / "cache-one", tmp_path / "cache-two")


@pytest.mark.slow
def test_a_local_dask_cluster_runs_one_worker_per_device(tiny_params_file, tmp_path, no_gpu_limit, one_thread,
                                                         monkeypatch):  # fmt: skip
    """`generate.task_runner: dask` on `cpu,cpu`: two worker processes, each pinned to its slot, make the files of a
    one-device run of the thread runner in this process."""
    from flows.generate import generate_teacher_data

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' kernels are this process's (one_thread)
    out = Path(load(tiny_params_file).generate.output_dir)
    one = _with(tiny_params_file, "one.yaml", generate={"device": "cpu"})
    dask = _with(
        tiny_params_file, "dask.yaml", generate={"device": "cpu,cpu", "task_runner": "dask", "workers": 1}
    )
    report = generate_teacher_data(str(dask))
    assert set(report["placement"]) == {"0:cpu", "1:cpu"}  # worker 0 on slot 0, worker 1 on slot 1
    out.rename(tmp_path / "dask")
    generate_teacher_data(str(one))
    _assert_same_tree(out, tmp_path / "dask")
