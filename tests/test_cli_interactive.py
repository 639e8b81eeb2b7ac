"""The CLI's interactive loop as a user drives it: /advise, /clear, /quit, Ctrl-C, empty lines."""
from __future__ import annotations

import builtins

from bianque import cli


def _drive(monkeypatch, capsys, lines, chunks_for):
    """Run run_interactive on fake input; chunks_for(turns, advise_now) gives a reply's chunks."""
    feed = iter(lines)

    def fake_input(prompt=""):
        item = next(feed)
        if isinstance(item, BaseException):
            raise item
        return item

    calls = []

    def respond(turns, advise_now):
        calls.append(([(t.role, t.text, t.stage) for t in turns], advise_now))
        stage = "advice" if advise_now else "question"
        return cli.Reply(stage, "v2" if advise_now else "v1", chunks_for(turns, advise_now))

    monkeypatch.setattr(builtins, "input", fake_input)
    rc = cli.run_interactive(respond, "coq", 3)
    return rc, calls, capsys.readouterr()


def test_advise_clear_quit_and_empty_line(monkeypatch, capsys):
    rc, calls, out = _drive(monkeypatch, capsys, ["", "我头疼", "/advise", "/clear", "  ", "/advise", "你好", "/quit", "never read"],
                            lambda turns, advise: iter(["建议多休息。"] if advise else ["疼多久了？"]))
    assert rc == 0
    assert calls == [
        ([("patient", "我头疼", None)], False),
        ([("patient", "我头疼", None), ("doctor", "疼多久了？", "question"), ("patient", "请直接给我建议。", None)], True),
        ([("patient", "你好", None)], False),  # /clear forgot the first dialogue; /advise on nothing asks nothing
    ]
    assert "医生［问询 1/3 · BianQue-1.0］：疼多久了？\n" in out.out
    assert "医生［建议 · BianQue-2.0］：建议多休息。\n" in out.out
    assert "（已开始新的问诊）" in out.out
    assert out.out.count("医生［问询 1/3 · BianQue-1.0］") == 2


def test_ctrl_c_stops_the_reply_but_not_the_session(monkeypatch, capsys):
    def chunks(turns, advise):
        if len(turns) == 1:
            def gen():
                yield "咳嗽"
                raise KeyboardInterrupt
            return gen()
        return iter(["还有别的症状吗？"])

    rc, calls, out = _drive(monkeypatch, capsys, ["我咳嗽", "没有发热", KeyboardInterrupt()], chunks)
    assert rc == 0
    assert "咳嗽 ［已停止］\n" in out.out
    # the stopped partial reply stays in the dialogue, and the session went on to the next message
    assert calls[1][0] == [("patient", "我咳嗽", None), ("doctor", "咳嗽", "question"), ("patient", "没有发热", None)]
    assert "医生［问询 2/3 · BianQue-1.0］：还有别的症状吗？" in out.out


def test_empty_reply_is_dropped_with_a_message(monkeypatch, capsys):
    rc, calls, out = _drive(monkeypatch, capsys, ["我头晕", "还是头晕", EOFError()],
                            lambda turns, advise: iter([]) if len(turns) == 1 else iter(["多久了？"]))
    assert rc == 0
    assert "（模型没有生成内容，请再试一次）" in out.out
    # the unanswered message was dropped, so the dialogue still alternates for the next one
    assert calls[1][0] == [("patient", "还是头晕", None)]


def test_ctrl_c_closes_the_reply_stream_so_generation_stops(monkeypatch, capsys):
    class Stream:
        """A reply stream (like the engine's) whose close() cancels generation."""

        def __init__(self):
            self.sent, self.closed = 0, False

        def __iter__(self):
            return self

        def __next__(self):
            self.sent += 1
            if self.sent == 1:
                return "咳嗽"
            raise KeyboardInterrupt  # Ctrl-C while waiting for the next chunk

        def close(self):
            self.closed = True

    stream = Stream()
    rc, calls, out = _drive(monkeypatch, capsys, ["我咳嗽", EOFError()], lambda turns, advise: stream)
    assert rc == 0 and "咳嗽 ［已停止］\n" in out.out
    assert stream.closed and stream.sent == 2


def test_ctrl_c_cancels_only_the_current_reply_on_the_engine(monkeypatch, capsys, tmp_path):
    """With an engine-served questioner (max_batch 1): Ctrl-C (SIGINT, as the terminal sends it)
    during a reply cancels that request within a step and frees the slot; the next message gets
    its full reply, the same as alone."""
    import signal
    import time

    from bianque.prompt import DOCTOR, PATIENT, Turn
    from bianque.sampling import SamplingParams
    from bianque.t5 import T5Questioner, V1Params, load_questioner
    from tests.tiny_t5 import build_tiny_t5

    solo = load_questioner(str(build_tiny_t5(tmp_path / "v1")))
    doctor = T5Questioner(solo.model, solo.tokenizer, "tiny", max_batch=1)
    params = V1Params(SamplingParams(False), max_new_tokens=400)
    requests = []

    def chunks_for(turns, advise):
        reply = doctor.reply(turns, params)
        first = next(reply)
        requests.append(reply._lane.request)
        yield first
        if len(turns) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the rest of the reply is being generated
        yield from reply

    rc, calls, out = _drive(monkeypatch, capsys, ["我咳嗽", "没有发热", "/quit"], chunks_for)
    assert rc == 0 and "［已停止］" in out.out
    stopped, second = requests
    engine, deadline = doctor.engine, time.monotonic() + 10
    while not engine.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped.cancelled and len(stopped.generated) < 400 and engine.scheduler.free == [0]
    partial = calls[1][0][1][1]  # the stopped reply's text stays in the dialogue
    assert len(partial) < len("".join(solo.reply([Turn(PATIENT, "我咳嗽")], params))) / 2  # stopped early
    turns = [Turn(PATIENT, "我咳嗽"), Turn(DOCTOR, partial, "question"), Turn(PATIENT, "没有发热")]
    assert "".join(solo.reply(turns, params)) in out.out and len(second.generated) > 1
