"""Static KV cache and the compiled decode step (bianque/glm/generate.py): the same logits and
tokens as the growing cache, fixed shapes, and torch.compile on CPU (plain, int8/int4, packed)."""
from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch

from bianque.glm import GLMAdvisor, GLMForCausalLM, GLMTokenizer, V2Params
from bianque.glm.generate import generate_tokens, static_decoder
from bianque.glm.model import StaticKVCache
from bianque.glm.quant import QuantLinear, quantize_block_
from bianque.prompt import PATIENT, Turn
from bianque.sampling import SamplingParams
from tests.tiny_glm import build_tiny_glm

# Static decoding attends over every slot, masked ones included (probability exactly 0), so
# only the summation order differs from the growing cache: fp32 rounding.
STATIC_TOL = dict(atol=1e-5, rtol=0)
# Inductor fuses and reorders fp32 reductions; the logits of the tiny model are O(1-10).
COMPILED_TOL = dict(atol=1e-4, rtol=1e-4)
ADVISOR_MAX_LENGTH = 64
PROMPTS = ["病人：我头疼三天了\n医生：", "病人：宝宝发烧\n医生：多久了？\n病人：两天了，晚上咳嗽\n医生："]
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="torch.compile on CPU needs a C++ compiler (g++)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_glm(tmp_path_factory.mktemp("tiny_glm_static"))


@pytest.fixture(scope="module")
def model(tiny_dir) -> GLMForCausalLM:
    return GLMForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir) -> GLMTokenizer:
    return GLMTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """Compiled graphs of this module's models do not outlive it (Dynamo's per-function cache)."""
    yield
    torch._dynamo.reset()


def single(tokenizer) -> dict:
    return {"input_ids": torch.tensor([tokenizer.encode(PROMPTS[0])])}


def padded(tokenizer) -> dict:
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["input_ids"][0] == tokenizer.pad_token_id).sum() > 0  # row 0 really is left-padded
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def never_end(model):
    """A processor that rules `<eop>` out: the tiny model otherwise stops after ~3 tokens."""
    def processor(ids, logits):
        logits = logits.clone()
        logits[:, model.config.eos_token_id] = -1e4
        return logits
    return processor


def run(model, inputs: dict, new_tokens: int, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(tokens [b, new_tokens], the logits every step saw), through the real generator: a
    processor records the logits it is given (processors run first, before sampling)."""
    seen = []

    def record(ids, logits):
        seen.append(logits.clone())
        return logits

    ids = inputs["input_ids"]
    tokens = list(generate_tokens(model, ids, new_tokens, attention_mask=inputs.get("attention_mask"),
                                  position_ids=inputs.get("position_ids"), processors=[record, never_end(model)],
                                  **options))
    return torch.stack(tokens, 1), seen


def assert_same_run(a, b, tol) -> None:
    assert a[0].tolist() == b[0].tolist()
    assert len(a[1]) == len(b[1])
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, **tol)


# --- static vs growing cache (eager) ---------------------------------------------------------

@pytest.mark.parametrize("inputs", [single, padded])
def test_static_cache_gives_the_growing_caches_logits_and_tokens(model, tokenizer, inputs):
    given = inputs(tokenizer)
    dynamic = run(model, given, 16)
    static = run(model, given, 16, static=True)
    assert dynamic[0].shape[1] == 16  # every step compared, not just the first few
    assert_same_run(static, dynamic, STATIC_TOL)


def test_static_cache_stops_at_eop_and_pads_finished_rows(model, tokenizer):
    eos, pad = model.config.eos_token_id, model.config.pad_token_id

    def row0_ends_at_step_two(ids, logits):
        if ids.shape[1] == given["input_ids"].shape[1] + 1:
            logits = logits.clone()
            logits[0, eos] = 1e4
        return logits

    given = padded(tokenizer)
    runs = [torch.stack(list(generate_tokens(model, given["input_ids"], 12, attention_mask=given["attention_mask"],
                                             position_ids=given["position_ids"], processors=[row0_ends_at_step_two],
                                             static=static)), 1)
            for static in (False, True)]
    assert runs[0].tolist() == runs[1].tolist()
    assert runs[1][0, 1] == eos and (runs[1][0, 2:] == pad).all()

    def all_end(ids, logits):
        logits = logits.clone()
        logits[:, eos] = 1e4
        return logits

    assert [t.tolist() for t in generate_tokens(model, given["input_ids"], 12, attention_mask=given["attention_mask"],
                                                position_ids=given["position_ids"], processors=[all_end],
                                                static=True)] == [[eos, eos]]


def test_static_cache_shapes_stay_fixed_and_never_overflow(model, tokenizer, monkeypatch):
    """Capacity overflow is impossible by construction: the generator sizes the cache for the
    whole budget (prompt + max_new_tokens) and writes one slot per fed token, in place."""
    writes = []
    original = StaticKVCache.update

    def spy(self, k, v, cache_position):
        keys, values = original(self, k, v, cache_position)
        writes.append((cache_position.tolist(), tuple(keys.shape), keys.data_ptr(), values.data_ptr()))
        return keys, values

    monkeypatch.setattr(StaticKVCache, "update", spy)
    ids = single(tokenizer)["input_ids"]
    length, new = ids.shape[1], 6
    assert len(list(generate_tokens(model, ids, new, processors=[never_end(model)], static=True))) == new
    layers = model.config.num_layers
    first_layer = writes[::layers]
    assert first_layer[0][0] == list(range(length))                                # prefill
    assert [w[0] for w in first_layer[1:]] == [[length + i] for i in range(new - 1)]  # then one slot a step
    capacity = length + new
    shape = (1, model.config.num_attention_heads, capacity, model.config.head_dim)
    assert {w[1] for w in writes} == {shape}
    assert len({w[2] for w in first_layer}) == 1  # the same buffer every step


def test_static_cache_errors_are_clear(model):
    cache = StaticKVCache(1, 2, 4, 8, torch.float32, torch.device("cpu"))
    too_many = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="5 new positions do not fit a static KV cache of 4 slots"):
        cache.update(too_many, too_many, torch.arange(5))
    ids = torch.tensor([[5, model.config.gmask_token_id, model.config.bos_token_id]])
    with pytest.raises(ValueError, match="static-cache steps need caches, position_ids and a mask"):
        model(ids, caches=model.new_static_caches(1, 8), cache_position=torch.arange(3))


def test_static_caches_are_reused_across_calls_and_zeroed(model, tokenizer):
    ids = single(tokenizer)["input_ids"]
    first = [t.item() for t in generate_tokens(model, ids, 5, static=True)]
    spare = static_decoder(model, False).spare
    spare[0].values.fill_(float("nan"))  # stale garbage: must never reach a reply
    assert [t.item() for t in generate_tokens(model, ids, 5, static=True)] == first
    assert static_decoder(model, False).spare is spare  # same shape: the same buffers again


# --- the compiled step (CPU: Inductor's C++ kernels) -----------------------------------------

@needs_cxx
def test_compiled_step_matches_eager_static(model, tokenizer):
    """Batch 1 with the advisor test's budget (ADVISOR_MAX_LENGTH), so both use one compiled
    graph; the padded batch's mask row is plain input data to the same step (tested eagerly)."""
    given = single(tokenizer)
    new = ADVISOR_MAX_LENGTH - given["input_ids"].shape[1]
    eager = run(model, given, new, static=True)
    compiled = run(model, given, new, compile=True)
    assert static_decoder(model, True).compiled is not None  # compiled, not fallen back to eager
    assert_same_run(compiled, eager, COMPILED_TOL)
    again = run(model, given, new, compile=True)  # reused: no second compile, same numbers
    assert_same_run(again, compiled, dict(atol=0, rtol=0))


@needs_cxx
def test_compiled_step_with_int8_and_int4_linears(model, tokenizer):
    quantized = copy.deepcopy(model)
    quantize_block_(quantized.transformer.layers[0], 8)  # both kinds in one model: one compile
    quantize_block_(quantized.transformer.layers[1], 4)
    assert {m.bits for m in quantized.modules() if isinstance(m, QuantLinear)} == {8, 4}
    given = single(tokenizer)
    eager = run(quantized, given, 10, static=True)
    compiled = run(quantized, given, 10, compile=True)
    assert static_decoder(quantized, True).compiled is not None
    assert_same_run(compiled, eager, COMPILED_TOL)
    assert eager[0].tolist() == run(quantized, given, 10)[0].tolist()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="no oneDNN bfloat16 packing here")  # torch decides, not the code under test
def test_packed_bfloat16_falls_back_to_eager_static_steps(tiny_dir, tokenizer, caplog):
    packed = GLMForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    given = single(tokenizer)
    with caplog.at_level(logging.INFO, logger="bianque.glm.generate"):
        compiled = run(packed, given, 8, compile=True)
    assert static_decoder(packed, True).compiled is None
    notes = [r.getMessage() for r in caplog.records if "cannot compile" in r.getMessage()]
    assert len(notes) == 1 and "static cache, eager steps" in notes[0]
    assert compiled[0].tolist() == run(packed, given, 8)[0].tolist()


@needs_cxx
def test_advisor_replies_with_the_compiled_step(model, tokenizer):
    greedy = V2Params(sampling=SamplingParams(do_sample=False), max_length=ADVISOR_MAX_LENGTH, min_answer_tokens=32)
    turns = [Turn(PATIENT, "我头疼三天了")]
    plain = "".join(GLMAdvisor(model, tokenizer, "tiny", greedy).reply(turns))
    advisor = GLMAdvisor(model, tokenizer, "tiny", greedy, compile=True)
    assert advisor.prompt(turns) == PROMPTS[0]  # the shapes test_compiled_step_matches_eager_static compiled
    static_decoder(model, True).spare = None
    advisor.warm_up()  # what load_advisor(compile=True) does: the default budget's graph, caches given back
    warm = static_decoder(model, True).spare
    assert warm[0].capacity == greedy.max_length and static_decoder(model, True).proven
    assert "".join(advisor.reply(turns)) == plain
    assert static_decoder(model, True).spare is warm  # the reply reused the warm-up's caches
