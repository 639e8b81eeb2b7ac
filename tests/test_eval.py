"""`python -m bianque eval`: reading dialogues and rows, the metrics, and every mode end to end on tiny models."""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bianque import eval as ev
from bianque.data import dialogue_examples
from bianque.prompt import DOCTOR, PATIENT, Turn, build_prompt, escape_v1, unescape_v1
from bianque.router import is_question
from bianque.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DIALOGUES = ROOT / "tests" / "data" / "eval_dialogues.jsonl"
ROWS = ROOT / "tests" / "data" / "eval_rows.csv"
RESULT_FIELDS = {"dialogue", "line", "position", "history_turns", "model", "route", "handover", "text", "reference",
                 "stage", "reason", "reference_stage", "reference_reason", "agree", "repeated", "length",
                 "reference_length", "rouge_l", "bleu_4", "seconds"}
SUMMARY_KEYS = {"data", "format", "mode", "seed", "limit", "models", "n", "dialogues", "skipped", "skipped_lines",
                "empty_positions", "reference_question_rate", "question_rate", "stage_agreement", "stage_confusion",
                "questions_before_advice", "reference_questions_before_advice", "repeated_questions",
                "repeated_question_rate", "length_mean", "length_median", "reference_length_mean",
                "reference_length_median", "rouge_l", "bleu_4", "corpus_bleu_4", "reasons", "reference_reasons",
                "models_used", "handovers", "seconds", "per_dialogue"}
OUTPUTS = {"results.jsonl", "summary.json", "report.md", "stage_agreement.png", "questions_before_advice.png",
           "lengths.png"}
SMALL = ["--max-new-tokens", "8", "--max-length", "48", "--device", "cpu"]


# ---------------------------------------------------------------- an independent reading of the committed file


def reference_figures(path: Path) -> dict:
    """The real doctors' figures, computed here from the raw JSON lines (not through bianque.eval)."""
    stages, lengths, before, dialogues = [], [], [], 0
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        turns = obj["turns"] if isinstance(obj, dict) else obj
        if turns[0]["role"] != "patient":
            continue
        doctor = [t["text"].strip() for t in turns[1::2] if t["text"].strip()]
        asks = [is_question(t) for t in doctor]
        stages += asks
        lengths += [len(t) for t in doctor]
        before.append(asks.index(False) if False in asks else len(asks))
        dialogues += 1
    return {"n": len(stages), "dialogues": dialogues, "reference_question_rate": sum(stages) / len(stages),
            "reference_length_mean": sum(lengths) / len(lengths),
            "reference_length_median": statistics.median(lengths),
            "reference_questions_before_advice": sum(before) / len(before)}


def lcs(a: str, b: str) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


# ---------------------------------------------------------------- reading


def test_jsonl_positions_skipped_lines_and_empty_turns():
    loaded = ev.read_positions(DIALOGUES)
    assert loaded.format == "jsonl"
    assert [line for line, _ in loaded.skipped] == [2, 4]
    assert "not valid JSON" in loaded.skipped[0][1] and "alternation" in loaded.skipped[1][1]
    assert loaded.empty == 1  # line 7's blank doctor turn
    assert [(p.dialogue, p.index) for p in loaded.positions] == [
        ("line1", 0), ("line1", 1), ("line1", 2), ("line3", 0), ("line3", 1),
        ("line6", 0), ("line6", 1), ("line6", 2), ("line7", 1)]
    third = loaded.positions[2]
    assert third.history == (Turn(PATIENT, "我最近总是失眠，晚上睡不着"), Turn(DOCTOR, "失眠多久了？"),
                             Turn(PATIENT, "大概两周了"), Turn(DOCTOR, "睡前会玩手机吗？"),
                             Turn(PATIENT, "会，一般玩到一点多"))
    assert third.reference.startswith("建议睡前一小时")


def test_csv_rows_grouped_into_dialogues_and_malformed_rows_counted():
    loaded = ev.read_positions(ROWS)
    assert loaded.format == "csv"
    assert [line for line, _ in loaded.skipped] == [5, 6, 10]
    assert [reason for _, reason in loaded.skipped] == [
        "empty target", "turn 0 of the input does not start with '病人：'",
        "has 1 fields, fewer than the header's input and target"]
    assert [(p.dialogue, p.line, p.index) for p in loaded.positions] == [
        ("line2", 2, 0), ("line2", 3, 1), ("line2", 4, 2), ("line7", 7, 0), ("line7", 9, 1), ("line11", 11, 1)]
    # the quoted two-line record (lines 7-8) is one row whose real newline separates the turns
    assert loaded.positions[3].history == (Turn(PATIENT, "孩子发烧38.5度"),)


def test_csv_and_jsonl_give_the_same_positions_for_the_same_dialogues(tmp_path):
    """A CSV written by `bianque.data build`'s own functions reads back as the dialogue's positions."""
    turns = [Turn(PATIENT, "咳嗽\n三天"), Turn(DOCTOR, "有痰吗？"), Turn(PATIENT, "有，黄痰"), Turn(DOCTOR, "多喝水。")]
    examples, _ = dialogue_examples(turns)
    path = tmp_path / "rows.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["input", "target"], *[[e.input, e.target] for e in examples]])
    positions = ev.read_positions(path).positions
    assert [(p.history, p.reference) for p in positions] == [
        (tuple(turns[:1]), "有痰吗？"), (tuple(turns[:3]), "多喝水。")]
    assert {p.dialogue for p in positions} == {"line2"}


@pytest.mark.parametrize("prompt, message", [
    ("病人：头疼", "does not end with"),
    ("医生：你好\n病人：头疼\n医生：", "does not start with '病人：'"),
    ("病人：头疼\n病人：还有\n医生：", "does not start with '医生：'"),
])
def test_parse_prompt_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        ev.parse_prompt(prompt)


def test_parse_prompt_inverts_build_prompt():
    turns = [Turn(PATIENT, "头疼"), Turn(DOCTOR, "多久了？"), Turn(PATIENT, "三天\t了")]
    assert ev.parse_prompt(unescape_v1(escape_v1(build_prompt(turns)))) == turns


# ---------------------------------------------------------------- metrics


@pytest.mark.parametrize("prediction, reference", [
    ("失眠多久了？", "失眠有多久了？"), ("建议多喝水", "多喝水，注意休息"), ("abc 头疼", "头疼 abc"), ("完全不同", "另一句话")])
def test_rouge_l_is_char_level_lcs_f1(prediction, reference):
    p, r = prediction.replace(" ", ""), reference.replace(" ", "")
    common = lcs(p, r)
    expected = 0.0 if common == 0 else 2 * (common / len(p)) * (common / len(r)) / (common / len(p) + common / len(r))
    assert ev.rouge_l(prediction, reference) == pytest.approx(expected)


def test_bleu_4_bounds():
    assert ev.bleu_4("建议多喝水注意休息", "建议多喝水注意休息") == pytest.approx(1.0)
    assert ev.bleu_4("", "建议多喝水") == 0.0
    assert ev.bleu_4("完全不同的话", "建议多喝水注意休息") < 0.05
    close, far = ev.bleu_4("建议多喝水注意休息吧", "建议多喝水注意休息"), ev.bleu_4("多喝水", "建议多喝水注意休息")
    assert 0 < far < close < 1
    assert ev.corpus_bleu_4(["建议多喝水注意休息"], ["建议多喝水注意休息"]) == pytest.approx(1.0)


def test_questions_before_advice_and_repeats():
    assert ev.questions_before_advice(["question", "question", "statement", "question"]) == 2
    assert ev.questions_before_advice(["statement"]) == 0
    assert ev.questions_before_advice(["question"] * 3) == 3
    history = [Turn(PATIENT, "头疼"), Turn(DOCTOR, "你好，请问头疼多久了？另外有没有发热？"), Turn(PATIENT, "三天，没发热")]
    assert ev.repeated_question("有没有发热", history)  # asked and answered already
    assert ev.repeated_question("头疼多久了", history)  # contained in an earlier asking sentence
    assert not ev.repeated_question("有没有恶心？", history)
    assert not ev.repeated_question("头疼", [Turn(PATIENT, "头疼")])


# ---------------------------------------------------------------- the system under test (fake doctors)


@dataclass(frozen=True)
class FakeParams:
    sampling: SamplingParams = SamplingParams(True, 0.7, 1.0, 50)
    max_new_tokens: int = 512
    max_length: int = 2048
    seed: int | None = None


@dataclass
class FakeDoctor:
    answer: str
    source: str = "fake"
    default_params: FakeParams = FakeParams()
    calls: list = field(default_factory=list)

    def reply(self, turns, params=None):
        self.calls.append((list(turns), params))
        return iter([self.answer])


def test_coq_replay_is_teacher_forced_and_seeded():
    v1, v2 = FakeDoctor("是否伴有发热？"), FakeDoctor("建议休息。")
    args = ev.build_parser().parse_args(["--out", "x", "--greedy"])
    system = ev.make_system("coq", {"v1": v1, "v2": v2}, args, max_questions=8, seed=5)
    loaded = ev.read_positions(DIALOGUES)
    results = ev.replay(loaded.positions, system, workers=3)
    assert [r["line"] for r in results] == [p.line for p in loaded.positions]  # file order
    assert [list(turns) for turns, _ in v1.calls] == [list(p.history) for p in loaded.positions[:8]]
    # line 6 already asked 是否伴有发热 (a repeat: handed over); line 7's history holds a doctor turn
    # that is no question (the empty one), so the advisor keeps that dialogue and v1 is not asked
    assert [r["model"] for r in results] == ["v1"] * 6 + ["v2"] * 3
    assert [r["handover"] for r in results] == [None] * 6 + ["repeat", "repeat", None]
    assert [list(turns) for turns, _ in v2.calls] == [list(p.history) for p in loaded.positions[6:]]
    assert all(params.seed == 5 and params.sampling.do_sample is False for _, params in v1.calls + v2.calls)
    assert [r["stage"] for r in results] == ["question"] * 6 + ["statement"] * 3
    summary = ev.summarise(results, loaded)
    assert summary["models_used"] == {"v1": 6, "v2": 3} and summary["handovers"] == {"repeat": 2}
    assert summary["stage_confusion"] == {"question": {"question": 4, "statement": 2},
                                          "statement": {"question": 2, "statement": 1}}
    assert summary["questions_before_advice"] == pytest.approx((3 + 2 + 1 + 0) / 4)


def test_v1_replay_counts_repeated_questions():
    system = ev.make_system("v1", {"v1": FakeDoctor("是否伴有发热？")}, ev.build_parser().parse_args(["--out", "x"]),
                            max_questions=8, seed=0)
    results = ev.replay(ev.read_positions(DIALOGUES).positions, system)
    assert [r["repeated"] for r in results] == [False] * 6 + [True, True, False]


# ---------------------------------------------------------------- end to end on tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_glm import build_tiny_glm
    from tests.tiny_t5 import build_tiny_t5

    root = tmp_path_factory.mktemp("models")
    return {"v1": str(build_tiny_t5(root / "v1")), "v2": str(build_tiny_glm(root / "v2"))}


def run_eval(argv, capsys):
    code = ev.main([str(a) for a in argv])
    return code, capsys.readouterr()


def check_run(out: Path, mode: str, data: Path, n: int) -> tuple[dict, list[dict]]:
    assert {p.name for p in out.iterdir()} == OUTPUTS
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary) == SUMMARY_KEYS and summary["mode"] == mode and summary["n"] == n
    results = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(results) == n and all(set(r) == RESULT_FIELDS for r in results)
    for r in results:
        assert r["stage"] in ("question", "statement") and r["reason"] and r["length"] == len(r["text"])
        assert (r["stage"] == "question") == is_question(r["text"])
        assert r["rouge_l"] == pytest.approx(ev.rouge_l(r["text"], r["reference"]))
    assert summary["question_rate"] == pytest.approx(sum(r["stage"] == "question" for r in results) / n)
    assert summary["stage_agreement"] == pytest.approx(sum(r["agree"] for r in results) / n)
    assert sum(sum(row.values()) for row in summary["stage_confusion"].values()) == n
    assert summary["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in results) / n)
    assert summary["bleu_4"] == pytest.approx(sum(r["bleu_4"] for r in results) / n)
    for png in ev.PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"]({png})" in report for png in ev.PLOTS) and f"{summary['n']} doctor positions" in report
    return summary, results


@pytest.mark.parametrize("mode", ["v1", "coq"])
def test_modes_end_to_end(tiny, tmp_path, capsys, mode):
    out = tmp_path / mode
    models = {"v1": ["--v1-model", tiny["v1"]], "coq": ["--v1-model", tiny["v1"], "--v2-model", tiny["v2"]]}[mode]
    code, io = run_eval(["--data", DIALOGUES, "--mode", mode, *models, "--out", out, *SMALL], capsys)
    assert code == 0, io.err[-2000:]
    summary, results = check_run(out, mode, DIALOGUES, 9)
    for key, value in reference_figures(DIALOGUES).items():
        assert summary[key] == pytest.approx(value), key
    assert summary["skipped"] == 2 and [x["line"] for x in summary["skipped_lines"]] == [2, 4]
    assert f"{DIALOGUES} line 2: skipped: not valid JSON" in io.err and f"{DIALOGUES} line 4: skipped:" in io.err
    assert "9/9" in io.err  # the progress bar
    assert "失眠" not in io.err and "头疼" not in io.err  # no dialogue text in the logs
    if mode == "v1":
        assert {r["model"] for r in results} == {"v1"} and summary["models"] == {"v1": tiny["v1"]}
        assert all(r["route"] is None and r["handover"] is None for r in results)
    else:
        assert summary["models"] == tiny and sum(summary["models_used"].values()) == 9
        assert all(r["route"] in ("question", "advice") for r in results)
        assert all((r["model"] == "v1") == (r["route"] == "question") for r in results)
        # line 7's history holds a doctor turn that asks nothing: the advisor answers there
        assert results[-1]["model"] == "v2" and results[-1]["handover"] is None
        assert "Chain of Questioning" in (out / "report.md").read_text(encoding="utf-8")


def test_v1_is_reproducible_and_batched_replies_equal_solo_ones(tiny, tmp_path, capsys):
    argv = ["--data", ROWS, "--mode", "v1", "--v1-model", tiny["v1"], "--seed", "3", "--limit", "4", *SMALL]
    assert run_eval([*argv, "--out", tmp_path / "a"], capsys)[0] == 0
    assert run_eval([*argv, "--out", tmp_path / "b", "--batch", "3"], capsys)[0] == 0
    a = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(a) == 4 and [r["text"] for r in a] == [r["text"] for r in b]
    assert [r["line"] for r in a] == [2, 3, 4, 7]  # --limit: the first usable rows in file order
    summary = json.loads((tmp_path / "a" / "summary.json").read_text(encoding="utf-8"))
    assert summary["format"] == "csv" and summary["skipped"] == 3 and summary["seed"] == 3 and summary["limit"] == 4
    assert summary["reference_question_rate"] == pytest.approx(3 / 4)  # 失眠多久了？/睡前会玩手机吗？/孩子多大了？…
    assert [d["dialogue"] for d in summary["per_dialogue"]] == ["line2", "line7"]
    # an existing run is not overwritten without --force
    code, io = run_eval([*argv, "--out", tmp_path / "a"], capsys)
    assert code == 2 and "already holds" in io.err and "--force" in io.err


def test_v2_end_to_end_in_a_real_process_then_compare(tiny, tmp_path, capsys):
    # one thread: tiny models gain nothing from more, and a busy 2-core machine makes them fight
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "v2"
    proc = subprocess.run([sys.executable, "-m", "bianque", "eval", "--data", str(DIALOGUES), "--mode", "v2",
                           "--v2-model", tiny["v2"], "--out", str(out), *SMALL],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, results = check_run(out, "v2", DIALOGUES, 9)
    assert {r["model"] for r in results} == {"v2"} and summary["models"] == {"v2": tiny["v2"]}
    for key, value in reference_figures(DIALOGUES).items():
        assert summary[key] == pytest.approx(value), key
    assert "line 2: skipped" in proc.stderr and "9/9" in proc.stderr and "wrote " in proc.stderr
    assert "失眠" not in proc.stderr and "头疼" not in proc.stderr
    # --compare: the coq run against a copy whose figures differ
    other = tmp_path / "other"
    other.mkdir()
    changed = {**summary, "question_rate": summary["question_rate"] + 0.25, "mode": "coq"}
    (other / "summary.json").write_text(json.dumps(changed), encoding="utf-8")
    cmp = tmp_path / "cmp"
    code, io = run_eval(["--compare", out, other, "--out", cmp], capsys)
    assert code == 0, io.err[-2000:]
    result = json.loads((cmp / "compare.json").read_text(encoding="utf-8"))
    assert result["metrics"]["question_rate"]["difference"] == pytest.approx(0.25)
    assert result["metrics"]["rouge_l"] == {"a": summary["rouge_l"], "b": summary["rouge_l"], "difference": 0.0}
    table = (cmp / "compare.md").read_text(encoding="utf-8")
    assert "| question_rate |" in table and "(coq, " in table and "(v2, " in table and "| reference_question_rate |" in table
    assert (cmp / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    code, io = run_eval(["--data", tmp_path / "none.jsonl", "--mode", "v1", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no such file" in io.err
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\n头疼,多久了\n", encoding="utf-8")
    code, io = run_eval(["--data", bad, "--mode", "v1", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "no column 'input'" in io.err and "头疼" not in io.err
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("not json\n", encoding="utf-8")
    code, io = run_eval(["--data", only_bad, "--mode", "v1", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "line 1: skipped: not valid JSON" in io.err and "no doctor position" in io.err
    code, io = run_eval(["--data", DIALOGUES, "--mode", "v1", "--out", tmp_path / "o", "--limit", "0"], capsys)
    assert code == 2 and "--limit" in io.err
    code, io = run_eval(["--compare", tmp_path / "x", tmp_path / "y", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "summary.json: no such file" in io.err
    with pytest.raises(SystemExit):
        ev.main(["--out", str(tmp_path / "o")])  # neither --data/--mode nor --compare
    assert "--data and --mode are required" in capsys.readouterr().err


def test_coq_through_a_running_server(tiny, tmp_path, tmp_path_factory, capsys):
    """`--server URL`: the same run against `python -m bianque serve` (a real process) on the tiny models."""
    from tests.test_api import running_server

    with running_server(tmp_path_factory, models=tiny, key=None) as server:
        url = server["url"]
        out = tmp_path / "remote"
        code, io = run_eval(["--data", DIALOGUES, "--mode", "coq", "--server", url, "--out", out, "--greedy",
                             "--max-new-tokens", "8", "--batch", "3"], capsys)
        assert code == 0, io.err[-2000:]
        summary, results = check_run(out, "coq", DIALOGUES, 9)
        assert set(summary["models"]) == {"v1", "v2"} and all(url in m for m in summary["models"].values())
        assert all((r["model"] == "v1") == (r["route"] == "question") for r in results)
        for key, value in reference_figures(DIALOGUES).items():
            assert summary[key] == pytest.approx(value), key
        code, io = run_eval(["--data", DIALOGUES, "--mode", "v2", "--server", url, "--out", tmp_path / "x",
                             "--max-length", "64"], capsys)
        assert code == 2 and "--max-length" in io.err  # cannot be sent to a server: said, not ignored
