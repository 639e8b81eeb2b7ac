"""The apps' recording, feedback and review page, headless with AppTest and the tiny models: what the
page shows AND what the database holds afterwards (read back through bianque.records)."""
from __future__ import annotations

import json

from test_apps import COQ_APP, V1_APP, backend, quick, send, start, v1_dir, v2_dir  # noqa: F401 - fixtures

from bianque.records import open_store
from bianque.records_session import NOTICE
from bianque.transcript import TranscriptInfo, to_json

PAGE = "bianque_records_page.py"


def _db(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/records.db"


def _infos(at) -> list[str]:
    return [i.value for i in at.info]


def _one(url: str) -> dict:
    store = open_store(url)
    try:
        ids = store.consultation_ids()
        assert len(ids) == 1, ids
        return store.get_consultation(ids[0])
    finally:
        store.close()


def _feedback(at, n: int):
    return at.get("feedback")[n]


def test_recording_is_announced_and_stores_turns_models_settings_and_flags(backend, v1_dir, monkeypatch, tmp_path):
    url = _db(tmp_path)
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    assert any(NOTICE in text for text in _infos(at))  # before the first message
    assert at.toggle(key="record_off").value is False
    quick(at, "v1")
    backend["v1"].script = ["胸口疼多久了？"]
    send(at, "我胸口压着疼，喘不上气")
    assert all(t.key != "record_off" for t in at.toggle)  # the choice is made before the first message
    assert any("本次问诊正在记录" in c.value for c in at.caption)
    got = _one(url)
    assert got["app"] == "v1" and got["models"]["v1"]["source"] == str(v1_dir)
    assert got["models"]["v1"]["device"] == "cpu" and got["models"]["v1"]["dtype"] == "float32"
    assert got["settings"]["v1"]["device"] == "cpu" and "v2" not in got["settings"]
    patient, doctor = got["turns"]
    assert (patient["role"], patient["text"]) == ("patient", "我胸口压着疼，喘不上气")
    assert patient["red_flags"] and {"name", "message", "action"} == set(patient["red_flags"][0])
    assert (doctor["role"], doctor["text"], doctor["model"], doctor["stage"]) == ("doctor", "胸口疼多久了？", "v1", None)
    assert doctor["params"]["sampling"]["do_sample"] is False and doctor["params"]["max_new_tokens"] == 12
    assert doctor["params"]["timing"]["total_ms"] > 0 and not doctor["stopped"] and not doctor["failed"]
    assert got["finished_at"] is not None


def test_feedback_is_saved_at_once_editable_and_in_the_transcript(backend, v1_dir, monkeypatch, tmp_path):
    url = _db(tmp_path)
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    backend["v1"].script = ["头疼多久了？"]
    send(at, "我头疼")
    _feedback(at, 0).set_value(0).run()  # thumbs down
    assert _one(url)["turns"][1]["feedback"]["rating"] == "down"
    better = [t for t in at.text_input if t.label.startswith("更好的问题")][0]
    better.input("哪个部位疼？").run()
    at.checkbox(key=better.key.replace(".better", ".advise")).check().run()
    assert _one(url)["turns"][1]["feedback"] == {"rating": "down", "better_question": "哪个部位疼？",
                                                "advise_now": True, "comment": None}
    _feedback(at, 0).set_value(1).run()  # changed mind: thumbs up, the rest kept
    assert _one(url)["turns"][1]["feedback"]["rating"] == "up"
    assert _feedback(at, 0).value == 1
    recording = at.session_state["recording"][1]
    consultation = at.session_state["consultation"]
    turns = json.loads(to_json(consultation, TranscriptInfo("t", "g"),
                               feedback=recording.feedback_by_index(consultation)))["turns"]
    assert turns[1]["feedback"]["better_question"] == "哪个部位疼？"
    assert not at.exception


def test_the_patient_can_choose_an_unrecorded_consultation(backend, v1_dir, monkeypatch, tmp_path):
    url = _db(tmp_path)
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    at.toggle(key="record_off").set_value(True).run()
    backend["v1"].script = ["几天了？", "咳嗽有痰吗？"]
    send(at, "我咳嗽")
    assert any("本次问诊不记录" in c.value for c in at.caption)
    assert open_store(url).consultation_ids() == []
    at.button(key="new").click().run()  # a new consultation is recorded again unless chosen otherwise
    assert at.toggle(key="record_off").value is False
    send(at, "我又咳嗽了")
    assert [t["text"] for t in _one(url)["turns"]] == ["我又咳嗽了", "咳嗽有痰吗？"]


def test_recording_off_creates_no_database_and_shows_no_notice(backend, v1_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "我头疼")
    assert len(at.chat_message) == 3 and not at.get("feedback")
    assert not any(NOTICE in text for text in _infos(at)) and all(t.key != "record_off" for t in at.toggle)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_database_shows_the_notice_and_the_app_still_answers(backend, v1_dir, monkeypatch, tmp_path):
    path = tmp_path / "records.db"
    open_store(f"sqlite:///{path}").close()
    url = f"sqlite:///file:{path}?mode=ro&uri=true"  # read-only even for root, who ignores file modes
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    backend["v1"].script = ["几度？"]
    send(at, "我发烧")
    warnings = [w.value for w in at.warning]
    assert any("本次问诊不再记录" in w and "readonly" in w for w in warnings), warnings
    assert [cm.markdown[0].value for cm in at.chat_message][1:] == ["我发烧", "几度？"]
    send(at, "三十九度")
    assert len(at.chat_message) == 5 and not at.exception
    assert open_store(f"sqlite:///{path}").consultation_ids() == []


def test_a_database_that_cannot_be_opened_is_a_notice_not_an_error(backend, v1_dir, monkeypatch, tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/dir/records.db"
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    assert any("记录数据库无法打开" in w.value for w in at.warning)
    quick(at, "v1")
    send(at, "我头晕")
    assert len(at.chat_message) == 3 and at.chat_message[2].markdown[0].value


def test_coq_records_stages_and_a_failed_reply(backend, v1_dir, v2_dir, monkeypatch, tmp_path):
    url = _db(tmp_path)
    at = start(COQ_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir)
    quick(at, "v1")
    quick(at, "v2")
    backend["v1"].script = ["发烧几天了？"]
    send(at, "孩子发烧")
    backend["v1"].fail = RuntimeError("boom")
    send(at, "两天")
    backend["v1"].fail = None
    backend["v1"].script = ["多少度？"]
    at.button(key="retry").click().run()
    at.button(key="advise").click().run()
    got = _one(url)
    assert [(t["role"], t["stage"], t["model"], t["failed"]) for t in got["turns"]] == [
        ("patient", None, None, False), ("doctor", "question", "v1", False),
        ("patient", None, None, False), ("doctor", None, None, True),
        ("doctor", "question", "v1", False),
        ("patient", None, None, False), ("doctor", "advice", "v2", False)]
    assert got["settings"]["max_questions"] == 8 and set(got["models"]) == {"v1", "v2"}
    # an advice reply asks for a comment, a question reply for a better question
    labels = [e.label for e in at.expander if e.label == "医生意见"]
    assert len(labels) == 3 and [t.label for t in at.text_area] == ["评语（可选）"]


def test_review_page_lists_opens_edits_deletes_and_exports(backend, v1_dir, monkeypatch, tmp_path):
    url = _db(tmp_path)
    at = start(V1_APP, monkeypatch, ("--record", url), BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    backend["v1"].script = ["头疼多久了？"]
    send(at, "我头疼")
    _feedback(at, 0).set_value(0).run()
    [t for t in at.text_input if t.label.startswith("更好的问题")][0].input("哪个部位疼？").run()
    cid = _one(url)["id"]

    at.switch_page(PAGE).run()
    assert not at.exception and at.title[0].value == "问诊记录"
    assert any("共 1 次问诊，筛选后 1 次" in c.value for c in at.caption)
    at.selectbox(key="review.rating").set_value("有好评").run()
    assert any("筛选后 0 次" in c.value for c in at.caption)
    at.selectbox(key="review.rating").set_value("有差评").run()
    assert [o.split(" · ")[0] for o in at.selectbox(key="review.open").options] == [f"#{cid}"]
    at.selectbox(key="review.open").set_value(cid).run()
    texts = [m.value for cm in at.chat_message for m in cm.markdown]
    assert texts == ["我头疼", "头疼多久了？"]
    assert _feedback(at, 0).value == 0  # the feedback given in the chat, shown again
    better = [t for t in at.text_input if t.label.startswith("更好的问题")][0]
    assert better.value == "哪个部位疼？"
    better.input("头疼是哪一侧？").run()  # feedback afterwards
    assert _one(url)["turns"][1]["feedback"]["better_question"] == "头疼是哪一侧？"
    assert {b.label.split("（")[0] for b in at.get("download_button")} >= {"导出微调数据 CSV", "导出对话 JSONL"}
    assert at.button(key=f"review.delete.{cid}").disabled
    at.checkbox(key=f"review.confirm.{cid}").check().run()
    at.button(key=f"review.delete.{cid}").click().run()
    assert any(f"已删除问诊 #{cid}" in s.value for s in at.success)
    assert open_store(url).consultation_ids() == []
