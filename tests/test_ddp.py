"""Two CPU processes (gloo) through dmd.training.launch: the run completes, the replicas stay identical, and every socket
is on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time

import pytest
from train_world import build_cache, run_params

from dmd.training.checkpoint import CheckpointManager
from flows.train import launch_command

pytestmark = pytest.mark.slow


def _listening_sockets_until_exit(process: subprocess.Popen, timeout: float) -> set[tuple[str, int]]:
    """(address, port) of every socket `process` or its descendants listened on while it ran."""
    import psutil

    seen, deadline = set(), time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in tree:
            try:
                seen |= {
                    (c.laddr.ip, c.laddr.port) for c in member.net_connections("inet") if c.status == "LISTEN"
                }
            except psutil.Error:
                pass
        time.sleep(0.2)
    process.wait(timeout=max(1.0, deadline - time.monotonic()))
    return seen


def test_two_processes_keep_identical_replicas(tmp_path, tiny_wan_dir):
    world = build_cache(tmp_path / "world", tiny_wan_dir)
    run = tmp_path / "ddp"
    params_file = run_params(world, run, max_train_steps=3, checkpoint_step_interval=1, train_batch_size=1,
                             num_processes=2, report_to="dvclive")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryFile("w+") as out:
        launcher = subprocess.Popen(launch_command(str(params_file), [], 2), env=env, stdout=out,
                                    stderr=subprocess.STDOUT, text=True)  # fmt: skip
        listening = _listening_sockets_until_exit(launcher, timeout=600)
        out.seek(0)
        log = out.read()
    assert launcher.returncode == 0, log[-3000:]
    # the launcher's rendezvous store and the workers' gloo sockets, all on loopback
    assert listening and {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    assert "training 0/3 steps on 2 process(es)" in log
    # each checkpoint compares sha256 digests of both processes' student and critic weights
    digests = re.findall(r"replicas identical on 2 processes \(student (\w+), critic (\w+)\)", log)
    assert len(digests) == 2 * 3, log[-3000:]  # logged by both processes at steps 1, 2, 3
    assert len(set(digests)) == 3  # the weights changed every step, identically on both
    assert [p.name for p in CheckpointManager(run / "checkpoints", 3).checkpoints()] == [
        "checkpoint-0000001", "checkpoint-0000002", "checkpoint-0000003"
    ]  # fmt: skip
    assert (run / "student" / "student.json").is_file()
    rows = (run / "metrics" / "plots" / "metrics" / "fake_score_loss.tsv").read_text().splitlines()
    assert len(rows) == 4  # one writer: a header and one row per step
