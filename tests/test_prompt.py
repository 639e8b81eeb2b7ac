"""The dialogue prompt format, v1 escaping and the left-side token budget (exact strings)."""
import pytest

from bianque.prompt import (
    DOCTOR, PATIENT, Fit, Turn, build_prompt, escape_v1, fit_dialogue, unescape_v1, validate_dialogue,
)

P, D = PATIENT, DOCTOR


@pytest.mark.parametrize(
    "turns, expected",
    [
        ([Turn(P, "头疼三天了")], "病人：头疼三天了\n医生："),
        (
            [Turn(P, "我失眠"), Turn(D, "失眠多久了？", "question"), Turn(P, "两周")],
            "病人：我失眠\n医生：失眠多久了？\n病人：两周\n医生：",
        ),
        (
            [Turn(P, "a"), Turn(D, "b"), Turn(P, "c"), Turn(D, "d"), Turn(P, "e")],
            "病人：a\n医生：b\n病人：c\n医生：d\n病人：e\n医生：",
        ),
        ([Turn(P, "第一行\n第二行")], "病人：第一行\n第二行\n医生："),
        ([Turn(P, "")], "病人：\n医生："),
    ],
)
def test_build_prompt_exact(turns, expected):
    out = build_prompt(turns)
    assert out == expected
    assert "\uff1a" in out and ":" not in out  # full-width colons only
    assert not out.endswith(" ")


def test_build_prompt_bytes():
    assert build_prompt([Turn(P, "咳嗽")]).encode() == b"\xe7\x97\x85\xe4\xba\xba\xef\xbc\x9a\xe5\x92\xb3\xe5\x97\xbd\n\xe5\x8c\xbb\xe7\x94\x9f\xef\xbc\x9a"


@pytest.mark.parametrize(
    "turns, message",
    [
        ([], "empty"),
        ([Turn(D, "你好")], "expected the patient"),
        ([Turn(P, "a"), Turn(P, "b")], "expected the doctor"),
        ([Turn(P, "a"), Turn(D, "b")], "end with a patient"),
    ],
)
def test_invalid_dialogues(turns, message):
    with pytest.raises(ValueError, match=message):
        validate_dialogue(turns)
    with pytest.raises(ValueError):
        build_prompt(turns)


def test_turn_checks_role_and_stage():
    with pytest.raises(ValueError, match="role"):
        Turn("nurse", "x")
    with pytest.raises(ValueError, match="stage"):
        Turn(D, "x", "diagnosis")
    assert Turn(D, "x", "advice").stage == "advice"


@pytest.mark.parametrize(
    "raw, escaped",
    [("a\nb\tc", "a\\nb\\tc"), ("无换行", "无换行"), ("\n\n", "\\n\\n"), ("", "")],
)
def test_escape_roundtrip(raw, escaped):
    assert escape_v1(raw) == escaped
    assert unescape_v1(escaped) == raw


def chars(text: str) -> int:
    return len(text)


def dialogue(n_pairs: int) -> list[Turn]:
    turns = []
    for i in range(n_pairs):
        turns += [Turn(P, f"病人说{i}"), Turn(D, f"医生问{i}？", "question")]
    return turns + [Turn(P, "最新的话")]


def test_fit_keeps_everything_when_it_fits():
    turns = dialogue(2)
    fit = fit_dialogue(turns, 10_000, chars)
    assert fit == Fit(tuple(turns), 0, 0) and not fit.changed


def test_fit_drops_oldest_pairs_first():
    turns = dialogue(3)
    budget = len(build_prompt(turns[2:]))  # room for all but the first pair
    fit = fit_dialogue(turns, budget, chars)
    assert fit.turns == tuple(turns[2:]) and fit.dropped_turns == 2 and fit.cut_chars == 0
    assert build_prompt(fit.turns).startswith("病人：病人说1\n医生：")


def test_fit_cuts_front_of_newest_message_only_when_alone_too_long():
    turns = [Turn(P, "旧"), Turn(D, "问？"), Turn(P, "ABCDEFGHIJ")]
    budget = len("病人：GHIJ\n医生：")
    fit = fit_dialogue(turns, budget, chars)
    assert fit.turns == (Turn(P, "GHIJ"),)
    assert fit.dropped_turns == 2 and fit.cut_chars == 6 and fit.changed
    assert build_prompt(fit.turns) == "病人：GHIJ\n医生："  # role labels intact


def test_fit_rejects_impossible_budget():
    with pytest.raises(ValueError, match="cannot hold"):
        fit_dialogue([Turn(P, "x")], 3, chars)
