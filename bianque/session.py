"""One consultation as the apps hold it: messages with their metadata, and the reply in progress.

Pure Python (no Streamlit), so the chat logic is unit-tested without a browser. The apps keep one
:class:`Consultation` per browser session in ``st.session_state``; a reply being streamed lives in
``pending`` and its text grows chunk by chunk, so a run interrupted by Stop (or by any rerun) still
has the partial reply and can keep it, marked as stopped, instead of losing it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .prompt import DOCTOR, PATIENT, Fit, Turn

QUESTION, ADVICE = "question", "advice"
MODEL_NAMES = {"v1": "BianQue-1.0", "v2": "BianQue-2.0"}
STAGE_NAMES = {QUESTION: "问询", ADVICE: "建议"}
# The patient turn "直接给建议" adds: it keeps the dialogue alternating and tells v2 what was asked.
ADVISE_NOW_TEXT = "请直接给我建议。"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Message:
    """A turn plus what the UI and the transcript need: who wrote it, when, with which settings."""

    role: str
    text: str
    stage: str | None = None  # doctor turns in the combined app: "question"/"advice"
    model: str | None = None  # "v1"/"v2" for doctor turns
    label: str | None = None  # the small label inside the bubble, fixed when the reply starts
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    params: dict[str, Any] | None = None  # generation settings the reply was made with
    stopped: bool = False
    note: str | None = None  # e.g. the dialogue was fitted to the model's budget

    def turn(self) -> Turn:
        return Turn(self.role, self.text, self.stage if self.role == DOCTOR else None)


@dataclass
class Consultation:
    """The dialogue of one browser session. ``messages`` alternate patient/doctor from a patient."""

    messages: list[Message] = field(default_factory=list)
    pending: Message | None = None
    error: str | None = None  # a failed reply (e.g. out of memory): shown until the next attempt

    def turns(self) -> tuple[Turn, ...]:
        return tuple(m.turn() for m in self.messages)

    @property
    def awaiting_reply(self) -> bool:
        """The last message is the patient's (a reply failed or was never made)."""
        return bool(self.messages) and self.messages[-1].role == PATIENT

    def add_patient(self, text: str) -> Message:
        """Append the patient's message; one sent while the previous is unanswered joins it."""
        self.error = None
        if self.awaiting_reply:  # e.g. after an out-of-memory failure: keep both, answer both
            last = self.messages[-1]
            last.text = f"{last.text}\n{text}"
            return last
        message = Message(PATIENT, text, finished_at=now_iso())
        self.messages.append(message)
        return message

    def start_reply(self, **fields: Any) -> Message:
        if not self.awaiting_reply:
            raise ValueError("a reply needs a patient message to answer")
        self.error = None
        self.pending = Message(DOCTOR, "", **fields)
        return self.pending

    def finish_reply(self, stopped: bool = False) -> Message | None:
        """Move the reply in progress into the dialogue (partial and marked if stopped).

        A reply stopped before its first character is dropped rather than kept empty: an empty
        doctor turn would read as "advice given" to the router and end the questioning.
        """
        message, self.pending = self.pending, None
        if message is None or (stopped and not message.text):
            return None
        message.stopped = stopped
        message.finished_at = now_iso()
        self.messages.append(message)
        return message

    def fail_reply(self, error: str) -> None:
        """Drop the reply in progress; the patient's message stays so the user can retry."""
        self.pending = None
        self.error = error

    def drop_last_reply(self) -> Message | None:
        """Remove the last doctor reply so it can be generated again."""
        if self.messages and self.messages[-1].role == DOCTOR:
            return self.messages.pop()
        return None

    def questions_asked(self) -> int:
        """Questions shown so far: what the router's question cap counts (the n of "问询 n/8")."""
        return sum(m.role == DOCTOR and m.stage == QUESTION for m in self.messages)


def reply_label(model: str, stage: str | None, question_no: int, max_questions: int) -> str:
    """"问询 n/8 · BianQue-1.0" / "建议 · BianQue-2.0" in the combined app, the model name alone otherwise."""
    name = MODEL_NAMES[model]
    if stage == QUESTION:
        return f"{STAGE_NAMES[QUESTION]} {question_no}/{max_questions} · {name}"
    if stage == ADVICE:
        return f"{STAGE_NAMES[ADVICE]} · {name}"
    return name


def fit_note(fit: Fit) -> str | None:
    """What the user should know when the model did not see the whole dialogue."""
    if not fit.changed:
        return None
    parts = []
    if fit.dropped_turns:
        parts.append(f"省略了最早的 {fit.dropped_turns} 条消息")
    if fit.cut_chars:
        parts.append(f"最新消息过长，只保留了结尾部分（截去开头 {fit.cut_chars} 个字）")
    return "对话超出模型长度：" + "；".join(parts)


def params_dict(params: Any) -> dict[str, Any]:
    """A doctor's frozen params dataclass as plain JSON-able data for the transcript."""
    return dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(params or {})
