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
from pathlib import Path

# name, file, exact text, replacement, tests to run (those absent in the checkout are skipped;
# when none exist the whole tests/ directory runs).
MUTATIONS = [
    ("transcript-label-dropped", "bianque/transcript.py", '"label": message.label,', '"label": None,', ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("transcript-note-dropped", "bianque/transcript.py", '"note": message.note,', '"note": None,', ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("transcript-title-dropped", "bianque/transcript.py", '"title": info.title,', '"title": "",', ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("transcript-max-questions-dropped", "bianque/transcript.py", '"max_questions": info.max_questions,', '"max_questions": None,', ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("markdown-note-dropped", "bianque/transcript.py", 'lines.append(f"\\n*{message.note}*")', "pass", ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("markdown-label-dropped", "bianque/transcript.py", "([message.label] if message.label else [])", "[]", ["tests/test_transcript_fields.py", "tests/test_apps.py", "tests/test_ui_session.py"]),
    ("cli-advise-ignored", "bianque/cli.py", 'advise_now = text.split(maxsplit=1)[0] == "/advise"', "advise_now = False", ["tests/test_cli_interactive.py", "tests/test_cli.py"]),
    ("cli-clear-keeps-dialogue", "bianque/cli.py", 'turns.clear()\n        return "clear"', 'return "clear"', ["tests/test_cli_interactive.py", "tests/test_cli.py"]),
    ("cli-ctrl-c-leaves", "bianque/cli.py", "    except KeyboardInterrupt:\n        close =", "    except ZeroDivisionError:\n        close =", ["tests/test_cli_interactive.py", "tests/test_cli.py"]),
    ("cli-empty-reply-kept", "bianque/cli.py", "turns.pop()  # nothing was said", "pass  # nothing was said", ["tests/test_cli_interactive.py", "tests/test_cli.py"]),
    ("cli-question-count-off", "bianque/cli.py", 'if t.role == DOCTOR) + 1', 'if t.role == DOCTOR)', ["tests/test_cli_interactive.py", "tests/test_cli.py"]),
    ("glm-layer-coeff-dropped", "bianque/glm/model.py", "torch.softmax(scores * self.layer_coeff, dim=-1)", "torch.softmax(scores, dim=-1)", ["tests/test_glm_fixtures.py", "tests/test_glm_model.py"]),
    ("glm-rotary-sign", "bianque/glm/model.py", "half * c + rotate_half(half) * s", "half * c - rotate_half(half) * s", ["tests/test_glm_fixtures.py", "tests/test_glm_model.py"]),
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
    args = parser.parse_args()
    repo = Path(args.repo).resolve()
    survivors, killed, missing = [], [], []
    for name, rel, old, new, tests in MUTATIONS:
        if not name.startswith(args.only):
            continue
        with tempfile.TemporaryDirectory(prefix="bianque-mut-") as tmp:
            copy = Path(tmp) / "repo"
            copy_repo(repo, copy)
            if (repo.parent / "shared").exists():  # ../shared resolves as in the checkout
                (Path(tmp) / "shared").symlink_to(repo.parent / "shared")
            source = (copy / rel).read_text(encoding="utf-8")
            if source.count(old) != 1:
                missing.append(name)
                print(f"{name}: not applicable (the text to break is not found once in {rel})", flush=True)
                continue
            (copy / rel).write_text(source.replace(old, new), encoding="utf-8")
            present = [t for t in tests if (copy / t).exists()] or ["tests"]
            env = dict(os.environ, PYTHONPATH=str(copy))
            run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *present],
                                 cwd=copy, env=env, capture_output=True, text=True)
            (killed if run.returncode != 0 else survivors).append(name)
            print(f"{name}: {'killed' if run.returncode else 'SURVIVED'} ({' '.join(present)})", flush=True)
    print(f"\n{len(killed)} killed, {len(survivors)} survived, {len(missing)} not applicable")
    for name in survivors:
        print(f"  survivor: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
