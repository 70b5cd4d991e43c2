"""Typed settings: the seed trainer's config imports key for key; bad settings give one clear message each."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmd.core.config import ConfigError, Params, load, validate
from dmd.data.simpletuner import CACHE_KEYS, MODEL_KEYS, RENAMED_KEYS, import_simpletuner

SEED = Path(__file__).parent / "fixtures" / "seed"
REPO = Path(__file__).resolve().parents[1]


def dmd(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lookup(params: Params, key: str):
    if key in RENAMED_KEYS:
        section, name = RENAMED_KEYS[key]
        return getattr(getattr(params, section), name)
    if key in MODEL_KEYS:
        return getattr(params.model, key)
    if key in CACHE_KEYS:
        return getattr(params.cache, key)
    return params.train.model_dump()[key]  # train's keys are flat only in its dump


def test_every_seed_key_is_imported_and_typed():
    config = json.loads((SEED / "config.json").read_text())
    backend = json.loads((SEED / "multidatabackend.json").read_text())
    raw, notes = import_simpletuner(config, backend)
    assert not [n for n in notes if "not mapped" in n], notes
    params = validate(raw)
    for key, value in config.items():
        if key == "data_backend_config":  # inlined from --backend
            assert [d.num_frames for d in params.cache.datasets] == [e["num_frames"] for e in backend]
            continue
        if key == "distillation_config":
            dc = params.train.distillation_config
            for k, v in value.items():
                got = getattr(dc, k)
                if k == "dmd_denoising_steps":
                    assert got == [int(s) for s in v.split(",")]
                elif isinstance(got, tuple):
                    assert list(got) == v
                else:
                    assert got == v, k
            continue
        assert _lookup(params, key) == value, key
    for entry, dataset in zip(backend, params.cache.datasets):
        for k, v in entry.items():
            assert getattr(dataset, k) == v, k


def test_the_seeds_validation_negative_prompt_is_the_models_negative_prompt():
    """The seed names it after validation, but it is the unconditional side of the real score's CFG too."""
    config = json.loads((SEED / "config.json").read_text())
    raw, _ = import_simpletuner(config)
    assert raw["model"]["negative_prompt"] == config["validation_negative_prompt"]
    assert "validation_negative_prompt" not in raw["train"]
    assert validate(raw).model.negative_prompt == config["validation_negative_prompt"]


def test_seed_import_says_where_it_follows_the_references():
    config = json.loads((SEED / "config.json").read_text())
    advanced = json.loads((SEED / "advanced-distillation-config.json").read_text())
    _, notes = import_simpletuner(config)
    text = "\n".join(notes)
    assert "num_training_frames=21: the rollout's length" in text
    assert "clamp the score timestep after timestep_shift" in text
    assert "same_step_across_blocks false" in text  # the seed's ts_schedule alone bounds nothing
    assert "ema_update_interval" in text
    assert "fake_score_guidance_scale" not in text  # the seed's 0 means the same everywhere
    config["distillation_config"].update(advanced["distillation_config"])
    _, notes = import_simpletuner(config)
    text = "\n".join(notes)
    assert "F_c + 1.2·(F_c − F_u)" in text and "same_step_across_blocks false" not in text


def test_every_params_key_has_a_consumer_in_code():
    """No key is accepted and ignored: each field name appears in the code outside dmd/core/config.py."""
    code = "\n".join(
        p.read_text()
        for d in ("dmd", "tasks", "flows")
        for p in (REPO / d).rglob("*.py")
        if p.name != "config.py"
    )
    seed = json.loads((SEED / "config.json").read_text())
    keys = set(seed) - {"data_backend_config"} | set(seed["distillation_config"])
    missing = sorted(k for k in keys if f".{k}" not in code and f'"{k}"' not in code)
    assert not missing, f"settings read by no code: {missing}"


def test_advanced_config_inconsistency_names_key_and_fix():
    config = json.loads((SEED / "config.json").read_text())
    advanced = json.loads((SEED / "advanced-distillation-config.json").read_text())
    config["distillation_config"].update(advanced["distillation_config"])
    raw, _ = import_simpletuner(config)
    with pytest.raises(ConfigError) as e:
        validate(raw)
    (message,) = e.value.problems
    assert "num_frame_per_block=3" in message and "28" in message and "use one of" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learning_rat=1e-4", "train.learning_rat: unknown key; did you mean 'train.learning_rate'?"),
        ("train.distillation_config.num_frame_per_blok=3", "did you mean"),
        ("train.max_train_steps=many", "train.max_train_steps"),
        ("train.distillation_config.dmd_denoising_steps=1000,522,757", "strictly decreasing"),
        ("train.distillation_config.dmd_denoising_steps=[1200, 500]", "(0, 1000]"),
        ("train.validation_resolution=1280x700", "multiples of 16"),
        ("toy.num_frames=20", "not 4k+1"),
        ("train.distillation_config.num_frame_per_block=4", "num_frame_per_block=4 does not divide"),
        ("generate.height=-32", "generate.height: Input should be greater than 0"),
        ("generate.width=0", "generate.width: Input should be greater than 0"),
        ("generate.fps=0", "generate.fps: Input should be greater than 0"),
        ("toy.fps=0", "toy.fps: Input should be greater than 0"),
    ],
)
def test_bad_settings_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load(REPO / "params.yaml", [override])
    assert len(e.value.problems) == 1
    assert expected in e.value.problems[0]


def test_overrides_are_typed():
    params = load(
        REPO / "params.yaml", ["train.max_train_steps=7", "train.distillation_config.last_step_only=true"]
    )
    assert params.train.run.max_train_steps == 7 and params.train.distillation_config.last_step_only is True


def test_overrides_reach_list_entries_by_index():
    params = load(REPO / "params.yaml", ["cache.datasets.0.num_frames=81"])
    assert params.cache.datasets[0].num_frames == 81
    with pytest.raises(ConfigError, match="'3' is not an index of that list"):
        load(REPO / "params.yaml", ["cache.datasets.3.num_frames=81"])


def test_validate_cli_reports_each_problem_and_fails(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["learning_rat"] = 1e-4
    raw["train"]["train_batch_size"] = "eight"
    raw["train"]["distillation_config"]["num_frame_per_block"] = 4
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw, allow_unicode=True))
    result = dmd("config", "validate", str(bad))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(lines) == 2, result.stderr  # field errors stop before the cross-field check runs
    assert any("train.learning_rat: unknown key; did you mean 'train.learning_rate'" in x for x in lines)
    assert any("train.train_batch_size" in x for x in lines)


def test_an_empty_or_partial_settings_file_is_not_silently_replaced_by_defaults(tmp_path):
    empty = tmp_path / "params.yaml"
    empty.write_text("# nothing yet\n")
    result = dmd("config", "validate", str(empty))
    assert result.returncode != 0 and "no settings in it" in result.stderr
    with pytest.raises(ConfigError, match="no settings in it"):
        load(empty)
    partial = tmp_path / "partial.yaml"
    partial.write_text("train:\n  max_train_steps: 10\n")
    result = dmd("config", "validate", str(partial))
    assert result.returncode == 0, result.stderr
    assert (
        "section(s) model, toy, toy_teacher, generate, cache, ode_init, evaluate not in the file"
        in result.stderr
    )


def test_default_params_validate_with_cli():
    result = dmd("config", "validate", "params.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_import_cli_writes_params_that_validate(tmp_path):
    out = tmp_path / "imported.yaml"
    result = dmd(
        "config",
        "import-simpletuner",
        str(SEED / "config.json"),
        "--backend",
        str(SEED / "multidatabackend.json"),
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "backend[0] names no video source" in result.stderr
    check = dmd("config", "validate", str(out))
    assert check.returncode == 0, check.stderr


def test_params_read_as_dvc_writes_them(tmp_path):
    """DVC rewrites params.yaml as YAML 1.2 (`dvc exp run -S`): `no` is a string, `1e-5` a number."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    text = yaml.safe_dump(raw, allow_unicode=True).replace("mixed_precision: 'no'", "mixed_precision: no")
    text = text.replace("learning_rate: 5.0e-05", "learning_rate: 5e-05")
    assert "mixed_precision: no\n" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load(path)
    assert params.train.run.mixed_precision == "no"
    assert isinstance(params.train.optim.learning_rate, float)
