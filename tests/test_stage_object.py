"""The API's `bianque` stage object as a client reads it, in process with scripted doctors: the
stage of the reply, and the stages the client sends back with earlier assistant messages."""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from bianque.glm.advisor import V2Params  # noqa: E402
from bianque.serving.api import create_app  # noqa: E402
from bianque.t5 import V1Params  # noqa: E402


class Scripted:
    """A doctor that says the next scripted line (and counts tokens as characters)."""

    def __init__(self, params, lines):
        self.default_params, self.lines, self.seen = params, list(lines), []

    def reply(self, turns, params=None):
        self.seen.append([(t.role, t.text, t.stage) for t in turns])
        yield self.lines.pop(0)

    def count_prompt_tokens(self, turns, params):
        return sum(len(t.text) for t in turns)

    def count_completion_tokens(self, text):
        return len(text)


def post(doctors, messages, **extra):
    app = create_app(lambda: doctors, background=False)
    with TestClient(app) as client:
        return client.post("/v1/chat/completions", json={"model": "bianque-coq", "messages": messages, **extra})


def test_a_shown_question_is_labelled_question_by_bianque_1():
    v1, v2 = Scripted(V1Params(), ["头疼多久了？"]), Scripted(V2Params(), ["多喝水。"])
    reply = post({"v1": v1, "v2": v2}, [{"role": "user", "content": "我头疼"}])
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == "头疼多久了？"
    assert body["bianque"] == {"stage": "question", "model": "bianque-1.0", "red_flags": []}
    assert v2.seen == []


def test_the_stages_a_client_sends_back_are_what_the_router_counts():
    # The earlier assistant message reads like a question but was sent as advice: the advisor
    # keeps the consultation (read from its text instead, BianQue-1.0 would be asked again).
    v1, v2 = Scripted(V1Params(), ["还有别的症状吗？"]), Scripted(V2Params(), ["建议休息。"])
    messages = [{"role": "user", "content": "我头疼"},
                {"role": "assistant", "content": "头疼多久了？", "bianque": {"stage": "advice", "model": "bianque-2.0"}},
                {"role": "user", "content": "两天"}]
    body = post({"v1": v1, "v2": v2}, messages).json()
    assert body["bianque"]["stage"] == "advice" and body["bianque"]["model"] == "bianque-2.0"
    assert body["choices"][0]["message"]["content"] == "建议休息。"
    assert v1.seen == [] and v2.seen == [[("patient", "我头疼", None), ("doctor", "头疼多久了？", "advice"),
                                          ("patient", "两天", None)]]
