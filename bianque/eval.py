"""`python -m bianque eval`: replay real dialogues and score the doctor under test against the real one.

    python -m bianque eval --data dialogues.jsonl --mode v1 --v1-model runs/x --out runs/x-eval
    python -m bianque eval --data val.csv --mode coq --out runs/coq-eval --limit 200 --seed 0
    python -m bianque eval --compare runs/base-eval runs/x-eval --out runs/compare

Teacher forcing: at every doctor position of a real dialogue the system under test (``v1``,
``v2`` or the Chain of Questioning ``coq``) is given the real history up to that point and writes
the next doctor turn; the real doctor's turn is the reference. The question detector
(``bianque.router.question_reason``) judges both turns, so the figures say how often, and when,
the model asks compared with a real doctor. Output folder: ``results.jsonl`` (one generated turn
per line), ``summary.json`` and ``report.md`` with PNG plots.

Input: dialogue JSONL (the format ``python -m bianque.data build`` reads) or an ``input,target``
CSV (the fine-tuning rows; consecutive rows that extend one another are one dialogue). Malformed
lines are reported with their line numbers, skipped and counted in the summary. Logs carry counts,
line numbers and timings only, never dialogue text.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .data import DataError, INPUT_COLUMN, TARGET_COLUMN, parse_dialogue, read_text
from .prompt import DOCTOR, LABELS, PATIENT, Turn, unescape_v1
from .router import is_asking, is_repeat, normalise, question_reason, sentences

MODES = ("v1", "v2", "coq")
QUESTION, STATEMENT = "question", "statement"
STAGES = (QUESTION, STATEMENT)
PLOTS = ("stage_agreement.png", "questions_before_advice.png", "lengths.png")
COMPARED = ("n", "skipped", "reference_question_rate", "question_rate", "stage_agreement",
            "questions_before_advice", "reference_questions_before_advice", "repeated_question_rate",
            "length_mean", "reference_length_mean", "rouge_l", "bleu_4", "corpus_bleu_4")


def _say(message: str) -> None:
    """A status line on stderr (counts, line numbers, paths; never dialogue text)."""
    sys.stderr.write(message + "\n")


# ---------------------------------------------------------------- reading dialogues


@dataclass(frozen=True)
class Position:
    """One doctor position of a real dialogue: the history before it and the real doctor's turn."""

    dialogue: str  # "line<N>": the file line the dialogue (its first CSV row) starts on
    line: int  # the file line this position comes from
    index: int  # how many doctor turns came before it in the dialogue
    history: tuple[Turn, ...]
    reference: str


@dataclass
class Loaded:
    """Positions read from a file, with what was left out (line numbers and reasons, never text)."""

    format: str
    positions: list[Position] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # malformed lines
    empty: int = 0  # doctor positions left out for an empty doctor turn or an empty patient turn before it


def read_positions(path: str | Path) -> Loaded:
    """Every doctor position of a dialogue JSONL or ``input,target`` CSV file, in file order."""
    text = read_text(path)
    return _read_csv(path, text) if detect_format(path, text) == "csv" else _read_jsonl(text)


def detect_format(path: str | Path, text: str) -> str:
    """``csv`` or ``jsonl``: by the file's suffix, else by its first non-blank character."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".jsonl", ".json"):
        return "csv" if suffix == ".csv" else "jsonl"
    return "jsonl" if text.lstrip()[:1] in ("[", "{") else "csv"


def _read_jsonl(text: str) -> Loaded:
    loaded = Loaded("jsonl")
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            turns = parse_dialogue(json.loads(line), f"line {number}")
        except json.JSONDecodeError as exc:
            loaded.skipped.append((number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except DataError as exc:
            loaded.skipped.append((number, str(exc).removeprefix(f"line {number}: ")))
            continue
        _add_dialogue(loaded, turns, number)
    return loaded


def _add_dialogue(loaded: Loaded, turns: Sequence[Turn], number: int) -> None:
    """A position per doctor turn; turns are trimmed as ``bianque.data build`` trims them."""
    turns = [Turn(t.role, t.text.strip()) for t in turns]
    for i, turn in enumerate(turns):
        if turn.role != DOCTOR:
            continue
        if turn.text and turns[i - 1].text:
            loaded.positions.append(Position(f"line{number}", number, i // 2, tuple(turns[:i]), turn.text))
        else:
            loaded.empty += 1


_TURN_START = re.compile(r"\n(?=(?:病人|医生)：)")


def parse_prompt(prompt: str) -> list[Turn]:
    """The turns of a fine-tuning ``input`` (``病人：p1\\n医生：d1\\n…\\n病人：pn\\n医生：``, unescaped)."""
    ending = "\n" + LABELS[DOCTOR]
    if not prompt.endswith(ending):
        raise ValueError("input does not end with '\\n医生：' (expected 病人：…\\n医生：)")
    turns = []
    for i, part in enumerate(_TURN_START.split(prompt[: -len(ending)])):
        role = (PATIENT, DOCTOR)[i % 2]
        if not part.startswith(LABELS[role]):
            raise ValueError(f"turn {i} of the input does not start with '{LABELS[role]}'")
        turns.append(Turn(role, part[len(LABELS[role]):].strip()))
    if turns[-1].role != PATIENT:
        raise ValueError("the input's last turn is not the patient's")
    return turns


def _read_csv(path: str | Path, text: str) -> Loaded:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader)]
    for name in (INPUT_COLUMN, TARGET_COLUMN):
        if name not in header:
            raise DataError(f"{path} has no column {name!r} (its header has {', '.join(map(repr, header))}); "
                            "expected the fine-tuning format input,target")
    columns = header.index(INPUT_COLUMN), header.index(TARGET_COLUMN)
    loaded, previous = Loaded("csv"), None
    number = reader.line_num + 1  # the physical line a record starts on (records may span lines)
    for record in reader:
        if any(cell.strip() for cell in record):
            previous = _csv_row(loaded, record, columns, number, previous)
        number = reader.line_num + 1
    return loaded


def _csv_row(loaded: Loaded, record: list[str], columns: tuple[int, int], number: int,
             previous: Position | None) -> Position | None:
    """Add one row's position; rows that extend the previous row's dialogue join its dialogue."""
    if len(record) <= max(columns):
        loaded.skipped.append((number, f"has {len(record)} fields, fewer than the header's input and target"))
        return None
    source, target = (unescape_v1(record[i].strip()) for i in columns)
    if not source or not target:
        loaded.skipped.append((number, f"empty {'input' if not source else 'target'}"))
        return None
    try:
        history = tuple(parse_prompt(source))
    except ValueError as exc:
        loaded.skipped.append((number, str(exc)))
        return None
    if not history[-1].text:
        loaded.empty += 1
        return None
    dialogue = f"line{number}"
    if previous is not None and history[:-1] == previous.history + (Turn(DOCTOR, previous.reference),):
        dialogue = previous.dialogue
    position = Position(dialogue, number, len(history) // 2, history, target.strip())
    loaded.positions.append(position)
    return position


# ---------------------------------------------------------------- metrics


def char_tokens(text: str) -> list[str]:
    """Character tokens (whitespace dropped): the unit of the char-level ROUGE-L and BLEU-4."""
    return [ch for ch in text if not ch.isspace()]


class _CharTokenizer:
    """rouge-score's tokenizer interface (its default keeps only ASCII letters and digits)."""

    def tokenize(self, text: str) -> list[str]:
        return char_tokens(text)


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """Char-level ROUGE-L F1 (rouge-score's LCS), in [0, 1]; 0 when either side is empty."""
    global _scorer
    if not char_tokens(prediction) or not char_tokens(reference):
        return 0.0
    if _scorer is None:
        from rouge_score.rouge_scorer import RougeScorer

        _scorer = RougeScorer(["rougeL"], tokenizer=_CharTokenizer())
    return _scorer.score(reference, prediction)["rougeL"].fmeasure


def bleu_4(prediction: str, reference: str) -> float:
    """Char-level sentence BLEU-4 with nltk's smoothing method 3 (as ChatGLM's P-Tuning evaluation)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyp, ref = char_tokens(prediction), char_tokens(reference)
    if not hyp or not ref:
        return 0.0
    with warnings.catch_warnings():  # nltk warns about short sentences; smoothing handles them
        warnings.simplefilter("ignore")
        return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method3))


def corpus_bleu_4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Char-level corpus BLEU-4 (n-gram counts pooled over all turns), smoothing method 3."""
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    pairs = [(char_tokens(p), char_tokens(r)) for p, r in zip(predictions, references)]
    pairs = [(p, r) for p, r in pairs if r]
    if not any(p for p, _ in pairs):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(corpus_bleu([[r] for _, r in pairs], [p for p, _ in pairs],
                                 smoothing_function=SmoothingFunction().method3))


def stage(text: str) -> tuple[str, str]:
    """(question|statement, the detector's reason)."""
    asks, reason = question_reason(text)
    return (QUESTION if asks else STATEMENT), reason


def repeated_question(text: str, history: Sequence[Turn]) -> bool:
    """Whether a generated question asks what the doctor already asked earlier in the dialogue.

    Under teacher forcing every earlier doctor question was answered by the real patient, so this
    counts questions already asked and already answered: the whole reply said before, or one of its
    asking sentences equal to, or contained in, an earlier asking sentence (after ``normalise``).
    """
    if is_repeat(text, history):
        return True
    asked = [normalise(s) for t in history if t.role == DOCTOR for s in sentences(t.text) if is_asking(s)]
    mine = [normalise(s) for s in sentences(text) if is_asking(s)]
    return any(m and any(m == a or (len(m) >= 4 and m in a) for a in asked) for m in mine)


def questions_before_advice(stages: Sequence[str]) -> int:
    """How many turns were questions before the first statement (all of them if none was one)."""
    return next((i for i, s in enumerate(stages) if s == STATEMENT), len(stages))


def score_turn(position: Position, text: str) -> dict[str, Any]:
    """The per-turn fields of results.jsonl that depend only on the generated and the real turn."""
    generated, reason = stage(text)
    reference, reference_reason = stage(position.reference)
    return {
        "stage": generated, "reason": reason,
        "reference_stage": reference, "reference_reason": reference_reason,
        "agree": generated == reference,
        "repeated": generated == QUESTION and repeated_question(text, position.history),
        "length": len(text), "reference_length": len(position.reference),
        "rouge_l": rouge_l(text, position.reference), "bleu_4": bleu_4(text, position.reference),
    }


def _rate(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.fmean(values) if values else 0.0


def by_dialogue(results: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in results:
        groups.setdefault(row["dialogue"], []).append(row)
    return groups


def dialogue_summary(name: str, rows: Sequence[dict]) -> dict[str, Any]:
    return {
        "dialogue": name, "line": rows[0]["line"], "positions": len(rows),
        "question_rate": _rate(r["stage"] == QUESTION for r in rows),
        "reference_question_rate": _rate(r["reference_stage"] == QUESTION for r in rows),
        "questions_before_advice": questions_before_advice([r["stage"] for r in rows]),
        "reference_questions_before_advice": questions_before_advice([r["reference_stage"] for r in rows]),
        "repeated_questions": sum(r["repeated"] for r in rows),
        "stage_agreement": _rate(r["agree"] for r in rows),
        "rouge_l": _mean(r["rouge_l"] for r in rows), "bleu_4": _mean(r["bleu_4"] for r in rows),
    }


def confusion(results: Sequence[dict]) -> dict[str, dict[str, int]]:
    """Counts by the real doctor's stage (rows) and the generated turn's stage (columns)."""
    counts = Counter((r["reference_stage"], r["stage"]) for r in results)
    return {ref: {gen: counts[ref, gen] for gen in STAGES} for ref in STAGES}


def summarise(results: Sequence[dict], loaded: Loaded) -> dict[str, Any]:
    """summary.json's figures (run settings are added by the caller)."""
    dialogues = [dialogue_summary(name, rows) for name, rows in by_dialogue(results).items()]
    lengths = [r["length"] for r in results]
    reference_lengths = [r["reference_length"] for r in results]
    questions = [r for r in results if r["stage"] == QUESTION]
    return {
        "n": len(results), "dialogues": len(dialogues),
        "skipped": len(loaded.skipped),
        "skipped_lines": [{"line": line, "reason": reason} for line, reason in loaded.skipped],
        "empty_positions": loaded.empty,
        "reference_question_rate": _rate(r["reference_stage"] == QUESTION for r in results),
        "question_rate": _rate(r["stage"] == QUESTION for r in results),
        "stage_agreement": _rate(r["agree"] for r in results),
        "stage_confusion": confusion(results),
        "questions_before_advice": _mean(d["questions_before_advice"] for d in dialogues),
        "reference_questions_before_advice": _mean(d["reference_questions_before_advice"] for d in dialogues),
        "repeated_questions": len([r for r in questions if r["repeated"]]),
        "repeated_question_rate": _rate(r["repeated"] for r in questions),
        "length_mean": _mean(lengths), "length_median": statistics.median(lengths) if lengths else 0,
        "reference_length_mean": _mean(reference_lengths),
        "reference_length_median": statistics.median(reference_lengths) if reference_lengths else 0,
        "rouge_l": _mean(r["rouge_l"] for r in results),
        "bleu_4": _mean(r["bleu_4"] for r in results),
        "corpus_bleu_4": corpus_bleu_4([r["text"] for r in results], [r["reference"] for r in results]),
        "reasons": dict(Counter(r["reason"] for r in results).most_common()),
        "reference_reasons": dict(Counter(r["reference_reason"] for r in results).most_common()),
        "models_used": dict(Counter(r["model"] for r in results).most_common()),
        "handovers": dict(Counter(r["handover"] for r in results if r["handover"]).most_common()),
        "seconds": sum(r["seconds"] for r in results),
        "per_dialogue": dialogues,
    }


# ---------------------------------------------------------------- the system under test


@dataclass(frozen=True)
class Generated:
    text: str
    model: str  # v1 or v2: who wrote it
    route: str | None = None  # coq: the router's stage (question/advice)
    handover: str | None = None  # coq: why v1's reply was not shown


def load_doctors(mode: str, settings: Any, batch: int) -> dict[str, Any]:
    """The models this mode needs: a running server's (``--server``) or local ones; with ``batch`` > 1
    local models answer through the batching engine, ``batch`` replies at a time."""
    if settings.server:
        from .cli import remote_doctors

        return remote_doctors(mode, settings)
    doctors, max_batch = {}, batch if batch > 1 else 0
    if mode in ("v1", "coq"):
        from .t5 import load_questioner

        s = settings.v1
        _say(f"loading BianQue-1.0 from {s.model} on {s.device} ...")
        doctors["v1"] = load_questioner(s.model, device=s.device, dtype=s.dtype, max_batch=max_batch)
    if mode in ("v2", "coq"):
        from .glm import load_advisor

        s = settings.v2
        _say(f"loading BianQue-2.0 from {s.model} on {s.device} ...")
        doctors["v2"] = load_advisor(s.model, device=s.device, dtype=s.dtype, quantize=s.quantize, compile=s.compile,
                                     max_batch=max_batch)
    return doctors


def make_system(mode: str, doctors: dict[str, Any], args: argparse.Namespace, max_questions: int,
                seed: int) -> Callable[[Sequence[Turn]], Generated]:
    """``system(history) -> Generated``; every reply samples with its own generator seeded ``seed``,
    so a run is reproducible whatever the order or concurrency of the replies."""
    from .cli import WithParams, session_params

    bound = {v: WithParams(d, replace(session_params(d, args, v), seed=seed)) for v, d in doctors.items()}
    if mode != "coq":
        return lambda history: Generated("".join(bound[mode].reply(list(history))), mode)
    from .router import ChainOfQuestioning

    server = getattr(doctors["v1"], "server", None)
    if server is not None:  # a server routes itself; its reply names the stage and the model

        def remote(history: Sequence[Turn]) -> Generated:
            reply = server.respond(list(history), False, max_questions, bound["v1"].params, bound["v2"].params)
            return Generated("".join(reply.chunks), reply.model, reply.stage)

        return remote
    router = ChainOfQuestioning(bound["v1"], bound["v2"], max_questions=max_questions)

    def system(history: Sequence[Turn]) -> Generated:
        reply = router.respond(list(history))
        return Generated(reply.text(), reply.model, reply.stage, reply.handover)

    return system


def replay(positions: Sequence[Position], system: Callable[[Sequence[Turn]], Generated],
           workers: int = 1) -> list[dict]:
    """Ask ``system`` at every position (``workers`` at a time) and score each reply, in file order."""
    from tqdm import tqdm

    def one(position: Position) -> dict:
        start = time.perf_counter()
        out = system(position.history)
        seconds = time.perf_counter() - start
        return {
            "dialogue": position.dialogue, "line": position.line, "position": position.index,
            "history_turns": len(position.history), "model": out.model, "route": out.route,
            "handover": out.handover, "text": out.text, "reference": position.reference,
            **score_turn(position, out.text), "seconds": round(seconds, 4),
        }

    bar = tqdm(total=len(positions), unit="turn", desc="eval", file=sys.stderr, dynamic_ncols=True)
    results = []
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for row in pool.map(one, positions):
            results.append(row)
            bar.update(1)
    return results


# ---------------------------------------------------------------- writing the output folder


def write_results(out: Path, results: Sequence[dict]) -> None:
    with (out / "results.jsonl").open("w", encoding="utf-8") as f:
        for row in results:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_run(out: Path, summary: dict, results: Sequence[dict]) -> None:
    """stage_agreement.png, questions_before_advice.png and lengths.png (labels in English: no CJK font needed)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    matrix = [[summary["stage_confusion"][ref][gen] for gen in STAGES] for ref in STAGES]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            dark = count > max(max(r) for r in matrix) / 2
            ax.text(j, i, str(count), ha="center", va="center", fontsize=14, color="white" if dark else "black")
    ax.set_xticks(range(2), STAGES)
    ax.set_yticks(range(2), STAGES)
    ax.set(xlabel="generated", ylabel="real doctor", title=f"stage agreement {summary['stage_agreement']:.1%}")
    _save(plt, fig, out / PLOTS[0])
    generated = [d["questions_before_advice"] for d in summary["per_dialogue"]]
    reference = [d["reference_questions_before_advice"] for d in summary["per_dialogue"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = [b - 0.5 for b in range(max(generated + reference + [1]) + 2)]
    ax.hist([generated, reference], bins=bins, label=["generated", "real doctor"])
    ax.set(xlabel="questions before the first advice (per dialogue)", ylabel="dialogues")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    _save(plt, fig, out / PLOTS[1])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist([[r["length"] for r in results], [r["reference_length"] for r in results]], bins=20,
            label=["generated", "real doctor"])
    ax.set(xlabel="reply length (characters)", ylabel="turns")
    ax.legend()
    _save(plt, fig, out / PLOTS[2])


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def report_markdown(summary: dict) -> str:
    s = summary
    lines = [f"# Evaluation: {s['mode']} on {s['data']}", "",
             f"Models: {', '.join(f'{k} = {v}' for k, v in s['models'].items())}; seed {s['seed']}; "
             f"{s['n']} doctor positions in {s['dialogues']} dialogues (teacher forcing); "
             f"{s['skipped']} malformed lines skipped; {s['empty_positions']} empty positions left out.", "",
             "## Headline", ""]
    lines += _table(("metric", "generated", "real doctor"), [
        ("question rate", s["question_rate"], s["reference_question_rate"]),
        ("questions before first advice (mean per dialogue)", s["questions_before_advice"],
         s["reference_questions_before_advice"]),
        ("reply length, mean (chars)", s["length_mean"], s["reference_length_mean"]),
        ("reply length, median (chars)", s["length_median"], s["reference_length_median"]),
        ("stage agreement", s["stage_agreement"], "-"),
        ("repeated questions (share of questions)", s["repeated_question_rate"], "-"),
        ("ROUGE-L (char F1, mean)", s["rouge_l"], "-"),
        ("BLEU-4 (char, sentence mean)", s["bleu_4"], "-"),
        ("BLEU-4 (char, corpus)", s["corpus_bleu_4"], "-"),
    ])
    lines += ["", "## Stage agreement", "", "Rows: the real doctor's turn; columns: the generated turn "
              "(both judged by the question detector).", ""]
    lines += _table(("real \\ generated", *STAGES), [(ref, *s["stage_confusion"][ref].values()) for ref in STAGES])
    lines += ["", f"![stage agreement]({PLOTS[0]})", "", f"![questions before advice]({PLOTS[1]})", "",
              f"![reply lengths]({PLOTS[2]})", "", "## Detector reasons", ""]
    reasons = sorted(set(s["reasons"]) | set(s["reference_reasons"]))
    lines += _table(("reason", "generated", "real doctor"),
                    [(r, s["reasons"].get(r, 0), s["reference_reasons"].get(r, 0)) for r in reasons])
    if s["models_used"] and s["mode"] == "coq":
        lines += ["", "## Chain of Questioning", "", "Turns written by each model: " + ", ".join(
            f"{k} {v}" for k, v in s["models_used"].items()) + "; v1 replies handed over: " +
            (", ".join(f"{k} {v}" for k, v in s["handovers"].items()) or "none") + "."]
    lines += ["", "## Per dialogue", ""]
    lines += _table(("dialogue", "positions", "question rate", "real", "questions before advice", "real",
                     "repeated", "agreement", "ROUGE-L", "BLEU-4"),
                    [(d["dialogue"], d["positions"], d["question_rate"], d["reference_question_rate"],
                      d["questions_before_advice"], d["reference_questions_before_advice"], d["repeated_questions"],
                      d["stage_agreement"], d["rouge_l"], d["bleu_4"]) for d in s["per_dialogue"]])
    if s["skipped_lines"]:
        lines += ["", "## Skipped lines", ""] + [f"- line {x['line']}: {x['reason']}" for x in s["skipped_lines"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- comparing two runs


def compare(a: Path, b: Path, out: Path) -> dict[str, Any]:
    """compare.json, compare.md and compare.png: two runs' headline figures side by side."""
    runs = [_read_summary(a), _read_summary(b)]
    names = [a.name or str(a), b.name or str(b)]
    rows = {key: [run.get(key) for run in runs] for key in COMPARED}
    result = {"runs": [str(a), str(b)], "data": [r["data"] for r in runs], "mode": [r["mode"] for r in runs],
              "metrics": {k: {"a": va, "b": vb, "difference": _difference(va, vb)} for k, (va, vb) in rows.items()}}
    (out / "compare.json").write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = [f"# Comparison: {names[0]} vs {names[1]}", "",
             f"A = {a} ({runs[0]['mode']}, {runs[0]['data']}); B = {b} ({runs[1]['mode']}, {runs[1]['data']}).", ""]
    if runs[0]["data"] != runs[1]["data"] or runs[0]["n"] != runs[1]["n"]:
        lines += ["**The two runs did not evaluate the same positions (data file or n differ): "
                  "their figures are not directly comparable.**", ""]
    lines += _table(("metric", f"A: {names[0]}", f"B: {names[1]}", "B - A"),
                    [(k, va, vb, _difference(va, vb)) for k, (va, vb) in rows.items()])
    lines += ["", "![comparison](compare.png)"]
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot_compare(out / "compare.png", names, runs)
    return result


def _read_summary(run: Path) -> dict:
    path = run / "summary.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; --compare takes two output folders of `python -m bianque eval`") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _difference(a: Any, b: Any) -> float | int | None:
    return b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _plot_compare(path: Path, names: Sequence[str], runs: Sequence[dict]) -> None:
    plt = _pyplot()
    keys = ("question_rate", "reference_question_rate", "stage_agreement", "repeated_question_rate", "rouge_l", "bleu_4")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.4
    for i, (name, run) in enumerate(zip(names, runs)):
        ax.bar([k + (i - 0.5) * width for k in range(len(keys))], [run.get(key, 0) or 0 for key in keys], width,
               label=name)
    ax.set_xticks(range(len(keys)), [k.replace("_", " ") for k in keys], rotation=20, ha="right")
    ax.set(ylim=(0, 1), ylabel="rate / score")
    ax.legend()
    _save(plt, fig, path)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_generation_arguments
    from .settings import add_settings_arguments, env_help

    parser = argparse.ArgumentParser(
        prog="python -m bianque eval", description="Replay real dialogues (teacher forcing) and score the replies "
        "against the real doctor's; or compare two evaluation folders.", epilog=env_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dialogue JSONL (as bianque.data build reads) or input,target CSV")
    parser.add_argument("--mode", choices=MODES, help="v1 asks, v2 advises, coq: the Chain of Questioning")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must not hold a run)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N doctor positions, in file order")
    parser.add_argument("--batch", type=int, default=1,
                        help="replies generated together: through the batching engine, or requests at once "
                             "to --server (default 1)")
    parser.add_argument("--force", action="store_true", help="overwrite the outputs of an earlier run in --out")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"),
                        help="put two evaluation folders side by side (no model is loaded)")
    add_settings_arguments(parser)
    add_generation_arguments(parser)
    return parser


def prepare_out(out: Path, names: Sequence[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    held = [n for n in names if (out / n).exists()]
    if held and not force:
        raise DataError(f"--out {out} already holds {', '.join(held)}; choose another folder or pass --force")
    out.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, replay, score and write one run; returns the summary."""
    import torch

    from .settings import settings_from_args

    if args.limit is not None and args.limit < 1:
        raise DataError(f"--limit must be at least 1, got {args.limit}")
    if args.batch < 1:
        raise DataError(f"--batch must be at least 1, got {args.batch}")
    settings = settings_from_args(args)  # every setting checked before any file or model is read
    loaded = read_positions(args.data)
    for line, reason in loaded.skipped:
        _say(f"{args.data} line {line}: skipped: {reason}")
    positions = loaded.positions[: args.limit] if args.limit else loaded.positions
    if not positions:
        raise DataError(f"{args.data}: no doctor position to evaluate ({len(loaded.skipped)} malformed lines "
                        f"skipped, {loaded.empty} empty positions)")
    prepare_out(args.out, ("results.jsonl", "summary.json", "report.md", *PLOTS), args.force)
    seed = 0 if settings.seed is None else settings.seed
    torch.manual_seed(seed)
    doctors = load_doctors(args.mode, settings, args.batch)
    system = make_system(args.mode, doctors, args, settings.max_questions, seed)
    results = replay(positions, system, args.batch)
    summary = {"data": str(args.data), "format": loaded.format, "mode": args.mode, "seed": seed,
               "limit": args.limit, "models": {v: d.source for v, d in doctors.items()},
               **summarise(results, loaded)}
    write_results(args.out, results)
    (args.out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    plot_run(args.out, summary, results)
    (args.out / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import ModelLoadError
    from .serving.remote import RemoteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.compare and (args.data is None or args.mode is None):
        parser.error("--data and --mode are required (or --compare A B)")
    try:
        if args.compare:
            prepare_out(args.out, ("compare.json", "compare.md", "compare.png"), args.force)
            compare(*args.compare, args.out)
            _say(f"wrote {args.out}/compare.md, compare.json, compare.png")
            return 0
        summary = run(args)
    except (DataError, ModelLoadError, RemoteError, ValueError) as exc:
        _say(f"error: {exc}")
        return 2
    _say(f"wrote {args.out}/results.jsonl, summary.json, report.md: n={summary['n']} skipped={summary['skipped']} "
          f"question_rate={summary['question_rate']:.3f} (real doctor {summary['reference_question_rate']:.3f}) "
          f"stage_agreement={summary['stage_agreement']:.3f} rouge_l={summary['rouge_l']:.3f} "
          f"bleu_4={summary['bleu_4']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
