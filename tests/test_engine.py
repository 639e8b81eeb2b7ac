"""The model-agnostic engine on a fake runner: joins, leaves, queueing, cancellation, failures."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from bianque.serving.engine import Engine
from bianque.serving.request import Request

V = 32


class FakeRunner:
    """Next token = (sum of the sequence so far * 7 + its length) mod V, as one-hot logits."""

    def __init__(self, max_batch: int, gate: threading.Event | None = None):
        self.max_batch = max_batch
        self.seqs: dict[int, list[int]] = {}
        self.batches: list[tuple[str, int]] = []
        self.fail_prompt: int | None = None  # a prompt starting with this id raises in prefill
        self.oom_at_batch: int | None = None  # the next decode of this many slots runs out of memory
        self.oom_prefill_over: int | None = None  # a prefill of more prompts than this runs out of memory
        self.gate = gate

    def _logits(self, seq):
        row = torch.zeros(V)
        row[(sum(seq) * 7 + len(seq)) % V] = 1.0
        return row

    def prefill(self, slots, prompts):
        assert all(0 <= s < self.max_batch and s not in self.seqs for s in slots)
        if any(p[0] == self.fail_prompt for p in prompts):
            raise ValueError("bad prompt")
        if self.oom_prefill_over is not None and len(slots) > self.oom_prefill_over:
            raise torch.OutOfMemoryError("simulated")
        for s, p in zip(slots, prompts):
            self.seqs[s] = list(p)
        self.batches.append(("prefill", len(slots)))
        return torch.stack([self._logits(self.seqs[s]) for s in slots])

    def decode(self, slots, tokens):
        if self.gate is not None:
            self.gate.wait()
        if self.oom_at_batch == len(slots):
            self.oom_at_batch = None
            raise torch.OutOfMemoryError("simulated")
        for s, t in zip(slots, tokens):
            self.seqs[s].append(t)
        self.batches.append(("decode", len(slots)))
        return torch.stack([self._logits(self.seqs[s]) for s in slots])

    def release(self, slot):
        self.seqs.pop(slot, None)


def solo(prompt, n):
    seq, out = list(prompt), []
    for _ in range(n):
        t = (sum(seq) * 7 + len(seq)) % V
        out.append(t)
        seq.append(t)
    return out


def greedy(prompt, n, stop=lambda t: False):
    return Request(prompt=list(prompt), choose=lambda row, gen: int(row.argmax()), is_stop=stop, max_new_tokens=n)


def run_all(engine, requests):
    results = [None] * len(requests)

    def consume(i, stream):
        try:
            results[i] = list(stream)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[i] = error
    streams = [engine.submit(r) for r in requests]
    threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


PROMPTS = [[1], [2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [3], [9, 9], [5, 1, 2], [7], [8, 8, 8, 8]]


def test_concurrent_requests_give_their_solo_outputs_and_more_than_max_batch_queue():
    runner = FakeRunner(max_batch=3)
    engine = Engine(runner)
    lengths = [5, 9, 2, 7, 1, 6, 3, 8]
    results = run_all(engine, [greedy(p, n) for p, n in zip(PROMPTS, lengths)])
    assert results == [solo(p, n) for p, n in zip(PROMPTS, lengths)]
    assert max(n for _, n in runner.batches) == 3
    assert runner.seqs == {} and sorted(engine.scheduler.free) == [0, 1, 2]  # no slot leaks
    assert run_all(engine, [greedy(p, 4) for p in PROMPTS]) == [solo(p, 4) for p in PROMPTS]


def test_stop_token_ends_a_request_without_being_yielded():
    prompt = [2, 3]
    expected = solo(prompt, 6)
    stop = expected[3]
    first = expected.index(stop)
    out = run_all(Engine(FakeRunner(2)), [greedy(prompt, 6, stop=lambda t: t == stop)])[0]
    assert out == expected[:first]


def test_waiting_requests_know_their_place_and_cancel_at_once():
    gate = threading.Event()
    runner = FakeRunner(max_batch=1, gate=gate)
    engine = Engine(runner)
    a = engine.submit(greedy([1], 50))
    b, c = engine.submit(greedy([2], 3)), engine.submit(greedy([3], 3))
    assert (b.position(), c.position()) == (0, 1) or (b.position(), c.position()) == (1, 2)
    b.close()
    assert c.position() in (0, 1)
    assert list(b) == []
    it = iter(a)
    assert next(it) == solo([1], 1)[0]
    gate.set()
    it.close()  # cancels after the first piece
    assert list(c) == solo([3], 3)
    assert runner.seqs == {} and engine.scheduler.idle()


def test_a_failing_request_fails_alone():
    runner = FakeRunner(max_batch=4)
    runner.fail_prompt = 66
    engine = Engine(runner)

    def bad_choose(row, gen):
        if len(gen) == 2:
            raise RuntimeError("sampling broke")
        return int(row.argmax())
    requests = [greedy([1], 5), greedy([66, 1], 5),
                Request(prompt=[4], choose=bad_choose, is_stop=lambda t: False, max_new_tokens=5), greedy([5, 5], 5)]
    results = run_all(engine, requests)
    assert results[0] == solo([1], 5) and results[3] == solo([5, 5], 5)
    assert isinstance(results[1], ValueError) and isinstance(results[2], RuntimeError)
    assert run_all(engine, [greedy(p, 3) for p in PROMPTS]) == [solo(p, 3) for p in PROMPTS]


def test_out_of_memory_in_a_step_fails_its_requests_and_the_engine_keeps_serving():
    gate = threading.Event()  # holds the first decode until both requests are in
    runner = FakeRunner(max_batch=4, gate=gate)
    runner.oom_at_batch = 2
    engine = Engine(runner)
    streams = [engine.submit(greedy(p, 9)) for p in PROMPTS[:2]]
    gate.set()
    for s in streams:
        with pytest.raises(torch.OutOfMemoryError):
            list(s)
    assert runner.seqs == {}
    assert run_all(engine, [greedy(p, 4) for p in PROMPTS]) == [solo(p, 4) for p in PROMPTS]


def test_newcomers_too_many_for_one_prefill_are_prefilled_one_by_one():
    """Out of memory in a batched prefill is not the requests' fault: each is retried alone."""
    runner = FakeRunner(max_batch=4)
    runner.oom_prefill_over = 1
    engine = Engine(runner)
    with engine._cond:  # all three are admitted at the same step boundary
        streams = [engine.submit(greedy(p, 4)) for p in PROMPTS[:3]]
    assert [list(s) for s in streams] == [solo(p, 4) for p in PROMPTS[:3]]
    assert [b for b in runner.batches if b[0] == "prefill"] == [("prefill", 1)] * 3


def test_max_new_tokens_must_be_positive():
    with pytest.raises(ValueError, match="max_new_tokens"):
        Engine(FakeRunner(1)).submit(greedy([1], 0))


def test_shutdown_ends_running_and_waiting_requests_and_refuses_new_ones():
    gate = threading.Event()
    engine = Engine(FakeRunner(max_batch=1, gate=gate))
    running, waiting = engine.submit(greedy([1], 50)), engine.submit(greedy([2], 3))
    it = iter(running)
    assert next(it) == solo([1], 1)[0]
    closer = threading.Thread(target=engine.shutdown)
    closer.start()
    gate.set()  # the step in progress finishes, then the loop stops
    closer.join(10)
    assert not closer.is_alive() and not engine._thread.is_alive()
    for stream in (it, iter(waiting)):
        with pytest.raises(RuntimeError, match="shut down"):
            list(stream)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(greedy([3], 3))
    assert engine.scheduler.idle()  # the refused request was never queued


EXIT_SCRIPT = """
import sys, pathlib, tempfile
sys.path.insert(0, {root!r})
from bianque.prompt import PATIENT, Turn
from bianque.sampling import SamplingParams
from bianque.t5 import V1Params, load_questioner
from tests.tiny_t5 import build_tiny_t5
doctor = load_questioner(str(build_tiny_t5(pathlib.Path(tempfile.mkdtemp()))), max_batch=2)
assert "".join(doctor.reply([Turn(PATIENT, "我头疼三天了")], V1Params(SamplingParams(False), max_new_tokens=12)))
"""


def test_a_process_that_replied_through_the_engine_exits_cleanly():
    """The engine thread is stopped at exit: killed inside a torch call by the interpreter's
    shutdown it aborted the process ("terminate called without an active exception", status -6)
    in 2-4 of 6 runs of this script before."""
    import subprocess
    import sys
    from pathlib import Path

    script = EXIT_SCRIPT.format(root=str(Path(__file__).resolve().parents[1]))
    for _ in range(4):
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-1500:]
        assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_are_sampled_on_a_pool_with_threads_to_spare_each_from_its_own_generator(monkeypatch, threads):
    """Seeded sampled requests in one batch give the tokens they give alone, whether their rows are
    chosen one after another (1 torch thread) or on the sampling pool (2); a choose that raises on
    a pool thread fails its own request only."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    names = set()

    def sampled(prompt, seed, n=6, broken=False):
        generator = torch.Generator().manual_seed(seed)

        def choose(row, generated):
            names.add(threading.current_thread().name)
            if broken and len(generated) == 3:
                raise RuntimeError("sampling broke")
            return int(torch.multinomial(torch.softmax(row + torch.arange(V) / V, -1), 1, generator=generator))
        return Request(prompt=list(prompt), choose=choose, is_stop=lambda t: False, max_new_tokens=n)

    alone = [run_all(Engine(FakeRunner(1)), [sampled(p, i)])[0] for i, p in enumerate(PROMPTS[:4])]
    names.clear()
    together = run_all(Engine(FakeRunner(4)), [sampled(p, i) for i, p in enumerate(PROMPTS[:4])] + [sampled([9], 9, broken=True)])
    assert together[:4] == alone and isinstance(together[4], RuntimeError)
    assert any(n.startswith("bianque-sampling") for n in names) == (threads > 1)


def test_an_idle_engine_hands_its_openmp_team_back(monkeypatch):
    """Before waiting for work the loop releases its thread's OpenMP team, so that another engine
    in the process (the CoQ app runs two) computes with the only team (serving/openmp.py)."""
    import bianque.serving.engine as engine_module

    released = []
    monkeypatch.setattr(engine_module, "release_team", lambda: released.append(threading.current_thread().name) or True)
    engine = Engine(FakeRunner(max_batch=2))
    assert run_all(engine, [greedy([1], 3)]) == [solo([1], 3)]
    deadline = time.monotonic() + 5
    while not released and time.monotonic() < deadline:  # once the request is done
        time.sleep(0.01)
    assert released == ["bianque-engine"]
    assert run_all(engine, [greedy([2], 3)]) == [solo([2], 3)]
    while len(released) < 2 and time.monotonic() < deadline:  # and after each busy spell
        time.sleep(0.01)
    assert released == ["bianque-engine"] * 2
