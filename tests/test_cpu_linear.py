"""Weight-first float32 linears (bianque/cpu_linear.py): the same numbers as F.linear, the same
parameters, and the engines' batched outputs unchanged when they are swapped in."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bianque.cpu_linear import MAX_ROWS, WeightFirstLinear, use_weight_first_, weight_first
from bianque.glm import load_advisor
from bianque.glm.generate import generate_tokens
from bianque.serving.engine import Engine
from bianque.serving.glm_runner import GLMRunner
from bianque.serving.t5_runner import T5Runner
from bianque.t5 import generate_ids, load_questioner
from tests import test_glm_runner as glm_case
from tests import test_t5_runner as t5_case
from tests.tiny_glm import build_tiny_glm
from tests.tiny_t5 import build_tiny_t5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (2, 48), (5, 48), (3, 4, 48), (MAX_ROWS, 48), (MAX_ROWS + 1, 48), (2, 1, 48)])
def test_weight_first_equals_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(80, 48, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(80, generator=g))
    x = torch.randn(*shape, generator=g)
    swapped = WeightFirstLinear(linear)
    out = swapped(x)
    assert out.shape == (*shape[:-1], 80) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight_first(x, linear.weight, linear.bias), linear(x), rtol=1e-5, atol=1e-5)


def test_weight_first_has_the_same_gradients():
    """load_questioner also serves fine-tuning: training through a swapped module must be right."""
    g = torch.Generator().manual_seed(1)
    plain = nn.Linear(16, 24)
    swapped = WeightFirstLinear(nn.Linear(16, 24))
    swapped.load_state_dict(plain.state_dict())
    x = torch.randn(3, 16, generator=g)
    plain(x).square().sum().backward()
    swapped(x).square().sum().backward()
    torch.testing.assert_close(swapped.weight.grad, plain.weight.grad)
    torch.testing.assert_close(swapped.bias.grad, plain.bias.grad)


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
    return str(build_tiny_glm(tmp_path_factory.mktemp("tiny_glm_wf")))


def test_swap_keeps_every_parameter_and_the_tied_head(glm_dir):
    model = load_advisor(glm_dir, device="cpu", dtype="float32").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_weight_first_(model, probe=True) == 0  # tiny weights: not worth a probe, nothing changes
    assert use_weight_first_(model, probe=False) == linears > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_only_float32_cpu_plain_linears_are_swapped(glm_dir):
    assert use_weight_first_(load_advisor(glm_dir, device="cpu", dtype="bfloat16").model, probe=False) == 0
    quantised = load_advisor(glm_dir, device="cpu", dtype="float32", quantize=8).model
    swapped = use_weight_first_(quantised, probe=False)
    assert swapped == 1 and isinstance(quantised.lm_head, WeightFirstLinear)  # the head; blocks stay int8


def test_probe_swaps_only_where_weight_first_is_faster(monkeypatch):
    import time
    import types

    from bianque import cpu_linear

    def slowed(fn):
        def run(*args):
            time.sleep(0.004)
            return fn(*args)
        return run

    model = lambda: nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))  # noqa: E731
    monkeypatch.setattr(cpu_linear, "weight_first", slowed(weight_first))
    assert not cpu_linear.weight_first_pays(torch.randn(1024, 1024), repeats=2)
    assert use_weight_first_(model()) == 0
    monkeypatch.undo()
    monkeypatch.setattr(cpu_linear, "F", types.SimpleNamespace(linear=slowed(F.linear)))
    assert cpu_linear.weight_first_pays(torch.randn(1024, 1024), repeats=2)
    assert use_weight_first_(model()) == 2


def test_glm_engine_with_weight_first_linears_gives_the_plain_solo_outputs(glm_dir):
    """Eight mixed dialogues batched through swapped linears: token-identical to each one run alone
    through plain F.linear; one batched step's logits within 1e-4 of a plain forward."""
    advisor = load_advisor(glm_dir, device="cpu", dtype="float32")
    prompts = [advisor.tokenizer.encode(advisor.prompt(turns)) for turns in glm_case.DIALOGUES]
    eos, solo = advisor.model.config.eos_token_id, []
    for ids, limit, floor in zip(prompts, glm_case.LIMITS, glm_case.MIN_NEW):
        def ban(seq, scores, start=len(ids), floor=floor):
            return glm_case.ban_eos(scores, eos) if seq.shape[1] - start < floor else scores
        tokens = [int(t) for t in generate_tokens(advisor.model, torch.tensor([ids]), limit, glm_case.GREEDY, processors=[ban])]
        solo.append(tokens[:-1] if tokens[-1] == eos else tokens)
    plain_logits = [advisor.model(torch.tensor([ids])).logits[0, -1] for ids in prompts[:5]]

    assert use_weight_first_(advisor.model, probe=False) > 0
    engine = Engine(GLMRunner(advisor.model, max_batch=8, capacity=glm_case.CAPACITY))
    streams = [engine.submit(glm_case.request(advisor, ids, n, f))
               for ids, n, f in zip(prompts, glm_case.LIMITS, glm_case.MIN_NEW)]
    assert [list(s) for s in streams] == solo
    batched = GLMRunner(advisor.model, max_batch=8, capacity=glm_case.CAPACITY).prefill([5, 0, 3, 7, 1], prompts[:5])
    for row, alone in zip(batched, plain_logits):
        torch.testing.assert_close(row, alone, atol=1e-4, rtol=0)


def test_t5_batched_steps_with_weight_first_linears_give_the_plain_solo_outputs(tmp_path_factory):
    questioner = load_questioner(str(build_tiny_t5(tmp_path_factory.mktemp("t5_wf"))))
    prompts = [questioner.prompt_ids(d) for d in t5_case.DIALOGUES]
    solo = [list(generate_ids(questioner.model, ids, dataclasses.replace(t5_case.GREEDY, max_new_tokens=n)))
            for ids, n in zip(prompts, t5_case.LIMITS)]
    plain = [t5_case._solo_logits(questioner.model, ids, out) for ids, out in zip(prompts, solo)]

    assert use_weight_first_(questioner.model, probe=False) > 0
    loop = t5_case.Loop(T5Runner(questioner.model, max_batch=8, initial_length=4))
    loop.admit({slot: (slot, ids) for slot, ids in enumerate(prompts)}, dict(enumerate(t5_case.LIMITS)))
    loop.drain()
    assert [loop.out[i] for i in range(8)] == solo
    runner = T5Runner(questioner.model, max_batch=8)
    first = runner.prefill(list(range(8)), prompts)
    torch.testing.assert_close(first, torch.stack([p[0] for p in plain]), rtol=0, atol=1e-4)


def test_loaders_swap_in_float32_on_cpu_where_the_probe_says_so(glm_dir, tmp_path_factory, monkeypatch):
    from bianque import cpu_linear

    monkeypatch.setattr(cpu_linear, "MIN_ELEMENTS", 0)  # the tiny models count as big enough
    monkeypatch.setattr(cpu_linear, "weight_first_pays", lambda weight, **kw: True)
    swapped = lambda model: {type(m) for m in model.modules()} & {nn.Linear, WeightFirstLinear}  # noqa: E731
    assert swapped(load_advisor(glm_dir, device="cpu", dtype="float32").model) == {WeightFirstLinear}
    assert WeightFirstLinear not in swapped(load_advisor(glm_dir, device="cpu", dtype="bfloat16").model)  # maybe packed
    t5_dir = str(build_tiny_t5(tmp_path_factory.mktemp("t5_loader_wf")))
    assert swapped(load_questioner(t5_dir).model) == {WeightFirstLinear}
    monkeypatch.setattr(cpu_linear, "weight_first_pays", lambda weight, **kw: False)
    assert swapped(load_advisor(glm_dir, device="cpu", dtype="float32").model) == {nn.Linear}
    assert swapped(load_questioner(t5_dir).model) == {nn.Linear}


def test_t5_packed_float32_linears_batch_as_they_run_alone(tmp_path_factory, monkeypatch):
    """Where packing pays (made to here), load_questioner packs every float32 linear (gated
    feed-forward and head included); the engine's batched steps then give the packed model's solo
    replies, close to the plain model's; pack=False (training) keeps plain Parameters."""
    from bianque.glm import cpu_pack

    t5_dir = str(build_tiny_t5(tmp_path_factory.mktemp("t5_packed")))
    plain = load_questioner(t5_dir, pack=False)
    monkeypatch.setattr(cpu_pack, "FLOAT32_MIN_HIDDEN", 0)  # the tiny model counts as big enough
    monkeypatch.setattr(cpu_pack, "_float32_packing_pays", lambda hidden: True)
    questioner = load_questioner(t5_dir)
    kinds = lambda model: {type(m) for m in model.modules()} & {nn.Linear, WeightFirstLinear, cpu_pack.PackedLinear}  # noqa: E731
    assert kinds(questioner.model) == {cpu_pack.PackedLinear} and kinds(plain.model) == {nn.Linear}
    prompts = [questioner.prompt_ids(d) for d in t5_case.DIALOGUES]
    solo = [list(generate_ids(questioner.model, ids, dataclasses.replace(t5_case.GREEDY, max_new_tokens=n)))
            for ids, n in zip(prompts, t5_case.LIMITS)]
    assert solo == [list(generate_ids(plain.model, ids, dataclasses.replace(t5_case.GREEDY, max_new_tokens=n)))
                    for ids, n in zip(prompts, t5_case.LIMITS)]
    loop = t5_case.Loop(T5Runner(questioner.model, max_batch=8, initial_length=4))
    loop.admit({slot: (slot, ids) for slot, ids in enumerate(prompts)}, dict(enumerate(t5_case.LIMITS)))
    loop.drain()
    assert [loop.out[i] for i in range(8)] == solo
    first = T5Runner(questioner.model, max_batch=8).prefill(list(range(8)), prompts)
    plain_first = T5Runner(plain.model, max_batch=8).prefill(list(range(8)), prompts)
    torch.testing.assert_close(first, plain_first, rtol=0, atol=1e-4)
