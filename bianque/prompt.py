"""Dialogue turns and the prompt format both BianQue models were trained on.

The format is data plus pure functions: ``病人：{p1}\\n医生：{d1}\\n病人：{p2}\\n医生：`` with
FULL-WIDTH colons (U+FF1A) and real newlines between turns. BianQue-1.0 additionally sees real
newlines/tabs escaped as the two characters backslash-n / backslash-t (its training data was
escaped that way); that escaping is separate (``escape_v1``) so BianQue-2 gets the plain text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

PATIENT = "patient"
DOCTOR = "doctor"
ROLES = (PATIENT, DOCTOR)
LABELS = {PATIENT: "病人：", DOCTOR: "医生："}  # full-width colon U+FF1A, never ASCII ':'
STAGES = ("question", "advice")


@dataclass(frozen=True)
class Turn:
    """One utterance. ``stage`` ("question"/"advice") is only meaningful on doctor turns."""

    role: str
    text: str
    stage: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be 'patient' or 'doctor', got {self.role!r}")
        if not isinstance(self.text, str):
            raise ValueError(f"Turn.text must be a string, got {type(self.text).__name__}")
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"Turn.stage must be 'question', 'advice' or None, got {self.stage!r}")


def validate_dialogue(turns: Sequence[Turn]) -> None:
    """Raise ValueError unless turns alternate patient/doctor from a patient and end with a patient."""
    if not turns:
        raise ValueError("the dialogue is empty: it needs at least one patient message")
    for i, turn in enumerate(turns):
        expected = ROLES[i % 2]
        if turn.role != expected:
            raise ValueError(
                f"turn {i} is from the {turn.role}, expected the {expected}: "
                "a dialogue alternates patient/doctor and starts with the patient"
            )
    if turns[-1].role != PATIENT:
        raise ValueError("the dialogue must end with a patient message for the doctor to reply to")


def build_prompt(turns: Sequence[Turn]) -> str:
    """``病人：p1\\n医生：d1\\n…\\n病人：pn\\n医生：`` exactly as the original apps built it."""
    validate_dialogue(turns)
    lines = [LABELS[t.role] + t.text for t in turns]
    lines.append(LABELS[DOCTOR])
    return "\n".join(lines)


def escape_v1(text: str) -> str:
    """Real newlines/tabs -> the two-character sequences ``\\n``/``\\t`` (BianQue-1.0's training form)."""
    return text.replace("\n", "\\n").replace("\t", "\\t")


def unescape_v1(text: str) -> str:
    """Inverse of :func:`escape_v1`, applied to BianQue-1.0's output."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


@dataclass(frozen=True)
class Fit:
    """A dialogue after fitting a token budget, and what had to go."""

    turns: tuple[Turn, ...]
    dropped_turns: int = 0
    cut_chars: int = 0

    @property
    def changed(self) -> bool:
        return self.dropped_turns > 0 or self.cut_chars > 0


def fit_dialogue(
    turns: Sequence[Turn],
    max_tokens: int,
    count_tokens: Callable[[str], int],
    render: Callable[[Sequence[Turn]], str] = build_prompt,
) -> Fit:
    """Fit a dialogue into ``max_tokens`` as measured by ``count_tokens(render(turns))``.

    Drops the OLDEST turns first, a patient/doctor pair at a time (so the dialogue still starts
    with the patient and no role label is ever cut), and always keeps the newest patient message.
    Only if that message alone is too long is the FRONT of it cut: the end of what the patient
    just wrote is what the doctor must answer. The original app let the tokenizer cut from the
    right, which silently dropped the newest turn.
    """
    validate_dialogue(turns)
    kept = tuple(turns)
    fits = lambda ts: count_tokens(render(ts)) <= max_tokens  # noqa: E731
    while len(kept) > 1 and not fits(kept):
        kept = kept[2:]
    dropped = len(turns) - len(kept)
    if fits(kept):
        return Fit(kept, dropped, 0)
    last = kept[-1]
    cut = _shortest_front_cut(last, max_tokens, count_tokens, render)
    return Fit((Turn(PATIENT, last.text[cut:]),), dropped, cut)


def _shortest_front_cut(
    last: Turn, max_tokens: int, count_tokens: Callable[[str], int], render: Callable
) -> int:
    """Smallest number of leading characters to remove from ``last`` so it fits (binary search)."""
    fits = lambda n: count_tokens(render([Turn(PATIENT, last.text[n:])])) <= max_tokens  # noqa: E731
    if not fits(len(last.text)):
        raise ValueError(f"a budget of {max_tokens} tokens cannot hold even an empty patient turn")
    lo, hi = 0, len(last.text)  # fits(hi) holds; find the smallest n that fits
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
