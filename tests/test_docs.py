"""Every shell block and Python snippet of README.md and docs/orchestration.md, run as printed, in document order.

The blocks run in a scratch DVC workspace laid out as a checkout (the real dvc.yaml, prefect.yaml, .dvc/config and
its offline plots page, `.venv`) on the tiny profile: a tiny random Wan as the shipped teacher, a few tiny videos,
so the whole DAG takes seconds per stage instead of minutes. The commands themselves are not changed, except for:

- SUBSTITUTIONS: the documented port 4200 becomes a free port (other servers may hold 4200 on this machine) and the
  documented remote /srv/dvc-store a scratch folder;
- a command that keeps running (a server, a runner, a worker) is started in the background, the block goes on once
  it answers, and it is stopped after the block, once every flow run it was given has finished;
- SKIPPED_LINES are left out of their block, with the reason.

NOT_RUN lists the blocks that cannot run here and why; a block that is in neither list fails the test, and so does
a listed block that no longer exists, so a new or changed block has to be run or explained.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_dvc import FIXTURES, git_commit, make_tiny_workspace

from dmd.core.config import dump, load

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = ("README.md", "docs/orchestration.md")
LANGUAGES = ("bash", "sh", "python")

# Blocks that cannot run here, by their first command line, and why.
NOT_RUN = {
    ("README.md", "make demo"): "`make demo` runs the default pipeline (minutes of CPU) and `make test` the suite, "
    "this test included; `make demo` is `dmd pipeline`, run here on the tiny profile in 'Running it'",
    ("README.md", ".venv/bin/dmd wan-skeleton wan-dry-run --config 1.3b --num-layers 1 --text-encoder-layers 1"): (
        "run as printed by tests/test_readme_dry_run.py"
    ),
    ("README.md", "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir /models/wan2.1-1.3b"): (
        "downloads 30 GB from the Hugging Face hub and needs a GPU; tests/test_real_shapes.py runs the seed's "
        "imported config on a 1.3B-width skeleton instead"
    ),
    ("README.md", ".venv/bin/python benchmarks/toy_teacher.py"): (
        "each benchmark measures the default toy world for minutes to an hour of CPU"
    ),
    ("docs/orchestration.md", "export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://prefect:PASSWORD@db-host:5432/prefect"): (
        "placeholders for a PostgreSQL host and password, and a server on all interfaces; tests/test_postgres.py "
        "runs a server on a throwaway PostgreSQL (scripts/ci-postgres.sh) on loopback"
    ),
    ("docs/orchestration.md", "accelerate launch --config_file multi-node.yaml -m dmd.training.loop params.yaml"): (
        "needs several machines and their accelerate config; tests/test_ddp.py runs training under accelerate "
        "launch on one"
    ),
}  # fmt: skip
SKIPPED_LINES = {
    "dvc exp apply <name>": "<name> is a placeholder for an experiment's name",
}
BACKGROUND = ("prefect server start", "dmd serve", "prefect worker start")


@dataclass
class Block:
    doc: str
    language: str
    text: str

    @property
    def commands(self) -> list[str]:
        return [
            line.strip()
            for line in self.text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        ]

    @property
    def key(self) -> tuple[str, str]:
        first = self.commands[0] if self.language != "python" else "python"
        return self.doc, re.sub(r"\s+#\s.*$", "", first).strip()


def doc_blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, flags=re.S | re.M):
            indent, language, body = match.groups()
            if language in LANGUAGES:
                body = "\n".join(line[len(indent) :] for line in body.splitlines())
                blocks.append(Block(doc, language, body))
    return blocks


# --------------------------------------------------------------------------------------------------------------
# The workspace and the block runner


def build_workspace(root: Path, tiny_wan_dir: Path, overrides: list[str]) -> Path:
    """The tiny pipeline as a checkout: six one-video shards (the documented backfill ranges fit), a full student
    (the default's model_type, so the README's snippet loads it), the offline plots page, prefect.yaml, .venv."""
    root = make_tiny_workspace(root, tiny_wan_dir)
    overrides = [
        "model.pretrained_model_name_or_path=models/toy-teacher",
        "train.report_to=dvclive",
        "train.model_type=full",
        "generate.shard_size=1",
        "generate.batch_size=1",
        *overrides,
    ]
    (root / "params.yaml").write_text(dump(load(FIXTURES / "tiny.yaml", overrides)))
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    shutil.copy(REPO / "prefect.yaml", root / "prefect.yaml")
    # prefect.yaml's entrypoints
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("config.json", "multidatabackend.json"):  # the user's SimpleTuner files the README imports
        shutil.copy(FIXTURES / "seed" / name, root / name)
    (root / ".venv").symlink_to(BIN.parent)
    git_commit(root, "docs workspace")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_wan_dir) -> Path:
    # the docs train 1200 steps three times: a checkpoint every 100 steps and a validation every 400 keep that short
    overrides = ["train.checkpoint_step_interval=100", "train.validation_step_interval=400"]
    return build_workspace(tmp_path_factory.mktemp("docs") / "workspace", tiny_wan_dir, overrides)


class Runner:
    """Runs blocks in the workspace with one environment: the project's .venv on PATH (as after `source
    .venv/bin/activate`), a Prefect home of its own, a git identity for the commits the docs make."""

    def __init__(self, workspace: Path, scratch: Path):
        self.workspace, self.scratch = workspace, scratch
        from flows.local_server import free_port

        self.port = free_port()
        self.substitutions = {"4200": str(self.port), "/srv/dvc-store": str(scratch / "dvc-store")}
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(scratch / "prefect-home"),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "GIT_AUTHOR_NAME": "docs",
            "GIT_AUTHOR_EMAIL": "docs@localhost",
            "GIT_COMMITTER_NAME": "docs",
            "GIT_COMMITTER_EMAIL": "docs@localhost",
            "OMP_NUM_THREADS": "1",
        }
        self.count = 0

    def substitute(self, text: str) -> str:
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        return text

    def run(self, block: Block, timeout: float = 1500) -> subprocess.CompletedProcess:
        self.count += 1
        folder = self.scratch / f"block-{self.count:02d}"
        folder.mkdir()
        if block.language == "python":
            script = folder / "snippet.py"
            script.write_text(block.text)
            return self._finish(
                subprocess.run(
                    [sys.executable, str(script)],
                    cwd=self.workspace,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                ),  # fmt: skip
                block,
            )
        pids = folder / "pids"
        lines = ["set -eo pipefail", WAIT_UNTIL]
        for n, line in enumerate(self.substitute(block.text).splitlines()):
            command = line.strip()
            if not command or command.startswith("#"):
                continue
            if re.sub(r"\s+#\s.*$", "", command) in SKIPPED_LINES:
                continue
            if command.startswith(BACKGROUND):
                job = folder / f"job-{n}.sh"
                job.write_text(command + "\n")
                lines.append(f"setsid bash {job} > {folder}/job-{n}.log 2>&1 & echo $! >> {pids}")
                lines.append(self._ready(command, folder / f"job-{n}.log"))
            else:
                lines.append(line)
        script = folder / "block.sh"
        script.write_text("\n".join(lines) + "\n")
        try:
            result = subprocess.run(["bash", str(script)], cwd=self.workspace, env=self.env, capture_output=True,
                                    text=True, timeout=timeout)  # fmt: skip
            if pids.exists() and result.returncode == 0:
                own = "prefect server start" in block.text
                self._wait_for_flow_runs(
                    f"http://127.0.0.1:{self.port}/api" if own else self.env["PREFECT_API_URL"]
                )
        finally:
            for pid in pids.read_text().split() if pids.exists() else []:
                _stop_group(int(pid))
        return self._finish(result, block)

    def _ready(self, command: str, log: Path) -> str:
        if command.startswith("prefect server start"):
            url = f"http://127.0.0.1:{self.port}/api/health"
            return f'wait_until "python -c \'import httpx; httpx.get(\\"{url}\\").raise_for_status()\'"'
        if command.startswith("dmd serve"):
            return "wait_until 'prefect deployment ls | grep -q dmd-pipeline/default'"
        return f"wait_until 'grep -q \"started\" {log}'"

    def _wait_for_flow_runs(self, api_url: str, timeout: float = 1200) -> None:
        """Until no flow run on the block's server is pending, running, or scheduled before now."""
        code = (
            "import datetime, sys\n"
            "from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=\n"
            "        FlowRunFilterStateType(any_=['PENDING', 'RUNNING', 'SCHEDULED']))))\n"
            "now = datetime.datetime.now(datetime.timezone.utc)\n"
            "busy = [r for r in runs if r.state.type.value != 'SCHEDULED' or r.expected_start_time <= now]\n"
            "sys.exit(1 if busy else 0)\n"
        )
        env = {**self.env, "PREFECT_API_URL": api_url}
        deadline = time.monotonic() + timeout
        while subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode:
            assert time.monotonic() < deadline, "flow runs still busy"
            time.sleep(3)

    @staticmethod
    def _finish(result: subprocess.CompletedProcess, block: Block) -> subprocess.CompletedProcess:
        assert result.returncode == 0, (
            f"{block.doc}: block starting `{block.key[1]}` failed ({result.returncode})\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
        return result


WAIT_UNTIL = """wait_until() {
    for _ in $(seq 600); do
        if bash -c "$1" > /dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "gave up waiting for: $1" >&2; return 1
}"""


def _stop_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------------


def test_every_block_is_run_or_explained():
    keys = [b.key for b in doc_blocks()]
    assert len(keys) == len(set(keys)), "two blocks open with the same line: tell them apart"
    assert set(NOT_RUN) <= set(keys), f"listed blocks no longer in the docs: {set(NOT_RUN) - set(keys)}"
    texts = "\n".join(b.text for b in doc_blocks())
    assert all(line in texts for line in SKIPPED_LINES)


def test_the_readme_snippet_is_the_model_cards_for_the_default_settings(tmp_path):
    """The README shows what the default exports, as its model card prints it (the card's paths are relative to
    the card, `student/`; the README's to the project root, `output/student/`)."""
    from dmd.distill.rollout import RolloutSchedule
    from dmd.student.export import student_card, write_model_card

    params = load(REPO / "params.yaml")
    card = student_card(params, RolloutSchedule.from_params(params), ema=True, step=1, sigma_error=0.0)
    student = tmp_path / Path(params.train.run.output_dir).name
    student.mkdir()
    text = write_model_card(student, params, card=card, path=student / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    (readme,) = [b for b in doc_blocks() if b.language == "python" and b.doc == "README.md"]
    expected = snippet.replace(f'"{student.name}"', f'"{params.train.run.output_dir}"').replace(
        '"a prompt"', f'"{params.train.validation.validation_prompt}"'
    )
    assert readme.text.strip() == expected.strip()


# every documented command, the whole tiny DAG several times over: longer than the suite's per-test limit on a
# loaded 2-core machine
@pytest.mark.timeout(2700)
def test_the_docs_run_as_printed(workspace, tmp_path):
    runner = Runner(workspace, tmp_path)
    from flows.local_server import local_prefect_server

    # Blocks that assume a server (PREFECT_API_URL set, as the docs' server section leaves the shell) talk to this
    # one; blocks that start their own export their own URL.
    with local_prefect_server(tmp_path / "server") as url:
        runner.env["PREFECT_API_URL"] = url
        ran = []
        for block in doc_blocks():
            if block.key in NOT_RUN:
                continue
            if block.key == ("README.md", ".venv/bin/dmd config validate params.yaml"):
                # the block ends by replacing params.yaml with the imported config, as it says; the blocks after it
                # need the workspace's own
                kept = (workspace / "params.yaml").read_bytes()
                result = runner.run(block)
                assert "todo: generate.prompts" in result.stderr
                (workspace / "params.yaml").write_bytes(kept)
            else:
                result = runner.run(block)
            ran.append(block.key)
            _check(block, result, workspace)
        assert len(ran) == len(doc_blocks()) - len(NOT_RUN)


def _check(block: Block, result: subprocess.CompletedProcess, workspace: Path) -> None:
    """What a block promises beyond its exit code."""
    output = result.stdout + result.stderr
    if block.key == ("README.md", "source .venv/bin/activate"):
        page = (workspace / "dvc_plots" / "index.html").read_text()
        assert "https://cdn" not in page and "vega-embed" in page  # renders offline
        assert (
            "eval_grid.png" in page and "eval_side_by_side.gif" in page and "validation" in page
        )  # image plots
        assert "speedup_dit" in output
        headline = json.loads((workspace / "metrics" / "eval.json").read_text())
        assert (
            "teacher_full" not in headline and "sharpness" in headline["student"]
        )  # the headline figures only
