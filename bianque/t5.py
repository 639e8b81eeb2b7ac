"""BianQue-1.0, the questioner: a T5 (ChatYuan-large-v2 fine-tune) that asks short follow-up questions.

Three parts, top to bottom:
- ``V1Tokenizer``: the 2023 tokenizer rebuilt on ``sentencepiece``. The model was trained and served
  with the slow ``T5Tokenizer`` of transformers 4.28; transformers 5.x gives different ids for most
  BianQue prompts (it rewrites the full-width ``：，？`` to ASCII), so we do not use it.
- ``encode``/``decode_step``/``generate_ids``: the encoder runs once, the decoder takes one token per
  step with the model's KV cache; sampling comes from ``bianque.sampling``.
- ``T5Questioner`` and ``load_questioner``: the doctor object the router and the UIs call.

Nothing here logs or prints dialogue text; logs carry sizes and timings only.
"""
from __future__ import annotations

import contextlib

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .cpu_linear import use_weight_first_
from .errors import ModelLoadError
from .glm.cpu_pack import pack_or_weight_first_
from .hub import V1_REPO, resolve_checkpoint
from .prompt import Fit, Turn, build_prompt, escape_v1, fit_dialogue, unescape_v1, validate_dialogue
from .sampling import SamplingParams, banned_ngram_tokens, next_token
from .serving.engine import Engine
from .serving.runner import check_kv_memory
from .serving.reply import EngineLane, Reply, SoloLane, Turns
from .serving.request import Request
from .serving.openmp import release_team
from .serving.t5_runner import T5Runner
from .settings import dtype_name, torch_dtype

log = logging.getLogger(__name__)

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = {"</s>": EOS_ID, "<unk>": UNK_ID, "<pad>": PAD_ID}
MAX_INPUT_TOKENS = 768  # the original app's tokenizer(max_length=768)
_SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")
# transformers 4.28 clean_up_tokenization, in its order; every pattern starts with a space.
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))
_CLEANUP_SPAN = max(len(a) for a, _ in _CLEANUP)


# --------------------------------------------------------------------------- tokenizer


class V1Tokenizer:
    """The slow transformers-4.28 ``T5Tokenizer`` behaviour on top of a SentencePiece model.

    NFKC (except for the user-defined symbols ``，？：。\\n\\t``), whitespace collapsing and the
    dummy ``▁`` prefix are SentencePiece's own normalizer; this class adds the 4.28 rules around it.
    """

    def __init__(self, sp) -> None:
        self.sp = sp
        self.vocab_size = sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        """Ids without the final ``</s>``.

        4.28 split the text on literal ``</s> <unk> <pad>`` first, stripped the whitespace on both
        sides of each (``str.strip`` whitespace), and encoded every other chunk on its own, so
        each chunk gets its own dummy ``▁``.
        """
        chunks = _SPECIAL_SPLIT.split(text)
        for i, chunk in enumerate(chunks):
            if chunk in SPECIAL_TOKENS:
                if i + 1 < len(chunks):
                    chunks[i + 1] = chunks[i + 1].lstrip()
                if i > 0:
                    chunks[i - 1] = chunks[i - 1].rstrip()
        ids: list[int] = []
        for chunk in chunks:
            if chunk in SPECIAL_TOKENS:
                ids.append(SPECIAL_TOKENS[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def encode(self, text: str, max_length: int | None = MAX_INPUT_TOKENS) -> list[int]:
        """``tokenizer(text, truncation=True, max_length=...)["input_ids"]`` of 4.28.

        Truncation keeps the first ``max_length - 1`` ids, then ``</s>`` is appended unless the ids
        already end with one. Callers fit the dialogue first (``fit_dialogue``): cutting here would
        drop the newest turn.
        """
        ids = self.tokenize(text)
        if max_length is not None and len(ids) + 1 > max_length:
            ids = ids[: max_length - 1]
        if not ids or ids[-1] != EOS_ID:
            ids.append(EOS_ID)
        return ids

    def count(self, text: str) -> int:
        """Model input length of ``text`` (with ``</s>``, no truncation): the budget's measure."""
        return len(self.encode(text, max_length=None))

    def decode(self, ids: Iterable[int]) -> str:
        """``batch_decode(skip_special_tokens=True)`` of 4.28: skip 0/1/2, ``▁``->space, strip, clean up."""
        kept = [int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID, UNK_ID)]
        return clean_up_tokenization(self.sp.decode(kept).strip()) if kept else ""


def clean_up_tokenization(text: str) -> str:
    for before, after in _CLEANUP:
        text = text.replace(before, after)
    return text


def load_tokenizer(path: str | Path) -> V1Tokenizer:
    """The BianQue-1.0 tokenizer from a checkpoint directory (its ``spiece.model``) or the file itself."""
    import sentencepiece as spm

    path = Path(path)
    model_file = path / "spiece.model" if path.is_dir() else path
    if not model_file.is_file():
        raise ModelLoadError(f"no SentencePiece model at {model_file}: a BianQue-1.0 checkpoint needs spiece.model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(model_file))
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(f"{model_file} is not a valid SentencePiece model ({exc}); re-download the checkpoint") from exc
    pieces = [sp.id_to_piece(i) for i in range(3)] if sp.get_piece_size() >= 3 else []
    if pieces != ["<pad>", "</s>", "<unk>"]:
        raise ModelLoadError(f"{model_file} does not have T5's <pad>, </s>, <unk> at ids 0-2 (found {pieces})")
    return V1Tokenizer(sp)


# --------------------------------------------------------------------------- streaming text


class TextStream:
    """Turns a growing list of ids into new text pieces whose concatenation is the final reply.

    The decoded text can still change at its end: ``strip`` hides a trailing space that the next
    piece brings back, the clean-up rewrites `` .``/`` 'm``... once their last character arrives,
    and a lone backslash may become an escaped newline. Those few characters are held back until
    they are settled.
    """

    def __init__(self, tokenizer: V1Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.diverged = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(_stable_prefix(self.tokenizer.decode(self.ids)))

    def finish(self) -> str:
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, raw: str) -> str:
        text = unescape_v1(raw)
        if not text.startswith(self.sent):  # never seen (the tests fuzz it); never yield a wrong piece
            if not self.diverged:
                log.warning("streamed text diverged from the decode at %d chars", len(self.sent))
            self.diverged = True
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def _stable_prefix(text: str) -> str:
    """``text`` minus the tail that more tokens could still rewrite (see ``TextStream``)."""
    space = text.rfind(" ", max(0, len(text) - _CLEANUP_SPAN))
    if space >= 0:
        text = text[:space]
    return text[:-1] if text.endswith("\\") else text


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class V1Params:
    """Generation settings; the defaults are the original app's ``model.generate`` call.

    ``seed`` makes sampling reproducible (a fresh CPU ``torch.Generator`` per reply); None uses
    the questioner's ``generator`` attribute if set, else torch's global RNG.
    ``no_repeat_ngram_size`` applies to greedy decoding too (set 0 for the original greedy call).
    """

    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(True, 0.7, 1.0, 50))
    max_new_tokens: int = 512
    no_repeat_ngram_size: int = 3
    max_input_tokens: int = MAX_INPUT_TOKENS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_input_tokens < 8:
            raise ValueError(f"max_input_tokens must be >= 8, got {self.max_input_tokens}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")


def encode(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the encoder once on ``[1, s]`` ids; returns (hidden states ``[1, s, d]``, mask ``[1, s]``)."""
    mask = torch.ones_like(input_ids)
    return model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask


def decode_step(model, hidden: torch.Tensor, mask: torch.Tensor, token: int, cache=None):
    """Feed one decoder token; returns (logits ``[V]`` for the next position, the updated cache).

    ``cache`` is transformers' ``EncoderDecoderCache``: self-attention keys/values grow by one per
    step, the cross-attention ones are computed at the first step and reused.
    """
    step = torch.tensor([[token]], device=hidden.device)
    out = model(encoder_outputs=(hidden,), attention_mask=mask, decoder_input_ids=step,
                cache=cache, use_cache=True)
    return out.logits[0, -1], out.cache


@torch.inference_mode()
def generate_ids(model, input_ids: Sequence[int], params: V1Params,
                 generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids until ``</s>`` (not yielded) or ``max_new_tokens``.

    As transformers' ``generate`` (the tests compare token for token): the no-repeat n-gram ban sees
    the decoder ids including the start token, then temperature/top-k/top-p and the draw. The draw
    runs on CPU in float32, so a seed gives the same choices from the same logits on any device.
    """
    device = next(model.parameters()).device
    hidden, mask = encode(model, torch.tensor([list(input_ids)], device=device))
    decoder_ids = [model.config.decoder_start_token_id]
    cache = None
    for _ in range(params.max_new_tokens):
        logits, cache = decode_step(model, hidden, mask, decoder_ids[-1], cache)
        token = choose_token(logits, decoder_ids, params, generator)
        if token == EOS_ID:
            return
        decoder_ids.append(token)
        yield token


def choose_token(logits: torch.Tensor, decoder_ids: Sequence[int], params: V1Params,
                 generator: torch.Generator | None = None) -> int:
    """The next id from one position's logits ``[V]``: the no-repeat n-gram ban over ``decoder_ids``
    (start token included), then sampling on CPU in float32. Shared by the solo loop and the engine."""
    logits = logits.float().cpu()
    if not torch.isfinite(logits).all():  # float16 overflow; sampling would fail obscurely
        raise FloatingPointError("BianQue-1.0 produced non-finite scores; run it in float32 (--v1-dtype float32)")
    banned = banned_ngram_tokens(list(decoder_ids), params.no_repeat_ngram_size)
    if banned:  # out of place: the engine's logits are inference tensors
        logits = logits.index_fill(0, torch.tensor(sorted(banned)), float("-inf"))
    return int(next_token(logits, params.sampling, generator)[0])


# --------------------------------------------------------------------------- the questioner


class T5Questioner:
    """BianQue-1.0 as a doctor: ``reply(turns)`` streams the next (usually questioning) doctor turn."""

    name = "BianQue-1.0"

    def __init__(self, model, tokenizer: V1Tokenizer, source: str, default_params: V1Params | None = None,
                 max_batch: int = 0) -> None:
        """``max_batch`` > 0 serves every ``reply`` through one batching engine (thread-safe: concurrent
        callers share decoder steps, up to ``max_batch`` at a time, the rest wait their turn);
        0 runs replies one at a time in their callers' threads, in arrival order."""
        if max_batch < 0:
            raise ValueError(f"max_batch must be >= 0 (0: no batching), got {max_batch}")
        self.model = model.eval()
        self.engine = Engine(T5Runner(self.model, max_batch)) if max_batch else None
        self._turns = Turns()
        self.tokenizer = tokenizer
        self.source = source
        self.default_params = default_params or V1Params()
        self.generator: torch.Generator | None = None  # CPU generator used when params.seed is None
        param = next(model.parameters())
        self.device, self.dtype = str(param.device), dtype_name(param.dtype)

    def fit(self, turns: Sequence[Turn], params: V1Params | None = None) -> Fit:
        """The dialogue ``reply`` sends: oldest turns dropped to fit ``max_input_tokens``."""
        params = params or self.default_params
        count = lambda prompt: self.tokenizer.count(escape_v1(prompt))  # noqa: E731
        return fit_dialogue(turns, params.max_input_tokens, count)

    def prompt_ids(self, turns: Sequence[Turn], params: V1Params | None = None) -> list[int]:
        """Exactly the ids the model sees: the escaped prompt of the fitted dialogue, ``</s>`` last."""
        params = params or self.default_params
        prompt = escape_v1(build_prompt(self.fit(turns, params).turns))
        return self.tokenizer.encode(prompt, max_length=params.max_input_tokens)

    def reply(self, turns: Sequence[Turn], params: V1Params | None = None) -> Reply:
        """Validate and fit now (errors surface at the call), then stream the reply's text pieces
        (a ``Reply``: iterate it, ``close()`` it to stop, ``ahead()`` for its place in the queue)."""
        validate_dialogue(turns)
        params = params or self.default_params
        ids = self.prompt_ids(turns, params)
        generator = self.generator
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        if self.engine is None:
            lane = SoloLane(self._turns, lambda: generate_ids(self.model, ids, params, generator))
        else:
            start = self.model.config.decoder_start_token_id
            choose = lambda logits, generated: choose_token(logits, [start, *generated], params, generator)  # noqa: E731
            lane = EngineLane(self.engine, Request(list(ids), choose, lambda token: token == EOS_ID, params.max_new_tokens))
        return Reply(lane, lambda tokens: self._stream(ids, tokens))

    def _stream(self, ids: list[int], tokens: Iterator[int]) -> Iterator[str]:
        stream, start, count = TextStream(self.tokenizer), time.perf_counter(), 0
        for token in tokens:
            count += 1
            piece = stream.push(token)
            if piece:
                yield piece
        tail = stream.finish()
        if tail:
            yield tail
        log.info("v1 reply: %d input tokens, %d new tokens, %.2fs on %s", len(ids), count,
                 time.perf_counter() - start, self.device)


def load_questioner(model: str = V1_REPO, device: str = "cpu", dtype: str | None = None,
                    max_batch: int = 0, pack: bool = True) -> T5Questioner:
    """BianQue-1.0 from a hub id or a local directory, on ``device`` in ``dtype`` (None: fp32 CPU / fp16 CUDA);
    ``max_batch`` > 0 batches concurrent replies through the serving engine (see ``T5Questioner``).
    In float32 on CPU the linears are packed for oneDNN where that times faster on this CPU
    (glm/cpu_pack.py), else multiplied weight first where that is (cpu_linear.py); ``pack=False``
    (training: packed weights are not trained) keeps them plain Parameters."""
    path = resolve_checkpoint(model, "--v1-model or BIANQUE_V1_MODEL")
    tokenizer = load_tokenizer(path)
    net = _load_model(path, torch_dtype(dtype, device, "v1"))
    if tokenizer.vocab_size > net.config.vocab_size:
        raise ModelLoadError(f"{path}: spiece.model has {tokenizer.vocab_size} pieces but the model only "
                             f"{net.config.vocab_size} embeddings; the tokenizer belongs to another checkpoint")
    try:
        net = net.to(device)
    except (RuntimeError, AssertionError) as exc:  # no such CUDA device, out of memory, ...
        raise ModelLoadError(f"could not move BianQue-1.0 to {device}: {str(exc).splitlines()[0]}; "
                             "pick another --v1-device or --v1-dtype") from exc
    packed = False
    if torch.device(device).type == "cpu" and next(net.parameters()).dtype == torch.float32:
        if pack:  # every linear, the head included (a tied head keeps its embedding too), or weight-first ones
            packed = pack_or_weight_first_(net, net.config.d_model)
        else:
            use_weight_first_(net)  # few-row fp32 products, where this CPU's BLAS favours it (same Parameters)
    if max_batch > 0:
        check_kv_memory(slot_bytes(net, V1Params()), max_batch, "BianQue-1.0",
                        "--v1-max-batch (or --max-batch, BIANQUE_V1_MAX_BATCH, BIANQUE_MAX_BATCH)")
    log.info("loaded BianQue-1.0 from %s on %s (%s%s)", path, device, dtype_name(next(net.parameters()).dtype),
             ", packed weights" if packed else "")
    try:
        questioner = T5Questioner(net, tokenizer, source=model, max_batch=max_batch)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise ModelLoadError(f"out of memory allocating BianQue-1.0's KV cache for max_batch={max_batch} on "
                             f"{device}; lower --v1-max-batch / BIANQUE_V1_MAX_BATCH") from exc
    if max_batch > 0 and torch.device(device).type == "cpu":
        release_team()  # the engine thread computes from now on: this thread's OpenMP team would slow it
    return questioner


def slot_bytes(model, params: V1Params) -> dict[torch.device, int]:
    """Bytes of one engine slot's keys and values at most: self-attention over ``max_new_tokens``
    and cross-attention over ``max_input_tokens``, every layer, each
    rounded up to the power of two the runner grows its buffers to."""
    cfg, param = model.config, next(model.parameters())
    grown = lambda n: max(64, 1 << (n - 1).bit_length())  # noqa: E731 - the runner doubles from 64
    tokens = grown(params.max_new_tokens + 1) + grown(params.max_input_tokens)
    return {param.device: cfg.num_decoder_layers * 2 * cfg.num_heads * cfg.d_kv * tokens * param.element_size()}


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Load without transformers' per-tensor progress bar and its tie warning: 5.x always marks
    T5's head as tied and then warns that ChatYuan's separate head was kept (which is right; a
    test checks the head). Missing or mis-shaped tensors are still errors, raised below."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_model(path: Path, dtype: torch.dtype):
    """``T5ForConditionalGeneration`` from ``path``; missing or mis-shaped tensors are errors, not warnings."""
    from transformers import T5ForConditionalGeneration

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not a BianQue-1.0 checkpoint directory")
    present = [name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not present:
        raise ModelLoadError(f"{path} has no weights (expected one of {', '.join(_WEIGHT_FILES)}); re-download it")
    safetensors = present[0].startswith("model.safetensors")
    try:
        with _quiet_transformers():
            net, info = T5ForConditionalGeneration.from_pretrained(
                path, dtype=dtype, use_safetensors=safetensors, weights_only=True, output_loading_info=True)
    except Exception as exc:  # wrong shapes, corrupt file, bad config, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"could not load the BianQue-1.0 weights in {path}: {first}") from exc
    if net.config.model_type != "t5":
        raise ModelLoadError(f"{path} holds a {net.config.model_type!r} model, not BianQue-1.0's T5")
    missing = sorted(info["missing_keys"])
    if missing:
        raise ModelLoadError(f"{path} is missing {len(missing)} weight tensors (e.g. {missing[0]}); "
                             "the checkpoint is incomplete or not BianQue-1.0")
    if info["unexpected_keys"]:
        log.warning("ignored %d unexpected tensors in %s", len(info["unexpected_keys"]), path)
    return net.eval()
