"""Block-causal attention on the stock Wan transformer: the mask, the KV cache against the full pass, rotary
offsets, the rolling window, LoRA, gradient checkpointing, and a clean exit back to the bidirectional model."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from dmd.distill.rollout import RolloutSchedule
from dmd.wan.causal import BlockCausalProcessor, KVCache, block_causal, block_mask
from dmd.wan.tiny import build_transformer

B, C, H, W = 2, 4, 4, 4
TPF = (H // 2) * (W // 2)  # tokens per latent frame at patch (1, 2, 2)
CONTEXT_T, BLOCK_T = 100.0, 757.0  # timesteps (1000·σ) of the context and of the block being denoised
LAYOUTS = {
    "independent_first_frame": RolloutSchedule((1.0,), 3, independent_first_frame=True).block_ranges(7),
    "equal_blocks": RolloutSchedule((1.0,), 2).block_ranges(6),
}


def _model(num_layers=2, rope_max_seq_len=1024, patch_size=(1, 2, 2), seed=0) -> WanTransformer3DModel:
    # two heads of 12: Wan's rope splits a head 4/4/4 over (t, h, w)
    return build_transformer(in_channels=C, text_dim=16, num_layers=num_layers, ffn_dim=32, seed=seed, freq_dim=16,
                             patch_size=patch_size, rope_max_seq_len=rope_max_seq_len).eval()  # fmt: skip


def _inputs(frames, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)  # blocks at their own σ
    ctx = torch.randn(B, C, frames, H, W, generator=g)  # the same frames re-noised to the context level
    c = torch.randn(B, 5, 16, generator=g)
    return x.to(dtype), ctx.to(dtype), c.to(dtype)


def _run(model, x, timestep, c):
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=c, return_dict=False)[0]


def _per_token(frame_timesteps):
    """(B, frames·TPF) timesteps, frame-major as the transformer flattens its patches."""
    return torch.tensor(frame_timesteps).repeat_interleave(TPF).expand(B, -1)


def _reference(causal, model, x, ctx, c, ranges, b, start_frame=0):
    """Block b's output from the block-causal full pass over [earlier blocks at the context timestep, block b]."""
    start, end = ranges[b]
    clip = torch.cat([ctx[:, :, :start], x[:, :, start:end]], dim=2)
    timestep = _per_token([CONTEXT_T] * (start - ranges[0][0]) + [BLOCK_T] * (end - start))
    shifted = [(s - ranges[0][0], e - ranges[0][0]) for s, e in ranges[: b + 1]]
    with causal.full(shifted, start_frame=start_frame):
        return _run(model, clip[:, :, ranges[0][0] :], timestep, c)[:, :, -(end - start) :]


def _fill(causal, model, cache, block, c):
    with causal.fill(cache):
        _run(model, block, torch.full((B,), CONTEXT_T), c)


def _attend(causal, model, cache, block, c, **kw):
    with causal.attend(cache, **kw):
        return _run(model, block, torch.full((B,), BLOCK_T), c)


def test_block_mask_layout():
    # frame 0 alone, then frames 1-2; two tokens a frame
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(block_mask([(0, 1), (1, 3)], 2), expected)


@torch.no_grad()
def test_mask_hides_later_blocks_but_not_earlier_ones():
    model, ranges = _model(), LAYOUTS["independent_first_frame"]  # [(0, 1), (1, 4), (4, 7)]
    x, _, c = _inputs(7)
    timestep = _per_token([CONTEXT_T] * 4 + [BLOCK_T] * 3)
    later, earlier = x.clone(), x.clone()
    later[:, :, 6] += 1.0  # last frame of the last block
    earlier[:, :, 0] += 1.0  # the first block
    with block_causal(model) as causal, causal.full(ranges):
        out, out_later, out_earlier = (_run(model, v, timestep, c) for v in (x, later, earlier))
    assert torch.equal(out[:, :, :4], out_later[:, :, :4])  # earlier blocks: bit for bit unchanged
    assert not torch.allclose(out[:, :, 4:6], out_later[:, :, 4:6])  # within the block: bidirectional
    for start, end in ranges[1:]:  # not block-diagonal: later blocks see the first
        assert not torch.allclose(out[:, :, start:end], out_earlier[:, :, start:end])


@torch.no_grad()
def test_one_block_is_the_stock_model():
    model = _model()
    x, _, c = _inputs(7)
    timestep = torch.tensor([300.0, 800.0])
    stock = _run(model, x, timestep, c)
    with block_causal(model) as causal:
        with causal.full([(0, 7)]):
            full = _run(model, x, timestep, c)
        with causal.attend(KVCache(B)):  # an empty cache: the block sees itself only
            cached = _run(model, x, timestep, c)
    assert torch.equal(full, stock)
    assert torch.equal(cached, stock)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@torch.no_grad()
def test_cache_equals_block_causal_full_pass(layout):
    model, ranges = _model(), LAYOUTS[layout]
    x, ctx, c = _inputs(ranges[-1][1])
    with block_causal(model) as causal:
        cache = KVCache(B)
        for b, (start, end) in enumerate(ranges):
            assert (cache.end_frame, cache.num_frames) == (start, start)
            out = _attend(causal, model, cache, x[:, :, start:end], c)
            ref = _reference(causal, model, x, ctx, c, ranges, b)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            _fill(causal, model, cache, ctx[:, :, start:end], c)
        assert cache.keys[0].shape == (B, ranges[-1][1] * TPF, 2, 12)


@torch.no_grad()
def test_block_is_placed_at_its_frames_not_at_zero():
    model, ranges = _model(), LAYOUTS["equal_blocks"]
    x, ctx, c = _inputs(6)
    block = x[:, :, 4:6]
    with block_causal(model) as causal:
        cache = KVCache(B)
        for start, end in ranges[:2]:
            _fill(causal, model, cache, ctx[:, :, start:end], c)
        right = _attend(causal, model, cache, block, c)
        right_explicit = _attend(causal, model, cache, block, c, start_frame=4)
        wrong = _attend(causal, model, cache, block, c, start_frame=0)  # as the stock rope would place it
    assert torch.equal(right, right_explicit)
    assert not torch.allclose(right, wrong, atol=1e-3)


@torch.no_grad()
def test_rolling_window_keeps_the_last_frames_at_their_true_positions():
    ranges = RolloutSchedule((1.0,), 2).block_ranges(8)  # [(0, 2), (2, 4), (4, 6), (6, 8)]
    x, ctx, c = _inputs(8)
    # 2 layers, a window of 4: every fill saw what the unbounded cache's did (the window drops frames only after
    # block 2's fill), so the window holds exactly the unbounded cache's last 4 frames; positions count on
    model = _model()
    with block_causal(model) as causal:
        window, unbounded = KVCache(B, max_frames=4), KVCache(B)
        for start, end in ranges[:3]:
            for cache in (window, unbounded):
                _fill(causal, model, cache, ctx[:, :, start:end], c)
        assert (window.start_frame, window.end_frame, window.num_frames) == (2, 6, 4)
        for layer in range(2):
            assert torch.equal(window.keys[layer], unbounded.keys[layer][:, 2 * TPF :])
            assert torch.equal(window.values[layer], unbounded.values[layer][:, 2 * TPF :])
        assert not torch.allclose(
            _attend(causal, model, window, x[:, :, 6:8], c),
            _attend(causal, model, unbounded, x[:, :, 6:8], c),
        )
    # 1 layer (keys/values then depend on their own token only), a window of 3 frames that splits block 1:
    # block 3 through the window is the full pass over frames 3..7 alone, placed at frames 3..7
    model = _model(num_layers=1)
    with block_causal(model) as causal:
        window = KVCache(B, max_frames=3)
        for start, end in ranges[:3]:
            _fill(causal, model, window, ctx[:, :, start:end], c)
        assert (window.start_frame, window.end_frame, window.num_frames) == (3, 6, 3)
        out = _attend(causal, model, window, x[:, :, 6:8], c)
        kept = [(3, 4), (4, 6), (6, 8)]  # the tail of block 1, block 2, block 3
        ref = _reference(causal, model, x, ctx, c, kept, 2, start_frame=3)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        unbounded = KVCache(B)
        for start, end in ranges[:3]:
            _fill(causal, model, unbounded, ctx[:, :, start:end], c)
        assert not torch.allclose(out, _attend(causal, model, unbounded, x[:, :, 6:8], c))


@torch.no_grad()
def test_exit_restores_the_stock_model():
    model = _model()
    x, ctx, c = _inputs(6)
    timestep = torch.tensor([300.0, 800.0])
    stock_processors = [block.attn1.processor for block in model.blocks]
    before = _run(model, x, timestep, c)
    with block_causal(model) as causal:
        assert all(isinstance(block.attn1.processor, BlockCausalProcessor) for block in model.blocks)
        assert not any(isinstance(block.attn2.processor, BlockCausalProcessor) for block in model.blocks)
        with pytest.raises(RuntimeError, match="inside causal.full"):
            _run(model, x, timestep, c)  # no mode chosen
        with causal.full(LAYOUTS["equal_blocks"]):
            assert not torch.equal(_run(model, x, timestep, c), before)
        _fill(causal, model, KVCache(B), ctx[:, :, :2], c)
    assert [block.attn1.processor for block in model.blocks] == stock_processors
    assert not model.rope._forward_hooks and not model._forward_hooks
    assert torch.equal(_run(model, x, timestep, c), before)


def _lora_model(dtype=torch.float32):
    model = _model()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # peft starts lora_B at zero; make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.to(dtype)


def test_lora_gradient_flows_through_the_current_block_only():
    model, ranges = _lora_model(), LAYOUTS["equal_blocks"]
    x, ctx, c = _inputs(6)
    ctx.requires_grad_(True)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    block = x[:, :, 4:6].clone().requires_grad_(True)
    with block_causal(model) as causal:
        cache = KVCache(B)
        for start, end in ranges[:2]:
            _fill(causal, model, cache, ctx[:, :, start:end], c)
        out = _attend(causal, model, cache, block, c)
        with torch.no_grad():
            ref = _reference(causal, model, x, ctx.detach(), c, ranges, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the processor goes through peft's layers
    out.square().mean().backward()
    assert all(k.grad_fn is None and not k.requires_grad for k in cache.keys + cache.values)
    assert ctx.grad is None  # nothing reaches the context through the cache
    assert block.grad is not None and block.grad.abs().sum() > 0
    for name, p in lora.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _step_then_fill_then_backward(model, x, ctx, c):
    """Block 1 with gradient; block 1's context fill (which rolls the window) before the backward pass."""
    model.zero_grad()
    with block_causal(model) as causal:
        cache = KVCache(B, max_frames=2)
        _fill(causal, model, cache, ctx[:, :, 0:2], c)
        out = _attend(causal, model, cache, x[:, :, 2:4], c)
        _fill(causal, model, cache, ctx[:, :, 2:4], c)  # the cache the recomputation must not see
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads, cache


def test_gradient_checkpointing_same_output_gradient_and_cache():
    model = _lora_model()
    x, ctx, c = _inputs(4)
    out, grads, cache = _step_then_fill_then_backward(model, x, ctx, c)
    model.enable_gradient_checkpointing()
    checkpoint_func = model._gradient_checkpointing_func
    out_ckpt, grads_ckpt, cache_ckpt = _step_then_fill_then_backward(model, x, ctx, c)
    assert model._gradient_checkpointing_func is checkpoint_func  # restored on exit
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6)
    assert (cache_ckpt.start_frame, cache_ckpt.end_frame) == (cache.start_frame, cache.end_frame) == (2, 4)
    for mine, theirs in zip(cache_ckpt.keys + cache_ckpt.values, cache.keys + cache.values):
        assert torch.equal(mine, theirs)


@torch.no_grad()
def test_bfloat16_cache_matches_full_pass():
    model, ranges = _lora_model(torch.bfloat16), LAYOUTS["independent_first_frame"]
    for name, p in model.named_parameters():  # as from_pretrained(torch_dtype=bf16) keeps them
        if any(keep in name for keep in WanTransformer3DModel._keep_in_fp32_modules):
            p.data = p.data.float()
    x, ctx, c = _inputs(7, dtype=torch.bfloat16)
    with block_causal(model) as causal:
        cache = KVCache(B)
        for b, (start, end) in enumerate(ranges):
            out = _attend(causal, model, cache, x[:, :, start:end], c)
            assert out.dtype == torch.bfloat16
            ref = _reference(causal, model, x, ctx, c, ranges, b)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=3e-2)
            _fill(causal, model, cache, ctx[:, :, start:end], c)
        assert cache.keys[0].dtype == torch.bfloat16


@torch.no_grad()
def test_clear_errors():
    with pytest.raises(ValueError, match="temporal patch size must be 1"):
        with block_causal(_model(patch_size=(2, 2, 2))):
            pass
    model = _model(rope_max_seq_len=6)
    x, ctx, c = _inputs(8)
    with block_causal(model) as causal:
        with pytest.raises(RuntimeError, match="already active"):
            with block_causal(model):
                pass
        with causal.full([(0, 2), (3, 4)]), pytest.raises(ValueError, match="do not tile"):
            _run(model, x[:, :, :4], torch.full((B,), BLOCK_T), c)
        with pytest.raises(ValueError, match="batch size 3 used with a batch of 2"):
            _attend(causal, model, KVCache(3), x[:, :, :2], c)
        cache = KVCache(B, max_frames=2)
        with causal.fill(cache), torch.enable_grad(), pytest.raises(RuntimeError, match="without gradient"):
            _run(model, ctx[:, :, :2], torch.full((B,), CONTEXT_T), c)
        assert cache.end_frame == 0
        for start in range(0, 6, 2):  # the window stays at 2 frames, the positions reach the table's end
            _fill(causal, model, cache, ctx[:, :, start : start + 2], c)
        assert (cache.num_frames, cache.end_frame) == (2, 6)
        with pytest.raises(ValueError, match="outside the rotary table's 6 frames"):
            _attend(causal, model, cache, x[:, :, 6:8], c)
        with pytest.raises(ValueError, match="tokens per frame"):
            _attend(causal, model, cache, torch.randn(B, C, 2, 8, 8), c)
    assert not isinstance(model.blocks[0].attn1.processor, BlockCausalProcessor)
