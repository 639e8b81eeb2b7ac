"""chat() / stream_chat() as code written for ChatGLM-6B calls them (SPEC §6), and process_response."""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..sampling import SamplingParams
from .generate import LogitsProcessor, generate_tokens

TRAINING_TIME = ("[[训练时间]]", "2023年")
# Half-width marks next to a CJK ideograph become full-width, in this order (SPEC §6.3).
PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))
CJK = "[\u4e00-\u9fff]"
_RULES = [(re.compile(f"({CJK}){re.escape(half)}"), rf"\1{full}", re.compile(f"{re.escape(half)}({CJK})"), rf"{full}\1")
          for half, full in PUNCTUATION]


def process_response(text: str) -> str:
    """Strip, expand the training-time placeholder, and make punctuation next to Chinese full-width
    (the tokenizer's NFKC folding turned it half-width)."""
    text = text.strip().replace(*TRAINING_TIME)
    for after_cjk, after_repl, before_cjk, before_repl in _RULES:
        text = after_cjk.sub(after_repl, text)
        text = before_cjk.sub(before_repl, text)
    return text


def build_chat_prompt(query: str, history: Sequence[tuple[str, str]] | None = None) -> str:
    """The query unchanged without history, else ChatGLM's `[Round i]\\n问：…\\n答：…` transcript."""
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def stream_raw(model, tokenizer, prompt: str, max_length: int, params: SamplingParams,
               processors: Sequence[LogitsProcessor] = (), generator: torch.Generator | None = None,
               compile: bool = False) -> Iterator[str]:
    """Decoded text of everything generated so far, after every token (the last one included).
    `compile`: static KV cache and a compiled decode step (see generate_tokens)."""
    ids = tokenizer.encode(prompt)
    if len(ids) >= max_length:
        raise ValueError(f"the prompt is {len(ids)} tokens, no room to answer within max_length={max_length}")
    input_ids = torch.tensor([ids], device=model.input_device)
    new: list[int] = []
    for token in generate_tokens(model, input_ids, max_length - len(ids), params,
                                 processors=processors, generator=generator, compile=compile):
        new.append(int(token[0]))
        yield tokenizer.decode(new)


def _params(do_sample: bool, top_p: float, temperature: float, top_k: int) -> SamplingParams:
    return SamplingParams(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)


def stream_chat(model, tokenizer, query: str, history: Sequence[tuple[str, str]] | None = None,
                max_length: int = 2048, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7,
                temperature: float = 0.95, logits_processor: Iterable[LogitsProcessor] | None = None,
                top_k: int = 50, generator: torch.Generator | None = None, **unsupported,
                ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Yield `(response_so_far, history + [(query, response_so_far)])` after EVERY step. Unlike
    the reference, the step that ends generation (eos or max_length) is yielded too. Other
    generate() options of the reference (repetition_penalty, ...) are not supported: refused."""
    if num_beams != 1:
        raise ValueError("only num_beams=1 is supported (BianQue never used beam search)")
    if unsupported:
        raise TypeError(f"unsupported generation options: {', '.join(sorted(unsupported))}")
    history = list(history or [])
    prompt = build_chat_prompt(query, history)
    for raw in stream_raw(model, tokenizer, prompt, max_length, _params(do_sample, top_p, temperature, top_k),
                          list(logits_processor or ()), generator):
        response = process_response(raw)
        yield response, history + [(query, response)]


def chat(model, tokenizer, query: str, history: Sequence[tuple[str, str]] | None = None,
         max_length: int = 2048, num_beams: int = 1, do_sample: bool = True, top_p: float = 0.7,
         temperature: float = 0.95, logits_processor: Iterable[LogitsProcessor] | None = None,
         **kwargs) -> tuple[str, list[tuple[str, str]]]:
    """`(response, history + [(query, response)])`, the reference's chat() contract."""
    response, new_history = "", list(history or []) + [(query, "")]
    for response, new_history in stream_chat(model, tokenizer, query, history, max_length, num_beams, do_sample,
                                             top_p, temperature, logits_processor, **kwargs):
        pass
    return response, new_history


def _unstable_tail(text: str) -> int:
    """How many trailing characters may still change once more tokens arrive: the last one (a
    half-width mark before a coming CJK char, or whitespace that strip() removed), any U+FFFD
    from a character whose UTF-8 byte pieces are not all generated yet, and an unfinished
    `[[训练时间]]` placeholder."""
    if not text:
        return 0
    placeholder = TRAINING_TIME[0]
    partial = next((n for n in range(len(placeholder) - 1, 0, -1) if text.endswith(placeholder[:n])), 0)
    replacement = len(text) - len(text.rstrip("\ufffd"))
    return max(1 + replacement, partial)


def stream_pieces(raw_texts: Iterable[str]) -> Iterator[str]:
    """Turn "decoded text so far" snapshots into new text pieces of the processed response.

    Each piece is a suffix of process_response(text so far), minus a short tail that later
    tokens could still change, so the pieces join to exactly process_response(final text)."""
    sent, processed = "", ""
    for raw in raw_texts:
        processed = process_response(raw)
        stable = processed[: len(processed) - _unstable_tail(processed)]
        if stable.startswith(sent) and len(stable) > len(sent):
            yield stable[len(sent):]
            sent = stable
    if processed.startswith(sent) and len(processed) > len(sent):
        yield processed[len(sent):]
