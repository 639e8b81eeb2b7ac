"""What a downloaded transcript shows, field by field, with the expected values written here."""
from __future__ import annotations

import json

from bianque.session import Consultation, Message
from bianque.transcript import TranscriptInfo, to_json, to_markdown


def _consultation() -> Consultation:
    return Consultation(messages=[
        Message("patient", "我最近咳嗽。", started_at="2026-01-01T00:00:00Z"),
        Message("doctor", "咳嗽多久了？", stage="question", model="v1", label="问询 1/3",
                started_at="2026-01-01T00:00:01Z", finished_at="2026-01-01T00:00:02Z",
                params={"top_p": 0.7}, note="对话过长，已截取最近的内容"),
    ])


INFO = TranscriptInfo(title="扁鹊健康大模型", greeting="你好，我是扁鹊。",
                      models={"v1": {"name": "扁鹊-1.0", "source": "tiny", "device": "cpu", "dtype": "float32"}},
                      max_questions=3)


def test_json_transcript_fields():
    data = json.loads(to_json(_consultation(), INFO, exported_at="2026-01-01T00:01:00Z"))
    assert data["format"] == "bianque-transcript/1"
    assert data["title"] == "扁鹊健康大模型"
    assert data["max_questions"] == 3
    assert data["greeting"] == "你好，我是扁鹊。"
    assert data["disclaimer"] == "以下回答由扁鹊健康模型自动生成，仅供参考！"
    assert data["exported_at"] == "2026-01-01T00:01:00Z"
    assert data["models"] == {"v1": {"name": "扁鹊-1.0", "source": "tiny", "device": "cpu", "dtype": "float32"}}
    assert data["turns"] == [
        {"role": "patient", "text": "我最近咳嗽。", "stage": None, "model": None, "label": None,
         "started_at": "2026-01-01T00:00:00Z", "finished_at": None, "stopped": False, "note": None, "params": None},
        {"role": "doctor", "text": "咳嗽多久了？", "stage": "question", "model": "v1", "label": "问询 1/3",
         "started_at": "2026-01-01T00:00:01Z", "finished_at": "2026-01-01T00:00:02Z", "stopped": False,
         "note": "对话过长，已截取最近的内容", "params": {"top_p": 0.7}},
    ]


def test_markdown_transcript_shows_label_and_note():
    md = to_markdown(_consultation(), INFO, exported_at="2026-01-01T00:01:00Z")
    assert md.startswith("# 扁鹊健康大模型\n\n> 以下回答由扁鹊健康模型自动生成，仅供参考！\n\n- 导出时间：2026-01-01T00:01:00Z\n")
    assert "- 扁鹊-1.0：tiny（cpu，float32）" in md
    assert "### 医生 · 问询 1/3 · 2026-01-01T00:00:01Z\n\n咳嗽多久了？\n\n*对话过长，已截取最近的内容*\n" in md
    assert "### 病人 · 2026-01-01T00:00:00Z\n\n我最近咳嗽。\n" in md
