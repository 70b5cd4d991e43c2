"""Orchestration overhead: the DAG run as bare stage commands vs through `dmd pipeline` (Prefect + DVC), and the
time of a no-op `dvc repro` / `dmd pipeline`.

    .venv/bin/python benchmarks/pipeline.py [--profile default|tiny]

Each side runs in its own fresh copy of the project layout (dvc.yaml, dmd/ sources, params.yaml, the teacher
as toy_teacher's committed output). `default` is params.yaml with the shipped toy teacher (models/toy-teacher);
`tiny` is tests/fixtures/tiny.yaml with a tiny random Wan (seconds per stage, so the overhead share is much
larger than on a real run). Default: `default` when the toy teacher exists, else `tiny`. Both sides report to
one Prefect server started here on loopback. Writes benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dmd.core.config import dump, load  # noqa: E402
from dmd.core.io import write_json  # noqa: E402
from dmd.wan.tiny import save_tiny_wan  # noqa: E402
from flows.local_server import local_prefect_server  # noqa: E402

BIN = Path(sys.executable).parent
TOY_TEACHER = REPO / "models" / "toy-teacher"
STAGES = ["generate", "cache", "train", "evaluate"]  # toy_teacher is shipped: up to date in every copy
TARGET_OVERHEAD = 0.10


def sh(cmd: list[str], cwd: Path) -> float:
    """Run a command (the project's scripts first on PATH); its wall time in seconds."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds


@contextmanager
def prefect_server(home: Path):
    """A Prefect server on loopback for the whole benchmark; yields its API URL."""
    try:
        with local_prefect_server(home / "prefect") as url:
            yield url
    except RuntimeError as e:
        sys.exit(str(e))


def workspace(root: Path, profile: str, teacher: Path) -> Path:
    root.mkdir(parents=True)
    sh(["git", "init", "-q"], root)
    sh([str(BIN / "dvc"), "init", "-q"], root)
    sh([str(BIN / "dvc"), "config", "core.analytics", "false"], root)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "dmd", root / "dmd", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    source = REPO / ("params.yaml" if profile == "default" else "tests/fixtures/tiny.yaml")
    overrides = ["model.pretrained_model_name_or_path=models/toy-teacher", "train.report_to=dvclive"]
    (root / "params.yaml").write_text(dump(load(source, overrides)))
    shutil.copytree(teacher, root / "models" / "toy-teacher")
    sh([str(BIN / "dvc"), "commit", "-f", "toy_teacher"], root)
    sh(["git", "add", "-A"], root)
    sh(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "workspace"],
        root,
    )
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["default", "tiny"], default=None)
    args = parser.parse_args()
    profile = args.profile or ("default" if (TOY_TEACHER / "model_index.json").exists() else "tiny")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    with tempfile.TemporaryDirectory(prefix="dmd-bench-pipeline-") as tmp, prefect_server(Path(tmp)) as api:
        tmp = Path(tmp)
        os.environ["PREFECT_API_URL"] = api  # one server for both sides: each bare command would otherwise
        # start (and migrate) a temporary server of its own, which the pipeline shares across its stages
        teacher = TOY_TEACHER if profile == "default" else save_tiny_wan(tmp / "tiny-wan")
        bare = workspace(tmp / "bare", profile, teacher)
        orchestrated = workspace(tmp / "orchestrated", profile, teacher)

        stage_seconds = {}
        for stage in STAGES:
            stage_seconds[stage] = sh([str(BIN / "dmd"), stage], bare)
            print(f"  dmd {stage}: {stage_seconds[stage]:.1f} s", flush=True)
        bare_total = sum(stage_seconds.values())
        pipeline_seconds = sh([str(BIN / "dmd"), "pipeline"], orchestrated)
        print(f"  dmd pipeline: {pipeline_seconds:.1f} s", flush=True)
        noop_repro = min(sh([str(BIN / "dvc"), "repro"], orchestrated) for _ in range(3))
        noop_pipeline = sh([str(BIN / "dmd"), "pipeline"], orchestrated)

    overhead = (pipeline_seconds - bare_total) / pipeline_seconds
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    rows = [
        ("stage commands alone (sum)", bare_total, 1.0),
        ("dmd pipeline (Prefect + DVC)", pipeline_seconds, pipeline_seconds / bare_total),
        ("no-op dvc repro", noop_repro, noop_repro / bare_total),
        ("no-op dmd pipeline", noop_pipeline, noop_pipeline / bare_total),
    ]
    print(f"\nprofile {profile}; {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}")
    print(f"{'run':34} {'seconds':>9} {'vs bare':>9}")
    for name, seconds, ratio in rows:
        print(f"{name:34} {seconds:9.1f} {ratio:9.3f}")
    verdict = "meets" if overhead <= TARGET_OVERHEAD else "misses"
    print(
        f"orchestration overhead: {overhead:.1%} of the pipeline's wall time ({verdict} the {TARGET_OVERHEAD:.0%} target)"
    )

    write_json(
        REPO / "benchmarks" / "results" / "pipeline.json",
        {
            "profile": profile,
            "machine": machine,
            "stage_seconds": stage_seconds,
            "bare_total_seconds": bare_total,
            "pipeline_seconds": pipeline_seconds,
            "overhead_fraction": overhead,
            "target_overhead_fraction": TARGET_OVERHEAD,
            "noop_dvc_repro_seconds": noop_repro,
            "noop_dmd_pipeline_seconds": noop_pipeline,
        },
    )


if __name__ == "__main__":
    main()
