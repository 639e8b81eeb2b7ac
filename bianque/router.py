"""Chain of Questioning: BianQue-1.0 asks while its replies are useful questions, then BianQue-2 advises.

Pure decisions first (``is_question``, ``is_repeat``, ``decide``, ``show_question``), then a small
orchestrator (``ChainOfQuestioning``) that calls the two doctors. Nothing here knows about models,
Streamlit, files or environment variables; a doctor is any object with ``reply(turns[, params])``
yielding text pieces.

Changes from the original app (scutcyr/BianQue ``bianque_v1_v2_app.py``), all deliberate:
- the first patient message goes to a model (the original answered it with a canned greeting,
  which now lives in ``GREETING`` for the UI to show and is never part of the model context);
- ``is_question`` replaces the substring list (kept as ``is_question_original`` for comparison);
- repeats are found after normalising whitespace, punctuation and greeting fillers;
- once advice was given the advisor keeps the consultation; ``max_questions`` counts questions
  actually shown; ``advise_now`` forces advice;
- the advisor gets the plain turns (the original handed it v1's escaped prompt).
"""
from __future__ import annotations

import logging
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from bianque.prompt import DOCTOR, Turn, validate_dialogue

log = logging.getLogger(__name__)

GREETING = "我是利用人工智能技术，结合大数据训练得到的智能医疗问答模型扁鹊，你可以向我提问。"
MAX_QUESTIONS = 8
QUESTION, ADVICE = "question", "advice"
V1, V2 = "v1", "v2"

# --- the original detector -------------------------------------------------------------------
ORIGINAL_MARKERS = ("？", "?", "吗", "呢", "么", "什么", "有没有", "多少", "几次", "怎么样")


def is_question_original(text: str) -> bool:
    """The 2023 rule: any marker anywhere. Fires on 那么/什么的/怎么办 and rhetorical questions."""
    return any(marker in text for marker in ORIGINAL_MARKERS)


# --- the better detector ---------------------------------------------------------------------
# A reply is split into sentences, then each sentence into clauses. A sentence is ASKING when it
# ends in a question mark or particle and is not rhetorical, or when one of its clauses carries an
# asking marker (是否/有无/多久/请描述...) without a marker that embeds it in a statement
# (建议检查是否.../如果有没有...). The reply is a question when an asking sentence is followed by
# at most MAX_TAIL_CHARS of statement: advice that poses and answers its own question
# ("为什么会失眠呢？原因有很多……") has a long tail, a follow-up question does not.

SENTENCE_RE = re.compile(r"[^。！？!?；;\n…]+[。！？!?；;\n…]*")
CLAUSE_SPLIT_RE = re.compile(r"[，,：:]")
QUESTION_MARKS = ("？", "?")
# Statement characters allowed after the last asking sentence: one short remark ("我需要了解一下，
# 以便判断病情。" is 13) still leaves a question; an answer to a self-posed question is longer.
MAX_TAIL_CHARS = 16

# Sentence-final particles that make a question without a question mark (吗 always; 么 unless it
# closes 那么/这么/什么/怎么; 呢 only with a wh-word or a "那…呢" follow-up).
FINAL_MA = ("吗", "嘛")
FINAL_ME = "么"
NOT_QUESTION_ME = ("那么", "这么", "什么", "怎么", "为什么")  # 多么/要么 never close a statement
FINAL_NE = "呢"
NE_WH_WORDS = ("什么", "怎么", "谁")
NE_FOLLOW_UP_STARTS = ("那", "另外", "其他", "其它")

# A request to send or show results ("把检查报告发过来看看", "您可以把检查结果发给我").
REQUEST_PATTERN = r"(把|将)[^，,。]{1,14}?(发|传|拍|给)(过来|上来|上传|给我|一下|我看|来看)"
# Clause-level asking markers. Each regex names one way a doctor asks without "？".
ASKING_PATTERNS = (
    r"请问",
    r"是否",
    r"有无",
    r"([\u4e00-\u9fff])[不没]\1",  # A-not-A: 有没有, 是不是, 疼不疼, 会不会
    r"(?<!没有)(?<![没不])多(久|长时间|大(?!程度|的)|高|重)",
    r"(?<![不了没])多少(?![有会都也还分])",
    # 几 asks when it closes the clause or takes 了 ("咳嗽几天了"), not in "观察几天" / "几天后".
    r"(?<![过息察等这前后好十每])几(天|次|年|个月|周|岁|小时|回|顿|分钟)(?=了|啊|呀|$)",
    r"什么(时候|时间|样|情况|症状|药|原因引起)(?![都也的])",
    r"(?<![没])有(什么|哪些)(?!的)",
    r"(?<![不])是(什么|哪)",
    r"哪(里|儿|个|些|种|侧|边|一|位|天)",
    r"怎么样(?!才)",
    r"(?<![但就可还只也于总要真正都倒凡])是[^，,]{1,12}?还是",
    r"请(您|你)?(描述|说|讲|告诉|提供|补充|详细|具体|回忆|上传|发)",
    r"(描述|叙述|说|讲|介绍|形容)一下",
    r"(说说|讲讲|告诉我)",
    r"(能否|可否|方便)(说|讲|告诉|描述|提供)",
    REQUEST_PATTERN,
    r"(想|需要|要)(进一步|再|先)?(了解|知道|问)一下?(您|你)",
    r"需要(进一步|再|更多)?(了解|知道)",
)
# Markers that turn a clause with an asking marker into a statement about testing or conditions.
EMBEDDING_PATTERNS = (
    r"建议",
    r"如果|假如|若是|倘若|万一",
    r"无论|不管|不论",
    r"取决于|要看|视情况",
    r"不知道|不清楚|不确定",
    r"一般|通常|往往|大多",
    r"(检查|复查|化验|查|看|观察|确定|确认|判断|排除|明确|评估|注意|监测|鉴别|决定|选择)[^，,]{0,8}?(是否|有无|有没有|是不是)",
    r"(帮助|以便|用于)[^，,]{0,16}(是否|有无|有没有|什么|哪)",
    r"(需要|需|待|有待)(进一步)?(评估|确定|判断|明确|检查|观察|决定)",
    r"具体(使用|用|选择|采用)",
    r"咨询[^，,]{0,4}医生",
    r"(确定|决定|选择|判断|明确|就看|根据)[^，,]{0,8}?(什么|哪|多少|几)",
    r"比如|例如|诸如",
    r"随时|欢迎",  # closing offers: "有什么问题随时咨询", "如有疑问欢迎再来"
    r"(向|跟|和|告诉)医生",
)
# Questions that are rhetorical wherever they stand ("难道…吗？").
RHETORICAL_MARKERS = ("难道", "岂不", "岂能", "何必", "何尝", "谁不", "怎能", "哪能", "不就是", "何况", "哪里有这么", "哪有这么")
# Self-posed questions of advice ("那么该怎么办呢？", "为什么会失眠？"): rhetorical unless they
# address the patient (a second-person word), as in "您平时如何缓解？".
SELF_POSED_MARKERS = (
    "为什么", "怎么办", "如何", "怎样才能", "怎么才能", "该怎么", "应该怎么", "什么原因",
    "哪些原因", "什么是", "原因是什么", "注意什么", "注意些什么", "吃什么好", "怎么治疗",
)
SECOND_PERSON = ("你", "您", "孩子", "宝宝", "小孩", "宝贝")

# A question that addresses the patient (second person, 请问, a request for results, the usual
# history-taking items) still asks however much advice follows it ("请问现在有什么症状？平时注意
# 饮食……"): the tail limit is for questions the text poses and answers itself ("高血压能吃党参吗？
# 高血压病人可以口服党参的……"), which restate the patient's question without addressing them.
ADDRESSING_PATTERNS = (
    r"[你您](?!好)",
    r"请问",
    REQUEST_PATTERN,
    r"多久|多长时间|多大(?!的)|不舒服|什么症状|哪里|什么药|做过|查过|方便",
    r"^(有没有|是否有|有无)",
    r"(睡眠|饮食|食欲|胃口|大便|小便|精神|血压|血糖|血脂|体温|心率)[^，,]{0,4}(怎么样|如何|多少)",
)

_ADDRESSING_RE = re.compile("|".join(f"(?:{p})" for p in ADDRESSING_PATTERNS))
_ASKING_RE = re.compile("|".join(f"(?:{p})" for p in ASKING_PATTERNS))
_EMBEDDING_RE = re.compile("|".join(f"(?:{p})" for p in EMBEDDING_PATTERNS))
_CLOSERS = "。！!；;\n…～~ 　.,，、"  # what may trail a sentence besides a question mark
_TRAILING_PUNCT = _CLOSERS + "？?"


def sentences(text: str) -> list[str]:
    """Split on sentence-ending punctuation, keeping each sentence's own terminator."""
    return [s for s in (m.group().strip() for m in SENTENCE_RE.finditer(text)) if s.strip(_TRAILING_PUNCT)]


def _content_len(text: str) -> int:
    return sum(1 for ch in text if unicodedata.category(ch)[0] not in "PZSC")


def _ends_with_particle(body: str) -> bool:
    """A question particle closes the sentence (without a question mark)."""
    if body.endswith(FINAL_MA):
        return True
    if body.endswith(FINAL_ME):
        return not body.endswith(NOT_QUESTION_ME)
    if body.endswith(FINAL_NE):
        has_wh = bool(_ASKING_RE.search(body)) or any(w in body for w in NE_WH_WORDS)
        return has_wh or body.startswith(NE_FOLLOW_UP_STARTS)
    return False


def _is_rhetorical(sentence: str) -> bool:
    if any(m in sentence for m in RHETORICAL_MARKERS):
        return True
    self_posed = any(m in sentence for m in SELF_POSED_MARKERS)
    return self_posed and not any(p in sentence for p in SECOND_PERSON)


def _asking_clause(clause: str) -> bool:
    return bool(_ASKING_RE.search(clause)) and not _EMBEDDING_RE.search(clause)


def asking_reason(sentence: str) -> str | None:
    """Which rule makes one sentence ask the patient something, or None when none does."""
    body = sentence.rstrip(_CLOSERS)
    if body.endswith(QUESTION_MARKS) or _ends_with_particle(body):
        if _is_rhetorical(body):
            return None
        return "question_mark" if body.endswith(QUESTION_MARKS) else "final_particle"
    if any(_asking_clause(c) for c in CLAUSE_SPLIT_RE.split(body)):
        return "asking_phrase"
    return None


def is_asking(sentence: str) -> bool:
    """Whether one sentence asks the patient something (see the comment above the constants)."""
    return asking_reason(sentence) is not None


def question_reason(text: str) -> tuple[bool, str]:
    """(is_question, the rule that decided it): question_mark / final_particle / asking_phrase /
    addressed_question, or no_asking_sentence / long_tail for statements."""
    parts = sentences(text)
    reasons = [(i, r) for i, r in ((i, asking_reason(s)) for i, s in enumerate(parts)) if r]
    if not reasons:
        return False, "no_asking_sentence"
    last, reason = reasons[-1]
    if _content_len("".join(parts[last + 1:])) <= MAX_TAIL_CHARS:
        return True, reason
    if any(_ADDRESSING_RE.search(parts[i].lstrip("，, ")) for i, _ in reasons):
        return True, "addressed_question"
    return False, "long_tail"


def is_question(text: str) -> bool:
    """Whether a doctor reply asks the patient a question (rather than advising)."""
    decided, reason = question_reason(text)
    log.debug("is_question=%s reason=%s chars=%d", decided, reason, len(text))
    return decided


# --- repeats ---------------------------------------------------------------------------------
# Openers v1 puts in front of the same question ("你好，请问失眠多久了" == "失眠多久了？").
FILLER_PREFIXES = ("你好", "您好", "请问")
_FILLERS_RE = re.compile("^(?:" + "|".join(FILLER_PREFIXES) + ")+")


def normalise(text: str) -> str:
    """Text without whitespace, punctuation, symbols or leading fillers; NFKC, case-folded."""
    kept = "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold()
                   if unicodedata.category(ch)[0] not in "PZSC")
    return _FILLERS_RE.sub("", kept) or kept  # a reply that is only a greeting stays itself


def is_repeat(reply: str, turns: Sequence[Turn]) -> bool:
    """Whether ``reply`` says again what an earlier doctor turn said (after ``normalise``)."""
    key = normalise(reply)
    return bool(key) and any(t.role == DOCTOR and normalise(t.text) == key for t in turns)


# --- decisions -------------------------------------------------------------------------------
def stage_of(turn: Turn) -> str:
    """A doctor turn's stage; turns from callers that did not record one are classified by text."""
    if turn.stage is not None:
        return turn.stage
    return QUESTION if is_question(turn.text) else ADVICE


def questions_shown(turns: Sequence[Turn]) -> int:
    return sum(1 for t in turns if t.role == DOCTOR and stage_of(t) == QUESTION)


def decide(turns: Sequence[Turn], max_questions: int = MAX_QUESTIONS, advise_now: bool = False) -> str:
    """Who answers the last patient turn: ``"question"`` (ask v1 first) or ``"advice"`` (v2).

    Advice when asked for, once any advice was given (the advisor keeps the consultation), or
    when ``max_questions`` questions were already shown; otherwise the questioner gets a turn.
    """
    validate_dialogue(turns)
    if advise_now:
        return ADVICE
    if any(t.role == DOCTOR and stage_of(t) == ADVICE for t in turns):
        return ADVICE
    return QUESTION if questions_shown(turns) < max_questions else ADVICE


def handover_reason(reply: str, turns: Sequence[Turn]) -> str | None:
    """Why v1's ``reply`` must not be shown (``"not_question"``/``"repeat"``), or None to show it."""
    if not is_question(reply):
        return "not_question"
    if is_repeat(reply, turns):
        return "repeat"
    return None


def show_question(reply: str, turns: Sequence[Turn]) -> bool:
    """v1's reply is shown only when it is a question that was not asked before."""
    return handover_reason(reply, turns) is None


# --- orchestration ---------------------------------------------------------------------------
@dataclass
class DoctorReply:
    """One doctor turn in the making. ``chunks`` streams it; ``text()`` drains and joins it.

    ``handover`` says why v1's reply was not shown when the advisor took over (metadata only,
    for logs and tests; the rejected text itself is never kept).
    """

    stage: str
    model: str
    chunks: Iterator[str]
    handover: str | None = None
    _seen: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.chunks = self._record(self.chunks)

    def _record(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            self._seen.append(piece)
            yield piece

    def text(self) -> str:
        """The whole reply: whatever ``chunks`` has not yielded yet is consumed first."""
        for _ in self.chunks:
            pass
        return "".join(self._seen)

    def turn(self) -> Turn:
        """The doctor ``Turn`` to append to the dialogue (drains the reply)."""
        return Turn(DOCTOR, self.text(), self.stage)


def _call(doctor: Any, turns: Sequence[Turn], params: Any) -> Iterator[str]:
    """``doctor.reply(turns)``, or ``reply(turns, params)`` when per-call params were given."""
    return iter(doctor.reply(turns) if params is None else doctor.reply(turns, params))


def _lazy(doctor: Any, turns: Sequence[Turn], params: Any) -> Iterator[str]:
    """Defer even the ``reply`` call until the first chunk is wanted, so advice streams on demand."""
    yield from _call(doctor, turns, params)


class ChainOfQuestioning:
    """Route each patient turn to the questioner (v1) or the advisor (v2).

    Per-call generation settings go through ``respond(..., v1_params=..., v2_params=...)`` and
    are forwarded as ``reply(turns, params)``; left out, each doctor uses its ``default_params``.
    """

    def __init__(self, questioner: Any, advisor: Any, max_questions: int = MAX_QUESTIONS) -> None:
        if isinstance(max_questions, bool) or not isinstance(max_questions, int) or max_questions < 0:
            raise ValueError(f"max_questions must be a whole number >= 0, got {max_questions!r}")
        self.questioner = questioner
        self.advisor = advisor
        self.max_questions = max_questions

    def respond(
        self,
        turns: Sequence[Turn],
        advise_now: bool = False,
        *,
        v1_params: Any = None,
        v2_params: Any = None,
    ) -> DoctorReply:
        """The next doctor turn for ``turns`` (which must end with the patient).

        The questioner's reply is generated in full here (it is short and must be judged); the
        advisor's is not started until ``chunks`` is iterated.
        """
        if decide(turns, self.max_questions, advise_now) == QUESTION:
            text = "".join(_call(self.questioner, turns, v1_params))
            reason = handover_reason(text, turns)
            if reason is None:
                log.debug("router: stage=question model=v1 chars=%d", len(text))
                return DoctorReply(QUESTION, V1, iter([text]))
            log.debug("router: v1 reply handed over (%s)", reason)
            return DoctorReply(ADVICE, V2, _lazy(self.advisor, turns, v2_params), handover=reason)
        log.debug("router: stage=advice model=v2")
        return DoctorReply(ADVICE, V2, _lazy(self.advisor, turns, v2_params))


# --- evaluation on labelled turns ------------------------------------------------------------
SHORT_CHARS = 60  # v1's replies are short; the issue reports short (<= 60 chars) and long apart


def score(pairs: Iterable[tuple[bool, bool]]) -> dict[str, float | int]:
    """n, accuracy, precision and recall of (predicted, expected) pairs; 'question' is positive."""
    tp = fp = fn = tn = 0
    for predicted, expected in pairs:
        tp += predicted and expected
        fp += predicted and not expected
        fn += expected and not predicted
        tn += not predicted and not expected
    n = tp + fp + fn + tn
    return {
        "n": n,
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
    }


def evaluate(rows: Sequence[dict[str, Any]], detector: Any = None) -> dict[str, dict[str, float | int]]:
    """Scores of ``detector`` (default ``is_question``) on rows with ``text`` and ``label``
    (``question``/``statement``): overall, short (<= SHORT_CHARS characters) and long."""
    detector = detector or is_question
    labelled = [(detector(r["text"]), r["label"] == "question", len(r["text"]) <= SHORT_CHARS) for r in rows]
    return {
        "overall": score((p, e) for p, e, _ in labelled),
        "short": score((p, e) for p, e, s in labelled if s),
        "long": score((p, e) for p, e, s in labelled if not s),
    }


def load_labelled(path: str) -> list[dict[str, Any]]:
    """Rows of a labelled JSONL file; a malformed line stops with its line number."""
    import json

    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row.get("text"), str) or row.get("label") not in ("question", "statement"):
                    raise ValueError("needs a string 'text' and a 'label' of question|statement")
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            rows.append(row)
    return rows


def ms_per_turn(texts: Sequence[str], passes: int = 3) -> float:
    """Milliseconds ``question_reason`` takes per text: the mean over ``texts`` of the fastest of
    ``passes`` passes (the fastest pass is the least disturbed by other work on the machine)."""
    import time

    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for text in texts:
            question_reason(text)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / max(1, len(texts))


def _report(path: str, show_errors: bool) -> str:
    rows = load_labelled(path)
    lines = [f"{path}: {len(rows)} turns", "detector             subset   n    accuracy precision recall"]
    for name, detector in (("is_question", is_question), ("is_question_original", is_question_original)):
        for subset, s in evaluate(rows, detector).items():
            lines.append(f"{name:20} {subset:8} {s['n']:<4} {s['accuracy']:.3f}    {s['precision']:.3f}     {s['recall']:.3f}")
    mean_chars = sum(len(r["text"]) for r in rows) / max(1, len(rows))
    lines.append(f"speed: is_question {ms_per_turn([r['text'] for r in rows]):.3f} ms per turn "
                 f"(mean of {len(rows)} turns, {mean_chars:.0f} characters on average; fastest of 3 passes)")
    if show_errors:  # labelled development data, not patient text
        for i, row in enumerate(rows, 1):
            decided, reason = question_reason(row["text"])
            if decided != (row["label"] == "question"):
                lines.append(f"row {i}: expected {row['label']}, got {reason}: {row['text'][:80]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bianque.router --eval FILE [--errors]``: the detectors' scores on labelled turns."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bianque.router", description=main.__doc__)
    parser.add_argument("--eval", required=True, metavar="FILE", help="JSONL rows with text and label")
    parser.add_argument("--errors", action="store_true", help="also list the misjudged rows of FILE")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(_report(args.eval, args.errors) + "\n")
    except (OSError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
