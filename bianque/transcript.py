"""Transcript downloads (Markdown and JSON) built from a consultation: pure functions, tested directly.

The JSON keeps everything needed to review a trial consultation later: each turn's role, stage,
model, timestamps and the generation settings it was made with, plus which checkpoints ran where.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

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


def transcript_dict(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None) -> dict:
    return {
        "format": FORMAT,
        "title": info.title,
        "exported_at": exported_at or now_iso(),
        "disclaimer": DISCLAIMER,
        "models": info.models,
        "max_questions": info.max_questions,
        "greeting": info.greeting,
        "turns": [_turn(m) for m in consultation.messages],
    }


def to_json(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None) -> str:
    return json.dumps(transcript_dict(consultation, info, exported_at), ensure_ascii=False, indent=2)


def _heading(message: Message) -> str:
    who = "病人" if message.role == PATIENT else "医生"
    parts = [who] + ([message.label] if message.label else []) + [message.started_at]
    return "### " + " · ".join(parts)


def to_markdown(consultation: Consultation, info: TranscriptInfo, exported_at: str | None = None) -> str:
    lines = [f"# {info.title}", "", f"> {DISCLAIMER}", "", f"- 导出时间：{exported_at or now_iso()}"]
    for key, model in sorted(info.models.items()):
        lines.append(f"- {model.get('name', key)}：{model.get('source')}（{model.get('device')}，{model.get('dtype')}）")
    lines += ["", "### 医生 · 开场白", "", info.greeting, ""]
    for message in consultation.messages:
        lines += [_heading(message), "", message.text]
        if message.stopped:
            lines.append("\n*（已停止）*")
        if message.note:
            lines.append(f"\n*{message.note}*")
        lines.append("")
    return "\n".join(lines)
