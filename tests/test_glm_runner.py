"""The batched BianQue-2 runner driven by the engine, against today's solo generator
(`bianque.glm.generate.generate_tokens`) and a plain no-cache forward (float32, tiny GLM)."""
from __future__ import annotations

import logging
import shutil
import threading
import time

import pytest
import torch
from torch._dynamo.utils import counters

from bianque.glm import load_advisor
from bianque.glm.advisor import GLMAdvisor, V2Params
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
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="torch.compile on CPU needs a C++ compiler (g++)")


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


def test_batched_prefill_equals_each_prompt_prefilled_alone(advisor, prompts):
    """Prompts of different lengths in one left-padded forward: each row's logits and the keys and
    values cached for its real tokens are its solo prefill's (fp32, 1e-4), and so are the next
    decode step's logits (its pads, cached past its length, stay invisible)."""
    model, chosen, slots = advisor.model, [prompts[i] for i in (0, 4, 1, 2)], [6, 2, 0, 5]
    assert len({len(p) for p in chosen}) == 4
    together, alone = GLMRunner(model, max_batch=8, capacity=CAPACITY), GLMRunner(model, max_batch=8, capacity=CAPACITY)
    batched = together.prefill(slots, chosen)
    solo = torch.cat([alone.prefill([slot], [prompt]) for slot, prompt in zip(slots, chosen)])
    torch.testing.assert_close(batched, solo, atol=1e-4, rtol=0)
    assert together.lengths == alone.lengths and together.positions == alone.positions
    for slot, prompt in zip(slots, chosen):
        mine, theirs, n = together.row[slot], alone.row[slot], len(prompt)
        for a, b in zip(together.caches, alone.caches):
            torch.testing.assert_close(a.keys[mine, :, :n], b.keys[theirs, :, :n], atol=1e-4, rtol=0)
            torch.testing.assert_close(a.values[mine, :, :n], b.values[theirs, :, :n], atol=1e-4, rtol=0)
    tokens = [int(t) for t in solo.argmax(-1)]
    torch.testing.assert_close(together.decode(slots, tokens), alone.decode(slots, tokens), atol=1e-4, rtol=0)


def recording_prefills(runner) -> list[int]:
    """Wrap runner.prefill to record how many prompts each call got."""
    sizes, prefill = [], runner.prefill

    def record(slots, prompts):
        sizes.append(len(slots))
        return prefill(slots, prompts)
    runner.prefill = record
    return sizes


def submit_at_once(engine, requests):
    """Submit while holding the engine's lock: its loop admits them all at the same step boundary."""
    with engine._cond:
        return [engine.submit(r) for r in requests]


def test_newcomers_at_one_step_boundary_prefill_in_one_forward(advisor, prompts, solo):
    runner = GLMRunner(advisor.model, max_batch=8, capacity=CAPACITY)
    sizes, engine = recording_prefills(runner), Engine(runner)
    streams = submit_at_once(engine, [request(advisor, ids, n, f) for ids, n, f in zip(prompts, LIMITS, MIN_NEW)])
    assert [list(s) for s in streams] == solo
    assert sizes == [8]


def test_a_bad_prompt_among_newcomers_fails_alone(advisor, prompts, solo):
    """One prompt without a mask token and one longer than a slot, admitted with three good ones:
    the batched prefill is refused before it runs, each is retried alone, the bad two fail with
    their own message, the good three give their solo outputs."""
    gmask = advisor.model.config.gmask_token_id
    no_mask = [t for t in prompts[1] if t != gmask]
    too_long = prompts[4] * 3
    runner = GLMRunner(advisor.model, max_batch=8, capacity=CAPACITY)
    assert len(too_long) >= CAPACITY
    sizes, engine = recording_prefills(runner), Engine(runner)
    jobs = [request(advisor, prompts[0], LIMITS[0], MIN_NEW[0]), request(advisor, no_mask, 5),
            request(advisor, prompts[2], LIMITS[2], MIN_NEW[2]), request(advisor, too_long, 5),
            request(advisor, prompts[5], LIMITS[5], MIN_NEW[5])]
    streams = submit_at_once(engine, jobs)
    assert list(streams[0]) == solo[0] and list(streams[2]) == solo[2] and list(streams[4]) == solo[5]
    with pytest.raises(ValueError, match="gMASK"):
        list(streams[1])
    with pytest.raises(ValueError, match="capacity of 160"):
        list(streams[3])
    assert sizes == [5, 1, 1, 1, 1, 1]
    wait_idle(engine)
    assert runner.lengths == [None] * 8


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


# ---------------------------------------------------------------- the advisor on the engine

def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not engine.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.idle()


def test_advisor_replies_from_many_threads_share_batched_steps(advisor):
    """`GLMAdvisor(max_batch=3)`: six threads at once get exactly their solo replies (greedy and
    seeded sampling, different max_length), steps hold several of them, a reply closed after its
    first piece leaves within a step, a request whose sampling fails fails alone, no slot leaks."""
    batched = GLMAdvisor(advisor.model, advisor.tokenizer, "tiny", V2Params(max_length=256), max_batch=3)
    engine, runner = batched.engine, batched.engine.runner
    sampled = lambda seed, n: V2Params(SamplingParams(True, 1.0, 1.0, 0), max_length=n, seed=seed)  # noqa: E731
    jobs = [(DIALOGUES[2], V2Params(GREEDY, max_length=120)), (DIALOGUES[0], V2Params(GREEDY, max_length=256)),
            (DIALOGUES[4], sampled(1, 200)), (DIALOGUES[1], sampled(2, 256)), (DIALOGUES[3], sampled(0, 120)),
            (DIALOGUES[5], sampled(3, 256))]
    expected = ["".join(advisor.reply(d, p)) for d, p in jobs]  # advisor: max_batch 0, one at a time
    assert all(expected) and len(set(expected)) >= 5 and len({len(e) for e in expected}) >= 4

    all_in, count, lock, sizes = threading.Event(), [0], threading.Lock(), []
    submit, prefill, decode = engine.submit, runner.prefill, runner.decode
    n_requests = len(jobs) + 2  # + the early stop + the failing one

    def counting_submit(request):
        with lock:
            count[0] += 1
            if count[0] == n_requests:
                all_in.set()
        return submit(request)

    def gated_prefill(slots, prompts):  # the first step waits until every request is queued
        assert all_in.wait(30), "not every thread submitted its request"
        return prefill(slots, prompts)

    def recording_decode(slots, tokens):
        sizes.append(len(slots))
        return decode(slots, tokens)

    engine.submit, runner.prefill, runner.decode = counting_submit, gated_prefill, recording_decode
    results, errors, stopped, failed = [None] * len(jobs), [], [], []

    def run(i):
        try:
            results[i] = "".join(batched.reply(*jobs[i]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def stop_early():
        reply = batched.reply(DIALOGUES[2], V2Params(GREEDY, max_length=256))  # 116 characters when run out
        next(reply)
        request = reply._lane.request
        reply.close()
        stopped.append((request, len(request.generated)))

    def fails_alone():  # temperature 1e-40 overflows to inf/nan probabilities inside sampling
        try:
            list(batched.reply(DIALOGUES[6], V2Params(SamplingParams(True, 1e-40, 1.0, 0), max_length=256, seed=1)))
        except RuntimeError as exc:
            failed.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    threads += [threading.Thread(target=stop_early), threading.Thread(target=fails_alone)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == expected
    assert len(failed) == 1
    assert max(sizes) == 3  # full batches: the replies really shared decode steps
    wait_idle(engine)
    (request, at_close), = stopped
    assert request.cancelled and len(request.generated) <= at_close + 2  # gone within a step
    assert sorted(engine.scheduler.free) == [0, 1, 2] and runner.lengths == [None] * 3
    engine.submit, runner.prefill, runner.decode = submit, prefill, decode
    again = ["".join(batched.reply(d, p)) for d, p in jobs[:3]]
    assert again == expected[:3]


def test_waiting_replies_know_their_place_and_max_length_is_capped(advisor):
    """max_batch 1: the running reply has no place (None), the waiting ones 0 and 1; one that
    gives up its place moves the next one up. A max_length beyond the slot capacity is capped."""
    batched = GLMAdvisor(advisor.model, advisor.tokenizer, "tiny", V2Params(max_length=128), max_batch=1)
    gate, decode = threading.Event(), batched.engine.runner.decode
    batched.engine.runner.decode = lambda slots, tokens: (gate.wait(30), decode(slots, tokens))[1]
    long_greedy = V2Params(GREEDY, max_length=128)
    first, second, third = (batched.reply(DIALOGUES[2], long_greedy) for _ in range(3))
    assert first.ahead(10) is None
    assert (second.ahead(0.05), third.ahead(0.05)) == (0, 1)
    second.close()
    assert third.ahead(0.05) == 0
    gate.set()
    capped = "".join(batched.reply(DIALOGUES[2], V2Params(GREEDY, max_length=4096)))
    assert "".join(first) == "".join(third) == capped == "".join(advisor.reply(DIALOGUES[2], long_greedy))
    wait_idle(batched.engine)


def test_solo_advisor_serves_threads_one_at_a_time_in_order(advisor):
    """max_batch 0: replies take turns in arrival order, each in its caller's thread."""
    first, second = advisor.reply(DIALOGUES[0], V2Params(GREEDY)), advisor.reply(DIALOGUES[1], V2Params(GREEDY))
    assert first.ahead(1) is None and second.ahead(0.05) == 0
    next(first)
    assert second.ahead(0.05) == 0
    first.close()
    assert second.ahead(1) is None
    assert "".join(second) == "".join(advisor.reply(DIALOGUES[1], V2Params(GREEDY)))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_weights_on_the_engine(tmp_path_factory, bits):
    path = str(build_tiny_glm(tmp_path_factory.mktemp(f"tiny_glm_q{bits}")))
    solo = load_advisor(path, device="cpu", dtype="float32", quantize=bits)
    batched = load_advisor(path, device="cpu", dtype="float32", quantize=bits, max_batch=2)
    assert batched.dtype.endswith(f"int{bits}") and batched.engine.runner.max_batch == 2
    jobs = [(DIALOGUES[2], V2Params(GREEDY, max_length=96)), (DIALOGUES[4], V2Params(max_length=96, seed=5))]
    replies, out, live = [batched.reply(*job) for job in jobs], ["", ""], {0, 1}
    while live:  # interleaved: both run in the same steps
        for k in sorted(live):
            piece = next(replies[k], None)
            if piece is None:
                live.discard(k)
            else:
                out[k] += piece
    assert out == ["".join(solo.reply(*job)) for job in jobs]


def test_load_refuses_a_kv_cache_that_does_not_fit(monkeypatch, advisor, tmp_path_factory):
    import types

    import psutil

    from bianque.errors import ModelLoadError
    from bianque.glm.advisor import slot_bytes

    cfg = advisor.model.config
    per_slot = slot_bytes(advisor.model, 2048)[torch.device("cpu")]
    assert per_slot == cfg.num_layers * 2 * cfg.num_attention_heads * 2048 * cfg.head_dim * 4  # float32
    path = str(build_tiny_glm(tmp_path_factory.mktemp("tiny_glm_mem")))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=per_slot * 3))
    with pytest.raises(ModelLoadError, match=r"^BianQue-2.0: the KV cache for 4 concurrent replies .* set "
                                             r"--v2-max-batch \(or --max-batch, BIANQUE_V2_MAX_BATCH, "
                                             r"BIANQUE_MAX_BATCH\) to 2 or less"):
        load_advisor(path, device="cpu", dtype="float32", max_batch=4)
    assert load_advisor(path, device="cpu", dtype="float32", max_batch=2).engine.runner.max_batch == 2
    # compiled, the runner allocates one more row (its scratch row): 2 slots no longer fit, 1 does
    with pytest.raises(ModelLoadError, match=r"the KV cache for 2 concurrent replies needs .* to 1 or less"):
        load_advisor(path, device="cpu", dtype="float32", max_batch=2, compile=True)


def test_a_reply_closed_from_another_thread_while_it_is_read_stops(advisor):
    """A server reads a reply in a worker thread and closes it from another when the client goes
    away: close() does not fail on the running generator, and the request leaves the engine."""
    batched = GLMAdvisor(advisor.model, advisor.tokenizer, "tiny", V2Params(max_length=256), max_batch=1)
    gate, decode = threading.Event(), batched.engine.runner.decode
    batched.engine.runner.decode = lambda slots, tokens: (gate.wait(30), decode(slots, tokens))[1]
    reply, pieces, errors = batched.reply(DIALOGUES[2], V2Params(GREEDY, max_length=256)), [], []

    def read():
        try:
            pieces.extend(reply)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
    worker = threading.Thread(target=read)
    worker.start()
    request = None
    deadline = time.monotonic() + 10
    while request is None and time.monotonic() < deadline:
        request = getattr(getattr(reply, "_lane", None), "request", None)
        time.sleep(0.01)
    assert request.started.wait(10)
    time.sleep(0.05)  # the worker is inside next(), waiting for the gated step
    reply.close()
    gate.set()
    worker.join(10)
    assert not worker.is_alive() and not errors
    wait_idle(batched.engine)
    assert request.cancelled and len(request.generated) <= 3


# ---------------------------------------------------------------- the compiled engine (--v2-compile)

def graphs() -> int:
    return counters["stats"]["unique_graphs"]  # Dynamo's count of graphs compiled in this process


@needs_cxx
def test_compiled_engine_gives_the_eager_outputs_with_one_graph_per_bucket(advisor, prompts, solo):
    """max_batch 2: warm-up (what load_advisor does) compiles the buckets 1 and 2 and nothing
    else; then eight requests of varied lengths (queueing, joining, leaving: steps of 1 and 2)
    give the eager engine's outputs, the solo ones, with no further compile."""
    compiled = GLMAdvisor(advisor.model, advisor.tokenizer, "tiny", V2Params(GREEDY, max_length=CAPACITY),
                          compile=True, max_batch=2)
    engine, runner = compiled.engine, compiled.engine.runner
    before = graphs()
    compiled.warm_up()
    assert runner.compiled is not None and runner.buckets == [1, 2] and graphs() - before == 2
    built, sizes, decode = graphs(), [], runner.decode
    runner.decode = lambda slots, tokens: (sizes.append(len(slots)), decode(slots, tokens))[1]
    streams = submit_at_once(engine, [request(advisor, ids, n, f) for ids, n, f in zip(prompts, LIMITS, MIN_NEW)])
    assert [list(s) for s in streams] == solo
    assert set(sizes) == {1, 2} and graphs() == built
    replies = ["".join(compiled.reply(d)) for d in DIALOGUES[:2]]
    assert replies == ["".join(advisor.reply(d, V2Params(GREEDY, max_length=CAPACITY))) for d in DIALOGUES[:2]]
    assert graphs() == built
    wait_idle(engine)
    assert runner.slot_at == [] and runner.lengths == [None] * 2


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="no oneDNN bfloat16 packing here")  # torch decides, not the code under test
def test_packed_bfloat16_engine_decodes_eagerly_when_compile_fails(tmp_path_factory, caplog):
    path = str(build_tiny_glm(tmp_path_factory.mktemp("tiny_glm_packed")))
    with caplog.at_level(logging.INFO, logger="bianque.serving.glm_runner"):
        packed = load_advisor(path, device="cpu", dtype="bfloat16", compile=True, max_batch=2)
    assert packed.engine.runner.compiled is None
    notes = [r.getMessage() for r in caplog.records if "cannot compile" in r.getMessage()]
    assert len(notes) == 1 and "eager steps" in notes[0]
    eager = load_advisor(path, device="cpu", dtype="bfloat16", max_batch=2)
    params = V2Params(GREEDY, max_length=96)
    assert ["".join(packed.reply(d, params)) for d in DIALOGUES[:2]] == ["".join(eager.reply(d, params)) for d in DIALOGUES[:2]]
