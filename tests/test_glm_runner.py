"""The batched BianQue-2 runner driven by the engine, against today's solo generator
(`bianque.glm.generate.generate_tokens`) and a plain no-cache forward (float32, tiny GLM)."""
from __future__ import annotations

import pytest
import torch

from bianque.glm import load_advisor
from bianque.glm.generate import INVALID_FALLBACK_ID, generate_tokens
from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.sampling import SamplingParams, guard_invalid, next_token
from bianque.serving.engine import Engine
from bianque.serving.glm_runner import GLMRunner
from bianque.serving.request import Request
from tests.tiny_glm import build_tiny_glm

GREEDY = SamplingParams(do_sample=False)

DIALOGUES = [
    [Turn(PATIENT, "头疼")],
    [Turn(PATIENT, "我最近经常失眠，晚上睡不着，白天乏力，不知道怎么办")],
    [Turn(PATIENT, "孩子发烧三天了"), Turn(DOCTOR, "有没有咳嗽？", "question"), Turn(PATIENT, "有一点咳嗽，流鼻涕")],
    [Turn(PATIENT, "腹痛")],
    [Turn(PATIENT, "老人胸闷心慌一周了"), Turn(DOCTOR, "以前有过类似情况吗？", "question"), Turn(PATIENT, "没有"),
     Turn(DOCTOR, "吃过什么药吗？", "question"), Turn(PATIENT, "吃了药也不好，晚上更严重")],
    [Turn(PATIENT, "拉肚子，恶心，呕吐")],
    [Turn(PATIENT, "嗓子疼两个月了"), Turn(DOCTOR, "多久了？", "question"), Turn(PATIENT, "两个月")],
    [Turn(PATIENT, "皮肤痒")],
]
# Each request's own budget, so requests leave the batch at different steps (1: after one token).
LIMITS = [30, 7, 16, 3, 30, 11, 1, 19]
# The tiny model says <eop> after a token or two; each request bans it for its first few tokens
# (the same rule in the solo reference, as a logits processor) so replies end at varied steps.
MIN_NEW = [20, 0, 12, 0, 25, 4, 0, 9]
CAPACITY = 160


@pytest.fixture(scope="module")
def advisor(tmp_path_factory):
    return load_advisor(str(build_tiny_glm(tmp_path_factory.mktemp("tiny_glm"))), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(advisor):
    return [advisor.tokenizer.encode(advisor.prompt(turns)) for turns in DIALOGUES]


@pytest.fixture(scope="module")
def solo(advisor, prompts):
    """Each prompt alone through today's generator; a trailing <eop> is dropped (the engine does
    not emit its stop token)."""
    eos, out = advisor.model.config.eos_token_id, []
    for ids, limit, floor in zip(prompts, LIMITS, MIN_NEW):
        def ban(seq, scores, start=len(ids), floor=floor):
            return ban_eos(scores, eos) if seq.shape[1] - start < floor else scores
        tokens = [int(t) for t in generate_tokens(advisor.model, torch.tensor([ids]), limit, GREEDY, processors=[ban])]
        out.append(tokens[:-1] if tokens[-1] == eos else tokens)
    return out


def ban_eos(scores: torch.Tensor, eos: int) -> torch.Tensor:
    scores = scores.clone()
    scores[:, eos] -= 1e4
    return scores


def request(advisor, ids, limit, floor=0) -> Request:
    eos = advisor.model.config.eos_token_id

    def greedy(row: torch.Tensor, generated: list[int]) -> int:
        scores = row[None] if len(generated) >= floor else ban_eos(row[None], eos)
        return int(next_token(guard_invalid(scores, INVALID_FALLBACK_ID), GREEDY)[0])
    return Request(list(ids), greedy, lambda t: t == eos, limit)


def test_solo_replies_are_varied(solo):
    """The comparison means something: replies of several lengths, some reaching their budget."""
    assert len({len(s) for s in solo}) >= 4
    assert sum(len(s) == n for s, n in zip(solo, LIMITS)) >= 2
    assert sum(len(s) < n for s, n in zip(solo, LIMITS)) >= 2


def test_batch_of_eight_is_token_identical_to_solo(advisor, prompts, solo):
    runner = GLMRunner(advisor.model, max_batch=8, capacity=CAPACITY)
    engine = Engine(runner)
    streams = [engine.submit(request(advisor, ids, n, f)) for ids, n, f in zip(prompts, LIMITS, MIN_NEW)]
    assert [list(s) for s in streams] == solo
    assert runner.lengths == [None] * 8  # every slot released


def test_batched_step_logits_match_a_solo_forward(advisor, prompts):
    """Prefill + two batched decode steps vs a plain forward (no cache) of each sequence alone."""
    model = advisor.model
    runner = GLMRunner(model, max_batch=8, capacity=CAPACITY)
    slots = [5, 0, 3, 7, 1]
    chosen = [prompts[i] for i in range(len(slots))]
    logits = runner.prefill(slots, chosen)
    seqs = [list(p) for p in chosen]
    for step in range(3):
        for k, seq in enumerate(seqs):
            alone = model(torch.tensor([seq])).logits[0, -1]
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits[k], alone, atol=1e-4, rtol=0)
        if step == 2:
            break
        tokens = [int(t) for t in logits.argmax(-1)]
        for seq, t in zip(seqs, tokens):
            seq.append(t)
        logits = runner.decode(slots, tokens)


def test_request_joining_mid_generation(advisor, prompts, solo):
    engine = Engine(GLMRunner(advisor.model, max_batch=8, capacity=CAPACITY))
    first = engine.submit(request(advisor, prompts[0], LIMITS[0], MIN_NEW[0]))
    head = iter(first)
    got = [next(head) for _ in range(5)]  # the first request is well under way
    later = [engine.submit(request(advisor, prompts[i], LIMITS[i], MIN_NEW[i])) for i in (2, 4, 1)]
    got += list(head)
    assert got == solo[0]
    assert [list(s) for s in later] == [solo[2], solo[4], solo[1]]


def test_one_request_hits_max_new_tokens_while_others_go_on(advisor, prompts, solo):
    engine = Engine(GLMRunner(advisor.model, max_batch=4, capacity=CAPACITY))
    short = engine.submit(request(advisor, prompts[4], 2, MIN_NEW[4]))
    longer = [engine.submit(request(advisor, prompts[i], LIMITS[i], MIN_NEW[i])) for i in (0, 2)]
    assert list(short) == solo[4][:2]
    assert [list(s) for s in longer] == [solo[0], solo[2]]


def test_slots_are_reused_and_nothing_leaks(advisor, prompts, solo):
    """More requests than slots queue and finish; cancelled ones free their slots; afterwards a
    full batch of 8 still gives the solo outputs."""
    runner = GLMRunner(advisor.model, max_batch=3, capacity=CAPACITY)
    engine = Engine(runner)
    cancelled = engine.submit(request(advisor, prompts[0], LIMITS[0], MIN_NEW[0]))
    next(iter(cancelled))
    cancelled.close()
    streams = [engine.submit(request(advisor, ids, n, f)) for ids, n, f in zip(prompts, LIMITS, MIN_NEW)]
    assert [list(s) for s in streams] == solo
    streams = [engine.submit(request(advisor, ids, n, f)) for ids, n, f in zip(*(reversed(x) for x in (prompts, LIMITS, MIN_NEW)))]
    assert [list(s) for s in streams] == list(reversed(solo))
    assert runner.lengths == [None] * 3


def test_bad_input_is_refused_clearly(advisor, prompts):
    runner = GLMRunner(advisor.model, max_batch=2, capacity=16)
    with pytest.raises(ValueError, match="capacity of 16"):
        runner.prefill([0], [prompts[1]])
    with pytest.raises(ValueError, match="outside 0..1"):
        runner.prefill([2], [prompts[0]])
    with pytest.raises(ValueError, match="no prompt"):
        runner.decode([1], [5])
    with pytest.raises(ValueError, match="gMASK"):
        runner.prefill([0], [[10, 11, advisor.model.config.bos_token_id]])
