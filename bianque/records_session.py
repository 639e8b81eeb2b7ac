"""Recording one live consultation (an app's browser session) into a RecordStore, never failing it.

Pure Python (no Streamlit), so the apps' recording is unit-tested without a browser. The apps keep
one :class:`RecordingSession` per consultation in ``st.session_state``. The consultation row is
written at the patient's first message (opening the page records nothing). A database that cannot
be written stops the recording of this consultation and leaves a ``notice`` for the page: the
dialogue goes on, unrecorded, and nothing is lost from the page. Feedback is also kept here, per
message, so the transcript downloads carry it whether or not the database took it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .prompt import DOCTOR, PATIENT
from .records import RecordsError, RecordStore
from .session import QUESTION, Consultation, Message

log = logging.getLogger(__name__)

NOTICE = "本次问诊将被记录，用于医生评估"
FAILED_NOTICE = "记录数据库无法使用，本次问诊不再记录（对话照常进行，页面上的内容不受影响）。原因：{reason}"


def is_question(message: Message) -> bool:
    """A questioning reply (the combined app's question stage, or BianQue-1.0 on its own)."""
    return message.stage == QUESTION or (message.stage is None and message.model == "v1")


def empty_feedback() -> dict[str, Any]:
    return {"rating": None, "better_question": None, "advise_now": False, "comment": None}


@dataclass
class RecordingSession:
    """What one consultation records: its row's id, each message's turn id, the feedback given.

    ``store`` is None when the database could not be opened (``notice`` says why) or when the
    patient chose an unrecorded consultation (``enabled`` False).
    """

    store: RecordStore | None
    app: str
    models: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    enabled: bool = True
    notice: str | None = None
    consultation_id: int | None = None
    # id(message) -> (message, turn id); the message is kept so that its id() is never reused.
    _turns: dict[int, tuple[Message, int]] = field(default_factory=dict)
    _said: dict[int, str] = field(default_factory=dict)  # id(patient message) -> the text recorded so far
    _feedback: dict[int, tuple[Message, dict[str, Any]]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        """Turns are being written now."""
        return self.enabled and self.store is not None and self.notice is None

    @property
    def started(self) -> bool:
        return self.consultation_id is not None

    def _fail(self, exc: RecordsError) -> None:
        log.warning("recording stopped: the records database failed (%s)", type(exc).__name__)
        self.notice = FAILED_NOTICE.format(reason=exc)

    def _start(self) -> None:
        if self.consultation_id is None:
            self.consultation_id = self.store.start_consultation(self.app, self.models, self.settings)

    def patient_turns(self, consultation: Consultation) -> None:
        """Write the patient's new words: new messages, and what was added to an unanswered one
        (the app joins a message sent after a failed reply to the one before it)."""
        if not self.active:
            return
        from .safety import flag_dict, red_flags

        earlier: list[str] = []
        for message in consultation.messages:
            if message.role != PATIENT:
                continue
            done = self._said.get(id(message), "")
            if len(message.text) > len(done):
                new = message.text[len(done):].lstrip("\n") if done else message.text
                flags = [flag_dict(f) for f in red_flags(message.text, earlier)]  # as the page shows them
                try:
                    self._start()
                    turn = self.store.add_turn(self.consultation_id, PATIENT, new, red_flags=flags)
                except RecordsError as exc:
                    self._fail(exc)
                    return
                self._said[id(message)] = message.text
                self._turns[id(message)] = (message, turn)
            earlier.append(message.text)

    def doctor_turn(self, message: Message, *, shown: bool, failed: bool, started_at: datetime,
                    finished_at: datetime, first_chunk_ms: float | None) -> None:
        """Write a reply as it ended: shown (finished or stopped part-way), failed, or stopped before
        its first character (``shown`` False, not failed)."""
        if not self.active or not self.started:
            return
        params = dict(message.params or {})
        params["timing"] = {"first_chunk_ms": None if first_chunk_ms is None else round(first_chunk_ms, 1),
                            "total_ms": round((finished_at - started_at).total_seconds() * 1000, 1)}
        try:
            turn = self.store.add_turn(
                self.consultation_id, DOCTOR, message.text, stage=message.stage, model=message.model,
                params=params, started_at=started_at, finished_at=finished_at,
                stopped=not failed and (message.stopped or not shown), failed=failed)
            self.store.finish_consultation(self.consultation_id)  # finished_at: its latest reply
        except RecordsError as exc:
            self._fail(exc)
            return
        if shown:
            self._turns[id(message)] = (message, turn)

    def turn_id(self, message: Message) -> int | None:
        found = self._turns.get(id(message))
        return found[1] if found and found[0] is message else None

    def feedback(self, message: Message) -> dict[str, Any] | None:
        found = self._feedback.get(id(message))
        return dict(found[1]) if found and found[0] is message else None

    def set_feedback(self, message: Message, rating: str | None = None, better_question: str | None = None,
                     advise_now: bool = False, comment: str | None = None) -> None:
        """Keep the feedback on a reply (for the transcript) and save it now when it is recorded."""
        fb = {"rating": rating, "better_question": (better_question or "").strip() or None,
              "advise_now": bool(advise_now), "comment": (comment or "").strip() or None}
        self._feedback[id(message)] = (message, fb)
        turn = self.turn_id(message)
        if turn is None or self.store is None or self.notice is not None:
            return
        try:
            self.store.set_feedback(turn, **fb)
        except RecordsError as exc:
            self._fail(exc)

    def feedback_by_index(self, consultation: Consultation) -> dict[int, dict[str, Any]]:
        """The feedback given, by message position (what the transcript downloads take)."""
        out = {}
        for i, message in enumerate(consultation.messages):
            fb = self.feedback(message)
            if fb is not None:
                out[i] = fb
        return out


def settings_info(settings: Any, kinds: tuple[str, ...], max_questions: int | None) -> dict[str, Any]:
    """The app's settings for the models it runs, as recorded (never the records URL: it may hold
    a password). Each reply's generation settings are recorded with the reply."""
    out: dict[str, Any] = {"max_questions": max_questions, "seed": settings.seed}
    for kind in kinds:
        s = getattr(settings, kind)
        out[kind] = {"model": s.model, "device": s.device, "dtype": s.dtype, "quantize": s.quantize,
                     "compile": s.compile}
    return out
