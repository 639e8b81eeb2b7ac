"""BianQue-2 (ChatGLM-6B) behind the engine's Runner contract: slots of a batched KV cache.

Each slot is one row of every layer's SlotKVCache (`[max_batch, nh, capacity, hd]`, allocated
once at construction, so `max_batch` x `capacity` is paid for up front) with its own length, its
own 2-D position (GLM: the position channel stays at the mask token's index, the block position
counts up; model.glm_position_ids / generate.next_position_ids) and its own mask. A decode step
runs every given slot in ONE forward; a slot's keys beyond its length are masked, so its logits
are its solo logits up to float rounding. Prompts are prefilled one by one (each exactly as a solo
prefill; batching prefills is left for later). Quantised and packed weights live inside the
linears and need nothing here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..glm.model import GLMForCausalLM, find_context_and_mask, glm_attention_mask, glm_position_ids


class GLMRunner:
    def __init__(self, model: GLMForCausalLM, max_batch: int, capacity: int) -> None:
        if max_batch < 1 or capacity < 2:
            raise ValueError(f"max_batch must be >= 1 and capacity >= 2, got {max_batch} and {capacity}")
        self.model, self.max_batch, self.capacity = model.eval(), max_batch, capacity
        self.device = model.input_device
        self.caches = model.new_slot_caches(max_batch, capacity)
        self.lengths: list[int | None] = [None] * max_batch      # None: the slot is free
        self.positions: list[tuple[int, int] | None] = [None] * max_batch  # the last token's 2-D position

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = []
        for slot, prompt in zip(slots, prompts):
            self._check_slot(slot)
            rows.append(self._prefill_one(slot, list(prompt)))
        return torch.stack(rows)

    def _prefill_one(self, slot: int, prompt: list[int]) -> torch.Tensor:
        length = len(prompt)
        if length == 0:
            raise ValueError("empty prompt")
        if length >= self.capacity:
            raise ValueError(f"a prompt of {length} tokens does not fit this runner's capacity of "
                             f"{self.capacity} tokens (prompt + answer)")
        context, mask_position = find_context_and_mask(prompt, self.model.config)
        positions = glm_position_ids(length, context, mask_position)                    # [2, s]
        mask = glm_attention_mask(length, context)                                      # [1, s, s]
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        cache_position = torch.arange(length, device=self.device)[None]                 # [1, s]
        for cache in self.caches:
            cache.select(torch.tensor([slot]), length)
        logits = self.model(ids, mask[None].to(self.device), positions[None].to(self.device),
                            caches=self.caches, cache_position=cache_position, last_only=True).logits
        self.lengths[slot] = length
        self.positions[slot] = (int(positions[0, -1]), int(positions[1, -1]))
        return logits[0, -1].float()

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        for slot in slots:
            self._check_slot(slot)
            if self.lengths[slot] is None:
                raise ValueError(f"slot {slot} has no prompt (prefill it first)")
            if self.lengths[slot] >= self.capacity:
                raise ValueError(f"slot {slot} is full: {self.capacity} tokens (prompt + answer) is this runner's capacity")
        lengths = torch.tensor([self.lengths[s] for s in slots], dtype=torch.long)      # where each new token goes
        span = int(lengths.max()) + 1
        # Each row sees its own keys 0..length (the new one included), nothing beyond.
        mask = torch.arange(span)[None, :] > lengths[:, None]                             # [n, span]
        positions = torch.tensor([[p, b + 1] for p, b in (self.positions[s] for s in slots)], dtype=torch.long)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        for cache in self.caches:
            cache.select(torch.tensor(list(slots)), span)
        logits = self.model(ids, mask[:, None, None].to(self.device), positions[:, :, None].to(self.device),
                            caches=self.caches, cache_position=lengths[:, None].to(self.device), last_only=True).logits
        for slot, (p, b) in zip(slots, positions.tolist()):
            self.lengths[slot] += 1
            self.positions[slot] = (p, b)
        return logits[:, -1].float()

    def release(self, slot: int) -> None:
        self._check_slot(slot)
        self.lengths[slot] = self.positions[slot] = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} outside 0..{self.max_batch - 1}")
