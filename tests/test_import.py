"""The checks the README promises, and `dmd config import-simpletuner` of configs as the seed's users write them:
real sizes for a real teacher, a prompt library asked for, every data-backend key mapped or reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmd.core.config import ConfigError, load, validate
from dmd.data.simpletuner import TODO, import_simpletuner

REPO = Path(__file__).resolve().parents[1]
SEED = Path(__file__).parent / "fixtures" / "seed"

# A data-backend file as SimpleTuner's documentation (documentation/DATALOADER.md) writes them for local video
# datasets and the text-embed cache.
USER_BACKEND = [
    {
        "id": "disney-black-and-white",
        "type": "local",
        "dataset_type": "video",
        "crop": False,
        "crop_style": "center",
        "resolution": 480,
        "minimum_image_size": 480,
        "maximum_image_size": 480,
        "target_downsample_size": 480,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/wan/disney-black-and-white",
        "instance_data_dir": "datasets/disney-black-and-white",
        "disabled": False,
        "caption_strategy": "textfile",
        "metadata_backend": "discovery",
        "repeats": 0,
        "video": {"num_frames": 125, "min_frames": 125},
    },
    {
        "id": "named-clips",
        "type": "local",
        "dataset_type": "video",
        "instance_data_dir": "datasets/named",
        "caption_strategy": "filename",
        "resolution": 480,
        "resolution_type": "pixel_area",
        "video": {"num_frames": 81, "max_frames": 200, "is_i2v": False},
    },
    {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": "cache/text/wan",
        "disabled": False,
        "write_batch_size": 128,
    },
]


def dmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "key", ["generate.height", "generate.width", "toy.height", "toy.width", "evaluate.width"]
)
def test_sizes_that_are_not_multiples_of_16_are_refused(key):
    with pytest.raises(ConfigError) as e:
        load(REPO / "params.yaml", [f"{key}=30"])
    assert e.value.problems == [
        f"{key}: 30 is not a multiple of 16 (Wan's VAE downsamples 8× and its transformer patches 2×2); "
        "use 16 or 32"
    ]
    load(REPO / "params.yaml", [f"{key}=48"])


def test_the_seed_config_of_a_real_wan_gets_real_sizes_and_asks_for_prompts(tmp_path):
    config = json.loads((SEED / "config.json").read_text())
    backend = json.loads((SEED / "multidatabackend.json").read_text())
    raw, notes = import_simpletuner(config, backend)
    params = validate(raw)
    # the backend's 480 px area at the aspect of the seed's 1280x704 validation videos, and its 121 frames
    g = params.generate
    assert (g.height, g.width, g.num_frames) == (352, 640, 121)
    assert abs(g.height * g.width - 480 * 480) / (480 * 480) < 0.05
    assert g.width / g.height == pytest.approx(1280 / 704, rel=0.03)
    # evaluation samples the seed's validation prompt library at that size, not the toy world's 32×32
    assert params.evaluate.prompts == config["validation_prompt_library"]
    todos = [n for n in notes if n.startswith(TODO)]
    assert len(todos) == 1 and todos[0].startswith(f"{TODO}generate.prompts: set your prompt library")

    out = tmp_path / "params.yaml"
    result = dmd("config", "import-simpletuner", str(SEED / "config.json"), "--backend",
                 str(SEED / "multidatabackend.json"), "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{TODO}generate.prompts" in result.stderr
    assert f"# {TODO}generate.prompts" in out.read_text()  # and in the file, for whoever opens it later
    check = dmd("config", "validate", str(out))
    assert check.returncode == 0, check.stderr
    assert "warning: generate.prompts is 'toy'" in check.stderr and "OK" not in check.stdout
    assert "videos 640x352, 121 frames" in check.stdout


def test_the_toy_teacher_keeps_the_toy_world():
    raw, notes = import_simpletuner(
        {"pretrained_model_name_or_path": "models/toy-teacher", "resolution": 480}
    )
    assert "generate" not in raw and not [n for n in notes if n.startswith(TODO)]


def test_a_simpletuner_backend_as_users_write_it_imports_with_every_key_accounted_for():
    raw, notes = import_simpletuner({"pretrained_model_name_or_path": "/models/wan2.1-1.3b"}, USER_BACKEND)
    params = validate(raw)
    datasets = {d.id: d for d in params.cache.datasets}
    assert list(datasets) == [
        "disney-black-and-white",
        "named-clips",
    ]  # the text-embed entry is a cache location
    disney, named = datasets["disney-black-and-white"], datasets["named-clips"]
    assert disney.instance_data_dir == "datasets/disney-black-and-white" and disney.manifest is None
    assert disney.cache_dir == "cache/vae/wan/disney-black-and-white"
    assert (disney.num_frames, disney.resolution, disney.resolution_type) == (125, 480, "pixel_area")
    assert (disney.minimum_image_size, disney.crop, disney.caption_strategy) == (480, False, "textfile")
    assert (named.caption_strategy, named.num_frames) == ("filename", 81)
    text = "\n".join(notes)
    mapped = {"id", "dataset_type", "instance_data_dir", "caption_strategy", "cache_dir_vae", "crop", "resolution",
              "resolution_type", "minimum_image_size", "disabled", "repeats", "video", "type", "crop_style"}  # fmt: skip
    for i, entry in enumerate(USER_BACKEND[:2]):
        for key in entry:
            assert key in mapped or f"backend[{i}] ({entry['id']}).{key}: not mapped (" in text, key
    for key in ("min_frames", "max_frames"):
        assert f".video.{key}=" in text
    # the text-embed entry says where SimpleTuner caches text embeddings; here they live in the cache folder
    assert "backend[2] (text-embeds): dataset_type text_embeds dropped" in text
    # the generated videos take the first dataset's length (125 = 4·31 + 1), snapped down when it is not 4k+1
    assert params.generate.num_frames == 125
    raw, _ = import_simpletuner({"pretrained_model_name_or_path": "/models/wan2.1-1.3b"},
                                [{**USER_BACKEND[0], "video": {"num_frames": 120}}])  # fmt: skip
    assert raw["generate"]["num_frames"] == 117


def test_unsupported_backend_entries_are_todos():
    backend = [
        {"id": "s3", "type": "aws", "dataset_type": "video", "aws_bucket_name": "b"},
        {"id": "pics", "type": "local", "dataset_type": "image", "instance_data_dir": "pics"},
        {
            "id": "prompted",
            "instance_data_dir": "v",
            "caption_strategy": "instanceprompt",
            "instance_prompt": "x",
        },
    ]
    raw, notes = import_simpletuner({}, backend)
    todos = "\n".join(n for n in notes if n.startswith(TODO))
    assert "backend[0] (s3): type aws dropped" in todos and "backend[1] (pics): dataset_type image" in todos
    assert "caption_strategy: instanceprompt is not supported" in todos
    assert [d["id"] for d in raw["cache"]["datasets"]] == ["prompted"]


def test_filename_captions(tmp_path):
    from dmd.core.config import CacheConfig, DatasetConfig
    from dmd.core.video import write_video
    from dmd.data.datasets import discover
    from dmd.data.synthetic import synthetic_clip

    for name in ("a_red_square_moving_right", "a__blue  circle"):
        write_video(tmp_path / f"{name}.mp4", synthetic_clip(5, 16, 16, 0))
    (tmp_path / "a_red_square_moving_right.txt").write_text("the sidecar, not used with filename captions")
    cfg = CacheConfig(datasets=[DatasetConfig(instance_data_dir=str(tmp_path), caption_strategy="filename")])
    sources, problems = discover(cfg)
    assert sorted(s.caption for s in sources) == ["a blue circle", "a red square moving right"]
    assert problems == []
