"""Transcript downloads (Markdown and JSON) built from a consultation: pure functions, tested directly.

The JSON keeps everything needed to review a trial consultation later: each turn's role, stage,
model, timestamps and the generation settings it was made with, plus which checkpoints ran where.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from .prompt import PATIENT
from .session import Consultation, Message, now_iso

DISCLAIMER = "以下回答由扁鹊健康模型自动生成，仅供参考！"
FORMAT = "bianque-transcript/1"


@dataclass(frozen=True)
class TranscriptInfo:
    """What the transcript says about the app: its title, greeting and the loaded models."""

    title: str
    greeting: str
    models: dict[str, dict[str, str]] = field(default_factory=dict)  # "v1" -> source/device/dtype
    max_questions: int | None = None


def _turn(message: Message) -> dict[str, Any]:
    return {
        "role": message.role,
        "text": message.text,
        "stage": message.stage,
        "model": message.model,
        "label": message.label,
        "started_at": message.started_at,
        "finished_at": message.finished_at,
        "stopped": message.stopped,
        "note": message.note,
        "params": message.params,
    }


def transcript_dict(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None,
                    feedback: Mapping[int, dict[str, Any]] | None = None) -> dict:
    """``feedback``: the feedback given on replies, by message position, from an app that records;
    then every turn has a "feedback" key: {rating, better_question, advise_now, comment} or None."""
    turns = [_turn(m) for m in consultation.messages]
    if feedback is not None:
        turns = [{**t, "feedback": feedback.get(i)} for i, t in enumerate(turns)]
    return {
        "format": FORMAT,
        "title": info.title,
        "exported_at": exported_at or now_iso(),
        "disclaimer": DISCLAIMER,
        "models": info.models,
        "max_questions": info.max_questions,
        "greeting": info.greeting,
        "turns": turns,
    }


def to_json(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None,
            feedback: Mapping[int, dict[str, Any]] | None = None) -> str:
    return json.dumps(transcript_dict(consultation, info, exported_at, feedback), ensure_ascii=False, indent=2)


def _heading(message: Message) -> str:
    who = "病人" if message.role == PATIENT else "医生"
    parts = [who] + ([message.label] if message.label else []) + [message.started_at]
    return "### " + " · ".join(parts)


def feedback_line(fb: Mapping[str, Any] | None) -> str | None:
    """A reply's feedback in one line: 👍/👎, the better question, "advise now", the comment."""
    if not fb:
        return None
    parts = [{"up": "👍 有用", "down": "👎 不好"}.get(fb.get("rating"), "未评分")]
    if fb.get("better_question"):
        parts.append(f"更好的问题：{fb['better_question']}")
    if fb.get("advise_now"):
        parts.append("此时应该直接给建议")
    if fb.get("comment"):
        parts.append(f"评语：{fb['comment']}")
    return " · ".join(parts)


def to_markdown(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None,
                feedback: Mapping[int, dict[str, Any]] | None = None) -> str:
    feedback = feedback or {}
    lines = [f"# {info.title}", "", f"> {DISCLAIMER}", "", f"- 导出时间：{exported_at or now_iso()}"]
    for key, model in sorted(info.models.items()):
        lines.append(f"- {model.get('name', key)}：{model.get('source')}（{model.get('device')}，{model.get('dtype')}）")
    lines += ["", "### 医生 · 开场白", "", info.greeting, ""]
    for i, message in enumerate(consultation.messages):
        lines += [_heading(message), "", message.text]
        if message.stopped:
            lines.append("\n*（已停止）*")
        if message.note:
            lines.append(f"\n*{message.note}*")
        if feedback_line(feedback.get(i)):
            lines.append(f"\n> 医生意见：{feedback_line(feedback.get(i))}")
        lines.append("")
    return "\n".join(lines)
