"""BianQue-2.0 as a doctor: `reply(turns)` streams the advice for a dialogue (the router's advisor).

Like the original app, the whole dialogue is built into ONE query with the project's prompt
builder (`病人：…\\n医生：…\\n病人：…\\n医生：`) and sent with `history=None`; the dialogue is first
fitted into `max_length` leaving room for the answer, dropping the oldest turns.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from ..errors import ModelLoadError
from ..hub import V2_REPO, resolve_checkpoint
from ..prompt import PATIENT, Fit, Turn, build_prompt, fit_dialogue, validate_dialogue
from ..sampling import SamplingParams, guard_invalid, next_token
from ..serving.engine import Engine
from ..serving.glm_runner import GLMRunner
from ..serving.openmp import release_team
from ..serving.runner import check_kv_memory
from ..serving.reply import EngineLane, Reply, SoloLane, Turns
from ..serving.request import Request
from ..settings import dtype_name, torch_dtype
from .chat import stream_pieces, stream_raw
from .generate import INVALID_FALLBACK_ID, generate_tokens
from .model import GLMForCausalLM
from .tokenizer import GLMTokenizer

log = logging.getLogger(__name__)

# Literals the tokenizer would turn into control ids if a patient typed them (or that look like
# control tokens to a reader: [gMASK] is plain text to the reference tokenizer but not to every
# tool). Their brackets are swapped for the full-width look-alikes ＜＞［］ in patient and doctor
# text: the special-token split no longer matches, and the tokenizer's NFKC folding maps them back
# to ASCII brackets, so the model still reads the characters the patient typed, as plain text.
CONTROL_LITERALS = ("<sop>", "<eop>", "[MASK]", "[gMASK]", "<pad>", "<unk>")
_CONTROL = re.compile("|".join(re.escape(t) for t in CONTROL_LITERALS))
_LOOK_ALIKE = str.maketrans({"<": "＜", ">": "＞", "[": "［", "]": "］"})
WARM_UP_MESSAGE = "你好"  # a fixed greeting: compiling never sees a patient's words


def neutralise_control_tokens(text: str) -> str:
    """`<sop>` -> `＜sop＞`, `[gMASK]` -> `［gMASK］`, ... (see CONTROL_LITERALS); other text unchanged."""
    return _CONTROL.sub(lambda m: m.group(0).translate(_LOOK_ALIKE), text)


@dataclass(frozen=True)
class V2Params:
    """Generation settings; the defaults are the original app's `model.chat` call (top-k 50 is
    transformers' default that BianQue never overrode). `max_length` counts prompt + answer; the
    prompt keeps at most `max_length - min(min_answer_tokens, max_length // 2)` tokens. `seed`
    makes sampling reproducible (a fresh generator per reply)."""

    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(True, 0.95, 0.7, 50))
    max_length: int = 2048
    min_answer_tokens: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_length < 4:
            raise ValueError(f"max_length must be at least 4 tokens, got {self.max_length}")
        if self.min_answer_tokens < 1:
            raise ValueError(f"min_answer_tokens must be positive, got {self.min_answer_tokens}")

    @property
    def prompt_budget(self) -> int:
        return self.max_length - min(self.min_answer_tokens, self.max_length // 2)


class GLMAdvisor:
    """The BianQue-2.0 doctor: `reply(turns)` streams text pieces of the next doctor turn."""

    name = "BianQue-2.0"

    def __init__(self, model: GLMForCausalLM, tokenizer: GLMTokenizer, source: str,
                 default_params: V2Params | None = None, compile: bool = False, max_batch: int = 0) -> None:
        """`max_batch` > 0 serves every `reply` through one batching engine (GLMRunner: a KV cache
        of `max_batch` slots x the default `max_length`, allocated here); concurrent callers share
        decode steps, the rest wait in arrival order. 0 runs replies one at a time in the callers'
        threads (arrival order too). Either way `reply` may be called from any thread."""
        if max_batch < 0:
            raise ValueError(f"max_batch must be >= 0 (0: no batching), got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.default_params = default_params or V2Params()
        # `compile`, solo: every reply on a static KV cache with a torch.compile'd decode step
        # (CUDA graphs on CUDA), compiled once (warm_up, else the first reply) and reused: the
        # capacity is max_length whatever the prompt, so only a new max_length compiles again.
        # On the engine: one compiled batched step per batch-size bucket (GLMRunner), all built
        # by warm_up. Either way a model that cannot be compiled decodes eagerly (logged).
        self.compile = compile
        self.engine = (Engine(GLMRunner(self.model, max_batch, self.default_params.max_length, compile=compile))
                       if max_batch else None)
        self._turns = Turns()
        weight = model.transformer.final_layernorm.weight  # linears may be quantised or packed
        bits = getattr(model.transformer.layers[0].mlp.dense_h_to_4h, "bits", None)
        # What the sidebar and transcripts show, e.g. "bfloat16" or "bfloat16 · int4".
        self.device = str(weight.device)
        self.dtype = dtype_name(weight.dtype) + (f" · int{bits}" if bits else "")

    def warm_up(self) -> None:
        """Compile the decode step now rather than in the first reply. On the engine: every batch
        bucket's step (before the engine serves anyone). Solo: two greedy steps of a fixed
        greeting (no patient text) with the default max_length, the shape every default reply
        then reuses."""
        if self.engine is not None:
            self.engine.runner.warm_up()
            return
        query = build_prompt([Turn(PATIENT, WARM_UP_MESSAGE)])
        raw = stream_raw(self.model, self.tokenizer, query, self.default_params.max_length,
                         SamplingParams(do_sample=False), compile=self.compile)
        for _ in zip(range(2), raw):
            pass
        raw.close()  # gives the static caches back for the first reply

    def fit(self, turns: Sequence[Turn], params: V2Params | None = None) -> Fit:
        """The (neutralised) dialogue `reply` sends: oldest turns dropped to fit the prompt budget."""
        params = params or self.default_params
        validate_dialogue(turns)
        safe = [replace(t, text=neutralise_control_tokens(t.text)) for t in turns]
        count = lambda prompt: len(self.tokenizer.encode(prompt))  # noqa: E731
        return fit_dialogue(safe, params.prompt_budget, count)

    def prompt(self, turns: Sequence[Turn], params: V2Params | None = None) -> str:
        """Exactly the query passed to chat (history=None)."""
        return build_prompt(self.fit(turns, params).turns)

    @property
    def capacity(self) -> int | None:
        """Prompt + answer tokens one engine slot holds (None without the engine)."""
        return self.engine.runner.capacity if self.engine is not None else None

    def reply(self, turns: Sequence[Turn], params: V2Params | None = None) -> Reply:
        """Validate and fit now (errors surface at the call), then stream the reply's text pieces
        (a `Reply`: iterate it, `close()` it to stop, `ahead()` for its place in the queue). On the
        engine a `max_length` beyond the slot capacity is lowered to it (the dialogue is fitted to that)."""
        params = params or self.default_params
        if self.capacity is not None and params.max_length > self.capacity:
            params = replace(params, max_length=self.capacity)
        ids = self.tokenizer.encode(self.prompt(turns, params))
        if len(ids) >= params.max_length:
            raise ValueError(f"the prompt is {len(ids)} tokens, no room to answer within max_length={params.max_length}")
        generator = None
        if params.seed is not None and params.sampling.do_sample:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        budget = params.max_length - len(ids)
        if self.engine is None:
            def solo() -> Iterator[int]:
                input_ids = torch.tensor([ids], device=self.model.input_device)
                for token in generate_tokens(self.model, input_ids, budget, params.sampling,
                                             generator=generator, compile=self.compile):
                    yield int(token[0])
            lane = SoloLane(self._turns, solo)
        else:
            def choose(row: torch.Tensor, generated: list[int]) -> int:
                return int(next_token(guard_invalid(row[None], INVALID_FALLBACK_ID), params.sampling, generator)[0])
            eos = self.model.config.eos_token_id
            lane = EngineLane(self.engine, Request(ids, choose, lambda token: token == eos, budget))
        return Reply(lane, lambda tokens: self._pieces(len(ids), tokens))

    def _pieces(self, prompt_length: int, tokens: Iterator[int]) -> Iterator[str]:
        start, new = time.perf_counter(), []

        def decoded() -> Iterator[str]:
            for token in tokens:
                new.append(token)
                yield self.tokenizer.decode(new)

        yield from stream_pieces(decoded())
        log.info("v2 reply: %d input tokens, %d new tokens, %.2fs on %s", prompt_length, len(new),
                 time.perf_counter() - start, self.device)


def slot_bytes(model: GLMForCausalLM, capacity: int) -> dict[torch.device, int]:
    """Bytes of one engine slot's keys and values (`capacity` tokens) on each device holding layers."""
    c, out = model.config, {}
    for layer in model.transformer.layers:
        weight = layer.input_layernorm.weight
        out[weight.device] = out.get(weight.device, 0) + 2 * c.num_attention_heads * capacity * c.head_dim * weight.element_size()
    return out


def load_advisor(model: str = V2_REPO, device: str = "cpu", dtype: str | torch.dtype | None = None,
                 quantize: int | None = None, compile: bool = False, max_batch: int = 0) -> GLMAdvisor:
    """BianQue-2.0 from a hub id or a local directory, on `device` in `dtype`
    (None: bfloat16 on CPU, float16 on CUDA), optionally with int8/int4 weights; `compile`:
    decode every reply on a static KV cache with a torch.compile'd step (see generate.py; on the
    engine GLMRunner's compiled step per batch bucket), compiled here; `max_batch` > 0 batches concurrent replies through the serving engine (see GLMAdvisor)."""
    path = resolve_checkpoint(model, "--v2-model or BIANQUE_V2_MODEL")
    options = {}
    if device == "auto" or "," in device:  # whole blocks spread over several GPUs (placement.py)
        from .placement import parse_devices

        try:
            options["devices"], device = device, str(parse_devices(device)[0])
        except ValueError as exc:
            raise ModelLoadError(f"could not load BianQue-2.0: {exc}") from exc
    if not isinstance(dtype, torch.dtype):
        dtype = torch_dtype(dtype, device, "v2")
    tokenizer = GLMTokenizer.from_pretrained(path)
    try:
        net = GLMForCausalLM.from_pretrained(path, device=device, dtype=dtype, quantize=quantize, **options)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ModelLoadError(f"out of memory loading BianQue-2.0 on {device} in {dtype_name(dtype)}; "
                             "use --v2-dtype bfloat16/float16, --quantize 8 or 4, or another --v2-device") from exc
    except RuntimeError as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"could not load BianQue-2.0 on {device}: {str(exc).splitlines()[0]}; "
                             "pick another --v2-device or --v2-dtype") from exc
    if len(tokenizer) > net.config.vocab_size:
        raise ModelLoadError(f"{path}: ice_text.model has {len(tokenizer)} pieces but the model only "
                             f"{net.config.vocab_size} embeddings; the tokenizer belongs to another checkpoint")
    if max_batch > 0:
        check_kv_memory(slot_bytes(net, V2Params().max_length), max_batch, "BianQue-2.0",
                        "--v2-max-batch (or --max-batch, BIANQUE_V2_MAX_BATCH, BIANQUE_MAX_BATCH)",
                        extra_rows=1 if compile else 0)  # compiled: GLMRunner's scratch row
    try:
        advisor = GLMAdvisor(net, tokenizer, source=model, compile=compile, max_batch=max_batch)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ModelLoadError(f"out of memory allocating BianQue-2.0's KV cache for max_batch={max_batch} on {device}; "
                             "lower --v2-max-batch / BIANQUE_V2_MAX_BATCH") from exc
    if advisor.compile:
        start = time.perf_counter()
        advisor.warm_up()
        if advisor.engine is None:
            log.info("BianQue-2.0 decode step compiled (warm-up) in %.1f s", time.perf_counter() - start)
        elif advisor.engine.runner.compiled is not None:
            log.info("BianQue-2.0 batched decode steps compiled for batch sizes %s (warm-up) in %.1f s",
                     advisor.engine.runner.buckets, time.perf_counter() - start)
    if advisor.engine is not None and advisor.engine.runner.device.type == "cpu":
        release_team()  # the engine thread computes from now on: this thread's OpenMP team would slow it
    log.info("loaded BianQue-2.0 from %s on %s (%s%s)", path, device, dtype_name(dtype), ", compiled decoding" if compile else "")
    return advisor
