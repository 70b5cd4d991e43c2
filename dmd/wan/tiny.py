"""Tiny Wan components built from config, with a tokenizer built locally: no hub, no downloads.

`save_tiny_wan(dir)` writes an ordinary diffusers Wan directory that `WanPipeline.from_pretrained(dir)` loads.
The toy teacher uses the same builders with its own sizes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from dmd.core.io import atomic_dir

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5's sentencepiece vocabulary

BASIC_WORDS = (
    "a an the and or of in on at to with without from by for is are moving moves slowly quickly slow fast "
    "left right up down small large big one two three red green blue yellow white black square circle cross "
    "ball box ring dot stripe striped solid video clip scene"
).split()


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (lower-cased, punctuation split off), with T5's special tokens."""
    vocab_words = sorted({w.lower() for w in (words or []) + BASIC_WORDS})
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    for ch in ".,;:!?'\"-()":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def caption_words(captions: list[str]) -> list[str]:
    return sorted({w for c in captions for w in re.findall(r"[\w]+", c.lower())})


def build_text_encoder(vocab_size: int, d_model: int = 32, seed: int = 0) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=max(4, d_model // 4),
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def build_vae(z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> AutoencoderKLWan:
    """4× spatial, 4× temporal compression (21 frames at 32×32 → 6 latent frames at 8×8)."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=base_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_temporal=4,
        scale_factor_spatial=4,
    ).eval()


def build_transformer(
    in_channels: int = 4,
    text_dim: int = 32,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 12,
    ffn_dim: int = 48,
    seed: int = 0,
    freq_dim: int = 32,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    rope_max_seq_len: int = 64,
) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=patch_size,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        rope_max_seq_len=rope_max_seq_len,
    )


def build_scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def build_tiny_pipeline(words: list[str] | None = None, seed: int = 0, shift: float = 3.0) -> WanPipeline:
    tokenizer = build_tokenizer(words)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=build_text_encoder(len(tokenizer), seed=seed),
        vae=build_vae(seed=seed),
        transformer=build_transformer(seed=seed),
        scheduler=build_scheduler(shift),
    )


def save_pipeline(pipe: WanPipeline, path: str | Path) -> Path:
    """Save as a diffusers directory, atomically (safetensors weights)."""
    with atomic_dir(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(path)


def save_tiny_wan(path: str | Path, words: list[str] | None = None, seed: int = 0) -> Path:
    return save_pipeline(build_tiny_pipeline(words, seed=seed), path)
