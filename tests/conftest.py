"""Test environment: offline, no telemetry, a private Prefect home; shared tiny-model fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_HOME = Path(tempfile.mkdtemp(prefix="dmd-tests-"))
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HOME=str(_HOME / "hf"),
    WANDB_MODE="disabled",
    WANDB_DIR=str(_HOME / "wandb"),
    DO_NOT_TRACK="1",
    PREFECT_HOME=str(_HOME / "prefect"),
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
    PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    DVC_NO_ANALYTICS="1",
    TOKENIZERS_PARALLELISM="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
)
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    """A tiny diffusers Wan directory (random weights, local tokenizer), built once per test session."""
    from dmd.wan.tiny import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "tiny-wan")


@pytest.fixture
def tiny_params_file(tmp_path, tiny_wan_dir) -> Path:
    """tests/fixtures/tiny.yaml with the model pointed at the tiny Wan and outputs under tmp_path."""
    import yaml

    raw = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    raw["model"]["pretrained_model_name_or_path"] = str(tiny_wan_dir)
    for section, key in [
        ("generate", "output_dir"),
        ("cache", "output_dir"),
        ("ode_init", "output_dir"),
        ("train", "output_dir"),
        ("train", "checkpoint_dir"),
        ("evaluate", "metrics_path"),
        ("evaluate", "report_dir"),
        ("evaluate", "videos_dir"),
        ("evaluate", "teacher_reference_dir"),
    ]:
        raw[section][key] = str(tmp_path / raw[section][key])
    raw["cache"]["datasets"][0]["manifest"] = raw["generate"]["output_dir"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
def tiny_params(tiny_params_file):
    from dmd.core.config import load

    return load(tiny_params_file)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback (SQLite in a temporary PREFECT_HOME); yields its API URL and
    points this process (and subprocesses started with os.environ) at it."""
    from flows.local_server import local_prefect_server

    with local_prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old


@pytest.fixture
def one_thread():
    """Bit-exact comparisons across runs and processes need the same kernels: one thread everywhere."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
