"""`python -m bianque records list|show|export|delete|purge --db URL`: the recorded consultations.

    python -m bianque records list --json
    python -m bianque records show 12 --json
    python -m bianque records export --format csv --out train.csv   # rows for bianque.finetune
    python -m bianque records export --format jsonl --out dialogues.jsonl  # for bianque.data build
    python -m bianque records delete 12
    python -m bianque records purge --older-than 30d

``show`` prints the consultation to the clinician who asked for it; nothing is logged.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .data import INPUT_COLUMN, TARGET_COLUMN
from .records import DEFAULT_URL, RecordsError, open_store, parse_age


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bianque records", description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=None, help=f"SQLAlchemy database URL (default: $BIANQUE_RECORD or {DEFAULT_URL})")
    sub = parser.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="the recorded consultations, newest first")
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one consultation with its turns and feedback")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    exp = sub.add_parser("export", help="fine-tuning rows (csv) or dialogues (jsonl)")
    exp.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")
    rm = sub.add_parser("delete", help="really delete a consultation, its turns and feedback")
    rm.add_argument("id", type=int)
    purge = sub.add_parser("purge", help="delete consultations older than an age (retention)")
    purge.add_argument("--older-than", required=True, help="e.g. 30d, 12h, 2w")
    for p in (ls, show, exp, rm, purge):  # --db is accepted after the action too
        p.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None) -> int:
    import os

    out = stdout or sys.stdout
    args = build_parser().parse_args(argv)
    url = args.db or os.environ.get("BIANQUE_RECORD") or DEFAULT_URL
    if url.lower() in ("1", "true", "yes", "on"):
        url = DEFAULT_URL
    try:
        age = parse_age(args.older_than) if args.action == "purge" else None
        if url.startswith("sqlite:///"):  # reading must not create an empty database
            path = url[len("sqlite:///"):]
            if path and path != ":memory:" and not Path(path).exists():
                raise RecordsError(f"no records database at {path} (nothing has been recorded there)")
        store = open_store(url)
        try:
            return run(store, args, age, out)
        finally:
            store.close()
    except RecordsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


def run(store, args: argparse.Namespace, age, out: TextIO) -> int:
    if args.action == "list":
        items = store.list_consultations()
        if args.json:
            out.write(json.dumps(items, ensure_ascii=False) + "\n")
        else:
            for c in items:
                out.write(f"{c['id']}\t{c['created_at']}\t{c['app']}\t{c['turns']} turns\t"
                          f"{c['questions']} questions\tup {c['ratings']['up']} down {c['ratings']['down']}\n")
    elif args.action == "show":
        item = store.get_consultation(args.id)
        if args.json:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
        else:
            out.write(f"#{item['id']} {item['app']} {item['created_at']}\n")
            for t in item["turns"]:
                out.write(f"{'病人' if t['role'] == 'patient' else '医生'}：{t['text']}\n")
                fb = t["feedback"]
                if fb:
                    out.write(f"  [{fb['rating'] or '-'}] better question: {fb['better_question'] or '-'}; "
                              f"advise now: {fb['advise_now']}; comment: {fb['comment'] or '-'}\n")
    elif args.action == "export":
        text, count = export_text(store, args.format)
        if args.out is None:
            out.write(text)
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_bytes(text.encode("utf-8"))
            sys.stderr.write(f"{args.out}: {count} {'rows' if args.format == 'csv' else 'dialogues'}\n")
    elif args.action == "delete":
        if not store.delete_consultation(args.id):
            raise RecordsError(f"no consultation {args.id}")
        sys.stderr.write(f"deleted consultation {args.id}\n")
    else:
        sys.stderr.write(f"deleted {store.purge(age)} consultations older than {args.older_than}\n")
    return 0


def export_text(store, fmt: str) -> tuple[str, int]:
    """The export as text, and its number of rows (csv) or dialogues (jsonl): what ``export``
    writes and what the review page downloads. The CSV is exactly what bianque.data.write_csv
    writes (``input,target``, UTF-8, quoted where needed), which bianque.finetune reads."""
    if fmt == "csv":
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow([INPUT_COLUMN, TARGET_COLUMN])
        rows = store.export_rows()
        writer.writerows([ex.input, ex.target] for ex in rows)
        return buffer.getvalue(), len(rows)
    dialogues = store.export_dialogues()
    return "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues), len(dialogues)


if __name__ == "__main__":
    sys.exit(main())
