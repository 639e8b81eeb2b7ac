"""bianque.data: the CSV reader's quirks and errors, and the JSONL -> CSV builder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bianque.data import (
    DataError,
    Example,
    build_examples,
    clean_text,
    dialogue_examples,
    main,
    read_csv,
    read_dialogues,
    split,
    write_csv,
)
from bianque.prompt import DOCTOR, PATIENT, Turn, build_prompt, escape_v1

# A CSV as real exports look: BOM, padded header names, extra columns in front, a quoted field
# spanning two lines, a target of full-width spaces only, an empty input, stray whitespace, a
# blank line between records, and a short record missing its last cells.
QUIRKY_CSV = (
    "\ufeffanswer_choice, input ,target,type\n"
    'x,病人：头疼三天了\\n医生：,  多久了？ ,q\n'
    'x,"病人：我咳嗽\n医生：",有没有发热？,q\n'
    "x,病人：失眠\\n医生：,\u3000\u3000,q\n"
    "x,,建议休息。,a\n"
    "\n"
    "x,\u3000病人：腹痛\\n医生：\t,建议到医院做个检查。,a\n"
    "x,病人：牙疼\\n医生：\n"
)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def test_read_csv_handles_the_quirks_and_counts_skipped_rows(tmp_path):
    data = read_csv(write(tmp_path, "train.csv", QUIRKY_CSV))
    assert data.examples == [
        Example("病人：头疼三天了\\n医生：", "多久了？"),
        Example("病人：我咳嗽\\n医生：", "有没有发热？"),  # the real newline is escaped as inference does
        Example("病人：腹痛\\n医生：", "建议到医院做个检查。"),
    ]
    assert data.skipped_empty == 3
    assert data.skipped_lines == [5, 6, 9]  # physical lines, counting the two-line record
    assert "3 examples" in data.summary("train.csv") and "skipped 3 rows" in data.summary("train.csv")


def test_read_csv_column_names_are_options(tmp_path):
    path = write(tmp_path, "d.csv", "prompt,reply\n病人：头晕\\n医生：,多久了？\n")
    assert read_csv(path, "prompt", "reply").examples == [Example("病人：头晕\\n医生：", "多久了？")]
    with pytest.raises(DataError, match=r"no column 'input' .*'prompt', 'reply'.*--input-column"):
        read_csv(path)
    with pytest.raises(DataError, match=r"no column 'answer'.*--target-column"):
        read_csv(path, "prompt", "answer")


@pytest.mark.parametrize("content", ["", "\n \n", "\ufeff"])
def test_empty_file_is_a_clear_error(tmp_path, content):
    with pytest.raises(DataError, match="is empty: expected a header row with the columns input, target"):
        read_csv(write(tmp_path, "e.csv", content))


def test_non_utf8_file_names_the_line_and_byte(tmp_path):
    content = "input,target\n病人：头疼\\n医生：,多久了？\n".encode() + "病人：咳嗽,有没有发热？\n".encode("gbk")
    first_bad = len("input,target\n病人：头疼\\n医生：,多久了？\n".encode())
    with pytest.raises(DataError) as err:
        read_csv(write(tmp_path, "gbk.csv", content))
    assert f"is not UTF-8: byte 0x{content[first_bad]:02x} at line 3 (byte offset {first_bad})" in str(err.value)
    assert "re-save the file as UTF-8" in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_csv(tmp_path / "nope.csv")


def test_clean_text_trims_and_escapes_like_inference():
    assert clean_text("\u3000 建议休息。\n多喝水\t \n") == "建议休息。\\n多喝水"
    assert clean_text("\u3000 \t\n") == ""


DIALOGUE = [
    Turn(PATIENT, "头疼三天了"),
    Turn(DOCTOR, "有没有发热？"),
    Turn(PATIENT, "没有\n就是疼"),
    Turn(DOCTOR, "建议多喝水。\n注意休息"),
    Turn(PATIENT, "好的"),
]


def test_builder_rows_are_the_inference_prompt_and_reply():
    examples, skipped = dialogue_examples(DIALOGUE)
    assert skipped == 0
    assert examples == [
        Example("病人：头疼三天了\\n医生：", "有没有发热？"),
        Example("病人：头疼三天了\\n医生：有没有发热？\\n病人：没有\\n就是疼\\n医生：", "建议多喝水。\\n注意休息"),
    ]
    # the same function the questioner uses to build its prompt, for every doctor turn
    for ex, i in zip(examples, (1, 3)):
        assert ex.input == escape_v1(build_prompt(DIALOGUE[:i]))
        assert ex.target == escape_v1(DIALOGUE[i].text)


def test_builder_skips_and_counts_empty_turns_and_short_dialogues():
    empty_reply = [Turn(PATIENT, "咳嗽"), Turn(DOCTOR, " \u3000"), Turn(PATIENT, "还有痰"), Turn(DOCTOR, "多久了？")]
    examples, skipped = dialogue_examples(empty_reply)
    assert skipped == 1 and [e.target for e in examples] == ["多久了？"]
    from bianque.data import BuildReport

    report = BuildReport()
    rows = build_examples([DIALOGUE, [Turn(PATIENT, "在吗")], DIALOGUE[:2]], min_turns=3, dedupe=True, report=report)
    assert len(rows) == 2 and report.short_dialogues == 2 and report.dialogues == 3
    again = build_examples([DIALOGUE], dedupe=True, seen=set(rows), report=report)
    assert again == [] and report.duplicates == 2


def test_split_is_seeded_and_disjoint():
    items = list(range(20))
    train, val = split(items, 0.25, seed=3)
    assert (train, val) == split(items, 0.25, seed=3)
    assert len(val) == 5 and sorted(train + val) == items
    assert split(items, 0.25, seed=4)[1] != val
    assert split([1, 2], 0.1, seed=0)[1] != []  # a requested validation set is never empty
    with pytest.raises(DataError, match="--val-ratio"):
        split(items, 1.0, seed=0)


def jsonl(dialogues: list) -> str:
    return "\n".join(json.dumps(d, ensure_ascii=False) for d in dialogues) + "\n"


def as_json(turns):
    return [{"role": t.role, "text": t.text} for t in turns]


def test_build_command_writes_csvs_that_read_back(tmp_path, capsys):
    dialogues = [as_json(DIALOGUE)] * 2 + [{"turns": as_json(DIALOGUE[:2])}] + [
        [{"role": "patient", "text": f"第{i}次头晕"}, {"role": "doctor", "text": "多久了？"}] for i in range(7)
    ]
    source = write(tmp_path, "d.jsonl", jsonl(dialogues) + "\n")
    argv = ["build", "--in", str(source), "--out", str(tmp_path / "train.csv"), "--val-out", str(tmp_path / "val.csv"),
            "--val-ratio", "0.2", "--seed", "1", "--dedupe"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    train, val = read_csv(tmp_path / "train.csv"), read_csv(tmp_path / "val.csv")
    rows = train.examples + val.examples
    assert len(rows) == len(set(rows)) == 9 and train.skipped_empty == val.skipped_empty == 0
    assert Example("病人：头疼三天了\\n医生：", "有没有发热？") in rows
    assert "10 dialogues" in out and "duplicates dropped" in out and "头疼" not in out  # counts, never text
    first = (tmp_path / "train.csv").read_bytes()
    assert main(argv) == 0 and (tmp_path / "train.csv").read_bytes() == first  # same seed, same split


@pytest.mark.parametrize("line, message", [
    ('[{"role": "patient", "text": "头疼"}', "line 2: not valid JSON"),
    ('[{"role": "nurse", "text": "头疼"}]', "line 2: turn 0 must be"),
    ('[{"role": "patient", "text": "a"}, {"role": "patient", "text": "b"}]', "line 2: turn 1 breaks the patient/doctor"),
    ('[{"role": "doctor", "text": "a"}]', "line 2: turn 0 breaks"),
    ('{"dialogue": []}', "line 2: expected a list"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", jsonl([as_json(DIALOGUE)]) + line + "\n")
    with pytest.raises(DataError, match=message):
        read_dialogues(path)


def test_build_command_reports_errors_without_a_traceback(tmp_path, capsys):
    source = write(tmp_path, "d.jsonl", jsonl([as_json(DIALOGUE)]))
    assert main(["build", "--in", str(source), "--out", str(tmp_path / "t.csv"), "--val-ratio", "0.5"]) == 2
    assert "--val-ratio needs --val-out" in capsys.readouterr().err
    assert main(["build", "--in", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_write_csv_round_trips_escaped_text(tmp_path):
    rows = [Example('病人：他说"疼"，\\n医生：', "多久了？"), Example("病人：a,b\\n医生：", "c")]
    assert write_csv(tmp_path / "r.csv", rows) == 2
    assert read_csv(tmp_path / "r.csv").examples == rows


def test_check_command_reports_counts_only(tmp_path, capsys):
    path = write(tmp_path, "train.csv", QUIRKY_CSV)
    assert main(["check", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 examples; skipped 3 rows with an empty input or target (lines 5, 6, 9)" in out and "头疼" not in out
    assert main(["check", "--data", str(path), "--target-column", "reply"]) == 2
    assert "no column 'reply'" in capsys.readouterr().err
