"""Mutation check (a developer tool, not part of CI): break named behaviours one at a time in a
temporary copy of the repo, run the tests that should notice, and report which mutations survive.

    python3 scripts/mutation_check.py            # all mutations, on this checkout
    python3 scripts/mutation_check.py --repo DIR --only cli-   # another checkout, a subset
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each mutation: name, file, exact text, replacement, the test files meant to notice (those absent
# in the checkout are dropped; when none is left the whole tests/ directory runs) and an optional
# pytest -k expression that narrows them to the tests concerned (keeps a run to minutes on 2 cores).
TRANSCRIPT = ["tests/test_transcript_fields.py", "tests/test_ui_session.py"]
CLI = ["tests/test_cli_interactive.py", "tests/test_cli.py"]
DETECTOR = ["tests/test_is_question.py", "tests/test_router.py"]
GLM = ["tests/test_glm_fixtures.py", "tests/test_glm_model.py"]
NOTICE = ["tests/test_apps.py", "tests/test_cli.py"]
SAFETY = ["tests/test_safety.py"]
RECORDS = ["tests/test_records.py", "tests/test_records_cli.py"]
MUTATIONS = [
    ("transcript-label-dropped", "bianque/transcript.py", '"label": message.label,', '"label": None,', TRANSCRIPT),
    ("transcript-note-dropped", "bianque/transcript.py", '"note": message.note,', '"note": None,', TRANSCRIPT),
    ("transcript-title-dropped", "bianque/transcript.py", '"title": info.title,', '"title": "",', TRANSCRIPT),
    ("transcript-max-questions-dropped", "bianque/transcript.py", '"max_questions": info.max_questions,', '"max_questions": None,', TRANSCRIPT),
    ("markdown-note-dropped", "bianque/transcript.py", 'lines.append(f"\\n*{message.note}*")', "pass", TRANSCRIPT),
    ("markdown-label-dropped", "bianque/transcript.py", "([message.label] if message.label else [])", "[]", TRANSCRIPT),
    ("app-notice-explanation-emptied", "bianque/ui.py", 'f"- {flag.message}\\n  现在可以做：{flag.action}"', 'f"- \\n  现在可以做：{flag.action}"', NOTICE, "notice"),
    ("app-notice-first-flag-only", "bianque/ui.py", "for flag in flags)", "for flag in flags[:1])", NOTICE, "notice"),
    ("app-notice-action-dropped", "bianque/ui.py", '\\n  现在可以做：{flag.action}"', '"', NOTICE, "notice"),
    ("cli-notice-first-flag-only", "bianque/cli.py", "    for flag in flags:\n        lines +=", "    for flag in flags[:1]:\n        lines +=", NOTICE, "notice or red_flags"),
    ("coq-max-questions-box-ignored", "bianque/ui.py", "return Controls(params, max_questions)", "return Controls(params, settings.max_questions)", ["tests/test_apps.py"], "coq"),
    ("coq-stage-label-count-off", "bianque/session.py", 'f"{STAGE_NAMES[QUESTION]} {question_no}/', 'f"{STAGE_NAMES[QUESTION]} {question_no - 1}/', ["tests/test_apps.py", "tests/test_ui_session.py"], "coq or label"),
    ("coq-stage-label-names-swapped", "bianque/session.py", 'STAGE_NAMES = {QUESTION: "问询", ADVICE: "建议"}', 'STAGE_NAMES = {QUESTION: "建议", ADVICE: "问询"}', ["tests/test_apps.py", "tests/test_ui_session.py"], "coq or label"),
    ("cli-advise-ignored", "bianque/cli.py", 'advise_now = text.split(maxsplit=1)[0] == "/advise"', "advise_now = False", CLI),
    ("cli-clear-keeps-dialogue", "bianque/cli.py", 'turns.clear()\n        return "clear"', 'return "clear"', CLI),
    ("cli-quit-ignored", "bianque/cli.py", 'if text == "/quit":', 'if text == "/quit-never":', CLI),
    ("cli-ctrl-c-leaves", "bianque/cli.py", "    except KeyboardInterrupt:\n        close =", "    except ZeroDivisionError:\n        close =", CLI),
    ("cli-ctrl-c-keeps-generating", "bianque/cli.py", "        if close:\n            close()", "        pass", CLI),
    ("cli-empty-reply-kept", "bianque/cli.py", "turns.pop()  # nothing was said", "pass  # nothing was said", CLI),
    ("cli-question-count-off", "bianque/cli.py", 'if t.role == DOCTOR) + 1', 'if t.role == DOCTOR)', CLI),
    ("detector-rhetorical-check-off", "bianque/router.py", "        if _is_rhetorical(body):\n            return None\n", "", DETECTOR),
    ("detector-rhetorical-markers-emptied", "bianque/router.py", 'RHETORICAL_MARKERS = ("难道",', 'RHETORICAL_MARKERS = () and ("难道",', DETECTOR),
    ("detector-tail-limit-off", "bianque/router.py", 'if _content_len("".join(parts[last + 1:])) <= MAX_TAIL_CHARS:', "if True:", DETECTOR),
    ("detector-tail-limit-doubled", "bianque/router.py", "MAX_TAIL_CHARS = 16", "MAX_TAIL_CHARS = 32", DETECTOR),
    ("router-repeat-check-off", "bianque/router.py", "    if is_repeat(reply, turns):\n        return \"repeat\"", "    if False:\n        return \"repeat\"", DETECTOR),
    ("glm-layer-coeff-dropped", "bianque/glm/model.py", "torch.softmax(scores * self.layer_coeff, dim=-1)", "torch.softmax(scores, dim=-1)", GLM),
    ("glm-rotary-sign", "bianque/glm/model.py", "half * c + rotate_half(half) * s", "half * c - rotate_half(half) * s", GLM),
    ("glm-rotary-pairing-interleaved", "bianque/glm/model.py", "    x1, x2 = x.chunk(2, dim=-1)\n    return torch.cat([-x2, x1], dim=-1)",
     "    x1, x2 = x[..., ::2], x[..., 1::2]\n    return torch.stack([-x2, x1], dim=-1).flatten(-2)", GLM),
    ("glm-tokenizer-blank-runs-kept", "bianque/glm/tokenizer.py", "return BLANK_RUN.sub(_blank_pieces, text)", "return text", GLM),
    ("glm-tokenizer-blank-tokens-not-undone", "bianque/glm/tokenizer.py", 'return BLANK_TOKEN.sub(lambda m: " " * int(m.group(1)), text)', "return text", GLM),
    ("safety-negation-ignored", "bianque/safety.py", "if not (NEGATED_BEFORE.search(before) or PAST_BEFORE.search(before) or NEGATED_AFTER.match(after)):", "if True:", SAFETY),
    ("safety-earlier-messages-ignored", "bianque/safety.py", "    earlier = [m for m in earlier if isinstance(m, str)]", "    earlier = []", SAFETY),
    ("safety-supersedes-ignored", "bianque/safety.py", "    redundant = {name for rule in fired for name in rule.supersedes}", "    redundant = set()", SAFETY),
    ("safety-cancelling-message-ignored", "bianque/safety.py", "    if unless is not None and any(unless.search(c) for c in clauses):", "    if False:", SAFETY),
    ("records-export-stage-dropped", "bianque/records.py", '"stage": t["stage"],\n', '"stage": None,\n', RECORDS, "export and not postgresql"),
    ("records-export-feedback-dropped", "bianque/records.py", '"feedback": t["feedback"]} for t in kept]', '"feedback": None} for t in kept]', RECORDS, "export and not postgresql"),
    ("records-export-better-question-ignored", "bianque/records.py", 'if fb.get("better_question"):', "if False:", RECORDS, "export and not postgresql"),
    ("api-stage-always-advice", "bianque/serving/api.py", 'info = {"stage": self.stage,', 'info = {"stage": "advice",', ["tests/test_stage_object.py", "tests/test_api.py"], "stage or coq"),
    ("api-sent-stages-ignored", "bianque/serving/api.py", 'stage = m.bianque.stage if (m.role == "assistant" and m.bianque) else None', "stage = None", ["tests/test_stage_object.py", "tests/test_api.py"], "stage or coq"),
]


def copy_repo(src: Path, dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (src / name).is_file():
            shutil.copy2(src / name, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--only", default="", help="run only mutations whose name starts with this")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutation's test run")
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    survivors, killed, missing, timed_out = [], [], [], []
    for name, rel, old, new, tests, *narrow in MUTATIONS:
        if not name.startswith(args.only):
            continue
        with tempfile.TemporaryDirectory(prefix="bianque-mut-") as tmp:
            copy = Path(tmp) / "repo"
            copy_repo(repo, copy)
            if (repo.parent / "shared").exists():  # ../shared resolves as in the checkout
                (Path(tmp) / "shared").symlink_to(repo.parent / "shared")
            source = (copy / rel).read_text(encoding="utf-8") if (copy / rel).exists() else ""
            if source.count(old) != 1:
                missing.append(name)
                print(f"{name}: not applicable (the text to break is not found once in {rel})", flush=True)
                continue
            (copy / rel).write_text(source.replace(old, new), encoding="utf-8")
            present = [t for t in tests if (copy / t).exists()] or ["tests"]
            select = ["-k", narrow[0]] if narrow and present != ["tests"] else []
            env = dict(os.environ, PYTHONPATH=str(copy))
            started = time.monotonic()
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *present, *select],
                                     cwd=copy, env=env, capture_output=True, text=True, timeout=args.timeout)
                verdict = "killed" if run.returncode != 0 else "SURVIVED"
                if run.returncode == 5:  # no test collected: nothing noticed
                    verdict = "SURVIVED"
            except subprocess.TimeoutExpired:
                verdict = "TIMED OUT"  # undecided: rerun it alone (--only NAME) with a longer --timeout
            {"killed": killed, "SURVIVED": survivors}.get(verdict, timed_out).append(name)
            print(f"{name}: {verdict} in {time.monotonic() - started:.0f} s ({' '.join(present + select)})", flush=True)
    print(f"\n{len(killed)} killed, {len(survivors)} survived, {len(timed_out)} timed out, {len(missing)} not applicable")
    for name in survivors:
        print(f"  survivor: {name}")
    for name in timed_out:
        print(f"  timed out: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
