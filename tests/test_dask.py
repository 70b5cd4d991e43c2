"""The Dask task runner (a local 2-process cluster) generates and caches the same data as the default runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dmd.core.video import read_video
from dmd.data.cache.loader import open_cache

BIN = Path(sys.executable).parent
FIXTURES = Path(__file__).parent / "fixtures"


def _workspace(root: Path, tiny_wan_dir: Path, runner: str) -> Path:
    root.mkdir(parents=True)
    raw = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    raw["model"]["pretrained_model_name_or_path"] = str(tiny_wan_dir)
    raw["generate"].update(task_runner=runner, workers=2)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


def _teacher_data(root: Path) -> tuple[pd.DataFrame, dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """The manifest (less the video byte hashes), every saved tensor, and every video's decoded frames."""
    manifest = pd.read_parquet(root / "manifest.parquet").drop(columns=["sha256"])
    tensors = {
        f"{p.relative_to(root)}:{k}": v
        for p in sorted(root.rglob("*.safetensors"))
        for k, v in load_file(p).items()
    }
    videos = {str(p.relative_to(root)): read_video(p) for p in sorted(root.rglob("*.mp4"))}
    return manifest, tensors, videos


def _cached(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every cached sample by its source video (keys hash the video bytes), plus the negative prompt."""
    cache = open_cache(root)
    entries = {row.source: cache.load(row.key) for row in cache.index.itertuples()}
    entries["<negative>"] = {"prompt_embeds": cache.negative_prompt_embeds}
    return entries


@pytest.mark.slow
def test_dask_runner_makes_the_same_files(tmp_path, tiny_wan_dir, prefect_server):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_API_URL": prefect_server}
    outputs = {}
    for runner in ("thread", "dask"):
        ws = _workspace(tmp_path / runner, tiny_wan_dir, runner)
        for command in ("generate", "cache"):
            result = subprocess.run(
                [str(BIN / "dmd"), command], cwd=ws, env=env, capture_output=True, text=True
            )
            assert result.returncode == 0, f"{runner} {command}:\n{result.stdout}\n{result.stderr}"
        outputs[runner] = (_teacher_data(ws / "data" / "teacher"), _cached(ws / "cache"))
    (manifest, tensors, videos), cached = outputs["thread"]
    (dask_manifest, dask_tensors, dask_videos), dask_cached = outputs["dask"]

    assert len(manifest) == 6 and len(videos) == 6 and len(cached) == 7
    pd.testing.assert_frame_equal(dask_manifest, manifest)
    assert dask_tensors.keys() == tensors.keys() and any(k.endswith(":latents") for k in tensors)
    for name, tensor in tensors.items():
        assert torch.equal(dask_tensors[name], tensor), name  # teacher latents and noise: bit for bit
    assert dask_videos.keys() == videos.keys()
    for name, frames in videos.items():
        # the same latents decoded in another process may round a few pixels the other way before H.264
        diff = np.abs(dask_videos[name].astype(int) - frames.astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 16, name
    assert dask_cached.keys() == cached.keys()
    for key, entry in cached.items():
        assert dask_cached[key].keys() == entry.keys(), key
        for name, tensor in entry.items():
            if name == "latents":  # taken from the teacher's own latents (cache.use_teacher_latents)
                assert torch.equal(dask_cached[key][name], tensor), key
            else:
                torch.testing.assert_close(dask_cached[key][name], tensor, rtol=0, atol=1e-6)


def test_the_local_dask_cluster_listens_on_loopback_only(tiny_params_file):
    """Scheduler, dashboard, nannies and workers of `generate.task_runner: dask` (a local cluster)."""
    import psutil

    from dmd.core.config import load
    from flows.generate import _task_runner

    cfg = load(tiny_params_file, ["generate.task_runner=dask", "generate.workers=2"]).generate
    with _task_runner(cfg) as runner:
        runner.client.wait_for_workers(2)  # the cluster starts with the runner's client
        tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
        listening = {
            (c.laddr.ip, c.laddr.port)
            for member in tree
            for c in member.net_connections("inet")
            if c.status == psutil.CONN_LISTEN
        }
    assert len(listening) >= 5  # scheduler, dashboard, and each worker's nanny and worker
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
