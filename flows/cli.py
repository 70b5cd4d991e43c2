"""The `dmd` command. Each stage command runs that stage's Prefect flow; the others call the library directly.

Every stage command takes `--params FILE` (default params.yaml) and repeatable `--set section.key=value`. The
settings are read and checked before Prefect starts, so a bad key or value ends with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from dmd.core.config import ConfigError, load

# Telemetry is off unless the user chose otherwise: the pipeline is meant to run offline, where every attempt to
# send it ends in an error line. Set before Prefect or DVC is imported, which read them once.
TELEMETRY_OFF = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}

# The temporary Prefect server a flow command starts without PREFECT_API_URL migrates a fresh database on first
# start, slower than Prefect's default startup timeout allows on a busy machine.
EPHEMERAL_STARTUP_SECONDS = 180

# command -> "module:function", a leading dot for this package's modules; imported only when their command runs
HANDLERS = {
    "toy-teacher": ".toy_teacher:main",
    "generate": ".generate:main",
    "backfill": ".generate:backfill_main",
    "cache": ".cache:main",
    "ode-init": ".ode_init:main",
    "train": ".train:main",
    "evaluate": ".evaluate:main",
    "pipeline": ".pipeline:main",
    "serve": ".pipeline:serve_main",
    "sample": "dmd.student.sample:main",
    "judge": "dmd.toy.judge:main",
    "wan-skeleton": "dmd.wan.skeleton:main",
}
SET_HELP = (
    "override one setting (repeatable); VALUE is read as YAML 1.2, as in params.yaml: `key=a red square, moving` "
    "is that text, `key=` the empty string, `key=null` null, `key=[1000, 757]` a list; checked like the file"
)
# The commands that run Prefect flows (the others never import Prefect).
FLOW_COMMANDS = {
    "toy-teacher", "generate", "backfill", "cache", "ode-init", "train", "evaluate", "pipeline", "serve",
}  # fmt: skip


def _settings(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=SET_HELP,
    )
    return p


class _Commands:
    """`add_parser` that also shows the one-line help as the command's own `--help` description."""

    def __init__(self, subparsers):
        self.subparsers = subparsers

    def add_parser(self, name: str, *, help: str, **kwargs) -> argparse.ArgumentParser:
        kwargs.setdefault("description", help[0].upper() + help[1:] + ".")
        return self.subparsers.add_parser(name, help=help, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dmd-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = _Commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    config = sub.add_parser("config", help="check or import settings")
    csub = _Commands(config.add_subparsers(dest="config_command", required=True, metavar="COMMAND"))
    v = csub.add_parser("validate", help="validate a params file; one message per problem")
    v.add_argument("file", nargs="?", default="params.yaml")
    v.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=SET_HELP
    )
    imp = csub.add_parser("import-simpletuner", help="turn a SimpleTuner-style config.json into params.yaml")
    imp.add_argument("config_json")
    imp.add_argument("--backend", help="its multidatabackend.json")
    imp.add_argument("-o", "--output", help="write here (default: print to stdout)")

    t = _settings(sub.add_parser("toy-teacher", help="train the toy world's tiny Wan teacher"))
    t.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on (default: cpu). Data order and noise are the same on every device; the "
        "weights differ by rounding, and the shipped teacher and its dvc.lock entry were trained on the CPU",
    )
    g = _settings(sub.add_parser("generate", help="generate teacher videos, sharded and resumable"))
    g.add_argument("--shards", help="A:B, the shard range to generate (default: all missing)")
    b = _settings(
        sub.add_parser("backfill", help="schedule generation runs for a shard range on a Prefect server")
    )
    b.add_argument("--shards", required=True, help="A:B")
    b.add_argument("--per-run", type=int, default=1, help="shards per flow run")
    b.add_argument("--start-at", help="ISO time of the first run (default: now)")
    b.add_argument("--every", default="0s", help="spacing between runs, e.g. 10m, 1h (default: all at once)")
    _settings(sub.add_parser("cache", help="encode VAE latents and T5 embeddings into the cache"))
    _settings(
        sub.add_parser(
            "ode-init",
            help="regress the student on the teacher's ODE trajectories, before DMD",
            description="With ode_init.enabled: regress the student (block-causal when train.causal) on the "
            "teacher's trajectories in the cache (generate.save_trajectory) and write it to ode_init.output_dir, "
            "where training starts from it; otherwise record that DMD starts from the teacher.",
        )
    )
    _settings(
        sub.add_parser(
            "train",
            help="DMD-train the few-step student",
            description="DMD-train the few-step student from the cache and export it to train.output_dir. With "
            "train.resume_from_checkpoint: latest it continues the newest checkpoint of the same run that lies at "
            "or before train.max_train_steps, and says which; a checkpoint of other settings, or past the end, "
            "is moved aside and training starts afresh.",
        )
    )
    _settings(
        sub.add_parser(
            "evaluate",
            help="compare student and teacher: speed, quality, report",
            description="Sample the student, the teacher at full steps with CFG and the teacher at the student's "
            "step count on the same prompts and noise; write evaluate.metrics_path and evaluate.report_dir/eval.md.",
        )
    )
    pl = _settings(
        sub.add_parser(
            "pipeline",
            help="run the whole DAG (dvc repro) as the dmd-pipeline flow",
            description="Run the dmd-pipeline flow: --set values are written into params.yaml (as `dvc exp run "
            "-S` writes them), then each stage is reproduced with `dvc repro --single-item`, in DAG order. Uses "
            "the Prefect server at PREFECT_API_URL, or a temporary one.",
        )
    )
    pl.add_argument("--target", default=None, help="stop after this stage (default: all)")
    _settings(
        sub.add_parser(
            "serve",
            help="serve the deployments (dmd-pipeline/default, backfill) with a runner",
            description="Serve dmd-pipeline/default (runs on demand) and generate-teacher-data/backfill, which is "
            "scheduled: every generate.backfill_interval_seconds (or generate.backfill_cron) it generates the next "
            "generate.backfill_shards_per_run missing teacher shards. Set both to null to serve it unscheduled. "
            "Needs a Prefect server (PREFECT_API_URL).",
        )
    )

    s = _settings(sub.add_parser("sample", help="generate videos with a trained student"))
    s.add_argument("--student", required=True, help="the exported student directory")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default="samples", help="folder for the mp4s")

    j = sub.add_parser("judge", help="score toy-world videos against their captions")
    j.add_argument("videos", nargs="+", help="mp4 files")
    j.add_argument("--prompts", nargs="+", help="one caption per video, or one .txt/.json file of captions")
    j.add_argument("--params", default="params.yaml", help="for the toy world's settings")
    j.add_argument("--output", help="write the JSON here as well as printing it")

    w = sub.add_parser(
        "wan-skeleton",
        help="write a random-weight diffusers Wan 2.1 directory of the real shapes, for a dry run",
        description="Write a diffusers Wan 2.1 T2V directory with the real configs' widths and freshly initialised "
        "random weights (same --seed, same bytes), and a locally built tokenizer; nothing is downloaded. "
        "WanPipeline.from_pretrained loads it: point model.pretrained_model_name_or_path at it for a dry run "
        "before downloading the real weights.",
    )
    w.add_argument("output", help="the directory to write (replaced atomically if it exists)")
    w.add_argument(
        "--config",
        default="1.3b",
        help="1.3b or 14b (Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, shipped as JSON), or a folder holding "
        "model_index.json and the transformer/, vae/, scheduler/, text_encoder/ configs (default: 1.3b)",
    )
    w.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    w.add_argument(
        "--num-layers",
        type=int,
        help="transformer blocks, at full width (default: the config's, 30 for 1.3b)",
    )
    w.add_argument(
        "--text-encoder-layers",
        type=int,
        help="UMT5 encoder blocks, at full width (default: the config's, 24)",
    )
    w.add_argument(
        "--vocab-size",
        type=int,
        help="rows of the text encoder's token embedding (default: the local tokenizer's size, far below the "
        "config's 256,384: the real embedding would be about 4 GB of random numbers that no local token id reaches)",
    )
    w.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the saved weights (default: fp32)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            from dmd.data import simpletuner

            return simpletuner.config_command(args)
        if hasattr(args, "overrides"):
            load(args.params, args.overrides)  # bad settings end here, before any flow or model is loaded
        module, func = HANDLERS[args.command].split(":")
        handler = getattr(importlib.import_module(module, __package__), func)
        if args.command not in FLOW_COMMANDS:
            return handler(args) or 0
        from dmd.core.process import stop_children_with_this_process, stop_with_parent

        from .logs import route_library_logs

        stop_with_parent()  # a killed `dvc repro` or pipeline run takes its stage with it, instead of an orphan
        stop_children_with_this_process()  # and a killed stage its temporary Prefect server, workers, launchers
        route_library_logs()
        with _temporary_server_settings():
            return handler(args) or 0
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _temporary_server_settings():
    """Without a configured Prefect server a flow runs on a temporary one that stops with the command: the
    "View at http://…" links Prefect prints would lead nowhere, so leave them out, and give it time to start."""
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        get_current_settings,
        temporary_settings,
    )

    if get_current_settings().api.url:
        yield
        return
    startup = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), EPHEMERAL_STARTUP_SECONDS)
    with temporary_settings({PREFECT_UI_URL: "", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: startup}):
        yield


if __name__ == "__main__":
    sys.exit(main())
