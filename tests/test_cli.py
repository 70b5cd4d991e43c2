"""The `dmd` command as a new user meets it: errors in one line before Prefect starts, one `--set` grammar,
descriptions in every `--help`, a version."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmd.core.config import apply_overrides, load, read_raw

REPO = Path(__file__).resolve().parents[1]
DMD = str(Path(sys.executable).with_name("dmd"))


def dmd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DMD, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def workspace(tmp_path) -> Path:
    """The default params.yaml and the shipped toy teacher, and nothing built yet."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "models").symlink_to(REPO / "models")
    return tmp_path


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "temporary server" not in result.stderr + result.stdout
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_bad_key_ends_in_one_line_before_prefect(workspace):
    result = dmd("train", "--set", "train.max_train_stepz=40", cwd=workspace)
    assert result.returncode == 2
    line = _one_line_error(result)
    assert "train.max_train_stepz: unknown key; did you mean 'train.max_train_steps'?" in line
    for command in ("pipeline", "generate", "evaluate", "cache"):
        assert dmd(command, "--set", "generate.height=30", cwd=workspace).returncode == 2


def test_a_missing_cache_ends_in_one_line_before_prefect(workspace):
    result = dmd("train", cwd=workspace)
    assert result.returncode == 1
    assert "cache/index.parquet: missing; build the cache with `dmd cache`" in _one_line_error(result)


@pytest.mark.parametrize(
    "override, value",
    [
        ("train.validation_prompt=a red square, moving", "a red square, moving"),
        ("train.validation_prompt='quoted, as Hydra wants it'", "quoted, as Hydra wants it"),
        ("train.validation_prompt=", ""),  # as `dvc exp run -S key=` writes it
        ("train.validation_prompt=null", None),
        ("train.validation_prompt=no", "no"),  # YAML 1.2, as params.yaml
    ],
)
def test_one_set_grammar(override, value):
    assert load(REPO / "params.yaml", [override]).train.validation.validation_prompt == value
    assert apply_overrides(read_raw(REPO / "params.yaml"), [override])["train"]["validation_prompt"] == value


def test_version_and_descriptions(workspace):
    from importlib.metadata import version

    assert dmd("--version", cwd=workspace).stdout.strip() == f"dmd {version('dmd-pipeline')}"
    from flows.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.description, f"dmd {name} --help has no description"
    assert "scheduled" in commands["serve"].description  # the backfill deployment it also serves


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("2d", 172800), ("1 day 6 hours", 108000), ("45", 45)],
)
def test_backfill_spacing_reads_durations(text, seconds):
    from flows.generate import parse_duration

    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["soon", "-5m", ""])
def test_backfill_spacing_refuses_what_is_not_a_duration(text):
    from dmd.data.generate import GenerationError
    from flows.generate import parse_duration

    with pytest.raises(GenerationError, match="expected a duration"):
        parse_duration(text)


def test_stage_lines_copied_into_the_pipeline_carry_one_timestamp(tmp_path):
    """The dmd-pipeline task stamps each line it copies from a stage: the stage's own console lines carry none."""
    from flows.logs import UNSTAMPED_CONSOLE_FORMATS

    code = (
        "from prefect import flow, get_run_logger\n"
        "@flow(name='stage')\n"
        "def stage():\n"
        "    get_run_logger().info('a stage line')\n"
        "stage()\n"
    )
    env = {**os.environ, **UNSTAMPED_CONSOLE_FORMATS, "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    (line,) = [x for x in result.stderr.splitlines() if "a stage line" in x]
    assert re.fullmatch(r"INFO +\| Flow run '[\w-]+' - a stage line", line), line


@pytest.fixture
def no_temporary_server(monkeypatch):
    """No Prefect server configured, and starting the temporary one fails the command: yields the list of start
    attempts (empty when a command ends before Prefect starts)."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    attempts = []

    def start(server, timeout=None):
        attempts.append(server)
        raise RuntimeError("a temporary Prefect server was started")

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield attempts


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        (
            "generate",
            ["model.pretrained_model_name_or_path=not-wan"],
            "model.pretrained_model_name_or_path: not-wan/model_index.json: missing",
        ),
        ("generate", ["generate.prompts=captions.txt"], "generate.prompts: captions.txt not found"),
        (
            "cache",
            [],
            "cache.datasets[0].manifest: 'data/teacher' has no manifest.parquet (nor shard-*/manifest.parquet); "
            "run `dmd generate` first",
        ),
        (
            "cache",
            ["cache.datasets=[{id: clips, instance_data_dir: clips}]"],
            "cache.datasets[0].instance_data_dir: 'clips' is not a directory",
        ),
        (
            "cache",
            ["model.pretrained_model_name_or_path=not-wan"],
            "model.pretrained_model_name_or_path: not-wan/model_index.json: missing",
        ),
        (
            "cache",
            ["model.pretrained_model_name_or_path=./models/wan-1.3b"],
            "model.pretrained_model_name_or_path './models/wan-1.3b': this path does not exist",
        ),
    ],
)
def test_a_missing_input_ends_in_one_line_before_prefect(
    workspace, monkeypatch, capsys, no_temporary_server, command, overrides, message
):
    """`dmd generate` and `dmd cache` check the files they read before Prefect starts, as `dmd train` does: one
    line naming the setting or file and the fix, exit code 2, and nothing written."""
    from flows.cli import main

    (workspace / "not-wan").mkdir()
    (workspace / "not-wan" / "config.json").write_text("{}")
    monkeypatch.chdir(workspace)
    before = _files(workspace)
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert main([command, *sets]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert no_temporary_server == []
    assert _files(workspace) == before
