"""The apps' logic without Streamlit running: the consultation state, labels, fit notes, transcripts,
sessions sharing an engine-served model, the queue line and the partial-reply capture behind Stop."""
from __future__ import annotations

import json
import threading
import time

import pytest

from bianque.prompt import DOCTOR, PATIENT, Fit, Turn
from bianque.sampling import SamplingParams
from bianque.session import ADVICE, QUESTION, Consultation, fit_note, params_dict, reply_label
from bianque.transcript import TranscriptInfo, to_json, to_markdown, transcript_dict

DISCLAIMER = "以下回答由扁鹊健康模型自动生成，仅供参考！"  # what the reader sees, written here

INFO = TranscriptInfo(
    title="扁鹊 · 测试",
    greeting="你好，我是扁鹊。",
    models={"v1": {"name": "BianQue-1.0", "source": "/m/v1", "device": "cpu", "dtype": "float32"},
            "v2": {"name": "BianQue-2.0", "source": "/m/v2", "device": "cuda:1", "dtype": "float16"}},
    max_questions=8,
)


def _dialogue() -> Consultation:
    c = Consultation()
    c.add_patient("我头疼三天了")
    reply = c.start_reply(model="v1", stage=QUESTION, label="问询 1/8 · BianQue-1.0",
                          params={"sampling": {"temperature": 0.7}})
    reply.text = "疼痛在什么部位？"
    c.finish_reply()
    c.add_patient("额头，\n晚上更重")
    reply = c.start_reply(model="v2", stage=ADVICE, label="建议 · BianQue-2.0")
    reply.text = "建议多休息"
    c.finish_reply(stopped=True)
    return c


def test_turns_alternate_and_carry_stages_only_on_doctor_turns():
    c = _dialogue()
    assert c.turns() == (
        Turn(PATIENT, "我头疼三天了"),
        Turn(DOCTOR, "疼痛在什么部位？", QUESTION),
        Turn(PATIENT, "额头，\n晚上更重"),
        Turn(DOCTOR, "建议多休息", ADVICE),
    )
    assert c.questions_asked() == 1
    assert c.messages[-1].stopped and c.messages[-1].finished_at is not None


def test_reply_needs_a_patient_message_and_regenerate_drops_only_the_doctor_turn():
    c = Consultation()
    with pytest.raises(ValueError, match="patient message"):
        c.start_reply()
    c = _dialogue()
    dropped = c.drop_last_reply()
    assert dropped.text == "建议多休息" and c.awaiting_reply
    assert c.drop_last_reply() is None  # the patient's message is never dropped
    assert [m.text for m in c.messages] == ["我头疼三天了", "疼痛在什么部位？", "额头，\n晚上更重"]


def test_failed_reply_keeps_the_dialogue_and_a_new_message_joins_the_unanswered_one():
    c = Consultation()
    c.add_patient("胸口闷")
    c.start_reply(model="v1")
    c.fail_reply("内存不足")
    assert c.pending is None and c.error == "内存不足" and c.awaiting_reply
    c.add_patient("还有点喘")
    assert c.error is None and [m.text for m in c.messages] == ["胸口闷\n还有点喘"]


def test_an_interrupted_reply_is_kept_partial_and_marked_stopped():
    from bianque.ui import _tee, _Timing

    c = Consultation()
    c.add_patient("失眠")
    message = c.start_reply(model="v1")
    stream = _tee(iter(["多", "久", "了？"]), message, _Timing(time.perf_counter(), time.perf_counter()))
    assert next(stream) + next(stream) == "多久"
    stream.close()  # what a Stop does to the stream: it is never read to the end
    assert c.pending.text == "多久"
    c.finish_reply(stopped=True)
    assert c.turns()[-1] == Turn(DOCTOR, "多久") and c.messages[-1].stopped


def test_a_reply_stopped_before_any_text_is_dropped_and_the_message_awaits_a_reply():
    c = Consultation()
    c.add_patient("失眠")
    c.start_reply()
    assert c.finish_reply(stopped=True) is None
    assert c.turns() == (Turn(PATIENT, "失眠"),) and c.awaiting_reply and c.pending is None
    c.start_reply()
    assert c.finish_reply().text == ""  # a finished empty reply is the model's answer: kept


@pytest.mark.parametrize("model, stage, n, expected", [
    ("v1", QUESTION, 3, "问询 3/8 · BianQue-1.0"),
    ("v2", ADVICE, 9, "建议 · BianQue-2.0"),
    ("v1", None, 1, "BianQue-1.0"),
    ("v2", None, 1, "BianQue-2.0"),
])
def test_reply_labels(model, stage, n, expected):
    assert reply_label(model, stage, n, 8) == expected


def test_fit_note_only_when_the_model_did_not_see_everything():
    assert fit_note(Fit((Turn(PATIENT, "a"),))) is None
    assert fit_note(Fit((Turn(PATIENT, "a"),), dropped_turns=4)) == "对话超出模型长度：省略了最早的 4 条消息"
    note = fit_note(Fit((Turn(PATIENT, "a"),), dropped_turns=2, cut_chars=120))
    assert note == "对话超出模型长度：省略了最早的 2 条消息；最新消息过长，只保留了结尾部分（截去开头 120 个字）"


def test_params_dict_is_plain_data():
    assert params_dict(SamplingParams(True, 0.95, 0.7, 50)) == {
        "do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50}


def test_json_transcript_has_roles_stages_models_timestamps_and_settings():
    data = json.loads(to_json(_dialogue(), INFO, exported_at="2026-01-01T00:00:00Z"))
    assert data["format"] == "bianque-transcript/1" and data["disclaimer"] == DISCLAIMER
    assert data["exported_at"] == "2026-01-01T00:00:00Z" and data["greeting"] == "你好，我是扁鹊。"
    assert data["models"]["v2"] == {"name": "BianQue-2.0", "source": "/m/v2", "device": "cuda:1", "dtype": "float16"}
    assert [(t["role"], t["stage"], t["model"], t["stopped"]) for t in data["turns"]] == [
        ("patient", None, None, False), ("doctor", "question", "v1", False),
        ("patient", None, None, False), ("doctor", "advice", "v2", True)]
    assert data["turns"][1]["params"] == {"sampling": {"temperature": 0.7}}
    assert data["turns"][2]["text"] == "额头，\n晚上更重"
    assert all(t["started_at"].endswith("Z") and t["finished_at"] for t in data["turns"])
    assert transcript_dict(Consultation(), INFO)["turns"] == []


def test_markdown_transcript_reads_as_the_consultation():
    c = _dialogue()
    md = to_markdown(c, INFO, exported_at="2026-01-01T00:00:00Z")
    stamp = c.messages[1].started_at
    expected_start = "\n".join([
        "# 扁鹊 · 测试", "", f"> {DISCLAIMER}", "", "- 导出时间：2026-01-01T00:00:00Z",
        "- BianQue-1.0：/m/v1（cpu，float32）", "- BianQue-2.0：/m/v2（cuda:1，float16）", "",
        "### 医生 · 开场白", "", "你好，我是扁鹊。", "",
        f"### 病人 · {c.messages[0].started_at}", "", "我头疼三天了", "",
        f"### 医生 · 问询 1/8 · BianQue-1.0 · {stamp}", "", "疼痛在什么部位？", "",
    ])
    assert md.startswith(expected_start)
    assert "额头，\n晚上更重" in md and md.rstrip().endswith("建议多休息\n\n*（已停止）*")


class _Status:
    """Records what a reply's status line would show."""

    def __init__(self) -> None:
        self.queued_calls: list[int | None] = []
        self.progress_calls: list[tuple[str, int]] = []

    def queued(self, ahead: int | None) -> None:
        self.queued_calls.append(ahead)

    def progress(self, name: str, chars: int) -> None:
        self.progress_calls.append((name, chars))


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    from bianque.t5 import load_questioner
    from tests.tiny_t5 import build_tiny_t5

    return load_questioner(str(build_tiny_t5(tmp_path_factory.mktemp("v1"))))


def _params(n: int):
    from bianque.t5 import V1Params

    return V1Params(SamplingParams(False), max_new_tokens=n)


TEXTS = ["我头疼三天了", "孩子发烧两天", "咳嗽一周，晚上更重", "胃痛"]


def test_sessions_generate_at_once_without_cross_talk(tiny_v1):
    """Four sessions share one engine-served model (max_batch 4) and generate at the same time, each
    with its own settings: each gets exactly the reply it gets alone, and nobody queues."""
    from bianque.t5 import T5Questioner
    from bianque.ui import Served, Serialised

    served = Served(T5Questioner(tiny_v1.model, tiny_v1.tokenizer, "tiny", max_batch=4))
    expected = ["".join(tiny_v1.reply([Turn(PATIENT, t)], _params(20 + 5 * i))) for i, t in enumerate(TEXTS)]
    assert len(set(expected)) == 4
    out, status, sizes = [""] * 4, [_Status() for _ in TEXTS], []
    decode = served.doctor.engine.runner.decode
    served.doctor.engine.runner.decode = lambda slots, tokens: (sizes.append(len(slots)), decode(slots, tokens))[1]
    start = threading.Barrier(4)

    def session(i: int) -> None:
        doctor = Serialised(served, params=_params(20 + 5 * i), status=status[i])
        start.wait()
        for piece in doctor.reply([Turn(PATIENT, TEXTS[i])]):
            out[i] += piece
            time.sleep(0.002)  # a browser session's pace: the others' pieces arrive meanwhile

    threads = [threading.Thread(target=session, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == expected
    assert max(sizes) >= 2  # they really shared decode steps
    assert all(s.progress_calls[-1] == ("BianQue-1.0", len(e)) for s, e in zip(status, expected))
    assert served.doctor.name == "BianQue-1.0" and Serialised(served, None, _Status()).source == "tiny"


def test_a_waiting_session_sees_its_place_until_its_reply_starts(tiny_v1, monkeypatch):
    """max_batch 1: while one session's reply runs, the next waits and is told "前面还有 0 位";
    a session that stops (closes its stream) frees the model for it."""
    from bianque.serving.t5_runner import T5Runner
    from bianque.t5 import T5Questioner
    from bianque.ui import Served, Serialised

    # The tiny model writes 200 tokens in ~0.2 s, less than the admission grace: 10 ms per decode
    # step keeps the first reply running (2 s) until the test stops it.
    decode = T5Runner.decode
    monkeypatch.setattr(T5Runner, "decode", lambda self, *a: (time.sleep(0.01), decode(self, *a))[1])
    served = Served(T5Questioner(tiny_v1.model, tiny_v1.tokenizer, "tiny", max_batch=1))
    first = Serialised(served, _params(200), _Status()).reply([Turn(PATIENT, TEXTS[0])])
    assert next(first)  # the first session is generating (and holds the only slot)
    status, result = _Status(), []
    second = threading.Thread(target=lambda: result.append("".join(
        Serialised(served, _params(15), status).reply([Turn(PATIENT, TEXTS[1])]))))
    second.start()
    deadline = time.monotonic() + 10
    while not status.queued_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert status.queued_calls[:1] == [0] and not result
    first.close()  # Stop in the first session
    second.join(30)
    assert result == ["".join(tiny_v1.reply([Turn(PATIENT, TEXTS[1])], _params(15)))]
    assert status.queued_calls[-1] is None and set(status.queued_calls[:-1]) == {0}
    assert served.doctor.engine.scheduler.idle()


def test_a_reply_admitted_at_the_next_step_boundary_is_not_announced_as_queued():
    """A free slot is taken at the engine's next step: a reply admitted within the grace shows no
    "排队中" notice (it flashed "前面还有 0 位" on a busy CPU); one still waiting after it does."""
    from bianque.ui import Served, Serialised

    class Lane:  # admitted after `delay` s, like a Reply whose engine is finishing a step
        def __init__(self, delay):
            self.until = time.monotonic() + delay

        def ahead(self, timeout):
            left = self.until - time.monotonic()
            time.sleep(max(0.0, min(left, timeout)))
            return None if time.monotonic() >= self.until else 0

        def __iter__(self):
            return iter(["好", "的"])

    class Doctor:
        name = "fake"

        def __init__(self, delay):
            self.delay = delay

        def reply(self, turns, params):
            return Lane(self.delay)

    soon, late = _Status(), _Status()
    assert "".join(Serialised(Served(Doctor(0.1)), None, soon).reply([Turn(PATIENT, TEXTS[0])])) == "好的"
    assert soon.queued_calls == []
    assert "".join(Serialised(Served(Doctor(Serialised.ADMIT_GRACE_S + 0.3)), None, late).reply(
        [Turn(PATIENT, TEXTS[0])])) == "好的"
    assert late.queued_calls[0] == 0 and late.queued_calls[-1] is None


def test_an_interruption_inside_a_progress_update_frees_the_slot(tiny_v1):
    """Streamlit raises its rerun/stop exception from the Streamlit call it interrupts."""
    from bianque.t5 import T5Questioner
    from bianque.ui import Served, Serialised

    class Interrupt(BaseException):
        pass

    class Interrupting(_Status):
        def progress(self, name, chars):
            if chars >= 2:
                raise Interrupt()

    served = Served(T5Questioner(tiny_v1.model, tiny_v1.tokenizer, "tiny", max_batch=1))
    with pytest.raises(Interrupt):
        "".join(Serialised(served, _params(200), Interrupting()).reply([Turn(PATIENT, TEXTS[0])]))
    engine, deadline = served.doctor.engine, time.monotonic() + 10
    while not engine.scheduler.idle() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.scheduler.idle() and engine.scheduler.free == [0]


def test_status_line_rate_limits_progress_and_stops_after_done():
    from bianque.ui import Status

    class Slot:
        def __init__(self):
            self.calls = []

        def caption(self, text):
            self.calls.append(("caption", text))

        def info(self, text, icon=None):
            self.calls.append(("info", text))

        def empty(self):
            self.calls.append(("empty", None))

    slot = Slot()
    status = Status(slot)
    status.queued(2)
    status.queued(None)
    status.progress("BianQue-1.0", 3)
    status.progress("BianQue-1.0", 4)  # within the interval: no update
    status.done()
    status.progress("BianQue-1.0", 90)
    assert slot.calls == [("info", "排队中：前面还有 2 位"), ("empty", None),
                          ("caption", "BianQue-1.0 正在生成… 已写 3 字"), ("empty", None)]


def test_runs_of_one_session_take_turns():
    """A fast rerun must wait until the interrupted run has filed its partial reply."""
    from bianque.ui import one_run_at_a_time

    state: dict = {}
    events: list[str] = []

    def old_run() -> None:
        with one_run_at_a_time(state):
            events.append("old starts")
            time.sleep(0.05)
            events.append("old files the partial reply")

    thread = threading.Thread(target=old_run)
    thread.start()
    time.sleep(0.01)
    with one_run_at_a_time(state):
        events.append("new starts")
    thread.join()
    assert events == ["old starts", "old files the partial reply", "new starts"]
