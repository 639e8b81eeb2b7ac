"""BianQue-1.0's batched runner for the serving engine: many T5 dialogues share each decoder step.

The engine owns scheduling and sampling; this runner owns the model state per slot:
- ``prefill`` encodes the newcomers together (right padding + attention mask), stores each one's
  cross-attention keys/values (its own encoder length, masked beyond it) and runs its first
  decoder step from the start token;
- ``decode`` runs one decoder step for any set of running slots, each at its own position: a
  per-slot self-attention cache (our own tensors) and per-slot relative position bias;
- ``release`` forgets a slot.

The weights are the loaded ``T5ForConditionalGeneration``'s own modules (layer norms, projections,
feed-forward, relative attention bias); only the attention over per-slot caches is written here,
because transformers' caches keep one length for the whole batch. Nothing here sees text.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


class T5Runner:
    """Slots ``0..max_batch-1`` of one T5; see the module docstring and the engine's ``Runner``."""

    def __init__(self, model, max_batch: int, initial_length: int = 64) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.max_batch = max_batch
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.start_id = cfg.decoder_start_token_id
        self.blocks = list(model.decoder.block)
        self.bias_attn = self.blocks[0].layer[0].SelfAttention  # the shared relative position bias
        self.scale_out = model.model_dim ** -0.5 if getattr(cfg, "scale_decoder_outputs", False) else None
        n, shape = len(self.blocks), (max_batch, self.heads, initial_length, self.d_kv)
        new = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.self_k, self.self_v = [new() for _ in range(n)], [new() for _ in range(n)]
        self.cross_k, self.cross_v = [new() for _ in range(n)], [new() for _ in range(n)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long)   # decoder tokens cached per slot
        self.enc_lengths = torch.zeros(max_batch, dtype=torch.long)
        self.active = [False] * max_batch

    # ------------------------------------------------------------------ the contract

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Encode the prompts together; float32 logits ``[len(slots), V]`` of each first new token."""
        slots = [int(s) for s in slots]
        if len(slots) != len(prompts) or not slots:
            raise ValueError(f"prefill needs one prompt per slot, got {len(slots)} slots and {len(prompts)} prompts")
        for slot in slots:
            self._check_slot(slot)
            if self.active[slot]:
                raise ValueError(f"slot {slot} is still in use; release it first")
        if len(set(slots)) != len(slots):
            raise ValueError(f"prefill got a slot twice: {slots}")
        lengths = [len(p) for p in prompts]
        if min(lengths) < 1:
            raise ValueError("prefill got an empty prompt (a T5 prompt has at least </s>)")
        width = max(lengths)
        ids = torch.zeros((len(slots), width), dtype=torch.long)
        mask = torch.zeros((len(slots), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[row, : len(prompt)] = 1
        hidden = self.model.encoder(input_ids=ids.to(self.device),
                                    attention_mask=mask.to(self.device)).last_hidden_state
        self._grow("cross", width)
        index = torch.tensor(slots, device=self.device)
        for i, block in enumerate(self.blocks):
            attn = block.layer[1].EncDecAttention
            self.cross_k[i][index, :, :width] = self._heads(attn.k(hidden))
            self.cross_v[i][index, :, :width] = self._heads(attn.v(hidden))
        for slot, n in zip(slots, lengths):
            self.enc_lengths[slot], self.lengths[slot], self.active[slot] = n, 0, True
        return self._step(slots, [self.start_id] * len(slots))

    @torch.inference_mode()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One decoder step for running slots, each fed its last token; float32 logits ``[len(slots), V]``."""
        slots = [int(s) for s in slots]
        if len(slots) != len(tokens) or not slots:
            raise ValueError(f"decode needs one token per slot, got {len(slots)} slots and {len(tokens)} tokens")
        if len(set(slots)) != len(slots):
            raise ValueError(f"decode got a slot twice: {slots}")
        for slot in slots:
            self._check_slot(slot)
            if not self.active[slot]:
                raise ValueError(f"slot {slot} is not running; prefill it first")
        return self._step(slots, [int(t) for t in tokens])

    @torch.inference_mode()
    def release(self, slot: int) -> None:
        """Forget ``slot``; its buffers are overwritten by the next prefill."""
        self._check_slot(slot)
        self.active[slot] = False
        self.lengths[slot] = 0
        self.enc_lengths[slot] = 0

    # ------------------------------------------------------------------ internals

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside 0..{self.max_batch - 1}")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[b, t, H*dk]`` -> ``[b, H, t, dk]``."""
        return x.view(x.shape[0], x.shape[1], self.heads, self.d_kv).transpose(1, 2)

    def _grow(self, kind: str, needed: int) -> None:
        """Double the time axis of the self or cross buffers until ``needed`` positions fit."""
        ks, vs = (self.self_k, self.self_v) if kind == "self" else (self.cross_k, self.cross_v)
        size = ks[0].shape[2]
        if needed <= size:
            return
        while size < needed:
            size *= 2
        for buffers in (ks, vs):
            for i, old in enumerate(buffers):
                new = old.new_zeros((*old.shape[:2], size, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                buffers[i] = new

    def _self_bias(self, positions: torch.Tensor, width: int) -> torch.Tensor:
        """Relative position bias ``[b, H, 1, width]`` of one query per slot at its own position,
        with the keys after that position masked out."""
        memory = torch.arange(width, device=self.device)[None, :]
        query = positions.to(self.device)[:, None]
        attn = self.bias_attn
        buckets = attn._relative_position_bucket(memory - query, bidirectional=False,
                                                 num_buckets=attn.relative_attention_num_buckets,
                                                 max_distance=attn.relative_attention_max_distance)
        bias = attn.relative_attention_bias(buckets).permute(0, 2, 1)[:, :, None, :]  # [b, H, 1, width]
        future = (memory > query)[:, None, None, :]
        return bias.masked_fill(future, torch.finfo(bias.dtype).min)

    def _step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        index = torch.tensor(slots, device=self.device)
        positions = self.lengths[slots]
        width = int(positions.max()) + 1
        self._grow("self", width)
        self_bias = self._self_bias(positions, width)
        enc_width = int(self.enc_lengths[slots].max())
        cross_mask = torch.zeros((len(slots), 1, 1, enc_width), dtype=self.dtype, device=self.device)
        padded = torch.arange(enc_width)[None, :] >= self.enc_lengths[slots][:, None]
        cross_mask.masked_fill_(padded[:, None, None, :].to(self.device), torch.finfo(self.dtype).min)
        rows = index[:, None]
        write_at = positions.to(self.device)[:, None]
        x = self.model.decoder.embed_tokens(torch.tensor(tokens, device=self.device)[:, None])
        for i, block in enumerate(self.blocks):
            layer = block.layer[0]
            attn = layer.SelfAttention
            h = layer.layer_norm(x)
            q = self._heads(attn.q(h))
            # write this step's key/value at each slot's own position
            self.self_k[i][rows, :, write_at] = self._heads(attn.k(h)).permute(0, 2, 1, 3)
            self.self_v[i][rows, :, write_at] = self._heads(attn.v(h)).permute(0, 2, 1, 3)
            k, v = self.self_k[i][index, :, :width], self.self_v[i][index, :, :width]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=self_bias, scale=1.0)
            x = _clamp(x + attn.o(out.transpose(1, 2).reshape(len(slots), 1, -1)))
            layer = block.layer[1]
            attn = layer.EncDecAttention
            q = self._heads(attn.q(layer.layer_norm(x)))
            k, v = self.cross_k[i][index, :, :enc_width], self.cross_v[i][index, :, :enc_width]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cross_mask, scale=1.0)
            x = _clamp(x + attn.o(out.transpose(1, 2).reshape(len(slots), 1, -1)))
            x = _clamp(block.layer[-1](x))
        self.lengths[slots] = positions + 1
        x = self.model.decoder.final_layer_norm(x)
        if self.scale_out is not None:
            x = x * self.scale_out
        return self.model.lm_head(x)[:, 0].float()


def _clamp(x: torch.Tensor) -> torch.Tensor:
    """transformers' T5 float16 guard: keep overflowing activations finite (no-op otherwise)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    top = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-top, max=top)
