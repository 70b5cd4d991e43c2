"""Peak memory of one DMD step per critic layout, against a plain LoRA flow-matching fine-tune step; and the DMD
step's time against the sum of the forward/backward passes it contains.

Configurations, each in its own subprocess so peak resident memory is measured cleanly:
  (a) LoRA student + LoRA critic on one shared fp32 base
  (b) LoRA student + full-copy critic (the seed trainer's layout)
  (c) LoRA student + LoRA critic on an int8-quanto base
  (d) a plain LoRA flow-matching fine-tune step on the same fp32 base (the reference)

A Wan-architecture transformer with a few hundred million parameters (random init, CPU, batch 1, a tiny latent),
so weights and optimizer state dominate memory, as they do at real scale. Peak = the high-water mark of resident
memory during the step (reset after setup through /proc/self/clear_refs), above the resident memory after setup
is "step overhead"; the table's ratios use the whole peak. Freed memory is handed back to the OS (malloc_trim)
before measuring, so memory freed by int8 quantization does not count.

    .venv/bin/python benchmarks/dmd_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

CONFIGS = {
    "a_lora_critic": "DMD step, LoRA critic on the shared base",
    "b_full_critic": "DMD step, full-copy critic",
    "c_lora_critic_int8": "DMD step, LoRA critic on an int8-quanto base",
    "d_lora_finetune": "plain LoRA flow-matching fine-tune step (reference)",
}
REFERENCE = "d_lora_finetune"
MODEL = dict(num_layers=12, num_attention_heads=8, attention_head_dim=128, ffn_dim=4096, text_dim=1024)
LATENT = (1, 16, 3, 8, 8)  # B, C, T, H, W: 3 latent frames of 8×8 → 48 tokens
TEXT_TOKENS = 16
LORA_RANK = 16
RESULTS = Path(__file__).parent / "results" / "dmd_memory.json"


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps it otherwise), so resident memory shows what
    is live: without this the float weights freed by int8 quantization would still count."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _build(config: str):
    import torch
    from diffusers import WanTransformer3DModel

    from dmd.core.config import Params
    from dmd.distill.method import DMDMethod
    from dmd.distill.roles import make_roles
    from dmd.distill.rollout import RolloutSchedule
    from dmd.wan.loading import add_lora, quantize_int8

    torch.manual_seed(0)
    base = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=LATENT[1],
        out_channels=LATENT[1],
        freq_dim=256,
        rope_max_seq_len=64,
        **MODEL,
    ).requires_grad_(False)
    n_params = sum(p.numel() for p in base.parameters())
    if config == "c_lora_critic_int8":
        quantize_int8(base)
    if config == REFERENCE:
        add_lora(base, LORA_RANK, LORA_RANK, "student")
        return SimpleNamespace(base=base, n_params=n_params)
    params = Params.model_validate(
        {
            "train": {
                "lora_rank": LORA_RANK,
                "lora_alpha": LORA_RANK,
                "distillation_config": {
                    "num_training_frames": LATENT[2],
                    "num_frame_per_block": LATENT[2],
                    "last_step_only": True,  # a fixed number of passes per step, for the timing breakdown
                    "real_score_guidance_scale": 3.0,
                    "fake_score_lora_rank": None if config == "b_full_critic" else LORA_RANK,
                },
            }
        }
    )
    roles = make_roles(base, params.train)  # (c)'s base is already int8: no full copy to take first
    text = torch.zeros(1, TEXT_TOKENS, MODEL["text_dim"])
    return SimpleNamespace(
        base=base,
        n_params=n_params,
        roles=roles,
        method=DMDMethod(params, roles, RolloutSchedule.from_params(params), text, text),
    )


def _batch():
    import torch

    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        latents_BCTHW=torch.randn(LATENT, generator=g),
        prompt_embeds_BLD=torch.randn(LATENT[0], TEXT_TOKENS, MODEL["text_dim"], generator=g),
        noise_BCTHW=None,
        captions=["x"],
        keys=["0"],
    )


def _finetune_step(base, optimizer, batch, gen):
    """One LoRA flow-matching step: x_σ from data, predict v = ε − x0."""
    import torch

    from dmd.core.flow_matching import add_noise, velocity_target

    x0 = batch.latents_BCTHW
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.rand(x0.shape[0], generator=gen)
    pred = base(add_noise(x0, noise, sigma), sigma * 1000, batch.prompt_embeds_BLD, return_dict=False)[0]
    loss = ((pred - velocity_target(x0, noise)) ** 2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _dmd_step(method, critic_opt, student_opt, batch, gen):
    from dmd.training.optim import clip_gradients

    loss, _ = method.critic_loss(batch, gen)
    loss.backward()
    clip_gradients(method.critic_parameters(), "norm", method.config.fake_score_grad_clip)
    critic_opt.step()
    critic_opt.zero_grad(set_to_none=True)
    loss, _ = method.generator_loss(batch, gen)
    loss.backward()
    student_opt.step()
    student_opt.zero_grad(set_to_none=True)


def _time(fn, repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def child(config: str, repeats: int, threads: int) -> dict:
    import torch

    from dmd.evaluation.metrics import dmd_pass_seconds, dmd_step_pass_counts

    torch.set_num_threads(threads)
    after_import = _rss_kib("VmRSS")
    built = _build(config)
    batch, gen = _batch(), torch.Generator().manual_seed(2)
    if config == REFERENCE:
        lora = [p for n, p in built.base.named_parameters() if "lora_" in n]
        opt = torch.optim.AdamW(lora, lr=1e-4)

        def step():
            _finetune_step(built.base, opt, batch, gen)

        trainable = sum(p.numel() for p in lora)
    else:
        method = built.method
        from dmd.training.optim import build_critic_optimizer

        critic_opt = build_critic_optimizer(method.params, method.critic_parameters())
        student_opt = torch.optim.AdamW(method.student_parameters(), lr=1e-4)

        def step():
            _dmd_step(method, critic_opt, student_opt, batch, gen)

        trainable = sum(p.numel() for p in method.student_parameters() + method.critic_parameters())
    step()  # first step allocates the optimizer states: they belong to the steady state
    _release_freed_memory()
    after_setup = _rss_kib("VmRSS")
    _reset_peak()
    step_s = _time(step, repeats, warm_up=False)
    peak = _rss_kib("VmHWM")
    out = {
        "config": config,
        "parameters": built.n_params,
        "trainable_parameters": trainable,
        "peak_rss_mib": peak / 1024,
        "peak_above_import_mib": (peak - after_import) / 1024,
        "resident_after_setup_mib": after_setup / 1024,
        "step_overhead_mib": (peak - after_setup) / 1024,
        "step_seconds": step_s,
    }
    if config == "a_lora_critic":
        dc = built.method.config
        passes = dmd_pass_seconds(
            built.roles, dc, batch.latents_BCTHW, batch.prompt_embeds_BLD, repeats=repeats
        )
        counts = dmd_step_pass_counts(dc)
        out["passes"] = passes
        out["pass_counts"] = counts
        out["sum_of_passes_seconds"] = sum(counts[k] * passes[k] for k in counts)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per configuration")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.threads)))
        return 0

    import torch

    from dmd.core.io import write_json

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": args.threads,
    }
    print(
        f"machine: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{args.threads} torch thread(s)"
    )
    results = {}
    for config, label in CONFIGS.items():
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                config,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(f"{config} failed (exit {proc.returncode})")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {label}: done in {time.perf_counter() - start:.0f} s", flush=True)

    ref = results[REFERENCE]
    n = ref["parameters"]
    print(
        f"\nWan-architecture transformer, {n / 1e6:.0f} M parameters, fp32, latent {LATENT}, LoRA rank {LORA_RANK}"
    )
    header = (
        f"{'configuration':58s} {'peak RSS MiB':>12s} {'× (d)':>6s} {'above import ×(d)':>18s} {'step s':>7s}"
    )
    print(header + "\n" + "-" * len(header))
    for config, label in CONFIGS.items():
        r = results[config]
        r["peak_ratio_to_d"] = r["peak_rss_mib"] / ref["peak_rss_mib"]
        r["peak_above_import_ratio_to_d"] = r["peak_above_import_mib"] / ref["peak_above_import_mib"]
        print(
            f"({config[0]}) {label:54s} {r['peak_rss_mib']:12.0f} {r['peak_ratio_to_d']:6.2f} "
            f"{r['peak_above_import_ratio_to_d']:18.2f} {r['resident_after_setup_mib']:16.0f} {r['step_seconds']:7.2f}"
        )
    a = results["a_lora_critic"]
    print("\nDMD step (a) against the passes it contains (last_step_only, 3 steps, real-score CFG):")
    for name, seconds in a["passes"].items():
        print(f"  {name:28s} {seconds:7.3f} s")
    overhead = a["step_seconds"] / a["sum_of_passes_seconds"]
    print(
        f"  step {a['step_seconds']:.2f} s vs sum of its passes {a['sum_of_passes_seconds']:.2f} s "
        f"(ratio {overhead:.2f}; the rest is role switching, sampling, optimizer steps)"
    )
    write_json(RESULTS, {"machine": machine, "model": MODEL, "latent": LATENT, "results": results})
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
