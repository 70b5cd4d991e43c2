"""A block-causal (Self-Forcing) student as a diffusers pipeline: `BlockCausalWanPipeline`, a `WanPipeline` that
generates block by block with a KV cache and makes the video `dmd sample` makes.

`WanPipeline` samples a clip as one bidirectional block, which a block-causal student never trained on. This
subclass keeps its components, prompt encoding, input checks, saving and loading, and replaces `__call__` with the
student's own sampler (`dmd.distill.rollout.sample`): each time block attends to itself and the cached keys and values
of the blocks before it, and a clip longer than the trained one keeps a rolling window of the cache.

The student's settings (its σs and time-block layout) live in the pipeline's config, so `save_pretrained` writes them
to `model_index.json` beside the components and `from_pretrained` gives them back. diffusers treats a config entry as
a setting rather than a component only when it is an `__init__` parameter with a default (`_get_signature_keys`);
a required one would be loaded as a (library, class) pair. Hence every setting has a default, None where there is no
sensible one, and the constructor refuses None.

Random draws, as `dmd sample --seed`: the initial noise is the first draw of `generator`, then the same generator
draws the re-noising between steps and each block's context noise, every draw made on the generator's device (the
CPU for a `torch.Generator("cpu")`) and moved to the pipeline's. A list of generators, one per video, samples each
video alone (its own KV cache) from its own generator: `dmd sample --prompt A --prompt B --seed S` is the call with
`[torch.Generator("cpu").manual_seed(S) for _ in range(2)]`. One generator for several videos draws for the whole
batch at once, as `sample` does on a batch, so its videos are not the ones each prompt gets alone.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

from dmd.core.io import atomic_dir
from dmd.core.noise import randn
from dmd.distill.rollout import RolloutSchedule, sample
from dmd.wan.latents import LatentGeometry, denormalize_latents

log = logging.getLogger(__name__)

PIPELINE_FOLDER = "pipeline"  # where `write_student_pipeline` puts the pipeline inside an exported student
OUTPUT_TYPES = ("np", "pt", "pil", "latent")


class BlockCausalWanPipeline(WanPipeline):
    """Text-to-video with a block-causal few-step Wan student (Self-Forcing / CausVid), through diffusers.

    Components are WanPipeline's (`tokenizer`, `text_encoder`, `vae`, `scheduler`, `transformer`; no
    `transformer_2`). The `scheduler` is the student's shipped one, carried so the folder is a complete Wan
    directory; sampling uses the exact σs of the config instead. The config adds the student's settings:

    - `sigmas`: the student's denoising steps as σ, decreasing;
    - `num_frame_per_block`, `independent_first_frame`: the time-block layout it trained with;
    - `context_sigma`: the σ to which finished blocks are re-noised before their keys and values are cached;
    - `num_training_frames`: latent frames of its training rollout; the cache keeps that many less one block, also
      past that length (None: the whole clip).
    """

    _optional_components = ["transformer_2"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        transformer,
        transformer_2=None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
        *,
        sigmas: list[float] | None = None,
        num_frame_per_block: int | None = None,
        independent_first_frame: bool = False,
        context_sigma: float = 0.0,
        num_training_frames: int | None = None,
    ):
        # WanPipeline's own parameters stay in the signature (and its config entries in model_index.json): diffusers
        # counts every non-underscore config entry that is not an optional __init__ parameter as a component, and
        # WanPipeline.__init__ registers all three
        if transformer is None:
            raise ValueError("BlockCausalWanPipeline needs the student's transformer")
        if transformer_2 is not None or boundary_ratio is not None or expand_timesteps:
            raise ValueError(
                "BlockCausalWanPipeline samples one Wan 2.1 transformer: transformer_2, boundary_ratio and "
                "expand_timesteps (Wan 2.2) are not supported"
            )
        if not sigmas or num_frame_per_block is None:
            raise ValueError(
                "BlockCausalWanPipeline needs the student's sigmas and num_frame_per_block (its student.json); "
                "build it with BlockCausalWanPipeline.from_student(student_dir, params) or from_pretrained"
            )
        schedule = RolloutSchedule(
            sigmas=tuple(float(s) for s in sigmas),
            num_frame_per_block=int(num_frame_per_block),
            independent_first_frame=bool(independent_first_frame),
            context_sigma=float(context_sigma),
            num_training_frames=None if num_training_frames is None else int(num_training_frames),
            causal=True,
        )
        _check_schedule(schedule)
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer)
        # plain JSON types, so the config a loaded pipeline has equals the one it was saved with
        self.register_to_config(
            sigmas=list(schedule.sigmas),
            num_frame_per_block=schedule.num_frame_per_block,
            independent_first_frame=schedule.independent_first_frame,
            context_sigma=schedule.context_sigma,
            num_training_frames=schedule.num_training_frames,
        )

    @property
    def schedule(self) -> RolloutSchedule:
        """The student's RolloutSchedule, from the config (block-causal)."""
        config = self.config
        return RolloutSchedule(
            sigmas=tuple(config.sigmas),
            num_frame_per_block=config.num_frame_per_block,
            independent_first_frame=config.independent_first_frame,
            context_sigma=config.context_sigma,
            num_training_frames=config.num_training_frames,
            causal=True,
        )

    @classmethod
    def from_student(cls, student_dir: str | Path, params) -> BlockCausalWanPipeline:
        """The pipeline of an exported block-causal student (`dmd train`'s output directory), on the CPU.

        `params` (a Params, or the path of a params.yaml) names the teacher, whose tokenizer, text encoder and VAE
        the student uses. The transformer is what `dmd sample` loads (`load_student`: a full student's weights, or
        the teacher with the student's LoRA, on an int8 base when it trained on one), so the videos are its.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        from dmd.core.config import load
        from dmd.student.export import load_student, read_card
        from dmd.wan.loading import load_text_encoder, load_vae

        if isinstance(params, (str, Path)):
            params = load(params)
        student_dir = Path(student_dir)
        card = read_card(student_dir)
        if not card.get("causal"):
            raise ValueError(
                f"{student_dir}: this student is bidirectional (student.json has causal: false): load it with "
                "diffusers' WanPipeline as its model card shows, or sample it with `dmd sample`"
            )
        transformer, schedule = load_student(student_dir, params)
        tokenizer, text_encoder = load_text_encoder(params.model)
        return cls(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=load_vae(params.model),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(student_dir, subfolder="scheduler"),
            transformer=transformer,
            sigmas=list(schedule.sigmas),
            num_frame_per_block=schedule.num_frame_per_block,
            independent_first_frame=schedule.independent_first_frame,
            context_sigma=schedule.context_sigma,
            num_training_frames=schedule.num_training_frames,
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
    ):
        """Videos of `prompt` (or `prompt_embeds`), block by block with the KV cache, in the student's steps.

        WanPipeline's arguments, less what a block-causal student cannot do: `num_inference_steps` is the
        student's step count (None takes it); `guidance_scale` must be ≤ 1 and there is no negative prompt (one KV
        cache holds one prompt's context; the guidance is distilled into the student); no step callbacks, no
        attention kwargs, no second transformer. Sizes are not rounded: `height` and `width` must be multiples of
        the VAE's factor times the patch, `num_frames` one more than a multiple of its temporal factor, and the
        latent frames must split into the student's time blocks.

        `generator`: one CPU `torch.Generator` draws the initial noise, then the re-noising and context noise, as
        `dmd sample --seed` does; a list of generators (one per video) samples each video alone from its own; None
        seeds one from torch's global random stream. `latents` replaces the initial noise (the generator then draws
        only the rest). Returns a `WanPipelineOutput` whose `frames` are `output_type`'s: "np" (B, T, H, W, 3) in
        [0, 1], "pt" (B, T, 3, H, W), "pil" lists of images, or "latent" the normalised latents (B, C, T, H, W).
        """
        schedule = self.schedule
        unsupported = {
            "negative_prompt": negative_prompt,
            "negative_prompt_embeds": negative_prompt_embeds,
            "guidance_scale_2": guidance_scale_2,
            "attention_kwargs": attention_kwargs,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
        }
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(
                f"BlockCausalWanPipeline takes no {', '.join(given)}: a block-causal student samples without "
                "classifier-free guidance and without step callbacks"
            )
        if guidance_scale > 1:
            raise ValueError(
                f"guidance_scale={guidance_scale}: a block-causal student samples without classifier-free guidance "
                "(one KV cache holds one prompt's context, and the guidance is distilled into the student); pass "
                "guidance_scale=1.0"
            )
        if num_inference_steps not in (None, schedule.num_steps):
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: this student samples in its {schedule.num_steps} "
                f"trained steps (σ = {', '.join(f'{s:.4g}' for s in schedule.sigmas)}); pass "
                f"num_inference_steps={schedule.num_steps} or leave it out"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {list(OUTPUT_TYPES)}")
        self.check_inputs(prompt, None, height, width, prompt_embeds)
        geometry = LatentGeometry.of(self.transformer, self.vae)
        problem = geometry.size_problem(height, width, num_frames)
        if problem is not None:
            raise ValueError(problem)
        shape = geometry.latent_shape(height, width, num_frames)
        ranges = schedule.block_ranges(shape[1])  # a length the time blocks cannot split raises here

        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        videos = batch_size * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != videos:
            raise ValueError(f"{len(generator)} generators for {videos} videos: pass one per video, or one")
        if latents is not None and tuple(latents.shape) != (videos, *shape):
            raise ValueError(f"latents of shape {tuple(latents.shape)}, expected {(videos, *shape)}")

        self._guidance_scale = guidance_scale
        self._guidance_scale_2 = None
        self._attention_kwargs = None
        self._current_timestep = None
        self._interrupt = False
        self._num_timesteps = schedule.num_steps
        device = self._execution_device

        given_embeds = prompt_embeds is not None
        prompt_embeds, _ = self.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if given_embeds:  # encode_prompt repeats only the embeddings it computes itself
            prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0)

        if isinstance(generator, list):  # each video alone, as `dmd sample` makes each prompt's
            groups = [(slice(i, i + 1), g) for i, g in enumerate(generator)]
        else:
            if generator is None:
                # from torch's global stream, so torch.manual_seed makes a run repeatable as with WanPipeline
                seed = int(torch.randint(0, 2**62, ()).item())
                generator = torch.Generator("cpu").manual_seed(seed)
            groups = [(slice(0, videos), generator)]

        # transformer passes per rollout, for the progress bar: every step of every block, and a cache fill after
        # every block but the last
        passes = len(ranges) * schedule.num_steps + len(ranges) - 1
        out = []
        with self.progress_bar(total=passes * len(groups)) as progress_bar:
            hook = self.transformer.register_forward_hook(lambda *_: progress_bar.update())
            try:
                for videos_slice, group_generator in groups:
                    n = videos_slice.stop - videos_slice.start
                    if latents is None:
                        noise = randn((n, *shape), group_generator, device)
                    else:
                        noise = latents[videos_slice].to(device, torch.float32)
                    out.append(
                        sample(
                            self.transformer,
                            prompt_embeds[videos_slice],
                            noise,
                            schedule,
                            generator=group_generator,
                        )
                    )
            finally:
                hook.remove()
        latents = torch.cat(out)

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(
                self.decode_latents(latents), output_type=output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → the VAE's video tensor (B, 3, T, H, W) in [-1, 1], one video at a time, each as
        `dmd sample` decodes it (dmd.wan.decode.LatentDecoder: WanPipeline's denormalisation, then `vae.decode`)."""
        config = self.vae.config
        decoded = []
        for one in latents.split(1):
            z = denormalize_latents(one.to(self.vae.dtype), config.latents_mean, config.latents_std)
            decoded.append(self.vae.decode(z, return_dict=False)[0])
        return torch.cat(decoded)


def _check_schedule(schedule: RolloutSchedule) -> None:
    sigmas = schedule.sigmas
    if any(not 0 < s <= 1 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas {list(sigmas)} must decrease within (0, 1]")
    if schedule.num_frame_per_block < 1:
        raise ValueError(f"num_frame_per_block={schedule.num_frame_per_block} must be at least 1")
    if not 0 <= schedule.context_sigma <= 1:
        raise ValueError(f"context_sigma={schedule.context_sigma} must lie in [0, 1]")
    if schedule.num_training_frames is not None:
        schedule.block_ranges(schedule.num_training_frames)  # the trained length must split into its blocks


# --------------------------------------------------------------------------------------------------------------
# The pipeline inside an exported student


def write_student_pipeline(student_dir: str | Path, params, folder: str = PIPELINE_FOLDER) -> Path | None:
    """Write the whole pipeline of the exported block-causal student in `student_dir` to `student_dir/folder`
    (`save_pretrained`: every component, the config with the student's settings), for
    `BlockCausalWanPipeline.from_pretrained` to load alone. Call it after the export wrote student.json.

    A LoRA student's adapter is fused into its base first (diffusers cannot load a transformer saved with peft
    layers), so its videos equal `dmd sample`'s to rounding rather than bit for bit; a full student's are exact
    (loaded at the precisions `pipeline_snippet` passes). Returns the folder, or None when there is none to write
    (a folder an earlier export left there is removed): a bidirectional student (WanPipeline loads it), or int8
    weights, which diffusers cannot save (`BlockCausalWanPipeline.from_student` loads such a student).
    """
    from dmd.student.export import read_card

    student_dir = Path(student_dir)
    target = student_dir / folder
    card = read_card(student_dir)
    problem = "bidirectional" if not card.get("causal") else _no_folder(card, params)
    if problem is not None:
        shutil.rmtree(target, ignore_errors=True)
        if problem != "bidirectional":
            log.warning(
                "no diffusers pipeline folder for this student: %s, which diffusers cannot save; load it with "
                "BlockCausalWanPipeline.from_student(%r, params)",
                problem,
                str(student_dir),
            )
        return None
    pipe = BlockCausalWanPipeline.from_student(student_dir, params)
    if getattr(pipe.transformer, "peft_config", None):
        pipe.transformer.fuse_lora()
        pipe.transformer.unload_lora()
    with atomic_dir(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    log.info("wrote the block-causal student's diffusers pipeline to %s", target)
    return target


def _no_folder(card: dict, params) -> str | None:
    """Why a block-causal student gets no pipeline folder, or None: weights optimum-quanto holds in int8 (a LoRA
    trained on an int8 base, which cannot absorb it, or an int8 text encoder)."""
    if card["model_type"] == "lora" and card.get("base_model_precision") == "int8-quanto":
        return "its LoRA trained on an int8-quanto base"
    if params.model.text_encoder_1_precision == "int8-quanto":
        return "its text encoder is int8-quanto"
    return None


def pipeline_snippet(student_dir: str | Path, params, card: dict, folder: str = PIPELINE_FOLDER) -> str:
    """The model card's Python for a block-causal student: its pipeline folder loaded with
    `BlockCausalWanPipeline.from_pretrained` at the precisions `dmd sample` runs it in, and called as `dmd sample`
    samples (paths relative to the folder that holds the student, as the card's other snippet names them). A student
    without a folder (`write_student_pipeline`) is built with `from_student` instead."""
    from dmd.student.sample import pipeline_arguments
    from dmd.wan.loading import DTYPES

    name = Path(student_dir).name
    imports = ["from dmd.student.pipeline import BlockCausalWanPipeline"]
    if _no_folder(card, params) is not None:
        imports.insert(0, "from dmd.core.config import load")
        load = f'pipe = BlockCausalWanPipeline.from_student("{name}", load("params.yaml"))'
    else:
        # diffusers loads every component in float32 unless told otherwise; dmd sample holds the transformer and
        # the text encoder at their configured precisions (the VAE in float32)
        dtypes = {
            component: DTYPES.get(precision, torch.float32)
            for component, precision in (
                ("transformer", params.model.base_model_precision),
                ("text_encoder", params.model.text_encoder_1_precision),
            )
        }
        dtypes = {component: dtype for component, dtype in dtypes.items() if dtype != torch.float32}
        if dtypes:
            mapping = ", ".join(f'"{c}": {d}' for c, d in {**dtypes, "default": torch.float32}.items())
            load = (
                f"pipe = BlockCausalWanPipeline.from_pretrained(\n"
                f'    "{name}/{folder}",\n    torch_dtype={{{mapping}}},\n)'
            )
        else:
            load = f'pipe = BlockCausalWanPipeline.from_pretrained("{name}/{folder}")'
    call = {"num_inference_steps": card["num_steps"], **pipeline_arguments(params)}
    arguments = "".join(f"    {key}={value!r},\n" for key, value in call.items())
    return "\n".join(
        [
            "import torch",
            "",
            *imports,
            "",
            load,
            'pipe.to("cuda" if torch.cuda.is_available() else "cpu")',
            f'video = pipe(\n    "a prompt",\n{arguments}    generator=torch.Generator("cpu").manual_seed(0),\n).frames[0]',
            "",
        ]
    )
