"""The one ChatGLM generator: prefill once, then one token per step on the KV cache (SPEC §4.2, §6.2).

`generate_tokens` yields token ids; `generate_ids` (model.generate), chat()/stream_chat() and the
advisor all consume it. Logits are processed in the reference order: user processors, the
invalid-score guard, then temperature -> top-k -> top-p (bianque.sampling).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..sampling import SamplingParams, guard_invalid, next_token
from .model import GLMForCausalLM, build_inputs

# chat() always appends ChatGLM's invalid-score processor: NaN/inf scores -> emit id 5 ("▁").
INVALID_FALLBACK_ID = 5
# Reserve this many cache slots beyond the prompt up front; the cache doubles when full.
CACHE_HEADROOM = 256
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [b, t], scores [b, V]) -> scores


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Positions `[b, 2, 1]` of the next generated token: the position channel stays at the
    mask token's index, the block position counts up by one."""
    return position_ids + torch.tensor([0, 1], device=position_ids.device).view(1, 2, 1)


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


@torch.no_grad()
def generate_tokens(model: GLMForCausalLM, input_ids: torch.Tensor, max_new_tokens: int,
                    params: SamplingParams = SamplingParams(do_sample=False),
                    attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                    processors: Sequence[LogitsProcessor] = (), generator: torch.Generator | None = None,
                    ) -> Iterator[torch.Tensor]:
    """Yield the next token ids `[b]`, one step at a time, until every row has produced `<eop>`
    (the eos id itself is yielded; finished rows then get `<pad>`) or max_new_tokens is reached.

    input_ids `[b, s]`; for left-padded batches pass the tokenizer's attention_mask `[b,1,s,s]`
    and position_ids `[b,2,s]`, otherwise both are built from the ids."""
    if position_ids is None:
        built_mask, position_ids = build_inputs(input_ids, model.config)
        attention_mask = built_mask if attention_mask is None else attention_mask
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    caches = model.new_caches(input_ids.shape[0], input_ids.shape[1] + min(max_new_tokens, CACHE_HEADROOM))
    logits = model(input_ids, attention_mask, position_ids, caches=caches, last_only=True).logits[:, -1]
    mask, positions = decode_mask_row(attention_mask), position_ids[:, :, -1:]
    ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
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
        positions, mask = next_position_ids(positions), grow_mask_row(mask)
        logits = model(token[:, None], mask, positions, caches=caches, last_only=True).logits[:, -1]


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
