"""BianQue-2 (ChatGLM-6B) behind the engine's Runner contract: slots of a batched KV cache.

Each slot is one row of every layer's SlotKVCache (`[max_batch, nh, capacity, hd]`, allocated
once at construction, so `max_batch` x `capacity` is paid for up front) with its own length, its
own 2-D position (GLM: the position channel stays at the mask token's index, the block position
counts up; model.glm_position_ids / generate.next_position_ids) and its own mask. A decode step
runs every given slot in ONE forward; a slot's keys beyond its length are masked, so its logits
are its solo logits up to float rounding. The newcomers of one step boundary are prefilled in
one forward too (left-padded; see `_prefill_inputs`), each row its solo prefill up to float
rounding. Quantised and packed weights live inside the linears and need nothing here.
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
        """Every newcomer in ONE forward, left-padded to the longest prompt (see `_prefill_inputs`);
        every prompt is checked before anything runs, so a bad one fails the call as a whole and
        the engine retries the others one by one."""
        if len(slots) != len(prompts) or not slots:
            raise ValueError(f"prefill needs one prompt per slot, got {len(slots)} slots and {len(prompts)} prompts")
        if len(set(slots)) != len(slots):
            raise ValueError(f"prefill got a slot twice: {list(slots)}")
        prompts = [list(p) for p in prompts]
        for slot, prompt in zip(slots, prompts):
            self._check_slot(slot)
            self._check_prompt(prompt)
        ids, mask, positions, cache_position = self._prefill_inputs(prompts)
        for cache in self.caches:
            cache.select(torch.tensor(list(slots)), ids.shape[1])
        logits = self.model(ids.to(self.device), mask.to(self.device), positions.to(self.device), caches=self.caches,
                            cache_position=cache_position.to(self.device), last_only=True).logits
        for slot, prompt, row in zip(slots, prompts, positions):
            self.lengths[slot] = len(prompt)
            self.positions[slot] = (int(row[0, -1]), int(row[1, -1]))
        return logits[:, -1].float()

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.capacity:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit this runner's capacity of "
                             f"{self.capacity} tokens (prompt + answer)")
        find_context_and_mask(prompt, self.model.config)  # raises on a prompt without <sop> / mask token

    def _prefill_inputs(self, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
        """ids `[n, s]`, mask `[n, 1, s, s]`, positions `[n, 2, s]` and cache positions `[n, s]`
        of prompts left-padded to the longest, s.

        LEFT padding, so that every row's last input is its last prompt token (the model keeps
        only the last position's logits, `last_only`). A row's real tokens still go to cache
        positions 0..len-1, as in a solo prefill, and its pads to len..s-1, past its length,
        where decode masks them (and overwrites them as the reply grows). In the key axis (cache
        order) a real query sees exactly its solo keys (model.glm_attention_mask); every pad key
        is masked for every query, so a masked score's probability is exactly 0 and the pads
        change no real row. Pad queries see the real keys only to stay finite; their outputs
        are never read. With one prompt (or prompts of one length) nothing is padded: a solo
        prefill exactly."""
        width, n = max(len(p) for p in prompts), len(prompts)
        ids = torch.full((n, width), self.model.config.pad_token_id, dtype=torch.long)
        mask = torch.ones((n, 1, width, width), dtype=torch.bool)
        positions = torch.zeros((n, 2, width), dtype=torch.long)
        cache_position = torch.empty((n, width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            length = len(prompt)
            pad = width - length
            context, mask_position = find_context_and_mask(prompt, self.model.config)
            ids[i, pad:] = torch.tensor(prompt, dtype=torch.long)
            mask[i, 0, pad:, :length] = glm_attention_mask(length, context)[0]
            mask[i, 0, :pad, :length] = False
            positions[i, :, pad:] = glm_position_ids(length, context, mask_position)
            cache_position[i] = torch.cat([torch.arange(length, width), torch.arange(length)])
        return ids, mask, positions, cache_position

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
