"""A LoRA student trained on an int8-quanto base, sampled on that base and on the full-precision one.

`model.base_model_precision: int8-quanto` trains the student's LoRA against a base whose linear weights are rounded
to int8 (the real score, the critic and the student all run on it). The question is which base such a LoRA must be
shipped for. Two measurements, in one run:

(a) The toy world (the shipped teacher `models/toy-teacher`, params.yaml with a LoRA student and a LoRA critic):
    a 3-step LoRA student is trained on the int8 base and another on the fp32 base, each with the training run's
    own step (`benchmarks/dmd_toy.py`'s `train_student`), exported with `dmd.student.export.export_student`, and loaded
    back as a diffusers LoRA on each base (`load_lora_adapter`). Every combination samples the held-out captions
    from the same initial noise and re-noising; the toy judge scores them (attribute accuracy, sharpness, FD to real
    clips, motion, diversity) next to the teacher (50 steps + CFG and 3 steps + CFG, on each base). Paired figures
    for one LoRA on the two bases: the share of clips whose judged attributes all agree, and the relative difference
    of the sampled latents. And the x0 prediction at the student's σs, with and without the LoRA, int8 base against
    fp32 base.

(b) The real widths: a `dmd wan-skeleton` directory of Wan 2.1 T2V 1.3B (random weights, 1 transformer layer, 1
    text-encoder layer), a rank-128 LoRA on `dmd.wan.loading.LORA_TARGETS` whose B matrices are random (a stand-in for a
    trained LoRA, sized relative to the weights it adapts), and a prompt encoded by the skeleton's text encoder.
    Relative x0 differences ‖x0_a − x0_b‖ / ‖x0_b‖ at a few σ against the fp32 base: the int8 base (computing in
    fp32, and in bf16 as `mixed_precision: bf16` trains it), and a bf16 base for scale; each without and with the
    LoRA, and for the LoRA's own contribution (x0 with it minus x0 without it on the same base). Also the outputs
    of the adapted linear layers (where int8 rounds the weights): in a randomly initialised Wan the blocks' gated
    residual branches add little to the output, so x0 shows little of the rounding; the layers show it undiluted.

    .venv/bin/python benchmarks/int8_base.py                 # both parts (several minutes on a few CPU cores)
    .venv/bin/python benchmarks/int8_base.py --part real     # only (b)

Prints the tables and writes benchmarks/results/int8_base.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.dmd_toy import Teacher, batched, summarise, train_student  # noqa: E402
from dmd.core.config import Params, load  # noqa: E402
from dmd.core.flow_matching import add_noise, sigma_to_timestep, x0_from_velocity  # noqa: E402
from dmd.core.io import write_json  # noqa: E402
from dmd.distill.rollout import RolloutSchedule, sample, transformer_velocity  # noqa: E402
from dmd.evaluation.metrics import gap_closed  # noqa: E402
from dmd.student.export import STUDENT_ADAPTER, export_student  # noqa: E402
from dmd.toy.judge import judge_clips, reference_clips  # noqa: E402
from dmd.toy.world import ATTRIBUTES, ToyWorld  # noqa: E402
from dmd.wan.formats import LORA_WEIGHTS  # noqa: E402
from dmd.wan.loading import add_lora, load_transformer  # noqa: E402

log = logging.getLogger("int8_base")
RESULTS = REPO / "benchmarks" / "results" / "int8_base.json"
# the bases a LoRA is trained on or sampled on: label -> (model.base_model_precision, the float dtype of an int8
# base); the toy trains in fp32 (train.mixed_precision: no), so its int8 base computes in fp32
TOY_BASES = {"int8": ("int8-quanto", torch.float32), "fp32": ("fp32", torch.float32)}
REAL_BASES = {
    "int8/fp32": ("int8-quanto", torch.float32),
    "int8/bf16": ("int8-quanto", torch.bfloat16),
    "bf16": ("bf16", torch.float32),
}
# a LoRA student and a LoRA critic; LoRA factors take a larger learning rate than params.yaml's full student
LORA = [
    "train.model_type=lora",
    "train.distillation_config.fake_score_lora_rank=16",
    "train.learning_rate=1e-4",
    "train.distillation_config.fake_score_lr=1e-4",
]


def on_base(params: Params, label: str, bases: dict) -> Params:
    precision, _ = bases[label]
    return params.model_copy(
        update={"model": params.model.model_copy(update={"base_model_precision": precision})}
    )


def load_base(params: Params, label: str, bases: dict, student_dir: Path | None = None):
    """The teacher's transformer on base `label`, with the exported LoRA student of `student_dir` when given."""
    _, float_dtype = bases[label]
    transformer = load_transformer(on_base(params, label, bases).model, int8_float_dtype=float_dtype)
    if student_dir is not None:
        transformer.load_lora_adapter(
            str(student_dir), weight_name=LORA_WEIGHTS, adapter_name=STUDENT_ADAPTER, prefix="transformer"
        )
    return transformer.eval().requires_grad_(False)


def sample_all(model, embeds_BLD, noise_BCTHW, schedule: RolloutSchedule, seed: int) -> torch.Tensor:
    """The few-step samples of every clip, in batches, the re-noising drawn from one generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return batched(lambda e, z: sample(model, e, z, schedule, generator), embeds_BLD, noise_BCTHW)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (b the reference)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def x0_at(transformer, x0_BCTHW: torch.Tensor, noise_BCTHW: torch.Tensor, sigma: float, embeds_BLD):
    """(the transformer's x0 prediction from x0 noised to σ, {layer: output} of every LoRA-adapted layer)."""
    outputs = {}
    hooks = [
        module.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out.float()))
        for name, module in transformer.named_modules()
        if hasattr(module, "lora_A")
    ]
    try:
        x = add_noise(x0_BCTHW, noise_BCTHW, sigma)
        t = torch.full((x.shape[0], x.shape[2]), float(sigma_to_timestep(sigma)))
        return x0_from_velocity(x, transformer_velocity(transformer)(x, t, embeds_BLD), sigma), outputs
    finally:
        for hook in hooks:
            hook.remove()


def relative_layers(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over the outputs of all layers together."""
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def x0_differences(models: dict, reference: str, x0, noise, sigmas, embeds) -> dict:
    """{σ: {base: {...}}}: relative differences of each base against `reference` of the x0 prediction without the
    LoRA (adapters disabled), with it, and of the LoRA's contribution (x0 with minus x0 without, on the same base);
    and of the LoRA-adapted linear layers' outputs (as the model runs, upstream differences included) without and
    with the LoRA. `models[label]`: a base carrying the LoRA."""
    out = {}
    for sigma in sigmas:
        preds = {}
        for label, model in models.items():
            model.disable_adapters()
            without = x0_at(model, x0, noise, sigma, embeds)
            model.enable_adapters()
            preds[label] = without, x0_at(model, x0, noise, sigma, embeds)
        (ref_base, ref_base_layers), (ref_lora, ref_lora_layers) = preds[reference]
        row = {"lora_effect": relative(ref_lora, ref_base)}
        for label, ((base, base_layers), (lora, lora_layers)) in preds.items():
            if label != reference:
                row[label] = {
                    "base": relative(base, ref_base),
                    "lora": relative(lora, ref_lora),
                    "lora_contribution": relative(lora - base, ref_lora - ref_base),
                    "layers_base": relative_layers(base_layers, ref_base_layers),
                    "layers_lora": relative_layers(lora_layers, ref_lora_layers),
                }
        out[f"{sigma:.4g}"] = row
    return out


# --------------------------------------------------------------------------------------------------------------
# (a) the toy world


def toy(args, machine: dict, results: dict) -> None:
    base = load(args.params, [*args.overrides, *LORA])
    world = ToyWorld(base.toy)
    teachers = {label: Teacher(on_base(base, label, TOY_BASES)) for label in TOY_BASES}
    teacher = teachers["fp32"]  # text encoder and VAE are the same for both

    train_captions = world.captions("train")
    captions = [train_captions[i % len(train_captions)] for i in range(base.generate.num_videos)]
    # rollouts from noise read only the prompts (the clips' latents are unused: benchmarks/dmd_toy.py)
    embeds = teacher.encode(captions)
    noise = torch.randn((len(captions), *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    data = SimpleNamespace(latents=torch.zeros_like(noise), embeds=embeds, noise=noise, captions=captions,
                           negative=teacher.encode([base.model.negative_prompt]), empty=teacher.encode([""]))  # fmt: skip

    eval_captions = [c for c in world.captions("held_out") for _ in range(args.seeds)]
    eval_embeds = teacher.encode(eval_captions)
    eval_noise = torch.randn(
        (len(eval_captions), *teacher.latent_shape),
        generator=torch.Generator().manual_seed(base.evaluate.seed),
    )
    reference = reference_clips(world, eval_captions)
    negative = teacher.encode([base.model.negative_prompt])
    full, few = base.evaluate.teacher_steps, len(base.train.distillation_config.dmd_denoising_steps)
    guidance = base.evaluate.teacher_guidance
    rows, latents, per_clip = {}, {}, {}
    out = results.setdefault("toy", {})
    out.update(eval_clips=len(eval_captions), seeds_per_caption=args.seeds,
               eval_captions=sorted(set(eval_captions)), train_steps=args.steps,
               overrides=[*args.overrides, *LORA], learning_rate=base.train.optim.learning_rate,
               fake_score_lr=base.train.distillation_config.fake_score_lr, lora_rank=base.train.student.lora_rank,
               critic_lora_rank=base.train.distillation_config.fake_score_lora_rank, rows=rows)  # fmt: skip

    def judge(name: str, x_BCTHW: torch.Tensor, **info) -> None:
        clips = [c.numpy() for c in batched(lambda z: torch.from_numpy(teacher.decoder(z)), x_BCTHW)]
        scores = judge_clips(clips, eval_captions, world, reference=reference)
        per_clip[name] = [c["predicted"] for c in scores["clips"]]
        latents[name] = x_BCTHW
        rows[name] = {**summarise(scores), **info}
        few_name, full_name = f"teacher fp32 {few} steps", f"teacher fp32 {full} steps"
        if few_name in rows and full_name in rows:
            rows[name]["gap_closed"] = {
                k: gap_closed(rows[few_name][k], rows[full_name][k], rows[name][k])
                for k in ("sharpness", "fd")
            }
        log.info(
            "%s: %s", name, {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()}
        )
        write_json(args.output, {"machine": machine, **results})

    for label, t in teachers.items():
        for steps in (full, few):
            judge(
                f"teacher {label} {steps} steps",
                batched(lambda e, z, s=steps, t=t: t.generate(e, negative, z, s, guidance), eval_embeds, eval_noise),
                nfe=2 * steps, guidance=guidance, base=label,
            )  # fmt: skip
    out["teacher_int8_vs_fp32_latents"] = relative(
        latents[f"teacher int8 {full} steps"], latents[f"teacher fp32 {full} steps"]
    )
    del teachers

    schedule = RolloutSchedule.from_params(base)
    for trained in args.train_on:
        params = on_base(base, trained, TOY_BASES)
        roles, seconds, history = train_student(params, data, args.steps)  # EMA weights swapped in
        roles.activate_student()
        as_trained = sample_all(roles.student, eval_embeds, eval_noise, schedule, base.evaluate.seed)
        student_dir = args.workdir / trained / "student"
        export_student(
            roles.student_transformer,
            params,
            RolloutSchedule.from_params(params),
            student_dir,
            ema=params.train.ema.use_ema,
            step=args.steps,
        )
        del roles
        last = history[-max(1, len(history) // 10) :]
        info = dict(trained_on=trained, train_seconds=round(seconds, 1),
                    critic_loss_end=float(np.mean([m["critic_loss"] for m in last])))  # fmt: skip
        transformers = {}
        for sampled in TOY_BASES:
            transformers[sampled] = load_base(base, sampled, TOY_BASES, student_dir)
            x = sample_all(transformers[sampled], eval_embeds, eval_noise, schedule, base.evaluate.seed)
            if sampled == trained:  # the export, loaded back on its own base, samples what training held
                info["reload_max_abs_diff"] = float((x - as_trained).abs().max())
            judge(f"LoRA trained {trained}, sampled {sampled}", x, nfe=few, sampled_on=sampled, **info)
        a, b = (f"LoRA trained {trained}, sampled {s}" for s in TOY_BASES)
        out[f"lora_trained_{trained}_int8_vs_fp32"] = {
            "latents": relative(latents[a], latents[b]),
            "clips_all_attributes_agree": float(np.mean([p == q for p, q in zip(per_clip[a], per_clip[b])])),
            **{f"clips_agree_{k}": float(np.mean([p[k] == q[k] for p, q in zip(per_clip[a], per_clip[b])]))
               for k in ATTRIBUTES},
        }  # fmt: skip
        # x0 at the student's σs, from its own (fp32-sampled) clean latents re-noised
        x0, n = latents[b], torch.randn(latents[b].shape, generator=torch.Generator().manual_seed(1))
        out[f"lora_trained_{trained}_x0"] = x0_differences(
            transformers, "fp32", x0, n, schedule.sigmas, eval_embeds
        )
        write_json(args.output, {"machine": machine, **results})
    if set(args.train_on) == set(TOY_BASES):
        # how much training on the int8 base changed the LoRA: the two students' samples against each other
        pairs = {"both_sampled_fp32": ("fp32", "fp32"), "both_sampled_int8": ("int8", "int8"),
                 "each_on_its_training_base": ("int8", "fp32")}  # fmt: skip
        out["lora_trained_int8_vs_trained_fp32_latents"] = {
            key: relative(
                latents[f"LoRA trained int8, sampled {a}"], latents[f"LoRA trained fp32, sampled {b}"]
            )
            for key, (a, b) in pairs.items()
        }
        write_json(args.output, {"machine": machine, **results})


# --------------------------------------------------------------------------------------------------------------
# (b) the real widths


def real(args, machine: dict, results: dict) -> None:
    from dmd.wan.loading import encode_prompts, load_text_encoder
    from dmd.wan.skeleton import save_skeleton

    start = time.perf_counter()
    root = save_skeleton(args.workdir / "wan", config="1.3b", num_layers=1, text_encoder_layers=1)
    log.info("wan-skeleton 1.3b (1 layer) written in %.0f s", time.perf_counter() - start)
    params = load(args.params, [*args.overrides, f"model.pretrained_model_name_or_path={root}"])
    tokenizer, text_encoder = load_text_encoder(params.model)
    embeds = encode_prompts(tokenizer, text_encoder, ["a red square moving right slowly"], 512)
    del text_encoder
    bases = {"fp32": ("fp32", torch.float32), **REAL_BASES}
    torch.manual_seed(0)  # peft draws the LoRA's A matrices from the global stream
    models = {}
    for label in bases:
        models[label] = add_lora(
            load_base(params, label, bases), args.real_lora_rank, args.real_lora_rank, STUDENT_ADAPTER
        )
    lora_sizes = set_random_lora(models, args.real_lora_norm)
    config = models["fp32"].config
    shape = (1, config.in_channels, *args.real_latent)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    results["real"] = {
        "model": "Wan 2.1 T2V 1.3B widths (dmd wan-skeleton --config 1.3b --num-layers 1 --text-encoder-layers 1)",
        "transformer_parameters": sum(
            p.numel() for n, p in models["fp32"].named_parameters() if "lora_" not in n
        ),
        "latent_BCTHW": list(shape),
        "lora_rank": args.real_lora_rank,
        "lora_alpha": args.real_lora_rank,
        "lora_relative_norm": args.real_lora_norm,
        "lora_relative_norm_measured": lora_sizes,
        "sigmas": list(args.real_sigmas),
        "x0_relative_difference_vs_fp32": x0_differences(models, "fp32", x0, noise, args.real_sigmas, embeds),
    }
    write_json(args.output, {"machine": machine, **results})


@torch.no_grad()
def set_random_lora(models: dict, relative_norm: float) -> dict:
    """Random B matrices, the same on every base, each scaled so ‖B·A‖·scale = relative_norm · ‖W‖ (Frobenius) for
    the fp32 weight W it adapts; returns the measured range of that ratio."""
    fp32 = models["fp32"]
    g = torch.Generator().manual_seed(2)
    ratios = []
    for name, module in fp32.named_modules():
        if not hasattr(module, "lora_B") or STUDENT_ADAPTER not in module.lora_B:
            continue
        a = module.lora_A[STUDENT_ADAPTER].weight
        b = torch.randn(module.lora_B[STUDENT_ADAPTER].weight.shape, generator=g)
        delta = module.scaling[STUDENT_ADAPTER] * (b @ a)
        b *= relative_norm * module.base_layer.weight.norm() / delta.norm()
        ratios.append(
            float((module.scaling[STUDENT_ADAPTER] * b @ a).norm() / module.base_layer.weight.norm())
        )
        for model in models.values():
            layer = model.get_submodule(name)
            layer.lora_A[STUDENT_ADAPTER].weight.copy_(a)
            layer.lora_B[STUDENT_ADAPTER].weight.copy_(b)
    return {"min": min(ratios), "max": max(ratios), "layers": len(ratios)}


# --------------------------------------------------------------------------------------------------------------


def print_tables(results: dict) -> None:
    if "toy" in results:
        t = results["toy"]
        print(f"\n(a) toy world: {t['eval_clips']} clips ({len(t['eval_captions'])} held-out captions × "
              f"{t['seeds_per_caption']} seeds), LoRA students {t['train_steps']} steps")  # fmt: skip
        cols = (
            ["accuracy_all"]
            + [f"acc_{a}" for a in ATTRIBUTES]
            + ["sharpness", "fd", "motion_consistency", "diversity"]
        )
        short = {"accuracy_all": "acc_all", "motion_consistency": "motion"}
        header = f"{'run':32s}{'NFE':>5s}" + "".join(
            f"{short.get(c, c.replace('acc_', '')):>9s}" for c in cols
        )
        header += f"{'gap sharp':>10s}{'gap fd':>8s}"
        print(header + "\n" + "-" * len(header))
        for name, r in t["rows"].items():
            cells = "".join(f"{r[c]:9.3f}" if r[c] is not None else f"{'-':>9s}" for c in cols)
            gap = r.get("gap_closed", {})
            gaps = "".join(f"{gap[k]:{w}.2f}" if gap.get(k) is not None else " " * w
                           for k, w in (("sharpness", 10), ("fd", 8)))  # fmt: skip
            print(f"{name[:32]:32s}{r['nfe']:5d}{cells}{gaps}")
        print("\nint8 base vs fp32 base, relative difference of the sampled latents (same noise): teacher "
              f"{t['teacher_int8_vs_fp32_latents']:.4f} (50 steps)")  # fmt: skip
        for key, value in t.items():
            if key.endswith("_int8_vs_fp32"):
                print(f"  {key}: {value['latents']:.4f}; clips whose judged attributes all agree "
                      f"{value['clips_all_attributes_agree']:.3f}")  # fmt: skip
            if key.endswith("_x0"):
                print_x0(key, value)
            if key == "lora_trained_int8_vs_trained_fp32_latents":
                print("int8-trained vs fp32-trained LoRA, relative difference of the sampled latents: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in value.items()))  # fmt: skip
    if "real" in results:
        r = results["real"]
        print(f"\n(b) {r['model']}: {r['transformer_parameters'] / 1e6:.0f} M parameters, latent {r['latent_BCTHW']}, "
              f"LoRA rank {r['lora_rank']} (‖ΔW‖/‖W‖ = {r['lora_relative_norm']:g})")  # fmt: skip
        print_x0("x0 relative difference vs fp32", r["x0_relative_difference_vs_fp32"])


def print_x0(title: str, table: dict) -> None:
    print(f"{title}:")
    print(f"  {'':18s}{' x0 ':-^32s}  {' adapted layers ':-^21s}")
    print(f"  {'σ':>7s} {'base':>10s}{'no LoRA':>10s} {'LoRA':>10s} {'LoRA part':>10s}  {'no LoRA':>10s} {'LoRA':>10s}"
          "   LoRA's effect on fp32 x0")  # fmt: skip
    for sigma, row in table.items():
        for label, v in row.items():
            if isinstance(v, dict):
                print(f"  {sigma:>7s} {label:>10s}{v['base']:10.5f} {v['lora']:10.5f} {v['lora_contribution']:10.5f}  "
                      f"{v['layers_base']:10.5f} {v['layers_lora']:10.5f}   {row['lora_effect']:.4f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--part", choices=["toy", "real", "both"], default="both")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each toy LoRA student")
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per held-out caption")
    parser.add_argument("--train-on", nargs="+", default=list(TOY_BASES), choices=list(TOY_BASES))
    parser.add_argument("--real-lora-rank", type=int, default=128)
    parser.add_argument("--real-lora-norm", type=float, default=0.05, help="‖ΔW‖/‖W‖ of the random LoRA")
    parser.add_argument("--real-latent", type=int, nargs=3, default=[3, 16, 16], metavar=("T", "H", "W"))
    parser.add_argument("--real-sigmas", type=float, nargs="+", default=[1.0, 0.757, 0.522, 0.25])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    machine = dict(platform=platform.platform(), cpu_count=os.cpu_count(), torch=torch.__version__,
                   torch_threads=args.threads)  # fmt: skip
    results: dict = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="int8-base-") as workdir:  # exported students, the skeleton
        args.workdir = Path(workdir)
        if args.part in ("toy", "both"):
            toy(args, machine, results)
        if args.part in ("real", "both"):
            real(args, machine, results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.output, {"machine": machine, **results})
    print_tables(results)
    print(f"\nwrote {args.output} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
