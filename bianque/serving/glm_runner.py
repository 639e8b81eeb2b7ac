"""BianQue-2 (ChatGLM-6B) behind the engine's Runner contract: slots of a batched KV cache.

Each running slot owns one row of every layer's SlotKVCache (`[rows, nh, capacity, hd]`,
allocated once at construction, so `max_batch` x `capacity` is paid for up front) with its own
length, its own 2-D position (GLM: the position channel stays at the mask token's index, the
block position counts up; model.glm_position_ids / generate.next_position_ids) and its own mask.
A decode step runs every given slot in ONE forward; a slot's keys beyond its length are masked,
so its logits are its solo logits up to float rounding. The newcomers of one step boundary are
prefilled in one forward too (left-padded; see `_prefill_inputs`), each row its solo prefill up
to float rounding. Quantised and packed weights live inside the linears and need nothing here.

Rows are kept packed: the running slots hold rows 0..n-1 (a slot that leaves hands its row to
the last one, whose keys and values move into it). That lets the compiled decode step (`compile`,
see `_compiled_decode`) read the first rows as views instead of gathering whole rows each step.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from ..glm.model import GLMForCausalLM, find_context_and_mask, glm_attention_mask, glm_position_ids

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes the compiled step is built for: 1, 2, 4, ... below max_batch, and max_batch
    (vLLM's CUDA-graph sizes, in small): a step of n rows runs the smallest bucket >= n."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


def slot_step(model: GLMForCausalLM, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
              cache_position: torch.Tensor, caches: list) -> torch.Tensor:
    """One token for the first `bucket` cache rows: ids `[b, 1]`, mask `[b, 1, 1, capacity]`,
    positions `[b, 2, 1]`, write positions `[b, 1]` -> logits `[b, V]`. Shapes depend on the
    bucket only (the key span is the whole capacity): what torch.compile specialises, once per
    bucket."""
    return model(ids, mask, positions, caches=caches, cache_position=cache_position, last_only=True).logits[:, -1]


class GLMRunner:
    def __init__(self, model: GLMForCausalLM, max_batch: int, capacity: int, compile: bool = False) -> None:
        """`compile`: decode steps through torch.compile ("reduce-overhead", i.e. CUDA graphs, on
        CUDA; Inductor's default on CPU), one graph per batch bucket, built by `warm_up` (call it
        at load, before serving). If the model cannot be compiled (prepacked bfloat16 weights
        are opaque oneDNN tensors), the reason is logged once and steps run eagerly."""
        if max_batch < 1 or capacity < 2:
            raise ValueError(f"max_batch must be >= 1 and capacity >= 2, got {max_batch} and {capacity}")
        self.model, self.max_batch, self.capacity = model.eval(), max_batch, capacity
        self.device = model.input_device
        # Compiled: one more row, the scratch row where a padded batch's unused rows write.
        self.caches = model.new_slot_caches(max_batch + 1 if compile else max_batch, capacity)
        self.lengths: list[int | None] = [None] * max_batch      # None: the slot is free
        self.positions: list[tuple[int, int] | None] = [None] * max_batch  # the last token's 2-D position
        self.row: list[int | None] = [None] * max_batch          # each slot's cache row (None: no row)
        self.slot_at: list[int] = []                             # row r belongs to slot_at[r]
        self.buckets = batch_buckets(max_batch)
        self.compiled, self.proven = None, False
        if compile:
            self._compile()

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
        for slot in slots:
            self._check_slot(slot)
        found = [self._check_prompt(prompt) for prompt in prompts]
        for slot in slots:
            if self.row[slot] is not None:
                raise ValueError(f"slot {slot} is still in use; release it first")
        ids, mask, positions, cache_position = self._prefill_inputs(prompts, found)
        for slot in slots:  # the next free rows (released again by the engine if this raises)
            self.row[slot] = len(self.slot_at)
            self.slot_at.append(slot)
        for cache in self.caches:
            cache.select(torch.tensor([self.row[s] for s in slots]), ids.shape[1])
        logits = self.model(ids.to(self.device), mask.to(self.device), positions.to(self.device), caches=self.caches,
                            cache_position=cache_position.to(self.device), last_only=True).logits
        for slot, prompt, row in zip(slots, prompts, positions):
            self.lengths[slot] = len(prompt)
            self.positions[slot] = (int(row[0, -1]), int(row[1, -1]))
        return logits[:, -1].float()

    def _check_prompt(self, prompt: list[int]) -> tuple[int, int]:
        """(context length, mask position) of a prompt that fits; raises ValueError otherwise."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) >= self.capacity:
            raise ValueError(f"a prompt of {len(prompt)} tokens does not fit this runner's capacity of "
                             f"{self.capacity} tokens (prompt + answer)")
        return find_context_and_mask(prompt, self.model.config)  # raises without <sop> / mask token

    def _prefill_inputs(self, prompts: list[list[int]], found: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """ids `[n, s]`, mask `[n, 1, s, s]`, positions `[n, 2, s]` and cache positions `[n, s]`
        of prompts left-padded to the longest, s (`found`: each prompt's `_check_prompt`).

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
        for i, (prompt, (context, mask_position)) in enumerate(zip(prompts, found)):
            length = len(prompt)
            pad = width - length
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
        positions = [(p, b + 1) for p, b in (self.positions[s] for s in slots)]
        logits = None
        if self.compiled is not None:
            logits = self._compiled_decode(slots, tokens, positions)
        if logits is None:
            logits = self._eager_decode(slots, tokens, positions)
        for slot, position in zip(slots, positions):
            self.lengths[slot] += 1
            self.positions[slot] = position
        return logits.float()

    def _eager_decode(self, slots: Sequence[int], tokens: Sequence[int], positions: list[tuple[int, int]]) -> torch.Tensor:
        """The given slots' rows gathered, keys up to the longest length + 1: the least work."""
        lengths = torch.tensor([self.lengths[s] for s in slots], dtype=torch.long)      # where each new token goes
        span = int(lengths.max()) + 1
        # Each row sees its own keys 0..length (the new one included), nothing beyond.
        mask = torch.arange(span)[None, :] > lengths[:, None]                             # [n, span]
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        for cache in self.caches:
            cache.select(torch.tensor([self.row[s] for s in slots]), span)
        logits = self.model(ids, mask[:, None, None].to(self.device), torch.tensor(positions)[:, :, None].to(self.device),
                            caches=self.caches, cache_position=lengths[:, None].to(self.device), last_only=True).logits
        return logits[:, -1]

    def _compiled_decode(self, slots: Sequence[int], tokens: Sequence[int], positions: list[tuple[int, int]],
                         bucket: int | None = None) -> torch.Tensor | None:
        """The first `bucket` rows (the smallest bucket holding every used row) with keys over the
        whole capacity: fixed shapes per bucket. A row not decoding now (free, or a newcomer
        prefilled in this step) gets a dummy token written to the scratch row and sees only its
        key 0 (finite; its logits are dropped). None if compiling failed (then eager from now on)."""
        bucket = bucket or next(b for b in self.buckets if b >= len(self.slot_at))
        scratch = self.max_batch
        ids = torch.full((bucket, 1), self.model.config.pad_token_id, dtype=torch.long)
        mask = torch.ones((bucket, 1, 1, self.capacity), dtype=torch.bool)
        mask[..., 0] = False
        where = torch.zeros((bucket, 2, 1), dtype=torch.long)
        cache_position = torch.zeros((bucket, 1), dtype=torch.long)
        write_rows = torch.full((bucket,), scratch, dtype=torch.long)
        rows = [self.row[s] for s in slots]
        for row, slot, token, position in zip(rows, slots, tokens, positions):
            length = self.lengths[slot]
            ids[row, 0], write_rows[row], cache_position[row, 0] = int(token), row, length
            mask[row, 0, 0, :length + 1] = False
            where[row, :, 0] = torch.tensor(position)
        for cache in self.caches:
            cache.select(write_rows, self.capacity, window=bucket)
        logits = self._run_compiled(ids, mask, where, cache_position)
        return None if logits is None else logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]

    def _compile(self) -> None:
        from ..glm.generate import _kernel_checks_are_constant

        _kernel_checks_are_constant()
        on_cuda = self.device.type == "cuda"
        # One graph per bucket; Dynamo's per-function recompile limit (8) must not cut that short.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, len(self.buckets) + 1)
        self.compiled = torch.compile(slot_step, mode="reduce-overhead" if on_cuda else None, fullgraph=True, dynamic=False)
        for cache in self.caches:  # CUDA graphs write these buffers in place, never copy them
            torch._dynamo.mark_static_address(cache.keys)
            torch._dynamo.mark_static_address(cache.values)

    def _run_compiled(self, *inputs: torch.Tensor) -> torch.Tensor | None:
        """slot_step compiled; the first failure to compile is logged once and turns compiling off."""
        inputs = tuple(x.to(self.device) for x in inputs)
        try:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs were consumed
            logits = self.compiled(self.model, *inputs, self.caches)
            self.proven = True
            return logits
        except Exception as exc:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly
            if self.proven:
                raise
            log.info("torch.compile cannot compile this model's batched decode step (%s: %s); eager steps",
                     type(exc).__name__, str(exc).strip().split("\n")[0][:200])
            self.compiled = None
            return None

    @torch.no_grad()
    def warm_up(self) -> float:
        """Build every bucket's compiled step now (at load, while no request runs): each bucket's
        rows all write to the scratch row. Seconds taken (see `compiled` for whether it worked)."""
        if self.slot_at:
            raise RuntimeError("warm_up runs before serving: slots are in use")
        start = time.perf_counter()
        for bucket in self.buckets:
            for _ in range(2):  # CUDA graphs: the first call warms up, the second records
                if self.compiled is not None:
                    self._compiled_decode([], [], [], bucket)
        return time.perf_counter() - start

    def release(self, slot: int) -> None:
        """Free the slot; the last row's slot moves into its row so the used rows stay packed."""
        self._check_slot(slot)
        row = self.row[slot]
        if row is not None:
            last = len(self.slot_at) - 1
            moved = self.slot_at.pop()
            if row != last:
                self.slot_at[row], self.row[moved] = moved, row
                length = self.lengths[moved] or 0  # None: its own prefill is failing; nothing to keep
                for cache in self.caches:
                    cache.keys[row, :, :length] = cache.keys[last, :, :length]
                    cache.values[row, :, :length] = cache.values[last, :, :length]
        self.row[slot] = self.lengths[slot] = self.positions[slot] = None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} outside 0..{self.max_batch - 1}")
