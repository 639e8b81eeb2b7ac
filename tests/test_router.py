"""Chain of Questioning: the decision table, the repeat check and the orchestrator with fake doctors."""
from __future__ import annotations

import pytest

from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.router import (
    ADVICE,
    GREETING,
    QUESTION,
    ChainOfQuestioning,
    decide,
    handover_reason,
    is_repeat,
    normalise,
    questions_shown,
    show_question,
)


def p(text: str = "我最近总是失眠") -> Turn:
    return Turn(PATIENT, text)


def q(text: str = "失眠多久了？") -> Turn:
    return Turn(DOCTOR, text, QUESTION)


def a(text: str = "建议规律作息，睡前不要玩手机。") -> Turn:
    return Turn(DOCTOR, text, ADVICE)


def rounds(n_questions: int) -> list[Turn]:
    """A dialogue with ``n_questions`` distinct questions shown, ending with the patient."""
    turns = [p("我头痛")]
    for i in range(n_questions):
        turns += [q(f"第{i + 1}个问题：头痛多久了？"), p(f"回答{i + 1}")]
    return turns


class FakeDoctor:
    """Records every call; ``reply`` returns an iterator over scripted pieces, one script per call."""

    def __init__(self, *scripts: list[str]) -> None:
        self.scripts = list(scripts)
        self.calls: list[tuple] = []
        self.produced: list[str] = []

    def reply(self, turns, params=None):
        self.calls.append((turns, params))
        pieces = self.scripts.pop(0)

        def stream():
            for piece in pieces:
                self.produced.append(piece)
                yield piece

        return stream()


class OneArgDoctor:
    """A doctor in the issue's minimal form: ``reply(turns)`` only."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.seen = None

    def reply(self, turns):
        self.seen = turns
        yield self.text


# --- decide ----------------------------------------------------------------------------------
DECISIONS = [
    # (dialogue, max_questions, advise_now, expected)
    ([p()], 8, False, QUESTION),  # the first message goes to a model, v1 first
    ([p()], 8, True, ADVICE),  # "直接给建议" on the first message
    ([p(), q(), p()], 8, False, QUESTION),
    ([p(), q(), p()], 8, True, ADVICE),
    ([p(), a(), p()], 8, False, ADVICE),  # after advice the advisor keeps the consultation
    ([p(), q(), p(), a(), p()], 8, False, ADVICE),
    (rounds(7), 8, False, QUESTION),
    (rounds(8), 8, False, ADVICE),  # eight questions shown: advice
    (rounds(9), 8, False, ADVICE),
    ([p()], 0, False, ADVICE),  # no questions allowed at all
    ([p(), q(), p()], 1, False, ADVICE),
    (rounds(2), 3, False, QUESTION),
    ([p(), Turn(DOCTOR, "失眠多久了？"), p()], 8, False, QUESTION),  # stage missing: read the text
    ([p(), Turn(DOCTOR, "建议多休息，清淡饮食。"), p()], 8, False, ADVICE),
]


@pytest.mark.parametrize(("turns", "max_questions", "advise_now", "expected"), DECISIONS)
def test_decision_table(turns, max_questions, advise_now, expected):
    assert decide(turns, max_questions, advise_now) == expected


@pytest.mark.parametrize("turns", [[], [q()], [p(), q()], [q(), p()], [p(), p()]])
def test_decide_rejects_malformed_dialogues(turns):
    with pytest.raises(ValueError):
        decide(turns)


def test_questions_shown_counts_only_question_turns():
    assert questions_shown(rounds(3)) == 3
    assert questions_shown([p(), q(), p(), a(), p()]) == 1


# --- show v1's reply or hand over ------------------------------------------------------------
HANDOVERS = [
    # (v1 reply, dialogue, reason or None when shown)
    ("失眠多久了？", [p()], None),
    ("是否伴有头痛", [p(), q(), p()], None),
    ("建议规律作息，适当运动。", [p()], "not_question"),
    ("", [p()], "not_question"),
    ("失眠多久了？", [p(), q("失眠多久了？"), p()], "repeat"),
    ("失眠 多久了", [p(), q("失眠多久了？"), p()], "repeat"),  # whitespace and punctuation
    ("你好，请问失眠多久了?", [p(), q("失眠多久了？"), p()], "repeat"),  # fillers, ASCII "?"
    ("睡前玩手机吗？", [p(), q("失眠多久了？"), p()], None),
    ("失眠多久了？", [p("失眠多久了？")], None),  # only doctor turns count as repeats
]


@pytest.mark.parametrize(("reply", "turns", "reason"), HANDOVERS)
def test_handover_table(reply, turns, reason):
    assert handover_reason(reply, turns) == reason
    assert show_question(reply, turns) is (reason is None)


def test_normalise_drops_whitespace_punctuation_width_and_fillers():
    assert normalise(" 您好，请问 头痛 多久了？\n") == "头痛多久了"
    assert normalise("ＡＢＣ？") == normalise("abc?") == "abc"
    assert normalise("你好") == "你好"  # a filler alone stays: it is the whole reply
    assert not is_repeat("。。", [p(), q("？"), p()])  # nothing left to compare


# --- the orchestrator ------------------------------------------------------------------------
def test_first_message_is_answered_by_the_questioner():
    questioner, advisor = FakeDoctor(["失眠", "多久了？"]), FakeDoctor()
    turns = [p()]
    reply = ChainOfQuestioning(questioner, advisor).respond(turns)
    assert (reply.stage, reply.model, reply.handover) == (QUESTION, "v1", None)
    assert reply.text() == "失眠多久了？"
    assert questioner.calls == [(turns, None)] and questioner.calls[0][0] is turns
    assert questioner.produced == ["失眠", "多久了？"]  # v1 was generated in full to judge it
    assert advisor.calls == []
    assert GREETING not in [t.text for t in questioner.calls[0][0]]


@pytest.mark.parametrize(
    ("v1_text", "reason"),
    [("失眠多久了", "repeat"), ("建议你睡前泡脚，规律作息。", "not_question")],
)
def test_v1_reply_not_shown_hands_over_to_the_advisor(v1_text, reason):
    turns = [p("失眠\n两周了"), q("失眠多久了？"), p("两周")]
    questioner, advisor = FakeDoctor([v1_text]), FakeDoctor(["建议", "规律作息。"])
    reply = ChainOfQuestioning(questioner, advisor).respond(turns)
    assert (reply.stage, reply.model, reply.handover) == (ADVICE, "v2", reason)
    assert reply.text() == "建议规律作息。"
    assert len(questioner.calls) == 1
    # The advisor gets the very same plain turns: real newline, never v1's escaped "\\n".
    assert advisor.calls[0][0] is turns and advisor.calls[0][0][0].text == "失眠\n两周了"


def test_max_questions_forces_advice_without_asking_v1():
    questioner, advisor = FakeDoctor(), FakeDoctor(["建议就医。"])
    reply = ChainOfQuestioning(questioner, advisor, max_questions=2).respond(rounds(2))
    assert (reply.stage, reply.model) == (ADVICE, "v2")
    assert reply.text() == "建议就医。"
    assert questioner.calls == []


def test_advise_now_skips_the_questioner():
    questioner, advisor = FakeDoctor(), FakeDoctor(["建议多喝水。"])
    reply = ChainOfQuestioning(questioner, advisor).respond([p()], advise_now=True)
    assert (reply.stage, reply.model, reply.text()) == (ADVICE, "v2", "建议多喝水。")
    assert questioner.calls == []


def test_after_advice_the_advisor_keeps_the_consultation():
    questioner, advisor = FakeDoctor(), FakeDoctor(["还可以热敷。"])
    turns = [p(), q(), p(), a(), p("还有别的办法吗？")]
    reply = ChainOfQuestioning(questioner, advisor).respond(turns)
    assert (reply.stage, reply.model, reply.text()) == (ADVICE, "v2", "还可以热敷。")
    assert questioner.calls == []


def test_advisor_chunks_are_lazy_and_stream_piece_by_piece():
    advisor = FakeDoctor(["一", "二", "三"])
    reply = ChainOfQuestioning(FakeDoctor(), advisor).respond([p()], advise_now=True)
    assert advisor.calls == []  # not even called before the caller iterates
    assert next(reply.chunks) == "一"
    assert len(advisor.calls) == 1 and advisor.produced == ["一"]
    assert reply.text() == "一二三"  # drains the rest and keeps what was already streamed
    assert reply.text() == "一二三"
    assert reply.turn() == Turn(DOCTOR, "一二三", ADVICE)


def test_per_call_params_are_forwarded():
    v1_params, v2_params = object(), object()
    questioner, advisor = FakeDoctor(["建议休息。"]), FakeDoctor(["好的。"])
    reply = ChainOfQuestioning(questioner, advisor).respond([p()], v1_params=v1_params, v2_params=v2_params)
    reply.text()
    assert questioner.calls[0][1] is v1_params and advisor.calls[0][1] is v2_params


def test_one_argument_doctors_work_when_no_params_are_given():
    questioner, advisor = OneArgDoctor("胸闷吗？"), OneArgDoctor("建议做心电图。")
    coq = ChainOfQuestioning(questioner, advisor)
    turns = [p("心慌")]
    assert coq.respond(turns).text() == "胸闷吗？" and questioner.seen is turns
    assert coq.respond(turns, advise_now=True).text() == "建议做心电图。" and advisor.seen is turns


def test_a_whole_consultation():
    questioner = FakeDoctor(["头痛多久了？"], ["是否伴有恶心"], ["头痛多久了"])
    advisor = FakeDoctor(["考虑偏头痛，建议休息。"], ["可以冷敷。"])
    coq = ChainOfQuestioning(questioner, advisor)
    turns = [p("我头痛")]
    for patient_text in ("三天", "没有恶心", "还能做什么？"):
        reply = coq.respond(turns)
        turns += [reply.turn(), p(patient_text)]
    final = coq.respond(turns)
    turns.append(final.turn())
    assert [(t.stage, t.text) for t in turns if t.role == DOCTOR] == [
        (QUESTION, "头痛多久了？"),
        (QUESTION, "是否伴有恶心"),
        (ADVICE, "考虑偏头痛，建议休息。"),  # v1 repeated itself: the advisor took over
        (ADVICE, "可以冷敷。"),  # and kept the consultation
    ]
    assert len(questioner.calls) == 3 and len(advisor.calls) == 2


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_max_questions_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="max_questions"):
        ChainOfQuestioning(FakeDoctor(), FakeDoctor(), max_questions=bad)


def test_questioner_errors_propagate_and_nothing_is_changed():
    class Broken:
        def reply(self, turns, params=None):
            raise MemoryError("out of memory")

    turns = [p()]
    with pytest.raises(MemoryError):
        ChainOfQuestioning(Broken(), FakeDoctor()).respond(turns)
    assert turns == [p()]


# --- with the real backends (tiny random checkpoints) ------------------------------------------
@pytest.fixture(scope="module")
def real_doctors(tmp_path_factory):
    from tiny_glm import build_tiny_glm
    from tiny_t5 import build_tiny_t5

    from bianque.glm import load_advisor
    from bianque.t5 import load_questioner

    questioner = load_questioner(str(build_tiny_t5(tmp_path_factory.mktemp("coq_v1"))))
    advisor = load_advisor(str(build_tiny_glm(tmp_path_factory.mktemp("coq_v2"))))
    return questioner, advisor


class Says:
    """The real tiny questioner, run with the test's settings, whose text is replaced by ``text``:
    random weights say nothing a router decision could be written down for."""

    def __init__(self, real, text: str) -> None:
        self.real, self.text, self.produced = real, text, []

    def reply(self, turns, params=None):
        self.produced.append("".join(self.real.reply(turns, params)))
        yield self.text


@pytest.mark.parametrize(
    ("v1_text", "stage", "model", "handover"),
    [
        ("疼的时候会恶心吗？", QUESTION, "v1", None),
        ("头痛是持续的吗", ADVICE, "v2", "repeat"),
        ("多喝水，注意休息。", ADVICE, "v2", "not_question"),
    ],
    ids=["shown", "repeat", "not_question"],
)
def test_real_backends_route_as_decided(real_doctors, v1_text, stage, model, handover):
    from bianque.glm.advisor import V2Params
    from bianque.t5 import V1Params

    questioner, advisor = real_doctors
    v1_params, v2_params = V1Params(max_new_tokens=12, seed=0), V2Params(max_length=96, seed=0)
    turns = [p("头痛\n三天了"), q("头痛是持续的吗？"), p("一阵一阵的")]
    v1 = Says(questioner, v1_text)
    coq = ChainOfQuestioning(v1, advisor)

    reply = coq.respond(turns, v1_params=v1_params, v2_params=v2_params)
    assert (reply.stage, reply.model, reply.handover) == (stage, model, handover)
    expected = v1_text if model == "v1" else "".join(advisor.reply(turns, v2_params))
    assert reply.text() == expected
    assert v1.produced == ["".join(questioner.reply(turns, v1_params))]  # the real v1 ran once, seeded

    advice = coq.respond(turns, advise_now=True, v2_params=v2_params)
    assert (advice.stage, advice.model, advice.handover) == (ADVICE, "v2", None)
    assert advice.text() == "".join(advisor.reply(turns, v2_params)) and len(v1.produced) == 1
