"""Recording a live consultation (bianque.records_session) without Streamlit: what is written when,
the dialogue the export rebuilds from it, database failures, the record setting, the export text,
feedback in the transcripts and the review page's filters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from bianque.data import write_csv
from bianque.records import open_store
from bianque.records_cli import export_text
from bianque.records_session import NOTICE, RecordingSession
from bianque.review import Filters, filter_consultations
from bianque.session import Consultation, Message
from bianque.settings import DEFAULT_RECORD_URL, parse_settings, record_url
from bianque.transcript import TranscriptInfo, to_json, to_markdown

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 3, 1, 9, 0, 0)
CHEST = "我胸口压着疼，喘不上气"


def _reply(c: Consultation, text: str, stopped: bool = False, **fields) -> Message:
    message = c.start_reply(**fields)
    message.text = text
    c.finish_reply(stopped=stopped)
    return message


def _doctor(rec: RecordingSession, c: Consultation, message: Message, failed: bool = False) -> None:
    shown = any(m is message for m in c.messages)
    rec.doctor_turn(message, shown=shown, failed=failed, started_at=T0, finished_at=T0 + timedelta(seconds=2),
                    first_chunk_ms=150.0)


def test_a_consultation_is_recorded_turn_by_turn_with_flags_params_and_timings(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    rec = RecordingSession(store, "coq", {"v1": {"source": "s1", "device": "cpu", "dtype": "float32"}},
                           {"max_questions": 3})
    c = Consultation()
    rec.patient_turns(c)
    assert store.consultation_ids() == []  # opening the page records nothing
    c.add_patient(CHEST)
    rec.patient_turns(c)
    rec.patient_turns(c)  # a second sync writes nothing new
    first = _reply(c, "疼了多久？", stage="question", model="v1", params={"max_new_tokens": 24})
    _doctor(rec, c, first)

    # a failed reply, then the patient adds a line (the app joins it), then the retry
    c.add_patient("十分钟了")
    rec.patient_turns(c)
    failing = c.start_reply(stage="question", model="v1")
    failing.text = "半"
    c.fail_reply("出错了")
    _doctor(rec, c, failing, failed=True)
    c.add_patient("还出冷汗")
    rec.patient_turns(c)
    assert c.messages[-1].text == "十分钟了\n还出冷汗"
    # a reply stopped before its first character is dropped from the page, recorded as stopped
    empty = c.start_reply(stage="advice", model="v2")
    c.finish_reply(stopped=True)
    _doctor(rec, c, empty)
    advice = _reply(c, "请立即拨打120。", stopped=True, stage="advice", model="v2")
    _doctor(rec, c, advice)

    got = store.get_consultation(rec.consultation_id)
    assert got["app"] == "coq" and got["models"]["v1"]["source"] == "s1" and got["settings"] == {"max_questions": 3}
    assert got["finished_at"] is not None
    assert [(t["role"], t["text"], t["stage"], t["model"], t["stopped"], t["failed"]) for t in got["turns"]] == [
        ("patient", CHEST, None, None, False, False),
        ("doctor", "疼了多久？", "question", "v1", False, False),
        ("patient", "十分钟了", None, None, False, False),
        ("doctor", "半", "question", "v1", False, True),
        ("patient", "还出冷汗", None, None, False, False),
        ("doctor", "", "advice", "v2", True, False),
        ("doctor", "请立即拨打120。", "advice", "v2", True, False),
    ]
    t = got["turns"]
    assert [f["name"] for f in t[0]["red_flags"]] and set(t[0]["red_flags"][0]) == {"name", "message", "action"}
    assert t[1]["params"] == {"max_new_tokens": 24, "timing": {"first_chunk_ms": 150.0, "total_ms": 2000.0}}
    assert t[1]["started_at"] == "2026-03-01T09:00:00+00:00" and t[1]["finished_at"] == "2026-03-01T09:00:02+00:00"
    # the export rebuilds the dialogue the patient saw: failed and empty replies out, joined lines joined
    assert [(x["role"], x["text"]) for x in store.export_dialogues()[0]["turns"]] == [
        ("patient", CHEST), ("doctor", "疼了多久？"), ("patient", "十分钟了\n还出冷汗"), ("doctor", "请立即拨打120。")]
    assert rec.turn_id(failing) is None and rec.turn_id(empty) is None and rec.turn_id(advice) == t[6]["id"]
    store.close()


def test_a_regenerated_reply_replaces_the_earlier_one_in_the_export(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    rec, c = RecordingSession(store, "v1"), Consultation()
    c.add_patient("咳嗽")
    rec.patient_turns(c)
    _doctor(rec, c, _reply(c, "多久了？", model="v1"))
    c.drop_last_reply()
    _doctor(rec, c, _reply(c, "有痰吗？", model="v1"))
    assert [t["text"] for t in store.get_consultation(rec.consultation_id)["turns"]] == ["咳嗽", "多久了？", "有痰吗？"]
    assert [t["text"] for t in store.export_dialogues()[0]["turns"]] == ["咳嗽", "有痰吗？"]
    # BianQue-1.0 alone asks: its replies count as questions in the list (the review page's filter)
    assert [(c["turns"], c["questions"]) for c in store.list_consultations()] == [(3, 2)]
    store.close()


def test_feedback_is_saved_replaced_and_kept_for_the_transcript(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/r.db")
    rec, c = RecordingSession(store, "v1"), Consultation()
    c.add_patient("头疼")
    rec.patient_turns(c)
    reply = _reply(c, "头疼多久了？", model="v1")
    _doctor(rec, c, reply)
    rec.set_feedback(reply, "down", better_question="  哪个部位疼？ ", advise_now=True)
    fb = {"rating": "down", "better_question": "哪个部位疼？", "advise_now": True, "comment": None}
    assert store.get_consultation(rec.consultation_id)["turns"][1]["feedback"] == fb
    assert rec.feedback_by_index(c) == {1: fb}
    rec.set_feedback(reply, "up", comment="好")  # editable: the whole feedback is replaced
    fb2 = {"rating": "up", "better_question": None, "advise_now": False, "comment": "好"}
    assert store.get_consultation(rec.consultation_id)["turns"][1]["feedback"] == fb2
    assert rec.feedback_by_index(c) == {1: fb2}

    unrecorded, c2 = RecordingSession(store, "v1", enabled=False), Consultation()
    c2.add_patient("腹泻")
    unrecorded.patient_turns(c2)
    other = _reply(c2, "几次了？", model="v1")
    _doctor(unrecorded, c2, other)
    unrecorded.set_feedback(other, "down")
    assert store.consultation_ids() == [rec.consultation_id]  # the patient chose not to be recorded
    assert unrecorded.feedback_by_index(c2)[1]["rating"] == "down"  # still in its transcript
    store.close()


def test_a_database_that_fails_stops_the_recording_with_a_notice(tmp_path):
    path = tmp_path / "r.db"
    open_store(f"sqlite:///{path}").close()
    store = open_store(f"sqlite:///file:{path}?mode=ro&uri=true")  # read-only even for root
    rec, c = RecordingSession(store, "v1"), Consultation()
    c.add_patient("发烧")
    rec.patient_turns(c)
    assert rec.notice and "readonly" in rec.notice and not rec.active
    reply = _reply(c, "几度？", model="v1")
    _doctor(rec, c, reply)  # no second attempt, no exception
    rec.set_feedback(reply, "up")
    assert rec.feedback_by_index(c) == {1: {"rating": "up", "better_question": None, "advise_now": False,
                                            "comment": None}}
    assert [m.text for m in c.messages] == ["发烧", "几度？"]
    store.close()
    assert open_store(f"sqlite:///{path}").consultation_ids() == []


def test_record_setting_from_flag_and_variable():
    assert parse_settings([], {}).record is None
    assert parse_settings(["--record"], {}).record == DEFAULT_RECORD_URL == "sqlite:///bianque-records.db"
    assert parse_settings(["--record", "sqlite:///x.db"], {}).record == "sqlite:///x.db"
    assert parse_settings([], {"BIANQUE_RECORD": "1"}).record == DEFAULT_RECORD_URL
    assert parse_settings([], {"BIANQUE_RECORD": "off"}).record is None
    assert parse_settings([], {"BIANQUE_RECORD": "postgresql://u@h/db"}).record == "postgresql://u@h/db"
    assert parse_settings(["--record", "sqlite:///a.db"], {"BIANQUE_RECORD": "sqlite:///b.db"}).record == "sqlite:///a.db"
    with pytest.raises(ValueError, match="BIANQUE_RECORD='records.db' is not a database URL"):
        record_url(None, "records.db")
    from bianque.records import DEFAULT_URL

    assert DEFAULT_RECORD_URL == DEFAULT_URL


def _known(store) -> None:
    cid = store.start_consultation("v1")
    store.add_turn(cid, "patient", "头疼")
    tid = store.add_turn(cid, "doctor", "多久了？", model="v1")
    store.set_feedback(tid, "down", better_question="哪里疼，\"胀痛\"还是刺痛？")


def test_export_text_is_the_cli_export_byte_for_byte(tmp_path):
    url = f"sqlite:///{tmp_path}/r.db"
    store = open_store(url)
    _known(store)
    text, rows = export_text(store, "csv")
    assert rows == 1 and write_csv(tmp_path / "w.csv", store.export_rows()) == 1
    assert text.encode("utf-8") == (tmp_path / "w.csv").read_bytes()
    jsonl, n = export_text(store, "jsonl")
    assert n == 1 and json.loads(jsonl)["turns"][1]["feedback"]["rating"] == "down"
    store.close()
    run = subprocess.run([sys.executable, "-m", "bianque", "records", "export", "--format", "csv", "--db", url],
                         capture_output=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout == text.encode("utf-8")  # no --out: standard output
    assert "哪里疼，\"\"胀痛\"\"还是刺痛？" in run.stdout.decode("utf-8")


def test_transcripts_carry_the_feedback():
    c = Consultation(messages=[Message("patient", "头疼", started_at="2026-01-01T00:00:00Z"),
                               Message("doctor", "多久了？", model="v1", label="BianQue-1.0",
                                       started_at="2026-01-01T00:00:01Z")])
    info = TranscriptInfo("扁鹊", "你好")
    fb = {1: {"rating": "down", "better_question": "哪里疼？", "advise_now": True, "comment": None}}
    data = json.loads(to_json(c, info, "2026-01-01T00:01:00Z", feedback=fb))
    assert [t["feedback"] for t in data["turns"]] == [None, fb[1]]
    assert "feedback" not in json.loads(to_json(c, info))["turns"][1]  # an app that does not record
    md = to_markdown(c, info, "2026-01-01T00:01:00Z", feedback=fb)
    assert "多久了？\n\n> 医生意见：👎 不好 · 更好的问题：哪里疼？ · 此时应该直接给建议\n" in md


def test_review_filters():
    items = [
        {"id": 3, "app": "coq", "created_at": "2026-03-03T10:00:00+00:00", "questions": 4, "ratings": {"up": 0, "down": 2}},
        {"id": 2, "app": "v1", "created_at": "2026-03-02T10:00:00+00:00", "questions": 1, "ratings": {"up": 1, "down": 0}},
        {"id": 1, "app": "coq", "created_at": "2026-03-01T10:00:00+00:00", "questions": 0, "ratings": {"up": 0, "down": 0}},
    ]
    ids = lambda f: [c["id"] for c in filter_consultations(items, f)]  # noqa: E731
    assert ids(Filters()) == [3, 2, 1]
    assert ids(Filters(since=date(2026, 3, 2))) == [3, 2]
    assert ids(Filters(until=date(2026, 3, 2))) == [2, 1]
    assert ids(Filters(apps=("coq",))) == [3, 1]
    assert ids(Filters(min_questions=1)) == [3, 2]
    assert ids(Filters(rating="有差评")) == [3]
    assert ids(Filters(rating="有好评")) == [2]
    assert ids(Filters(rating="未评价")) == [1]
    assert NOTICE == "本次问诊将被记录，用于医生评估"
