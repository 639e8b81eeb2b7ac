"""The one ChatGLM generator: prefill once, then one token per step on the KV cache (SPEC §4.2, §6.2).

`generate_tokens` yields token ids; `generate_ids` (model.generate), chat()/stream_chat() and the
advisor all consume it. Logits are processed in the reference order: user processors, the
invalid-score guard, then temperature -> top-k -> top-p (bianque.sampling).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..sampling import SamplingParams, guard_invalid, next_token
from .model import GLMForCausalLM, StaticKVCache, build_inputs

log = logging.getLogger(__name__)

# chat() always appends ChatGLM's invalid-score processor: NaN/inf scores -> emit id 5 ("▁").
INVALID_FALLBACK_ID = 5
# Reserve this many cache slots beyond the prompt up front; the cache doubles when full.
CACHE_HEADROOM = 256
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [b, t], scores [b, V]) -> scores


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions `[b, 2, 1]` of the next generated token: the position channel stays at the
    mask token's index, the block position counts up by one. Built on the device (no host
    tensor copied in every step: on CUDA that copy would wait for the queued kernels)."""
    step = position_ids.clone()
    step[:, 1] += 1
    return step


def decode_mask_row(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The prompt's last mask row `[b, 1, 1, s]`, or None when it masks nothing (unpadded input:
    the reference passes no mask for single-token steps)."""
    if attention_mask is None:
        return None
    row = attention_mask[:, :, -1:, :]
    return row if bool(row.any()) else None


def grow_mask_row(row: torch.Tensor | None) -> torch.Tensor | None:
    """Append one visible key (the token just fed) to the step's mask row."""
    if row is None:
        return None
    return torch.cat([row, row.new_zeros(*row.shape[:-1], 1)], dim=-1)


class DynamicDecoding:
    """The default: growing KVCaches (SPEC §5), mask rows grown one key per step."""

    def __init__(self, model: GLMForCausalLM, batch: int, prompt_length: int, max_new_tokens: int):
        self.model = model
        self.caches = model.new_caches(batch, prompt_length + min(max_new_tokens, CACHE_HEADROOM))
        self.mask: torch.Tensor | None = None

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids, attention_mask, position_ids, caches=self.caches, last_only=True).logits
        self.mask = decode_mask_row(attention_mask)
        return logits[:, -1]

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.mask = grow_mask_row(self.mask)
        return self.model(token, self.mask, positions, caches=self.caches, last_only=True).logits[:, -1]

    def close(self) -> None:
        self.caches = []


def decode_step(model: GLMForCausalLM, token: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                mask: torch.Tensor, caches: list[StaticKVCache]) -> torch.Tensor:
    """One token on static caches: ids `[b, 1]`, positions `[b, 2, 1]`, the slot it is written
    to `[1]`, the mask row `[b, 1, 1, capacity]` -> logits `[b, V]`. The same shapes every step:
    this is the function torch.compile (and CUDA graphs) turn into one kernel sequence."""
    return model(token, mask, position_ids, caches=caches, cache_position=cache_position, last_only=True).logits[:, -1]


class StaticDecoder:
    """Per model (kept on it, see `static_decoder`): the decode step, compiled or eager, and the
    static caches of the last generation, reused by the next one of the same shape so compiled
    graphs (CUDA graphs: fixed addresses) are replayed instead of re-recorded."""

    def __init__(self, model: GLMForCausalLM, compile: bool):
        self.model, self.compiled, self.proven = model, None, False
        self.spare: list[StaticKVCache] | None = None
        if compile:
            _kernel_checks_are_constant()
            on_cuda = model.input_device.type == "cuda"
            # reduce-overhead = CUDA graphs; on CPU the default mode (Inductor's C++ kernels).
            self.compiled = torch.compile(decode_step, mode="reduce-overhead" if on_cuda else None,
                                          fullgraph=True, dynamic=False)

    def take_caches(self, batch: int, capacity: int) -> list[StaticKVCache]:
        """The spare caches when their shape fits (zeroed: a stale NaN value times a masked,
        zero probability would still be NaN), else new ones (a generation still running on the
        spare ones, or another shape, never shares them)."""
        caches, self.spare = self.spare, None
        if caches is not None and (caches[0].keys.shape[0], caches[0].capacity) == (batch, capacity):
            for cache in caches:
                cache.keys.zero_()
                cache.values.zero_()
            return caches
        del caches  # free the old shape's memory before allocating the new one
        caches = self.model.new_static_caches(batch, capacity)
        if self.compiled is not None:  # CUDA graphs may write these buffers in place, not copy them
            for cache in caches:
                torch._dynamo.mark_static_address(cache.keys)
                torch._dynamo.mark_static_address(cache.values)
        return caches

    def give_back(self, caches: list[StaticKVCache]) -> None:
        self.spare = caches

    def __call__(self, *args) -> torch.Tensor:
        """decode_step(model, *args), compiled where torch.compile can; if compiling fails the
        first time, eager from then on (one log line): every model still decodes."""
        if self.compiled is not None:
            try:
                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
                logits = self.compiled(self.model, *args)
                self.proven = True
                return logits
            except Exception as exc:  # noqa: BLE001 - any compiler failure; a real error recurs eagerly below
                if self.proven:
                    raise
                log.info("torch.compile cannot compile this model's decode step (%s: %s); static cache, eager steps",
                         type(exc).__name__, str(exc).strip().split("\n")[0][:200])
                self.compiled = None
        return decode_step(self.model, *args)


def _kernel_checks_are_constant() -> None:
    """quant.kernel_ok (is torch's int8/int4 kernel usable here?) runs a random probe once per
    process and is lru_cached. Dynamo ignores lru_cache and would trace the probe (a Generator,
    try/except) and give up; marked as a constant result, it is called while tracing and folded
    into the graph. Marking sets one attribute on the function: idempotent."""
    from . import quant

    torch.compiler.assume_constant_result(quant.kernel_ok.__wrapped__)


def static_decoder(model: GLMForCausalLM, compile: bool) -> StaticDecoder:
    """The model's StaticDecoder for `compile` (created once, then reused across replies)."""
    decoders = model.__dict__.setdefault("_static_decoders", {})
    if compile not in decoders:
        decoders[compile] = StaticDecoder(model, compile)
    return decoders[compile]


class StaticDecoding:
    """Static KV caches sized for the whole budget (prompt + max_new_tokens): prefill eager,
    then every step the same shapes. Unfilled slots are hidden by a mask row kept on the device
    and un-masked one slot per step, in place."""

    def __init__(self, model: GLMForCausalLM, batch: int, prompt_length: int, max_new_tokens: int, compile: bool):
        self.model, self.decoder = model, static_decoder(model, compile)
        self.caches = self.decoder.take_caches(batch, prompt_length + max_new_tokens)
        self.row = self.slot = None
        self.next = prompt_length

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor:
        length, capacity = input_ids.shape[1], self.caches[0].capacity
        if attention_mask is None:
            attention_mask = build_inputs(input_ids, self.model.config)[0]
        mask = F.pad(attention_mask, (0, capacity - length), value=True)   # [b, 1, s, capacity]
        slots = torch.arange(length, device=input_ids.device)
        logits = self.model(input_ids, mask, position_ids, caches=self.caches, cache_position=slots, last_only=True).logits
        self.row = mask[:, :, -1:].clone()                                  # [b, 1, 1, capacity]
        self.slot = slots[-1:] + 1
        return logits[:, -1]

    def step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.row[..., self.next] = False   # the slot this token is written to becomes visible
        logits = self.decoder(token, positions, self.slot, self.row, self.caches)
        self.slot += 1
        self.next += 1
        return logits

    def close(self) -> None:
        self.decoder.give_back(self.caches)
        self.caches = []


@torch.no_grad()
def generate_tokens(model: GLMForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    params: SamplingParams = SamplingParams(do_sample=False),
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    processors: Sequence[LogitsProcessor] = (), generator: torch.Generator | None = None,
                    static: bool = False, compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token ids `[b]`, one step at a time, until every row has produced `<eop>`
    (the eos id itself is yielded; finished rows then get `<pad>`) or max_new_tokens is reached.

    input_ids `[b, s]`; for left-padded batches pass the tokenizer's attention_mask `[b,1,s,s]`
    and position_ids `[b,2,s]`, otherwise both are built from the ids. `static` decodes on
    fixed-size caches (same numbers to fp32 rounding); `compile` also runs each step through
    torch.compile (implies static; compiled once per model and shape, reused across calls)."""
    if position_ids is None:
        built_mask, position_ids = build_inputs(input_ids, model.config)
        attention_mask = built_mask if attention_mask is None else attention_mask
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    batch, length = input_ids.shape
    decoding = (StaticDecoding(model, batch, length, max_new_tokens, compile) if static or compile
                else DynamicDecoding(model, batch, length, max_new_tokens))
    try:
        logits = decoding.prefill(input_ids, attention_mask, position_ids)
        positions = position_ids[:, :, -1:]
        ids, done = input_ids, torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            for processor in processors:
                logits = processor(ids, logits)
            token = next_token(guard_invalid(logits, INVALID_FALLBACK_ID), params, generator)
            token = token.masked_fill(done, pad)
            done = done | (token == eos)
            yield token
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            if processors:
                ids = torch.cat([ids, token[:, None]], dim=1)
            positions = next_position_ids(positions)
            logits = decoding.step(token[:, None], positions)
    finally:
        decoding.close()


def generate_ids(model: GLMForCausalLM, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Prompt plus generated ids `[b, s + new]` (transformers' generate() defaults for sampling)."""
    params = SamplingParams(do_sample, temperature, top_p, top_k)
    steps = generate_tokens(model, input_ids, max_new_tokens, params, attention_mask, position_ids,
                            generator=generator)
    new = [token[:, None] for token in steps]
    return torch.cat([input_ids, *new], dim=1)
