"""`dmd wan-skeleton`: a diffusers Wan 2.1 directory at the real widths, with random weights, for a dry run.

The configs are the public Wan 2.1 T2V diffusers repositories' JSON files (`dmd/wan/configs/`, no weights). The
transformer and the text encoder keep their real widths and may be made shallower; the tokenizer is built locally
(`dmd.wan.tiny.build_tokenizer`), so nothing is downloaded. The result is an ordinary diffusers directory that
`WanPipeline.from_pretrained` and the stages' loaders (dmd/wan/loading.py) accept: what to run before downloading the real
weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from dmd.wan.loading import WanModelError, expect_class
from dmd.wan.tiny import build_tokenizer, save_pipeline

WAN_CONFIGS = Path(__file__).parent / "configs"
NAMED_CONFIGS = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}
SKELETON_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "text_encoder": "text_encoder/config.json",
}


def config_folder(config: str | Path) -> Path:
    """`1.3b`, `14b`, or a folder holding model_index.json and the component configs (weights not needed)."""
    if str(config).lower() in NAMED_CONFIGS:
        return WAN_CONFIGS / NAMED_CONFIGS[str(config).lower()]
    folder = Path(config)
    if not folder.is_dir():
        raise WanModelError(
            "--config",
            f"{config!r} is neither one of {', '.join(NAMED_CONFIGS)} nor a folder; pass one of those names, or a "
            f"folder with model_index.json, transformer/config.json, vae/config.json, "
            f"scheduler/scheduler_config.json and text_encoder/config.json",
        )
    return folder


def read_configs(folder: str | Path) -> dict[str, dict]:
    """model_index.json and each component's config, checked to be those of a Wan text-to-video pipeline."""
    folder = Path(folder)
    configs = {"model_index": _read_json(folder / "model_index.json")}
    for name, rel in CONFIG_FILES.items():
        configs[name] = _read_json(folder / rel)
    expect_class(folder / "model_index.json", configs["model_index"], "WanPipeline", "--config")
    expect_class(
        folder / CONFIG_FILES["transformer"], configs["transformer"], "WanTransformer3DModel", "--config"
    )
    expect_class(folder / CONFIG_FILES["vae"], configs["vae"], "AutoencoderKLWan", "--config")
    if configs["text_encoder"].get("model_type") != "umt5":
        raise WanModelError(
            "--config",
            f"{folder / CONFIG_FILES['text_encoder']} has model_type {configs['text_encoder'].get('model_type')!r}, "
            f"not 'umt5' (Wan 2.1 uses the UMT5-XXL encoder)",
        )
    return configs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WanModelError(
            "--config", f"{path}: missing; a config folder needs {', '.join(CONFIG_FILES.values())}"
        ) from None
    except json.JSONDecodeError as e:
        raise WanModelError("--config", f"{path}: not valid JSON ({e})") from None


def component_seed(seed: int, component: str) -> int:
    """One seed per component, so a change to one component (its depth) leaves the others' weights as they were."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{component}".encode()).digest()[:8], "little")


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """The modules' own default initialisation, drawn from `seed`, without touching the caller's random state
    (the CPU's, and `device`'s when modules are created on an accelerator)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def build_skeleton(
    config: str | Path = "1.3b",
    seed: int = 0,
    num_layers: int | None = None,
    text_encoder_layers: int | None = None,
    vocab_size: int | None = None,
    dtype: str = "fp32",
) -> WanPipeline:
    """A WanPipeline with `config`'s widths and freshly initialised weights; same arguments, same weights.

    `num_layers` / `text_encoder_layers` cut the transformer / text encoder to that depth (default: the config's).
    The text encoder's vocabulary is the local tokenizer's, not the config's (the real 256k-row embedding would be
    gigabytes of random numbers that no local token id reaches); `vocab_size` overrides it.
    """
    if dtype not in SKELETON_DTYPES:
        raise WanModelError("--dtype", f"{dtype!r}: expected one of {', '.join(SKELETON_DTYPES)}")
    configs = read_configs(config_folder(config))
    tokenizer = build_tokenizer()
    for key, value in (("--num-layers", num_layers), ("--text-encoder-layers", text_encoder_layers)):
        _check_depth(key, value)
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise WanModelError(
            "--vocab-size",
            f"{vocab_size} is below the local tokenizer's {len(tokenizer)} tokens (its ids would index past the "
            f"embedding); pass at least {len(tokenizer)}, or leave it unset",
        )

    text_config = {k: v for k, v in configs["text_encoder"].items() if not k.startswith("_")}
    text_config.pop("torch_dtype", None)  # the saved file records the dtype the weights are written in
    if text_encoder_layers is not None:
        text_config["num_layers"] = text_config["num_decoder_layers"] = text_encoder_layers
    text_config["vocab_size"] = vocab_size or len(tokenizer)
    scheduler_config = configs["scheduler"]
    scheduler_cls = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
    if scheduler_cls is None:
        raise WanModelError(
            "--config",
            f"{CONFIG_FILES['scheduler']} names class {scheduler_config.get('_class_name')!r}, which diffusers does "
            f"not have; name a diffusers scheduler such as UniPCMultistepScheduler",
        )

    transformer = build_transformer(configs, seed, num_layers)
    vae = build_vae(configs, seed)
    with seeded(component_seed(seed, "text_encoder")):
        text_encoder = UMT5EncoderModel(UMT5Config(**text_config))
    torch_dtype = SKELETON_DTYPES[dtype]
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=_cast(text_encoder, torch_dtype).eval(),
        vae=_cast(vae, torch_dtype).eval(),
        transformer=_cast(transformer, torch_dtype).eval(),
        scheduler=scheduler_cls.from_config(scheduler_config),
    )


def build_transformer(
    config: str | Path | dict[str, dict] = "1.3b",
    seed: int = 0,
    num_layers: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanTransformer3DModel:
    """`config`'s transformer (a name, a folder, or `read_configs`' result) with fresh weights, in memory on `device`.

    The weights are created on `device` (no copy on the CPU first: the 14B model is 56 GB in fp32) with the module's
    own initialisation drawn from `seed`, then held in `dtype` as `from_pretrained(torch_dtype=dtype)` holds them,
    the modules diffusers keeps in fp32 staying fp32. On the CPU in fp32 these are `build_skeleton`'s weights; an
    accelerator draws other numbers from the same seed.
    """
    configs = config if isinstance(config, dict) else read_configs(config_folder(config))
    _check_depth("--num-layers", num_layers)
    transformer_config = {k: v for k, v in configs["transformer"].items() if not k.startswith("_")}
    if num_layers is not None:
        transformer_config["num_layers"] = num_layers
    with seeded(component_seed(seed, "transformer"), device), torch.device(device):
        transformer = WanTransformer3DModel.from_config(transformer_config)
    if dtype != torch.float32:
        keep = set(transformer._keep_in_fp32_modules or [])
        for name, param in transformer.named_parameters():
            if not keep.intersection(name.split(".")):  # the rule diffusers' loader applies
                param.data = param.data.to(dtype)
    return transformer.eval()


def build_vae(
    config: str | Path | dict[str, dict] = "1.3b", seed: int = 0, device: str | torch.device = "cpu"
) -> AutoencoderKLWan:
    """`config`'s VAE with fresh weights, in fp32 (as `dmd.wan.loading.load_vae` holds it), created on `device`."""
    configs = config if isinstance(config, dict) else read_configs(config_folder(config))
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    with seeded(component_seed(seed, "vae"), device), torch.device(device):
        return AutoencoderKLWan.from_config(vae_config).eval()


def _check_depth(key: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise WanModelError(key, f"{value}: a model needs at least one layer; pass 1 or more")


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every weight in `dtype`. Not `model.to(dtype)`: diffusers warns there about the modules it keeps in fp32,
    which `from_pretrained(torch_dtype=...)` upcasts again when it loads the files."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def save_skeleton(path: str | Path, **kwargs) -> Path:
    """Write `build_skeleton(**kwargs)` to `path` atomically as a diffusers directory (safetensors)."""
    return save_pipeline(build_skeleton(**kwargs), path)


def main(args) -> int:
    """The `dmd wan-skeleton` command."""
    pipe = build_skeleton(
        args.config,
        seed=args.seed,
        num_layers=args.num_layers,
        text_encoder_layers=args.text_encoder_layers,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
    )
    out = save_pipeline(pipe, args.output)
    sizes = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
    print(
        f"{out}: random {args.config} Wan skeleton (seed {args.seed}, {args.dtype}); parameters: "
        + ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in sizes.items()),
        file=sys.stderr,
    )
    print(out)
    return 0
