"""Evaluation metrics on hand-made sets: Fréchet distance against closed forms, CLIP score on a tiny CLIP trained
here to match colours with their names, NFE from a real WanPipeline, timing and memory meters."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy import linalg

from dmd.evaluation.metrics import (
    FeatureModel,
    FeatureModelError,
    NFECounter,
    PeakMemory,
    PhaseTimer,
    clip_score,
    frechet_distance,
    gap_closed,
    speedup,
    video_features,
)

COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 235),
    "yellow": (240, 220, 30),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _fd_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (fine for full-rank covariances)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_frechet_distance_matches_textbook_formula_on_full_rank_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 5))
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 0.7
    assert frechet_distance(a, b) == pytest.approx(_fd_scipy(a, b), rel=1e-8)


def test_frechet_distance_one_dimensional_closed_form():
    # two 1-D Gaussians: (μa − μb)² + (σa − σb)²
    rng = np.random.default_rng(1)
    a, b = rng.normal(2.0, 1.0, size=(1000, 1)), rng.normal(-1.0, 3.0, size=(800, 1))
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_identical_and_shifted_sets_with_fewer_samples_than_dims():
    # 12 samples in 64 dimensions: singular covariances, as with a few dozen videos in CLIP space
    rng = np.random.default_rng(2)
    a = rng.normal(size=(12, 64))
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-8)
    # a constant shift leaves the covariance alone: the distance is exactly ‖shift‖²
    assert frechet_distance(a, a + 0.5) == pytest.approx(64 * 0.25, rel=1e-8)
    assert frechet_distance(a, rng.normal(size=(12, 64)) * 3) > 100


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


# --------------------------------------------------------------------------------------------------------------
# CLIP score and feature models on a tiny CLIP


def _colour_clip(name: str, rng: np.random.Generator, frames: int = 3, size: int = 32) -> np.ndarray:
    base = np.array(COLOURS[name], dtype=np.float64)
    return np.clip(base + rng.normal(0, 20, (frames, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP saved like a hub model (weights, tokenizer, image processor), trained here for a few dozen
    steps so that each colour's frames align with the caption that names it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from dmd.wan.tiny import build_tokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tokenizer = build_tokenizer(list(COLOURS))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,  # pooled text feature at the tokenizer's </s>
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    names = list(COLOURS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        batch = [names[i] for i in rng.permutation(len(names))]
        pixels = processor(images=[_colour_clip(n, rng, 1)[0] for n in batch], return_tensors="pt")
        text = tokenizer([f"a {n} square" for n in batch], padding=True, return_tensors="pt")
        loss = model(
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            pixel_values=pixels["pixel_values"],
            return_loss=True,
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, "the tiny CLIP did not learn colour names; the tests below would mean nothing"
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_score_drops_when_captions_are_shuffled(tiny_clip_dir):
    model = FeatureModel(str(tiny_clip_dir), "evaluate.clip_model")
    rng = np.random.default_rng(5)
    names = [n for n in COLOURS for _ in range(2)]
    clips = [_colour_clip(n, rng) for n in names]
    frames = model.frame_features(clips)
    assert frames.shape[:2] == (len(clips), 3)
    matched = clip_score(frames, model.text_features([f"a {n} square" for n in names]))
    # a derangement: every clip gets another colour's caption
    shuffled_names = names[2:] + names[:2]
    shuffled = clip_score(frames, model.text_features([f"a {n} square" for n in shuffled_names]))
    assert matched > shuffled + 20, (matched, shuffled)


def test_clip_score_is_the_mean_clamped_cosine():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [1.0, 1.0]]])  # (N=2, T=2, D=2)
    text = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    # video 1: cos 1 and 0; video 2: cos −1 → 0 and 1/√2
    expected = 100 * (1 + 0 + 0 + 2**-0.5) / 4
    assert clip_score(frames, text) == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 videos but 1 captions"):
        clip_score(frames, text[:1])


def test_feature_frechet_distance_same_vs_different_videos(tiny_clip_dir):
    model = FeatureModel(str(tiny_clip_dir), "evaluate.feature_model", batch_size=5)
    rng = np.random.default_rng(6)
    warm = [_colour_clip(n, rng) for n in ("red", "yellow", "red", "yellow", "red", "yellow")]
    cold = [_colour_clip(n, rng) for n in ("blue", "green", "blue", "green", "blue", "green")]
    warm_feats = video_features(model.frame_features(warm))
    same = frechet_distance(warm_feats, video_features(model.frame_features(warm)))
    other_warm = video_features(model.frame_features([_colour_clip(n, rng) for n in ("red", "yellow") * 3]))
    different = frechet_distance(warm_feats, video_features(model.frame_features(cold)))
    assert same == pytest.approx(0.0, abs=1e-6)
    assert different > 5 * frechet_distance(warm_feats, other_warm) > 0


def test_clip_vision_model_gives_features_without_text(tiny_clip_dir, tmp_path):
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(tiny_clip_dir)
    vision_config = full.config.vision_config
    vision_config.projection_dim = full.config.projection_dim
    vision = CLIPVisionModelWithProjection(vision_config)
    vision.vision_model.load_state_dict(full.vision_model.state_dict())
    vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
    vision.save_pretrained(tmp_path)
    CLIPImageProcessor.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)

    clips = [_colour_clip(n, np.random.default_rng(7)) for n in ("red", "blue")]
    only_vision = FeatureModel(str(tmp_path), "evaluate.feature_model")
    both = FeatureModel(str(tiny_clip_dir), "evaluate.feature_model")
    assert not only_vision.has_text
    torch.testing.assert_close(
        only_vision.frame_features(clips), both.frame_features(clips), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(FeatureModelError, match="no text tower"):
        only_vision.text_features(["a red square"])


def test_feature_model_missing_names_the_key(tmp_path):
    with pytest.raises(FeatureModelError, match=r"evaluate\.feature_model='.*nowhere'.*null to skip"):
        FeatureModel(str(tmp_path / "nowhere"), "evaluate.feature_model")


# --------------------------------------------------------------------------------------------------------------
# Speed meters


def test_nfe_counter_counts_cfg_as_two_and_batches_per_sample(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent")
    for prompts, guidance, expected_calls in (
        (["a red square"], 3.0, 4),
        (["a", "b"], 3.0, 4),
        (["a"], 1.0, 2),
    ):
        with NFECounter(pipe.transformer) as nfe:
            pipe(prompt=prompts, guidance_scale=guidance, **kwargs)
        assert nfe.calls == expected_calls
        assert nfe.samples / len(prompts) == expected_calls  # NFE per video
    # the hook is gone afterwards
    pipe(prompt=["a"], guidance_scale=1.0, **kwargs)
    assert nfe.calls == 2


def test_phase_timer_sums_phases_per_video():
    timer = PhaseTimer("cpu")
    for sleep in (0.02, 0.04):
        with timer.phase("dit"):
            time.sleep(sleep)
        with timer.phase("vae_decode"):
            time.sleep(0.01)
        timer.end_video()
    means = timer.mean_seconds()
    assert means["dit"] == pytest.approx(0.03, abs=0.01)
    assert means["end_to_end"] == pytest.approx(means["dit"] + means["vae_decode"])
    assert list(means)[:2] == ["dit", "vae_decode"]


def test_peak_memory_sees_a_transient_allocation():
    with PeakMemory("cpu") as small:
        pass
    with PeakMemory("cpu") as big:
        block = np.ones(96 * 2**20 // 8)  # 96 MiB, touched
        del block
    assert big.kind.startswith("cpu_")
    assert big.mb >= 80
    if big.kind == "cpu_peak_rss_delta":  # resettable peak: an empty region measures ~nothing
        assert small.mb < 20


def test_speedup_and_gap_closed():
    assert speedup(10.0, 0.4) == pytest.approx(25.0)
    with pytest.raises(ValueError):
        speedup(1.0, 0.0)
    # sharpness: few 0.4, full 0.8, student 0.72 → 80% of the gap; FD (lower is better): 10 → 2, student 3.6
    assert gap_closed(0.4, 0.8, 0.72) == pytest.approx(0.8)
    assert gap_closed(10.0, 2.0, 3.6) == pytest.approx(0.8)
    assert gap_closed(0.5, 0.5, 0.9) is None
