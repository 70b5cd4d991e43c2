"""Block-causal attention for the stock diffusers `WanTransformer3DModel` (CausVid / Self-Forcing students).

`block_causal(transformer)` swaps the self-attention processor of every transformer block (`attn1` only;
cross-attention is untouched) for `BlockCausalProcessor`, and hooks `transformer.rope`; on exit the stock
processors come back and the model is bidirectional again. Inside, a mode is chosen per call and one ordinary
`transformer(hidden_states=..., timestep=..., encoder_hidden_states=..., return_dict=False)` runs it:

- `causal.full(block_ranges)`: the whole clip in one pass, each token seeing its own time block and earlier ones
  (a boolean mask): teacher-forced training.
- `causal.attend(cache)`: only one block's latent frames, at their place in the clip (rotary positions offset),
  attending to the `KVCache`'s keys/values followed by its own: a rollout or sampling step.
- `causal.fill(cache)`: the same pass on a finished block (re-noised to the context level by the caller), without
  gradient, appending the block's keys/values to the cache; `KVCache(max_frames=...)` keeps a rolling window.

`WanTransformer3DModel.forward` passes no attention kwargs to its blocks, so the mode travels with the rotary
embedding: the rope hook returns the stock (cos, sin) pair as a tuple that also carries this call's frozen state
(the mask, or the cache's keys/values as they were when the call began). Gradient checkpointing re-runs a block
with that same tuple during backward, and the checkpointed block is pinned to the block-causal processor, so the
recomputation sees what the forward saw even after later fills changed the cache or the context was left; a fill
is committed to the cache once, after the forward, never by a recomputation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

BlockRanges = Sequence[tuple[int, int]]


def block_mask(
    block_ranges: BlockRanges, tokens_per_frame: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """(S, S) boolean, True where query token i may attend to key token j: j's block is i's or an earlier one.

    Tokens are frame-major (frame f owns tokens [f·tpf, (f+1)·tpf)), as the transformer flattens its patches.
    """
    block_of_frame = torch.cat(
        [torch.full((end - start,), b, dtype=torch.long) for b, (start, end) in enumerate(block_ranges)]
    )
    block_of_token = block_of_frame.repeat_interleave(tokens_per_frame).to(device)
    return block_of_token[None, :] <= block_of_token[:, None]


def check_block_ranges(block_ranges: BlockRanges, num_frames: int) -> None:
    """Raise unless `block_ranges` tile [0, num_frames) with non-empty [start, end) ranges in order."""
    ranges = [tuple(r) for r in block_ranges]
    starts = [0] + [end for _, end in ranges[:-1]]
    if (
        not ranges
        or [start for start, _ in ranges] != starts
        or ranges[-1][1] != num_frames
        or any(end <= start for start, end in ranges)
    ):
        raise ValueError(
            f"block ranges {ranges} do not tile the {num_frames} latent frames [0, {num_frames})"
        )


class KVCache:
    """Per transformer block, the self-attention keys and values of the frames filled so far, for one batch.

    `keys[layer]` and `values[layer]` are (batch_size, frames·tokens_per_frame, heads, head_dim), after norm_k and
    the rotary embedding, as the processor attends with them (empty lists before the first fill). They are never
    modified in place (a fill builds new tensors), so a call that captured them keeps seeing the same values.

    `max_frames` keeps only the most recent frames, a rolling window for sampling past the trained length. Rotary
    positions keep counting: the next block sits at `end_frame` (every frame ever filled), not after the frames
    kept, so the kept keys keep their true positions.
    """

    def __init__(self, batch_size: int, max_frames: int | None = None):
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1 (or None for no limit), got {max_frames}")
        self.batch_size = batch_size
        self.max_frames = max_frames
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.tokens_per_frame: int | None = None
        self.end_frame = 0

    @property
    def num_frames(self) -> int:
        """Frames held now (at most `max_frames`)."""
        return self.keys[0].shape[1] // self.tokens_per_frame if self.keys else 0

    @property
    def start_frame(self) -> int:
        """Clip position of the oldest frame held."""
        return self.end_frame - self.num_frames

    def reset(self) -> None:
        """Empty, positions back to frame 0 (a new clip)."""
        self.keys, self.values, self.tokens_per_frame, self.end_frame = [], [], None, 0

    def _append(self, keys: list[torch.Tensor], values: list[torch.Tensor], frames: int, tpf: int) -> None:
        if self.keys:
            keys = [torch.cat([old, new], dim=1) for old, new in zip(self.keys, keys)]
            values = [torch.cat([old, new], dim=1) for old, new in zip(self.values, values)]
        if self.max_frames is not None:
            keep = self.max_frames * tpf
            keys, values = [k[:, -keep:] for k in keys], [v[:, -keep:] for v in values]
        self.keys, self.values, self.tokens_per_frame = keys, values, tpf
        self.end_frame += frames


@dataclass
class _Mode:
    """What the caller asked for: set by `BlockCausal.full/attend/fill`, read when a forward pass starts."""

    kind: str  # "full" | "attend" | "fill"
    block_ranges: list[tuple[int, int]] | None = None
    start_frame: int | None = None
    cache: KVCache | None = None


@dataclass
class _Call:
    """One forward pass's frozen state, shared by its processors (and by checkpointing's recomputation)."""

    mask: torch.Tensor | None = None  # full mode: (1, 1, S, S), None when the clip is one block
    cache: KVCache | None = None
    cache_keys: list[torch.Tensor] = field(default_factory=list)  # the cache as it was when the call began
    cache_values: list[torch.Tensor] = field(default_factory=list)
    fill: bool = False
    frames: int = 0
    tokens_per_frame: int = 0
    new_keys: dict[int, torch.Tensor] = field(default_factory=dict)  # fill: this block's, per layer
    new_values: dict[int, torch.Tensor] = field(default_factory=dict)


class _Rotary(tuple):
    """The stock (freqs_cos, freqs_sin) pair, carrying its call's `_Call` to the processors: the one argument
    that reaches every block's self-attention unchanged, including through gradient checkpointing."""

    def __new__(cls, freqs: tuple[torch.Tensor, torch.Tensor], call: _Call):
        self = super().__new__(cls, freqs)
        self.call = call
        return self


def _rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding, op for op (it is a local function there, so it cannot be imported)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BlockCausalProcessor:
    """WanAttnProcessor's self-attention (same projections, norms, rotary embedding, dispatch and output), with
    the block-causal mask or the KV cache of the call its rotary embedding carries. Projections go through
    `attn.to_q/to_k/to_v/to_out`, so a peft LoRA wrapped around them takes part."""

    def __init__(self, layer: int, attention_backend=None):
        self.layer = layer
        self._attention_backend = attention_backend  # the stock processor's, kept (set_attention_backend)
        self._parallel_config = None

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        call = getattr(rotary_emb, "call", None)
        if call is None or encoder_hidden_states is not None or attention_mask is not None:
            raise RuntimeError(
                "BlockCausalProcessor is a self-attention processor for a transformer inside block_causal(); "
                "it got no call state (was the rope hook removed?) or a cross-attention/mask argument"
            )
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)

        if call.cache is not None:
            if call.fill:
                # setdefault: should a fill ever be recomputed, its keys are still recorded once
                call.new_keys.setdefault(self.layer, key)
                call.new_values.setdefault(self.layer, value)
            if call.cache_keys:  # the cached frames come first: they are earlier in the clip
                key = torch.cat([call.cache_keys[self.layer], key], dim=1)
                value = torch.cat([call.cache_values[self.layer], value], dim=1)

        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=call.mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
        )
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class _PinnedBlock:
    """A transformer block whose self-attention runs with the block-causal processor whatever is installed when
    it is called: gradient checkpointing calls it again during backward, which may come after block_causal()
    has put the stock processors back."""

    def __init__(self, block, processor: BlockCausalProcessor):
        self.block, self.processor = block, processor

    def __call__(self, *args, **kwargs):
        attn = self.block.attn1
        installed = attn.processor
        attn.set_processor(self.processor)
        try:
            return self.block(*args, **kwargs)
        finally:
            attn.set_processor(installed)


class BlockCausal:
    """Mode selection for a transformer with the block-causal processors installed; made by `block_causal`.

    Each method is a context manager; the transformer calls inside it run in that mode (a call outside any
    mode raises). They nest: leaving one restores the mode around it.
    """

    def __init__(self, transformer, processors: list[BlockCausalProcessor]):
        self.transformer = transformer
        self._processors = {block: p for block, p in zip(transformer.blocks, processors)}
        self._mode: _Mode | None = None
        self._call: _Call | None = None

    @contextlib.contextmanager
    def full(self, block_ranges: BlockRanges, start_frame: int = 0) -> Iterator[None]:
        """A whole clip per call, block-causal over `block_ranges` (they must tile the clip's latent frames);
        `start_frame` shifts its rotary positions (the clip's frame 0 is that frame of a longer video)."""
        with self._set(_Mode("full", block_ranges=[tuple(r) for r in block_ranges], start_frame=start_frame)):
            yield

    @contextlib.contextmanager
    def attend(self, cache: KVCache, start_frame: int | None = None) -> Iterator[None]:
        """One block per call, attending to `cache` then itself, in the caller's grad mode. The block sits at
        `start_frame`, by default `cache.end_frame`: right after every frame filled so far."""
        with self._set(_Mode("attend", start_frame=start_frame, cache=cache)):
            yield

    @contextlib.contextmanager
    def fill(self, cache: KVCache) -> Iterator[None]:
        """One block per call, as `attend` at `cache.end_frame`, then its keys/values appended to `cache`.

        Runs under torch.no_grad (the context is not differentiated through, as in Self-Forcing); a call made
        with gradient enabled inside raises rather than keep a graph in the cache.
        """
        with self._set(_Mode("fill", cache=cache)), torch.no_grad():
            yield

    @contextlib.contextmanager
    def _set(self, mode: _Mode) -> Iterator[None]:
        outer, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = outer

    def _rope_hook(self, rope, args, output):
        """Start of a forward pass: freeze this call's state and shift the rotary positions to the block's place."""
        mode = self._mode
        if mode is None:
            raise RuntimeError(
                "the transformer is block-causal here: run it inside causal.full(block_ranges), "
                "causal.attend(cache) or causal.fill(cache)"
            )
        hidden_states = args[0]
        batch, _, frames, height, width = hidden_states.shape
        _, p_h, p_w = rope.patch_size
        tpf = (height // p_h) * (width // p_w)

        if mode.kind == "full":
            check_block_ranges(mode.block_ranges, frames)
            start = mode.start_frame
            # one block: no mask, so the pass is the stock bidirectional one exactly
            mask = None
            if len(mode.block_ranges) > 1:
                # 4-D: diffusers' native backend reads a 2-D (B, S_k) mask as a padding mask
                mask = block_mask(mode.block_ranges, tpf, hidden_states.device)[None, None]
            call = _Call(mask=mask)
        else:
            cache = mode.cache
            if batch != cache.batch_size:
                raise ValueError(f"a KVCache for batch size {cache.batch_size} used with a batch of {batch}")
            if cache.tokens_per_frame not in (None, tpf):
                raise ValueError(
                    f"a KVCache of {cache.tokens_per_frame} tokens per frame used with {tpf} "
                    f"({height}×{width} latents)"
                )
            fill = mode.kind == "fill"
            if fill and torch.is_grad_enabled():
                raise RuntimeError(
                    "KVCache fills run without gradient: call the transformer under torch.no_grad"
                )
            start = cache.end_frame if mode.start_frame is None else mode.start_frame
            call = _Call(
                cache=cache,
                cache_keys=list(cache.keys),
                cache_values=list(cache.values),
                fill=fill,
                frames=frames,
                tokens_per_frame=tpf,
            )

        if start < 0 or start + frames > rope.max_seq_len:
            raise ValueError(
                f"latent frames {start}..{start + frames - 1} lie outside the rotary table's "
                f"{rope.max_seq_len} frames (rope_max_seq_len); a rolling KVCache(max_frames=...) bounds the "
                "cache, not the positions, which keep counting"
            )
        if start:
            # the stock table for start + frames frames (rope reads only the shape), less the first `start` frames
            stretched = hidden_states[:1, :1, :1].expand(1, 1, start + frames, height, width)
            freqs_cos, freqs_sin = rope.forward(stretched)
            output = (freqs_cos[:, start * tpf :], freqs_sin[:, start * tpf :])
        self._call = call
        self._pin_checkpointing()
        return _Rotary(output, call)

    def _pin_checkpointing(self) -> None:
        """Route diffusers' per-block checkpoint function (set by enable_gradient_checkpointing, perhaps after
        block_causal() began) through `_PinnedBlock`."""
        inner = getattr(self.transformer, "_gradient_checkpointing_func", None)
        if inner is None or getattr(inner, "block_causal", None) is self:
            return

        def checkpoint(block, *args):
            return inner(_PinnedBlock(block, self._processors[block]), *args)

        checkpoint.block_causal, checkpoint.inner = self, inner
        self.transformer._gradient_checkpointing_func = checkpoint

    def _unpin_checkpointing(self) -> None:
        current = getattr(self.transformer, "_gradient_checkpointing_func", None)
        if getattr(current, "block_causal", None) is self:
            self.transformer._gradient_checkpointing_func = current.inner

    def _commit_hook(self, transformer, args, output):
        """End of a forward pass: a fill's keys/values go into its cache, once."""
        call, self._call = self._call, None
        if call is None or not call.fill:
            return
        layers = range(len(transformer.blocks))
        if sorted(call.new_keys) != list(layers):
            raise RuntimeError(
                f"a fill recorded keys for layers {sorted(call.new_keys)}, expected {list(layers)}"
            )
        call.cache._append(
            [call.new_keys[i] for i in layers],
            [call.new_values[i] for i in layers],
            call.frames,
            call.tokens_per_frame,
        )


@contextlib.contextmanager
def block_causal(transformer) -> Iterator[BlockCausal]:
    """Make a `WanTransformer3DModel` block-causal for the duration; the stock processors come back on exit.

    with block_causal(transformer) as causal:
        with causal.full(block_ranges):            # teacher forcing: the whole clip, one pass
            v = transformer(hidden_states=x_BCTHW, timestep=t_BS, encoder_hidden_states=c, return_dict=False)[0]
        cache = KVCache(batch_size=B)
        with causal.attend(cache):                 # block b at σ (its frames only), seeing the cache
            v = transformer(hidden_states=x_block, timestep=t_B, ...)[0]
        with causal.fill(cache):                   # block b's output re-noised to the context level
            transformer(hidden_states=ctx_block, timestep=t_ctx_B, ...)
    """
    p_t = transformer.config.patch_size[0]
    if p_t != 1:
        raise ValueError(
            f"block-causal attention works on latent frames: temporal patch size must be 1, not {p_t}"
        )
    attns = [block.attn1 for block in transformer.blocks]
    if any(getattr(attn, "fused_projections", False) for attn in attns):
        raise ValueError("fused QKV projections are not supported: call transformer.unfuse_qkv_projections()")
    stock = [attn.processor for attn in attns]
    if any(isinstance(p, BlockCausalProcessor) for p in stock):
        raise RuntimeError("block_causal() is already active on this transformer")
    if any(getattr(p, "_parallel_config", None) is not None for p in stock):
        raise ValueError("context parallelism is not supported by the block-causal processors")

    processors = [
        BlockCausalProcessor(layer, getattr(p, "_attention_backend", None)) for layer, p in enumerate(stock)
    ]
    causal = BlockCausal(transformer, processors)
    hooks = [
        transformer.rope.register_forward_hook(causal._rope_hook),
        transformer.register_forward_hook(causal._commit_hook),
    ]
    try:
        for attn, processor in zip(attns, processors):
            attn.set_processor(processor)
        yield causal
    finally:
        for hook in hooks:
            hook.remove()
        for attn, processor in zip(attns, stock):
            attn.set_processor(processor)
        causal._unpin_checkpointing()
