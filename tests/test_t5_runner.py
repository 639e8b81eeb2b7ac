"""The batched BianQue-1.0 runner against today's solo path (``bianque.t5.generate_ids``/``decode_step``).

A small greedy loop plays the engine's part: it admits requests into slots, feeds each running slot
its last token, bans repeated 3-grams as the solo loop does, and releases finished slots.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.sampling import SamplingParams, banned_ngram_tokens, next_token
from bianque.serving.t5_runner import T5Runner
from bianque.t5 import EOS_ID, T5Questioner, V1Params, decode_step, encode, generate_ids, load_questioner
from tiny_t5 import build_tiny_t5

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

GREEDY = V1Params(sampling=SamplingParams(do_sample=False), max_new_tokens=24, no_repeat_ngram_size=3)

DIALOGUES = [
    [Turn(PATIENT, "头疼")],
    [Turn(PATIENT, "我最近经常失眠，晚上睡不着，白天乏力，不知道怎么办")],
    [Turn(PATIENT, "孩子发烧三天了"), Turn(DOCTOR, "有没有咳嗽？"), Turn(PATIENT, "有一点咳嗽，流鼻涕")],
    [Turn(PATIENT, "腹痛")],
    [Turn(PATIENT, "老人胸闷心慌一周了"), Turn(DOCTOR, "以前有过类似情况吗？"), Turn(PATIENT, "没有"),
     Turn(DOCTOR, "吃过什么药吗？"), Turn(PATIENT, "吃了药也不好，晚上更严重")],
    [Turn(PATIENT, "拉肚子，恶心，呕吐")],
    [Turn(PATIENT, "嗓子疼两个月了"), Turn(DOCTOR, "多久了？"), Turn(PATIENT, "两个月")],
    [Turn(PATIENT, "皮肤痒")],
]


@pytest.fixture(scope="module")
def questioner(tmp_path_factory):
    return load_questioner(str(build_tiny_t5(tmp_path_factory.mktemp("t5"))))


@pytest.fixture(scope="module")
def prompts(questioner):
    return [questioner.prompt_ids(d) for d in DIALOGUES]


# Each request's own max_new_tokens (the tiny random model rarely says </s>), so replies end at different steps.
LIMITS = [24, 7, 16, 3, 24, 11, 1, 19]


@pytest.fixture(scope="module")
def solo(questioner, prompts):
    return [list(generate_ids(questioner.model, ids, dataclasses.replace(GREEDY, max_new_tokens=n)))
            for ids, n in zip(prompts, LIMITS)]


def _choose(logits: torch.Tensor, history: list[int]) -> int:
    """The solo loop's choice: ban repeated 3-grams of the decoder ids (start token included), argmax."""
    logits = logits.clone()
    banned = banned_ngram_tokens(history, GREEDY.no_repeat_ngram_size)
    if banned:
        logits[list(banned)] = float("-inf")
    return int(next_token(logits, GREEDY.sampling)[0])


class Loop:
    """A minimal engine: greedy, one decoder step per ``step()`` for every running slot."""

    def __init__(self, runner: T5Runner) -> None:
        self.runner, self.running, self.out, self.limit = runner, {}, {}, {}

    def admit(self, pairs: dict[int, tuple], limits: dict | None = None) -> None:
        """``{slot: (name, prompt ids)}``, prefilled together; ``limits``: max_new_tokens per name."""
        slots = list(pairs)
        for slot in slots:
            self.limit[pairs[slot][0]] = (limits or {}).get(pairs[slot][0], GREEDY.max_new_tokens)
        logits = self.runner.prefill(slots, [pairs[s][1] for s in slots])
        assert logits.shape == (len(slots), self.runner.model.config.vocab_size)
        assert logits.dtype == torch.float32
        for slot, row in zip(slots, logits):
            name = pairs[slot][0]
            self.out[name], self.running[slot] = [], name
            self._take(slot, row)

    def _take(self, slot: int, row: torch.Tensor) -> None:
        name = self.running[slot]
        token = _choose(row, [0] + self.out[name])
        if token == EOS_ID:
            self.finish(slot)
        else:
            self.out[name].append(token)
            if len(self.out[name]) >= self.limit[name]:
                self.finish(slot)

    def finish(self, slot: int) -> None:
        del self.running[slot]
        self.runner.release(slot)

    def step(self) -> None:
        slots = list(self.running)
        logits = self.runner.decode(slots, [self.out[self.running[s]][-1] for s in slots])
        for slot, row in zip(slots, logits):
            self._take(slot, row)

    def drain(self) -> None:
        while self.running:
            self.step()


def test_batch_of_eight_mixed_dialogues_equals_solo(questioner, prompts, solo):
    assert len({len(p) for p in prompts}) >= 5, "the dialogues must have different prompt lengths"
    assert len({len(s) for s in solo}) >= 2 and all(solo), "the solo replies must differ in length"
    loop = Loop(T5Runner(questioner.model, max_batch=8, initial_length=4))  # buffers grow on the way
    loop.admit({slot: (slot, ids) for slot, ids in enumerate(prompts)}, dict(enumerate(LIMITS)))
    loop.drain()
    assert [loop.out[i] for i in range(8)] == solo


def _solo_logits(model, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Solo logits for every position of ``tokens`` (the start token first)."""
    with torch.inference_mode():
        hidden, mask = encode(model, torch.tensor([ids]))
        cache, rows = None, []
        for token in [model.config.decoder_start_token_id] + tokens:
            logits, cache = decode_step(model, hidden, mask, token, cache)
            rows.append(logits.float())
    return torch.stack(rows)


def test_batched_step_logits_match_solo(questioner, prompts, solo):
    model = questioner.model
    reference = [_solo_logits(model, ids, out) for ids, out in zip(prompts, solo)]
    runner = T5Runner(model, max_batch=8)
    got = {i: [row] for i, row in enumerate(runner.prefill(list(range(8)), prompts))}
    step = 0
    while True:
        slots = [i for i in range(8) if step < len(solo[i])]
        if not slots:
            break
        for slot, row in zip(slots, runner.decode(slots, [solo[i][step] for i in slots])):
            got[slot].append(row)
        step += 1
        for i in range(8):
            if step == len(solo[i]) and i in slots:
                runner.release(i)
    for i in range(8):
        torch.testing.assert_close(torch.stack(got[i]), reference[i], rtol=0, atol=1e-4)


def test_join_mid_generation_and_leave(questioner, prompts, solo):
    loop = Loop(T5Runner(questioner.model, max_batch=4))
    limits = {"a": LIMITS[0], "b": LIMITS[4], "c": LIMITS[1], "d": LIMITS[2], "e": LIMITS[7]}
    loop.admit({0: ("a", prompts[0]), 2: ("b", prompts[4])}, limits)
    for _ in range(3):
        loop.step()
    loop.admit({1: ("c", prompts[1]), 3: ("d", prompts[2])}, limits)  # join while a and b are at step 3
    loop.step()
    cancelled = list(loop.out["b"])
    loop.finish(2)  # b leaves (cancelled) mid-generation
    loop.step()
    loop.admit({2: ("e", prompts[7])}, limits)  # its slot is reused at once
    loop.drain()
    assert loop.out["a"] == solo[0]
    assert loop.out["c"] == solo[1]
    assert loop.out["d"] == solo[2]
    assert loop.out["e"] == solo[7]
    assert len(cancelled) == 5 and cancelled == solo[4][:5]


def test_very_different_prompt_lengths_in_one_batch(questioner, solo, prompts):
    long_dialogue = []
    for i in range(12):
        long_dialogue += [Turn(PATIENT, f"我{'头疼咳嗽发热'[i % 5]}好几年了，吃了药也不好"), Turn(DOCTOR, "多久了？")]
    long_ids = questioner.prompt_ids(long_dialogue + [Turn(PATIENT, "晚上更严重")])
    short_ids = [EOS_ID]  # the shortest legal prompt: only </s>
    assert len(long_ids) > 100
    expected = [list(generate_ids(questioner.model, ids, GREEDY)) for ids in (long_ids, short_ids)]
    loop = Loop(T5Runner(questioner.model, max_batch=3, initial_length=2))
    loop.admit({0: ("short", short_ids), 1: ("long", long_ids), 2: ("mid", prompts[2])}, {"mid": LIMITS[2]})
    loop.drain()
    assert [loop.out["long"], loop.out["short"], loop.out["mid"]] == [*expected, solo[2]]


def test_slot_reuse_after_release_is_exact(questioner, prompts, solo):
    """A slot that held a long prompt and a long reply serves a shorter one exactly (stale state masked)."""
    runner = T5Runner(questioner.model, max_batch=1)
    order = sorted(range(8), key=lambda i: -len(prompts[i]))
    for i in order:
        loop = Loop(runner)
        loop.admit({0: (i, prompts[i])}, {i: LIMITS[i]})
        loop.drain()
        assert loop.out[i] == solo[i]


def test_bad_calls_are_clear_errors(questioner, prompts):
    runner = T5Runner(questioner.model, max_batch=2)
    with pytest.raises(ValueError, match="not running"):
        runner.decode([0], [5])
    with pytest.raises(ValueError, match="outside 0..1"):
        runner.prefill([2], [prompts[0]])
    with pytest.raises(ValueError, match="one prompt per slot"):
        runner.prefill([0, 1], [prompts[0]])
    with pytest.raises(ValueError, match="empty prompt"):
        runner.prefill([0], [[]])
    runner.prefill([0], [prompts[0]])
    with pytest.raises(ValueError, match="still in use"):
        runner.prefill([0], [prompts[1]])
    with pytest.raises(ValueError, match="twice"):
        runner.decode([0, 0], [5, 5])
    with pytest.raises(ValueError, match="max_batch"):
        T5Runner(questioner.model, max_batch=0)


def test_questioner_replies_from_many_threads_share_batched_steps(questioner):
    """``T5Questioner(max_batch=3)``: six threads at once get exactly their solo replies (greedy and
    seeded sampling), decoder steps hold several of them, a consumer that stops early frees its slot."""
    batched = T5Questioner(questioner.model, questioner.tokenizer, "tiny", max_batch=3)
    engine, runner = batched.engine, batched.engine.runner
    jobs = [(DIALOGUES[i], dataclasses.replace(GREEDY, max_new_tokens=LIMITS[i])) for i in range(4)]
    jobs += [(DIALOGUES[4], V1Params(max_new_tokens=20, seed=7)), (DIALOGUES[5], V1Params(max_new_tokens=12, seed=8))]
    expected = ["".join(questioner.reply(d, p)) for d, p in jobs]
    assert len(set(expected)) == len(jobs) and all(expected)

    all_in, count, lock, sizes = threading.Event(), [0], threading.Lock(), []
    submit, prefill, decode = engine.submit, runner.prefill, runner.decode

    def counting_submit(request):
        with lock:
            count[0] += 1
            if count[0] == len(jobs) + 1:
                all_in.set()
        return submit(request)

    def gated_prefill(slots, prompts):  # the first step waits until every request is queued
        assert all_in.wait(30), "not every thread submitted its request"
        return prefill(slots, prompts)

    def recording_decode(slots, tokens):
        sizes.append(len(slots))
        return decode(slots, tokens)

    engine.submit, runner.prefill, runner.decode = counting_submit, gated_prefill, recording_decode
    results, errors = [None] * len(jobs), []

    def run(i):
        try:
            results[i] = "".join(batched.reply(*jobs[i]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def stop_early():
        stream = batched.reply(DIALOGUES[6], dataclasses.replace(GREEDY, max_new_tokens=24))
        next(stream)
        stream.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    threads.append(threading.Thread(target=stop_early))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == expected
    assert max(sizes) == 3  # full batches: the replies really shared decoder steps
    deadline = time.monotonic() + 10
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert sorted(engine.scheduler.free) == [0, 1, 2] and not any(runner.active)


def test_load_refuses_a_kv_cache_that_does_not_fit(monkeypatch, tmp_path_factory):
    """The engine's cache is accounted for at load: too little free memory is a clear error naming
    the settings and how many replies would fit; enough memory (or max_batch 0) loads."""
    import types

    import psutil

    from bianque.errors import ModelLoadError
    from bianque.t5 import slot_bytes

    path = str(build_tiny_t5(tmp_path_factory.mktemp("t5_mem")))
    small = load_questioner(path)
    per_slot = slot_bytes(small.model, V1Params())[torch.device("cpu")]
    cfg = small.model.config  # self 513 -> 1024 and cross 768 -> 1024 positions, as the runner grows them
    assert per_slot == cfg.num_decoder_layers * 2 * cfg.num_heads * cfg.d_kv * 2048 * 4
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=per_slot * 5))
    with pytest.raises(ModelLoadError, match=r"^BianQue-1.0: the KV cache for 8 concurrent replies .* set "
                                             r"--v1-max-batch \(or --max-batch, BIANQUE_V1_MAX_BATCH, "
                                             r"BIANQUE_MAX_BATCH\) to 4 or less"):
        load_questioner(path, max_batch=8)
    assert load_questioner(path, max_batch=4).engine.runner.max_batch == 4
    assert load_questioner(path, max_batch=0).engine is None
