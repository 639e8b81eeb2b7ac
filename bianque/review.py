"""The doctors' review loop in the apps: the recording notice, feedback on each reply, and the
review page "问诊记录" (recorded consultations: filter, open, feedback afterwards, delete, export).

Streamlit rendering only; what is stored and how lives in bianque/records.py and
bianque/records_session.py. The page script ``bianque_records_page.py`` calls :func:`review_page`;
bianque/ui.py calls the chat-page parts. Nothing here logs patient text.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from datetime import date, datetime
from typing import Any, Callable, Sequence

import streamlit as st

from .records import RecordsError, RecordStore, open_store
from .records_session import NOTICE, RecordingSession, empty_feedback, is_question
from .session import MODEL_NAMES

log = logging.getLogger(__name__)

RECORDING_KEY = "recording"
RECORD_OFF_KEY = "record_off"
RATING_NAMES = {0: "down", 1: "up"}
RATING_FILTERS = ("全部", "有差评", "有好评", "未评价")
APP_NAMES = {"v1": "BianQue-1.0", "v2": "BianQue-2.0", "coq": "问询与建议"}
PAGE_TITLE = "问诊记录"


@st.cache_resource(show_spinner=False)
def _store(url: str) -> RecordStore:
    """One store (one connection pool) per database for the whole process, shared by all sessions."""
    return open_store(url)


def store_or_notice(url: str) -> tuple[RecordStore | None, str | None]:
    """The store at ``url``, or None and a notice saying why it cannot be used."""
    try:
        return _store(url), None
    except RecordsError as exc:
        log.warning("records database unavailable: %s", type(exc).__name__)
        return None, f"记录数据库无法打开，本次问诊不会被记录（对话照常进行）。原因：{exc}"


# ---------------------------------------------------------------- the chat page

def recording_session(consultation: Any, url: str | None, app: str, models: dict, settings: dict) -> RecordingSession | None:
    """This consultation's RecordingSession (a new one for a new consultation); None when the app
    does not record. The patient's choice (the toggle) starts as "recorded" for each consultation."""
    if url is None:
        return None
    current = st.session_state.get(RECORDING_KEY)
    if current is not None and current[0] is consultation:
        return current[1]
    store, notice = store_or_notice(url)
    recording = RecordingSession(store, app, models, settings, notice=notice)
    st.session_state[RECORDING_KEY] = (consultation, recording)
    st.session_state[RECORD_OFF_KEY] = False  # before the toggle is drawn in this run
    return recording


def recording_banner(recording: RecordingSession | None, has_messages: bool) -> None:
    """Before the first message: the notice and the choice of an unrecorded consultation; then a
    line saying whether this consultation is recorded. Any database failure is shown here."""
    if recording is None:
        return
    if recording.notice:
        st.warning(recording.notice, icon=":material/database_off:")
    if has_messages:
        if recording.started and recording.enabled and not recording.notice:
            st.caption(f":material/radio_button_checked: {NOTICE}（本次问诊正在记录）")
        elif not recording.enabled:
            st.caption(":material/radio_button_unchecked: 本次问诊不记录")
        return
    if recording.store is not None:
        st.info(f"**{NOTICE}**。记录包括对话内容、所用模型与设置；不想被记录可以打开下面的开关。",
                icon=":material/radio_button_checked:")
        off = st.toggle("不记录本次问诊", key=RECORD_OFF_KEY)
        recording.enabled = not off


def reply_feedback(recording: RecordingSession | None, message: Any) -> None:
    """The feedback widgets under a doctor reply in the chat (only in an app that records)."""
    if recording is None or not message.text:
        return
    current = recording.feedback(message) or empty_feedback()

    def save(fb: dict[str, Any]) -> None:
        recording.set_feedback(message, **fb)

    feedback_widgets(f"fb.{id(message)}", "question" if is_question(message) else "advice", current, save)


def feedback_widgets(key: str, kind: str, current: dict[str, Any], save: Callable[[dict[str, Any]], None]) -> None:
    """Thumbs, and for a question a better question and "should have advised now", for advice a
    comment; each change is saved at once (``save`` gets the whole feedback)."""
    fields = {f"{key}.rating": {"up": 1, "down": 0}.get(current.get("rating")),
              f"{key}.better": current.get("better_question") or "",
              f"{key}.advise": bool(current.get("advise_now")),
              f"{key}.comment": current.get("comment") or ""}
    for name, value in fields.items():
        st.session_state.setdefault(name, value)

    def changed() -> None:
        state = st.session_state
        save({"rating": RATING_NAMES.get(state.get(f"{key}.rating")),
              "better_question": state.get(f"{key}.better"), "advise_now": bool(state.get(f"{key}.advise")),
              "comment": state.get(f"{key}.comment")})

    st.feedback("thumbs", key=f"{key}.rating", on_change=changed)
    with st.expander("医生意见", icon=":material/rate_review:"):
        if kind == "question":
            st.text_input("更好的问题（可选）", key=f"{key}.better", on_change=changed,
                          placeholder="这里应该问…（按回车保存）")
            st.checkbox("此时应该直接给建议", key=f"{key}.advise", on_change=changed)
        else:
            st.text_area("评语（可选）", key=f"{key}.comment", on_change=changed)


# ---------------------------------------------------------------- the review page

@dataclass(frozen=True)
class Filters:
    since: date | None = None
    until: date | None = None
    apps: tuple[str, ...] = ()
    min_questions: int = 0
    rating: str = RATING_FILTERS[0]


def filter_consultations(items: Sequence[dict], f: Filters) -> list[dict]:
    """The listed consultations (records.list_consultations) that pass the page's filters."""
    out = []
    for c in items:
        day = datetime.fromisoformat(c["created_at"]).date()
        ratings = c["ratings"]
        rated = {"有差评": ratings["down"] > 0, "有好评": ratings["up"] > 0,
                 "未评价": ratings["up"] + ratings["down"] == 0}.get(f.rating, True)
        if ((f.since is None or day >= f.since) and (f.until is None or day <= f.until)
                and (not f.apps or c["app"] in f.apps) and c["questions"] >= f.min_questions and rated):
            out.append(c)
    return out


def _when(iso: str | None) -> str:
    return "—" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")


def _label(c: dict) -> str:
    when = datetime.fromisoformat(c["created_at"]).strftime("%Y-%m-%d %H:%M")
    return (f"#{c['id']} · {when} UTC · {APP_NAMES.get(c['app'], c['app'])} · {c['questions']} 次问询 · "
            f"好评 {c['ratings']['up']} · 差评 {c['ratings']['down']}")


def _filters(items: Sequence[dict]) -> Filters:
    left, mid, right = st.columns(3)
    since = left.date_input("从（日期）", value=None, key="review.since")
    until = left.date_input("到（日期）", value=None, key="review.until")
    apps = mid.multiselect("应用", sorted({c["app"] for c in items}), key="review.apps",
                           format_func=lambda a: APP_NAMES.get(a, a), placeholder="全部应用")
    min_q = int(mid.number_input("问询次数至少", 0, 100, 0, key="review.min_questions"))
    rating = right.selectbox("评价", RATING_FILTERS, key="review.rating")
    return Filters(since, until, tuple(apps), min_q, rating)


def _table(items: Sequence[dict]) -> None:
    st.dataframe(
        [{"编号": c["id"], "时间 (UTC)": datetime.fromisoformat(c["created_at"]).strftime("%Y-%m-%d %H:%M"),
          "应用": APP_NAMES.get(c["app"], c["app"]), "问询": c["questions"], "消息": c["turns"],
          "好评": c["ratings"]["up"], "差评": c["ratings"]["down"]} for c in items],
        hide_index=True, width="stretch")


def _exports(store: RecordStore) -> None:
    from .records_cli import export_text

    left, right = st.columns(2)
    csv_text, rows = export_text(store, "csv")
    left.download_button(f"导出微调数据 CSV（{rows} 行）", csv_text.encode("utf-8"), "bianque-records.csv", "text/csv",
                         key="review.export_csv", on_click="ignore", icon=":material/download:")
    jsonl, dialogues = export_text(store, "jsonl")
    right.download_button(f"导出对话 JSONL（{dialogues} 段）", jsonl.encode("utf-8"), "bianque-records.jsonl",
                          "application/jsonl", key="review.export_jsonl", on_click="ignore", icon=":material/download:")


def _delete(store: RecordStore, cid: int) -> None:
    try:
        store.delete_consultation(cid)
        st.session_state["review.open"] = None
        st.session_state["review.deleted"] = cid
    except RecordsError as exc:
        st.session_state["review.error"] = str(exc)


def _consultation_view(store: RecordStore, cid: int) -> None:
    try:
        item = store.get_consultation(cid)
    except RecordsError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    models = "；".join(f"{MODEL_NAMES.get(k, k)}：`{m.get('source')}` · {m.get('device')} · {m.get('dtype')}"
                      for k, m in sorted(item["models"].items()))
    st.caption(f"开始 {_when(item['created_at'])} · 最后回复 {_when(item['finished_at'])} · {models}")
    for t in item["turns"]:
        _recorded_turn(store, t)
    confirm = st.checkbox("确认删除（删除后无法恢复）", key=f"review.confirm.{cid}")
    st.button("删除本次问诊", key=f"review.delete.{cid}", disabled=not confirm, on_click=_delete,
              args=(store, cid), icon=":material/delete:", type="primary")


def _recorded_turn(store: RecordStore, t: dict) -> None:
    from .ui import AVATARS

    with st.chat_message("user" if t["role"] == "patient" else "assistant",
                         avatar=AVATARS["user" if t["role"] == "patient" else "assistant"]):
        if t["role"] == "patient":
            st.markdown(t["text"])
            for flag in t["red_flags"]:
                st.caption(f":material/emergency: 当时的急症提示：{flag.get('message', flag) if isinstance(flag, dict) else flag}")
            return
        what = [MODEL_NAMES.get(t["model"], t["model"] or "")]
        what += [{"question": "问询", "advice": "建议"}.get(t["stage"], "")] if t["stage"] else []
        what += ["已停止"] if t["stopped"] else []
        what += ["失败"] if t["failed"] else []
        st.caption(" · ".join(w for w in what if w))
        st.markdown(t["text"] or "*（无内容）*")
        if t["failed"] or not t["text"]:
            return

        def save(fb: dict[str, Any], turn_id: int = t["id"]) -> None:
            try:
                store.set_feedback(turn_id, **{**fb, "better_question": (fb["better_question"] or "").strip() or None,
                                               "comment": (fb["comment"] or "").strip() or None})
            except RecordsError as exc:
                st.session_state["review.error"] = str(exc)

        kind = "question" if is_question(SimpleNamespace(stage=t["stage"], model=t["model"])) else "advice"
        feedback_widgets(f"review.{t['id']}", kind, t["feedback"] or empty_feedback(), save)


def review_page(url: str | None) -> None:
    """The page "问诊记录": recorded consultations of the database at ``url``."""
    st.title(PAGE_TITLE)
    if url is None:
        st.info("本应用没有开启记录（启动时加 `--record` 或设置 `BIANQUE_RECORD=1`）。", icon=":material/info:")
        return
    store, notice = store_or_notice(url)
    if store is None:
        st.error(notice, icon=":material/database_off:")
        return
    for key, show in (("review.error", st.error), ("review.deleted", None)):
        value = st.session_state.pop(key, None)
        if value is not None and show is not None:
            show(value, icon=":material/error:")
        elif value is not None:
            st.success(f"已删除问诊 #{value}（包括全部消息和意见）。", icon=":material/delete:")
    try:
        items = store.list_consultations()
    except RecordsError as exc:
        st.error(str(exc), icon=":material/error:")
        return
    shown = filter_consultations(items, _filters(items))
    st.caption(f"共 {len(items)} 次问诊，筛选后 {len(shown)} 次。")
    _table(shown)
    by_id = {c["id"]: c for c in shown}
    cid = st.selectbox("打开问诊", list(by_id), index=None, key="review.open", placeholder="选择一次问诊查看",
                       format_func=lambda i: _label(by_id[i]))
    _exports(store)
    if cid is not None:
        st.divider()
        st.subheader(f"问诊 #{cid}")
        _consultation_view(store, cid)


def run_review_page(argv: Sequence[str] | None = None) -> None:
    """The page script's body: the records URL from the app's arguments and BIANQUE_RECORD."""
    import sys

    from .settings import parse_settings

    try:
        url = parse_settings(sys.argv[1:] if argv is None else argv).record
    except ValueError as exc:
        st.error(f"**启动参数有误**\n\n{exc}", icon=":material/error:")
        return
    review_page(url)
