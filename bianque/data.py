"""Training data for BianQue-1.0: read (input, target) CSVs and build them from dialogues.

A training row is exactly what the questioner sees and says at serving time:
``input = escape_v1(build_prompt(turns_before))`` and ``target = escape_v1(doctor_text)``.
Both go through :func:`clean_text`, the same cleaning inference applies, so a model trained on
these rows is never asked a prompt in a form it did not learn.

    python -m bianque.data build --in dialogues.jsonl --out train.csv --val-out val.csv
    python -m bianque.data check --data train.csv

Rows with an empty input or target are skipped AND counted; the counts are reported, never hidden.
Rows are patient text: this module reports counts and line numbers, never row contents.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .prompt import DOCTOR, PATIENT, Turn, build_prompt, escape_v1

INPUT_COLUMN = "input"
TARGET_COLUMN = "target"


class DataError(ValueError):
    """A data file cannot be used; the message names the file, the line and the remedy."""


@dataclass(frozen=True)
class Example:
    input: str
    target: str


@dataclass
class Dataset:
    """Examples read from one file, with what was left out and why (counts and line numbers only)."""

    examples: list[Example]
    skipped_empty: int = 0
    skipped_lines: list[int] = field(default_factory=list)

    def summary(self, name: str) -> str:
        lines = ", ".join(map(str, self.skipped_lines[:10])) + (", ..." if len(self.skipped_lines) > 10 else "")
        note = f"; skipped {self.skipped_empty} rows with an empty input or target (lines {lines})" if self.skipped_empty else ""
        return f"{name}: {len(self.examples)} examples{note}"


def clean_text(text: str) -> str:
    """The cleaning inference applies: trim the ends, escape real newlines/tabs as v1 expects.

    Everything else (full-width spaces, runs of whitespace, NFKC) is normalised by the v1
    tokenizer itself, identically for training and serving, so it is not duplicated here.
    ``str.strip`` also removes full-width spaces (U+3000), so a cell holding only those is empty.
    """
    return escape_v1(text.strip())


# ---------------------------------------------------------------- reading CSV files


def read_text(path: str | Path) -> str:
    """The file's text; a clear DataError for a missing, empty or non-UTF-8 file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # Excel writes a BOM; it is not part of the header
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8: byte 0x{raw[exc.start]:02x} at line {line} (byte offset {exc.start}) "
            "cannot be decoded; re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`)"
        ) from None
    if not text.strip():
        raise DataError(f"{path} is empty: expected a header row with the columns {INPUT_COLUMN}, {TARGET_COLUMN}")
    return text


def read_csv(
    path: str | Path, input_column: str = INPUT_COLUMN, target_column: str = TARGET_COLUMN
) -> Dataset:
    """Read (input, target) rows; extra columns are ignored, quoted multi-line fields are kept whole."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    header = [name.strip() for name in next(reader)]
    columns = [_column_index(path, header, name, flag) for name, flag in
               ((input_column, "--input-column"), (target_column, "--target-column"))]
    data = Dataset([])
    line = reader.line_num + 1  # the physical line a record starts on (records may span lines)
    for record in reader:
        if any(cell.strip() for cell in record):  # blank lines between records are not rows
            source, target = (clean_text(record[i]) if i < len(record) else "" for i in columns)
            if source and target:
                data.examples.append(Example(source, target))
            else:
                data.skipped_empty += 1
                data.skipped_lines.append(line)
        line = reader.line_num + 1
    return data


def _column_index(path: str | Path, header: list[str], name: str, flag: str) -> int:
    if name not in header:
        found = ", ".join(repr(h) for h in header)
        raise DataError(f"{path} has no column {name!r} (its header has {found}); pass {flag} NAME to use another column")
    return header.index(name)


def write_csv(path: str | Path, examples: Iterable[Example]) -> int:
    """Write ``input,target`` rows (UTF-8, quoted where needed); returns the number of rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([INPUT_COLUMN, TARGET_COLUMN])
        for ex in examples:
            writer.writerow([ex.input, ex.target])
            count += 1
    return count


# ---------------------------------------------------------------- building rows from dialogues


def parse_dialogue(obj: object, where: str) -> list[Turn]:
    """One JSONL record -> turns. A record is a list of {"role", "text"} or {"turns": [...]}."""
    if isinstance(obj, dict) and "turns" in obj:
        obj = obj["turns"]
    if not isinstance(obj, list):
        raise DataError(f"{where}: expected a list of {{\"role\", \"text\"}} objects")
    turns = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or item.get("role") not in (PATIENT, DOCTOR) or not isinstance(item.get("text"), str):
            raise DataError(f"{where}: turn {i} must be {{\"role\": \"patient\"|\"doctor\", \"text\": \"...\"}}")
        if item["role"] != (PATIENT, DOCTOR)[i % 2]:
            raise DataError(f"{where}: turn {i} breaks the patient/doctor alternation (dialogues start with the patient)")
        turns.append(Turn(item["role"], item["text"]))
    return turns


def read_dialogues(path: str | Path) -> list[list[Turn]]:
    """All dialogues of a JSONL file (blank lines skipped), with line numbers in every error."""
    dialogues = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        dialogues.append(parse_dialogue(obj, f"{path} line {number}"))
    return dialogues


def dialogue_examples(turns: Sequence[Turn]) -> tuple[list[Example], int]:
    """One example per doctor turn: the prompt inference would build before it, and that turn.

    Returns the examples and how many doctor turns were skipped for an empty prompt or reply.
    Earlier turns are cleaned the same way the app sees them (trimmed), before the prompt is built.
    """
    examples, skipped = [], 0
    for i, turn in enumerate(turns):
        if turn.role != DOCTOR:
            continue
        before = [Turn(t.role, t.text.strip()) for t in turns[:i]]
        target = clean_text(turn.text)
        if target and before[-1].text:
            examples.append(Example(clean_text(build_prompt(before)), target))
        else:
            skipped += 1
    return examples, skipped


@dataclass
class BuildReport:
    dialogues: int = 0
    short_dialogues: int = 0
    rows: int = 0
    skipped_empty: int = 0
    duplicates: int = 0


def build_examples(
    dialogues: Sequence[Sequence[Turn]], min_turns: int = 2, dedupe: bool = False,
    seen: set[Example] | None = None, report: BuildReport | None = None,
) -> list[Example]:
    """Rows for many dialogues; those shorter than ``min_turns`` turns are left out and counted.

    ``seen`` is shared between calls so that de-duplication also keeps validation rows out of
    the training set's copies.
    """
    report = report if report is not None else BuildReport()
    seen = seen if seen is not None else set()
    out = []
    for turns in dialogues:
        report.dialogues += 1
        if len(turns) < min_turns:
            report.short_dialogues += 1
            continue
        examples, skipped = dialogue_examples(turns)
        report.skipped_empty += skipped
        for ex in examples:
            if dedupe and ex in seen:
                report.duplicates += 1
                continue
            seen.add(ex)
            out.append(ex)
    report.rows += len(out)
    return out


def split(items: Sequence, val_ratio: float, seed: int) -> tuple[list, list]:
    """Seeded split of ``items`` into (train, validation), each kept in its original order."""
    if not 0.0 <= val_ratio < 1.0:
        raise DataError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_ratio)
    if val_ratio > 0 and len(items) > 1:
        n_val = max(1, n_val)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bianque.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="JSONL dialogues -> input,target CSV (one row per doctor turn)")
    build.add_argument("--in", dest="source", required=True, type=Path, help="JSONL: one dialogue per line")
    build.add_argument("--out", required=True, type=Path, help="training CSV to write")
    build.add_argument("--val-out", type=Path, help="validation CSV to write (split by dialogue)")
    build.add_argument("--val-ratio", type=float, default=None, help="share of dialogues for validation (0.1 with --val-out)")
    build.add_argument("--seed", type=int, default=42)
    build.add_argument("--min-turns", type=int, default=2, help="leave out dialogues with fewer turns (patient+doctor)")
    build.add_argument("--dedupe", action="store_true", help="drop repeated (input, target) rows")
    check = sub.add_parser("check", help="read a CSV as fine-tuning will and report its counts")
    check.add_argument("--data", required=True, type=Path)
    check.add_argument("--input-column", default=INPUT_COLUMN)
    check.add_argument("--target-column", default=TARGET_COLUMN)
    return parser


def run_build(args: argparse.Namespace) -> str:
    val_ratio = args.val_ratio if args.val_ratio is not None else (0.1 if args.val_out else 0.0)
    if val_ratio > 0 and args.val_out is None:
        raise DataError("--val-ratio needs --val-out to write the validation rows to")
    dialogues = read_dialogues(args.source)
    # split whole dialogues, not rows: rows of one dialogue share prefixes, which would leak
    train_dialogues, val_dialogues = split(dialogues, val_ratio, args.seed)
    report, seen = BuildReport(), set()
    train = build_examples(train_dialogues, args.min_turns, args.dedupe, seen, report)
    val = build_examples(val_dialogues, args.min_turns, args.dedupe, seen, report)
    if not train:
        raise DataError(f"{args.source}: no training rows were produced ({_describe(report)})")
    write_csv(args.out, train)
    note = f"{args.out}: {len(train)} rows"
    if args.val_out:
        write_csv(args.val_out, val)
        note += f"; {args.val_out}: {len(val)} rows"
    return f"{note} ({_describe(report)})"


def _describe(report: BuildReport) -> str:
    return (f"{report.dialogues} dialogues, {report.short_dialogues} shorter than --min-turns, "
            f"{report.skipped_empty} doctor turns skipped for empty text, {report.duplicates} duplicates dropped")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            print(run_build(args))
        else:
            print(read_csv(args.data, args.input_column, args.target_column).summary(str(args.data)))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
