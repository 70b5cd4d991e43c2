"""A tiny training world for the training-run tests: teacher data and cache built once, runs in their own folders."""

from __future__ import annotations

from pathlib import Path

import yaml

FIXTURES = Path(__file__).parent / "fixtures"


def build_cache(root: Path, tiny_wan_dir: Path) -> dict:
    """tests/fixtures/tiny.yaml pointed at the tiny Wan, its teacher data generated and cached under `root`."""
    from dmd.core.config import validate
    from dmd.data import generate
    from dmd.data.cache.build import build_cache as encode

    raw = yaml.safe_load((FIXTURES / "tiny.yaml").read_text())
    raw["model"]["pretrained_model_name_or_path"] = str(tiny_wan_dir)
    raw["generate"]["output_dir"] = str(root / "data")
    raw["cache"]["output_dir"] = str(root / "cache")
    raw["cache"]["datasets"][0]["manifest"] = str(root / "data")
    params = validate(raw)
    generate.generate_teacher_data(params)
    encode(params)
    return raw


def run_params(base: dict, run_dir: Path, **train) -> Path:
    """A params file for one run: outputs under `run_dir`, `train` keys overridden."""
    import copy

    raw = copy.deepcopy(base)
    dirs = dict(
        output_dir=str(run_dir / "student"),
        checkpoint_dir=str(run_dir / "checkpoints"),
        metrics_dir=str(run_dir / "metrics"),
        validation_prompt=None,
    )
    raw["train"].update({**dirs, **train})
    raw["evaluate"]["metrics_path"] = str(run_dir / "eval.json")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path
