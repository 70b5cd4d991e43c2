"""Evaluation metrics: speed (NFE, wall time by phase, peak memory) and quality (Fréchet distance, CLIP score).

Speed is measured, never assumed: NFE comes from a forward hook on the transformer, times from a clock read after
synchronising the device, memory from the allocator (CUDA) or the kernel's peak-RSS counter (CPU).
Quality metrics are small pure functions over features; `FeatureModel` turns frames and captions into features.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

PHASES = ("text_encoding", "dit", "vae_decode")


# --------------------------------------------------------------------------------------------------------------
# Speed


class NFECounter:
    """Counts forward passes of a module while active: `calls` and `samples` (the batch sizes summed).

    A CFG step with cond and uncond in separate calls counts 2 per video; in one batched call of 2B it counts
    2B samples for B videos. `samples / videos` is therefore the NFE per video either way.
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self.samples = 0
        self._handle = None

    def _hook(self, module, args, kwargs, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.calls += 1
        self.samples += int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 1

    def __enter__(self) -> NFECounter:
        self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so a clock read after it includes that work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class PhaseTimer:
    """Wall time per phase and per video: `with timer.phase("dit"): ...`, then `timer.end_video()`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.videos: list[dict[str, float]] = []
        self._current: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        yield
        synchronize(self.device)
        self._current[name] += time.perf_counter() - start

    def end_video(self) -> None:
        self.videos.append(dict(self._current))
        self._current = defaultdict(float)

    def mean_seconds(self) -> dict[str, float]:
        """Mean seconds per video of each phase, and `end_to_end`, their sum."""
        return {n: float(np.mean(v)) for n, v in self.per_phase().items()}

    def median_seconds(self) -> dict[str, float]:
        """Median seconds per video of each phase, and `end_to_end` (the median of the per-video sums)."""
        return {n: float(np.median(v)) for n, v in self.per_phase().items()}

    def per_phase(self) -> dict[str, list[float]]:
        """Seconds of every timed video, per phase and `end_to_end` (their sum), in the order timed."""
        if not self.videos:
            raise ValueError("no timed videos")
        names = sorted({k for v in self.videos for k in v}, key=lambda n: (n not in PHASES, n))
        out = {n: [v.get(n, 0.0) for v in self.videos] for n in names}
        out["end_to_end"] = [sum(v.values()) for v in self.videos]
        return out


def quartiles(values) -> tuple[float, float, float]:
    """(first quartile, median, third quartile): a figure and its spread, robust to a few outliers."""
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return float(q1), float(median), float(q3)


def _rss_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand memory that is freed but still held by the C allocator back to the OS (glibc), so the resident set
    at the start of a measurement is what is live, not what earlier runs left behind."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline keeps freed memory, the delta reads low
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux only."""
    _release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory while active, in MiB. `kind` says what was measured:

    - `cuda_max_allocated`: `torch.cuda.max_memory_allocated` (weights included, allocator cache excluded);
    - `cpu_peak_rss_delta`: the process's peak resident set minus its resident set on entry, after freed heap
      memory is returned to the OS (Linux): what the run allocates on top of what was already live;
    - `cpu_max_rss_delta`: the same from getrusage, whose peak cannot be reset (a lower bound after a larger
      earlier peak).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mb: float | None = None
        self.kind = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif _reset_peak_rss() and _rss_kb("VmHWM") is not None:
            self._start_kb = _rss_kb("VmRSS")
            self.kind = "cpu_peak_rss_delta"
        else:
            self._start_kb = _max_rss_kb()
            self.kind = "cpu_max_rss_delta"
        return self

    def __exit__(self, *exc) -> None:
        if self.kind == "cuda_max_allocated":
            synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "cpu_peak_rss_delta":
            self.mb = max(0, _rss_kb("VmHWM") - self._start_kb) / 1024
        else:
            self.mb = max(0, _max_rss_kb() - self._start_kb) / 1024


def _max_rss_kb() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage // 1024 if sys.platform == "darwin" else usage  # bytes on macOS, KiB on Linux


@dataclass
class SpeedStats:
    """What one compared run cost, per video."""

    nfe: float
    seconds: dict[str, float]  # phases of PHASES and end_to_end, median per video
    peak_memory_mb: float
    peak_memory_kind: str
    timed_videos: int
    warmup_videos: int
    device: str
    per_video: list[dict[str, float]] = field(
        default_factory=list
    )  # every timed video's phases, in item order
    weights_mb: float | None = None  # the transformer's parameters and buffers

    def as_dict(self) -> dict:
        out = {
            "nfe": self.nfe,
            "seconds_per_video": self.seconds["end_to_end"],
            "dit_seconds_per_video": self.seconds.get("dit", 0.0),
            "breakdown_seconds": {p: self.seconds.get(p, 0.0) for p in PHASES},
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_kind": self.peak_memory_kind,
            "transformer_weights_mb": self.weights_mb,
            "timed_videos": self.timed_videos,
            "warmup_videos": self.warmup_videos,
            "device": self.device,
        }
        if self.per_video:
            dit = [v.get("dit", 0.0) for v in self.per_video]
            total = [sum(v.values()) for v in self.per_video]
            out["dit_seconds_quartiles"] = list(quartiles(dit))
            out["seconds_per_video_quartiles"] = list(quartiles(total))
        return out


def module_mb(module: torch.nn.Module) -> float:
    """MiB held by a module's parameters and buffers (what its weights cost, whatever the device)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def paired_speedup(baseline: list[dict[str, float]], run: list[dict[str, float]], phase: str | None):
    """(q1, median, q3) of the per-video ratios baseline / run of the same videos (same prompt and seed, timed
    next to each other), for one phase or, with None, end to end."""

    def seconds(v: dict[str, float]) -> float:
        return sum(v.values()) if phase is None else v.get(phase, 0.0)

    if len(baseline) != len(run) or not run:
        raise ValueError(f"paired speed-up needs the same videos: {len(baseline)} against {len(run)}")
    return quartiles([speedup(seconds(b), seconds(r)) for b, r in zip(baseline, run)])


def dmd_step_pass_counts(distillation_config) -> dict[str, int]:
    """How many transformer passes of each kind one DMD step runs (`DMDMethod`: a generator update, then a critic
    update), keyed as `dmd_pass_seconds` times them. Only with `last_step_only`: otherwise the exit step, and with
    it the number of rollout passes, is drawn at random each step.

    Generator update: K−1 student passes without gradient, the exit pass with it (and its backward), the real
    score (cond + uncond in one batch when it has CFG), the fake score. Critic update: K student passes without
    gradient, the fake score's forward and backward.
    """
    dc = distillation_config
    if not dc.last_step_only:
        raise ValueError(
            "the number of rollout passes of a DMD step is random unless last_step_only is set; set "
            "train.distillation_config.last_step_only: true to count them"
        )
    k = len(dc.dmd_denoising_steps)
    return {
        "student_forward": 2 * k - 1,
        "student_forward_backward": 1,
        "real_forward": 1,
        "fake_forward": 1,
        "fake_forward_backward": 1,
    }


def dmd_pass_seconds(
    roles,
    distillation_config,
    x_BCTHW: torch.Tensor,
    c_BLD: torch.Tensor,
    *,
    repeats: int = 1,
    warm_up: bool = True,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Median seconds of each kind of pass in `dmd_step_pass_counts`, run on `roles` (dmd.distill.roles.Roles) at timestep
    500 with `x_BCTHW` and `c_BLD`, the device synchronised around each. The real score runs as a batch of two
    when the step gives it CFG (real_score_guidance_scale ≠ 1), the fake score when fake_score_guidance_scale ≠ 0;
    `autocast` is the training run's (e.g. `accelerator.autocast`). Gradients are left cleared."""
    dc = distillation_config
    device = x_BCTHW.device
    t_BT = torch.full((x_BCTHW.shape[0], x_BCTHW.shape[2]), 500.0, device=device)
    trainable = roles.student_parameters() + roles.critic_parameters()

    def forward(role, pair: bool) -> None:
        x, t, c = x_BCTHW, t_BT, c_BLD
        if pair:  # cond and uncond as one batch, as `guided_x0` runs them
            x, t, c = torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c])
        with torch.no_grad(), autocast():
            role(x, t, c)

    def forward_backward(role) -> None:
        with autocast():
            loss = role(x_BCTHW, t_BT, c_BLD).square().mean()
        loss.backward()
        for p in trainable:
            p.grad = None

    passes = {
        "student_forward": lambda: forward(roles.student, False),
        "student_forward_backward": lambda: forward_backward(roles.student),
        "real_forward": lambda: forward(roles.real, dc.real_score_guidance_scale != 1),
        "fake_forward": lambda: forward(roles.fake, dc.fake_score_guidance_scale != 0),
        "fake_forward_backward": lambda: forward_backward(roles.fake),
    }
    seconds = {}
    for name, run in passes.items():
        if warm_up:
            run()
        samples = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            samples.append(time.perf_counter() - start)
        seconds[name] = float(np.median(samples))
    return seconds


def speedup(baseline_seconds: float, seconds: float) -> float:
    """How many times faster than the baseline (baseline / this)."""
    if seconds <= 0:
        raise ValueError(f"cannot compute a speed-up against {seconds} seconds")
    return baseline_seconds / seconds


def gap_closed(few: float, full: float, student: float) -> float | None:
    """Fraction of the few-step teacher → full teacher gap that the student closes (1 = matches full).

    None when the two teachers score the same (no gap to close).
    """
    if abs(full - few) < 1e-12:
        return None
    return (student - few) / (full - few)


# --------------------------------------------------------------------------------------------------------------
# Quality: pure functions over features


def _psd_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix with rounding noise (|λ| ≤ n·eps·λmax) set to exactly 0."""
    tol = len(w) * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(_psd_eigenvalues(w))) @ v.T


def frechet_distance(features_a_ND: np.ndarray, features_b_MD: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:

    ‖μa − μb‖² + tr Σa + tr Σb − 2·tr (Σa^½ Σb Σa^½)^½

    The trace term is computed from symmetric eigendecompositions, so it stays exact when the covariances are
    singular (fewer samples than feature dimensions, as with a few dozen videos).
    """
    a = np.asarray(features_a_ND, dtype=np.float64)
    b = np.asarray(features_b_MD, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) feature sets with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(
            f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)} "
            "(raise evaluate.num_seeds or add prompts)"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = np.sqrt(_psd_eigenvalues(np.linalg.eigvalsh((middle + middle.T) / 2))).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)
    return max(value, 0.0)


def clip_score(frame_features_NTD: torch.Tensor, text_features_ND: torch.Tensor) -> float:
    """CLIP score of videos against captions: 100·max(cos(frame, caption), 0), averaged over frames and videos."""
    if frame_features_NTD.ndim != 3 or text_features_ND.ndim != 2:
        raise ValueError(
            f"need (N, T, D) frame features and (N, D) text features, got {tuple(frame_features_NTD.shape)} and "
            f"{tuple(text_features_ND.shape)}"
        )
    if len(frame_features_NTD) != len(text_features_ND):
        raise ValueError(f"{len(frame_features_NTD)} videos but {len(text_features_ND)} captions")
    frames = torch.nn.functional.normalize(frame_features_NTD.double(), dim=-1)
    text = torch.nn.functional.normalize(text_features_ND.double(), dim=-1)
    cosine_NT = torch.einsum("ntd,nd->nt", frames, text)
    return float((100 * cosine_NT.clamp(min=0)).mean())


def video_features(frame_features_NTD: torch.Tensor) -> np.ndarray:
    """One feature per video: the per-frame features averaged over time."""
    return frame_features_NTD.double().mean(1).cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# Feature models


class FeatureModelError(ValueError):
    pass


class FeatureModel:
    """A vision(-language) model from transformers that embeds video frames (and, for CLIP, captions).

    Supported: a full CLIP (`CLIPModel`: image and text features), a CLIP vision tower with projection
    (`CLIPVisionModelWithProjection`), or any `AutoModel` vision backbone with a pooled output (e.g. DINOv2).
    The image processor and tokenizer are loaded from the same id or directory.
    """

    def __init__(self, name_or_path: str, key: str, device: torch.device | str = "cpu", batch_size: int = 32):
        from transformers import AutoConfig, AutoImageProcessor

        self.name = name_or_path
        self.device = torch.device(device)
        self.batch_size = batch_size
        try:
            config = AutoConfig.from_pretrained(name_or_path)
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise FeatureModelError(
                f"{key}='{name_or_path}': cannot load a model config and image processor "
                f"({str(e).splitlines()[0][:160]}). Set it to a local directory holding a transformers vision "
                f"model, e.g. one saved from openai/clip-vit-base-patch32"
                + (" (HF_HUB_OFFLINE is set, so hub ids must already be cached)" if offline else "")
                + ", or to null to skip the metric."
            ) from e
        self.model_type = config.model_type
        self.tokenizer = None
        if self.model_type == "clip":
            from transformers import AutoTokenizer, CLIPModel

            self.model = CLIPModel.from_pretrained(name_or_path)
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        elif self.model_type == "clip_vision_model":
            from transformers import CLIPVisionModelWithProjection

            self.model = CLIPVisionModelWithProjection.from_pretrained(name_or_path)
        else:
            from transformers import AutoModel

            self.model = AutoModel.from_pretrained(name_or_path)
        self.model.to(self.device).eval().requires_grad_(False)

    @property
    def has_text(self) -> bool:
        return self.tokenizer is not None

    @torch.no_grad()
    def _image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        if self.model_type == "clip":
            out = self.model.get_image_features(pixel_values=pixels)
        elif self.model_type == "clip_vision_model":
            out = self.model(pixel_values=pixels).image_embeds
        else:
            result = self.model(pixel_values=pixels)
            pooled = getattr(result, "pooler_output", None)
            out = pooled if pooled is not None else result.last_hidden_state.mean(1)
        return out.float().cpu()

    def frame_features(self, clips: list[np.ndarray]) -> torch.Tensor:
        """(N, T, D) features of every frame of N uint8 (T, H, W, 3) clips of equal length."""
        lengths = {len(c) for c in clips}
        if len(lengths) != 1:
            raise ValueError(f"clips of different lengths {sorted(lengths)}; evaluate clips of one length")
        frames = [f for clip in clips for f in clip]
        feats = [
            self._image_features(frames[i : i + self.batch_size])
            for i in range(0, len(frames), self.batch_size)
        ]
        return torch.cat(feats).view(len(clips), lengths.pop(), -1)

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> torch.Tensor:
        if not self.has_text:
            raise FeatureModelError(f"'{self.name}' ({self.model_type}) has no text tower; use a full CLIP")
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
        ).to(self.device)
        return (
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
            .float()
            .cpu()
        )
