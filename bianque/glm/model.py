"""ChatGLM-6B (first generation, as fine-tuned into BianQue-2) as one pure PyTorch module.

Modules are named after the checkpoint tensors (`transformer.layers.{i}.attention.query_key_value`,
...), so loading is "check names and shapes, copy". No file access, no device or dtype choices:
the caller builds the model where it wants it. SPEC = shared/glm_reference/SPEC.md.

Internal layout is batch-first `[b, s, H]` (the reference is sequence-first; only the logits
layout is observable and that is `[b, s, V]` in both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GLMConfig

# The reference block takes a layer count that defaults to 28 and the model never passes the
# configured num_layers, so alpha = sqrt(2 * 28) for EVERY model size (SPEC §3.2). Tiny models
# with 2 layers still use 28 here; "fixing" this breaks the reference logits by ~20.
RESIDUAL_ALPHA = math.sqrt(2 * 28)
# Masked scores are filled with a finite value, not -inf: rows whose keys are all masked (left
# padding) must give a finite uniform average, or NaN spreads through 0*NaN (SPEC §3.4).
MASKED_SCORE = -10000.0


# ----------------------------------------------------------------------------------------------
# Positions and masks (SPEC §4). Each rule lives in exactly one function.
# ----------------------------------------------------------------------------------------------

def glm_position_ids(length: int, context_length: int, mask_position: int | None) -> torch.Tensor:
    """2-D positions `[2, length]` for one unpadded sequence.

    Channel 0: token index before `<sop>`; `<sop>` and everything after it share the index of
    the mask token. Channel 1 (block position): 0 before `<sop>`, then 1, 2, 3, ...
    Without a mask token (a tokenizer-only edge case) channel 0 stays `0..length-1`.
    """
    positions = torch.arange(length, dtype=torch.long)
    if mask_position is not None:
        positions[context_length:] = mask_position
    blocks = torch.zeros(length, dtype=torch.long)
    blocks[context_length:] = torch.arange(1, length - context_length + 1, dtype=torch.long)
    return torch.stack([positions, blocks])


def glm_attention_mask(length: int, context_length: int) -> torch.Tensor:
    """Boolean mask `[1, length, length]`, True = may NOT attend.

    Causal, except that every query also sees the whole prefix before `<sop>`: the prefix is
    bidirectional, and prefix tokens still cannot see `<sop>` or anything after it.
    """
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[:, :context_length] = True
    return (~allowed).unsqueeze(0)


def find_context_and_mask(ids: list[int], config: GLMConfig, prefer_gmask: bool = True) -> tuple[int, int]:
    """(index of the first `<sop>`, index of the mask token) as the model's own builder picks them.

    The model prefers `[gMASK]` over `[MASK]`; the tokenizer's batch builder prefers `[MASK]`
    (SPEC §4.3), hence the flag.
    """
    if config.bos_token_id not in ids:
        raise ValueError("input_ids must contain <sop> (bos); encode prompts with the GLM tokenizer")
    order = [config.gmask_token_id, config.mask_token_id]
    if not prefer_gmask:
        order.reverse()
    for token in order:
        if token in ids:
            return ids.index(config.bos_token_id), ids.index(token)
    raise ValueError("input_ids must contain [gMASK] or [MASK]; encode prompts with the GLM tokenizer")


def build_inputs(input_ids: torch.Tensor, config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask `[b, 1, s, s]` and positions `[b, 2, s]` built from unpadded ids, row by row."""
    masks, positions = [], []
    length = input_ids.shape[1]
    for row in input_ids.tolist():
        ctx, mp = find_context_and_mask(row, config)
        masks.append(glm_attention_mask(length, ctx))
        positions.append(glm_position_ids(length, ctx, mp))
    device = input_ids.device
    return torch.stack(masks).to(device), torch.stack(positions).to(device)


# ----------------------------------------------------------------------------------------------
# Rotary encoding (SPEC §3.3)
# ----------------------------------------------------------------------------------------------

def rotary_inv_freq(rotary_dim: int) -> torch.Tensor:
    """Frequencies for one rotated half. The reference rounds them to fp16 in every precision
    mode (0.1 becomes 0.0999755859375); not doing so moves tiny-model logits by up to ~2."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / (10000 ** exponent)).half().float()


def rotary_tables(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[b, 2, s, rotary_dim]` for both position channels, computed in fp32."""
    inv_freq = rotary_inv_freq(rotary_dim).to(position_ids.device)
    angles = position_ids.float().unsqueeze(-1) * inv_freq          # [b, 2, s, r/2]
    angles = torch.cat([angles, angles], dim=-1)                     # [b, 2, s, r]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX pairing: [x1, x2] -> [-x2, x1] (not the interleaved even/odd pairing)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[b, nh, s, hd]`: the first half of each head turns with the token position, the second
    half with the block position (the "2-D" encoding)."""
    halves = x.chunk(2, dim=-1)
    out = []
    for channel, half in enumerate(halves):
        c, s = cos[:, channel].unsqueeze(1), sin[:, channel].unsqueeze(1)   # [b, 1, s, r]
        out.append(half * c + rotate_half(half) * s)
    return torch.cat(out, dim=-1)


# ----------------------------------------------------------------------------------------------
# KV cache (SPEC §5)
# ----------------------------------------------------------------------------------------------

class KVCache:
    """Keys and values of one layer, `[b, nh, capacity, hd]` each (keys after rotary).

    Space is reserved ahead and doubled when full, so a decode step writes one slot instead of
    concatenating (copying) the whole cache, and a short chat does not reserve max_length."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, max(capacity, 1), head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def _grow(self, needed: int) -> None:
        extra = max(needed, 2 * self.keys.shape[2]) - self.keys.shape[2]
        self.keys = F.pad(self.keys, (0, 0, 0, extra))
        self.values = F.pad(self.values, (0, 0, 0, extra))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v `[b, nh, n, hd]`; return views of everything cached `[b, nh, length, hd]`."""
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            self._grow(end)
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class StaticKVCache:
    """Keys and values of one layer in buffers of FIXED capacity `[b, nh, capacity, hd]`.

    `update` writes at explicit slots and returns the WHOLE buffers, so every decode step sees
    the same shapes (what a compiled step / CUDA graph needs). Slots not written yet hold zeros
    or stale values: the caller masks them (a mask row `[b, 1, 1, capacity]`, True = masked),
    and a masked score's probability is exactly 0 in fp32, as with the growing cache."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v `[b, nh, n, hd]` at slots `cache_position` (LongTensor `[n]` on the cache's
        device); return the full buffers `[b, nh, capacity, hd]`. Only the shape is checked: the
        slots are device data (reading them would stall the GPU), so the generator sizes the
        cache for its whole budget and never writes past it."""
        if k.shape[2] > self.capacity:
            raise ValueError(f"{k.shape[2]} new positions do not fit a static KV cache of {self.capacity} slots")
        self.keys.index_copy_(2, cache_position, k)
        self.values.index_copy_(2, cache_position, v)
        return self.keys, self.values


class SlotKVCache:
    """Keys and values of one layer for a serving engine: `[max_batch, nh, capacity, hd]` each,
    one row ("slot") per running sequence, each with its own length (kept by the caller).

    Before a forward the caller picks the rows it runs with `select(rows, span)`; `update(k, v,
    cache_position)` then writes k, v `[n, nh, s, hd]` of row `rows[i]` at its own positions
    `cache_position[i]` (LongTensor `[n, s]`) and returns those rows' first `span` slots
    `[n, nh, span, hd]`. Slots past a row's length hold stale values: the caller's mask
    `[n, 1, s, span]` (True = masked) hides them, and a masked score's probability is exactly 0
    in fp32, so a row's numbers do not depend on the other rows.

    `select(rows, span, window=n)` is the compiled step's variant: input row i still writes to
    `rows[i]` (its own row i, or a scratch row for a batch padded to a fixed size), but `update`
    returns the first n rows as views: no gather copy of `[n, nh, capacity, hd]` every step."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        shape = (batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.span = capacity
        self.window: int | None = None

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def select(self, rows: torch.Tensor, span: int, window: int | None = None) -> None:
        """Rows `[n]` (slot indices) and key span of the next update; span <= capacity; `window`:
        see the class."""
        if span > self.capacity:
            raise ValueError(f"{span} positions do not fit a KV cache of {self.capacity} slots")
        self.rows, self.span, self.window = rows.to(self.keys.device), span, window

    def update(self, k: torch.Tensor, v: torch.Tensor, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See the class: write each selected row at its positions `[n, s]`; return `[n, nh, span, hd]`."""
        rows = self.rows[:, None]
        cols = cache_position.to(self.keys.device)
        # rows/cols broadcast to [n, s]; the head slice between them moves to the end: [n, s, nh, hd].
        self.keys[rows, :, cols] = k.transpose(1, 2)
        self.values[rows, :, cols] = v.transpose(1, 2)
        if self.window is not None:
            return self.keys[:self.window, :, :self.span], self.values[:self.window, :, :self.span]
        return self.keys[self.rows, :, :self.span], self.values[self.rows, :, :self.span]


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

class SelfAttention(nn.Module):
    def __init__(self, config: GLMConfig, layer_index: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.head_dim
        # The reference divides q by (sqrt(hd) * (l+1)) and multiplies the scores by (l+1) again
        # in fp32, only so fp16 scores cannot overflow. Kept for fp16 fidelity; no-op in fp32.
        self.layer_coeff = float(layer_index + 1)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | StaticKVCache | SlotKVCache | None, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # q/k/v are interleaved PER HEAD: [nh, 3*hd] with q_j, k_j, v_j adjacent (not [Q|K|V]).
        qkv = self.query_key_value(x).view(b, s, self.heads, 3, self.head_dim).permute(0, 3, 2, 1, 4)
        # q and k turn in one pass, as 2*nh heads: half the small ops of a decode step's rotary.
        qk = apply_rotary_2d(qkv[:, :2].reshape(b, 2 * self.heads, s, self.head_dim), cos, sin)
        q, k, v = qk[:, :self.heads], qk[:, self.heads:], qkv[:, 2]
        if cache_position is not None:   # static cache: the full buffers, unfilled slots masked
            k, v = cache.update(k, v, cache_position)
        elif cache is not None:
            k, v = cache.update(k, v)
        q = q / (math.sqrt(self.head_dim) * self.layer_coeff)
        scores = torch.matmul(q, k.transpose(-1, -2)).float()
        if mask is not None:
            scores = scores.masked_fill(mask, MASKED_SCORE)
        probs = torch.softmax(scores * self.layer_coeff, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.dense(context)


class GLU(nn.Module):
    """Named "GLU" in the reference but a plain two-layer MLP with tanh-GELU, no gating."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: GLMConfig, layer_index: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = SelfAttention(config, layer_index)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GLU(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | StaticKVCache | SlotKVCache | None, cache_position: torch.Tensor | None = None) -> torch.Tensor:
        # DeepNorm-style: the residual is the NORMALISED input times alpha, not the block input.
        x = self.input_layernorm(h)
        h = RESIDUAL_ALPHA * x + self.attention(x, cos, sin, mask, cache, cache_position)
        y = self.post_attention_layernorm(h)
        return RESIDUAL_ALPHA * y + self.mlp(y)


class GLMTransformer(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


@dataclass
class GLMOutput:
    logits: torch.Tensor                                    # [b, s, V] (or [b, 1, V] with last_only)
    hidden_states: tuple[torch.Tensor, ...] | None = None   # each [b, s, H]; see forward()


class GLMForCausalLM(nn.Module):
    """ChatGLM-6B. `forward` is the whole computation; `from_pretrained`, `generate`, `chat` and
    `stream_chat` are thin delegations (to loader.py, generate.py, chat.py) so that code written
    for the original model keeps working, while this file stays free of I/O."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = GLMTransformer(config)
        # The head is tied to the input embedding (one tensor, SPEC §1); no bias.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, caches: list[KVCache] | list[StaticKVCache] | list[SlotKVCache] | None = None,
                cache_position: torch.Tensor | None = None, last_only: bool = False,
                output_hidden_states: bool = False) -> GLMOutput:
        """input_ids `[b, s]`; attention_mask bool `[b, 1, s, total]` (True = masked) and
        position_ids `[b, 2, s]` are built from the ids when not given for a whole prompt
        (unpadded input only); cached steps take no mask unless padded, as in the reference.
        With `caches` (one KVCache per layer) the new keys/values are appended and attention
        covers everything cached. With StaticKVCaches, `cache_position` (LongTensor `[s]`) names
        the slots to write, attention covers all `capacity` slots and the mask (then required,
        `[b, 1, s, capacity]`) must hide the unfilled ones. SlotKVCaches (serving) work the same
        way with per-row positions `cache_position` `[b, s]` (see SlotKVCache). hidden_states, when asked for, are
        the embedding output, the output of every block but the last, and the final LayerNorm
        output (as the reference)."""
        if cache_position is not None:
            if caches is None or position_ids is None or attention_mask is None:
                raise ValueError("static-cache steps need caches, position_ids and a mask over every cache slot")
        elif caches is None or caches[0].length == 0:  # a whole prompt: build what was not given
            if attention_mask is None or position_ids is None:
                built_mask, built_positions = build_inputs(input_ids, self.config)
                attention_mask = built_mask if attention_mask is None else attention_mask
                position_ids = built_positions if position_ids is None else position_ids
        elif position_ids is None:
            raise ValueError("cached decoding steps need position_ids (see generate.next_position_ids)")
        h = self.transformer.word_embeddings(input_ids)
        cos, sin = rotary_tables(position_ids, self.config.rotary_dim, h.dtype)
        # The reference skips masking when nothing is masked. Not checked for static caches: the
        # check reads device data, and masking nothing changes no score anyway.
        if cache_position is None and attention_mask is not None and not attention_mask.any():
            attention_mask = None
        hidden = [h]
        for i, layer in enumerate(self.transformer.layers):
            h = layer(h, cos, sin, attention_mask, None if caches is None else caches[i], cache_position)
            hidden.append(h)
        h = self.transformer.final_layernorm(h)
        hidden[-1] = h
        if last_only:
            h = h[:, -1:]
        logits = self.lm_head(h)
        return GLMOutput(logits, tuple(hidden) if output_hidden_states else None)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device (a packed embedding has no parameters)."""
        return next(self.transformer.word_embeddings.parameters(), self.transformer.final_layernorm.weight).device

    def new_caches(self, batch: int, capacity: int) -> list[KVCache]:
        """One empty KVCache per layer, in the compute dtype and on that LAYER's device (blocks
        may be spread over several GPUs); read from a LayerNorm, since linears may be swapped for
        quantised or packed modules."""
        c = self.config
        return [KVCache(batch, c.num_attention_heads, capacity, c.head_dim,
                        layer.input_layernorm.weight.dtype, layer.input_layernorm.weight.device)
                for layer in self.transformer.layers]

    def new_static_caches(self, batch: int, capacity: int) -> list[StaticKVCache]:
        """One zeroed StaticKVCache of `capacity` slots per layer, placed as new_caches places them."""
        c = self.config
        return [StaticKVCache(batch, c.num_attention_heads, capacity, c.head_dim,
                              layer.input_layernorm.weight.dtype, layer.input_layernorm.weight.device)
                for layer in self.transformer.layers]

    def new_slot_caches(self, max_batch: int, capacity: int) -> list[SlotKVCache]:
        """One zeroed SlotKVCache of `max_batch` rows x `capacity` slots per layer, placed as new_caches places them."""
        c = self.config
        return [SlotKVCache(max_batch, c.num_attention_heads, capacity, c.head_dim,
                            layer.input_layernorm.weight.dtype, layer.input_layernorm.weight.device)
                for layer in self.transformer.layers]

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=None, quantize=None, **options) -> GLMForCausalLM:
        """Load a checkpoint directory; `options` are load_model's (devices, max_memory, pack)."""
        from .loader import load_model
        return load_model(path, device=device, dtype=dtype, quantize=quantize, **options)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 **sampling) -> torch.Tensor:
        """Prompt plus new ids `[b, s + new]` (fewer when every row hit `<eop>`)."""
        from .generate import generate_ids
        return generate_ids(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            attention_mask=attention_mask, position_ids=position_ids, **sampling)

    def chat(self, tokenizer, query: str, history=None, **kwargs):
        from .chat import chat
        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=None, **kwargs):
        from .chat import stream_chat
        return stream_chat(self, tokenizer, query, history, **kwargs)
