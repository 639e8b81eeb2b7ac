"""What the learned safety backstop would have added blind (issue #14; a developer tool, not run by CI).

For each written set of tests/data/safety_indep.tsv: the rules as they were BEFORE that set was written
(bianque/safety.py at the parent of the commit that added the set, read with `git show`), the model
trained without that set (leave-one-set-out, bianque.safety_model.fit), and both together, scored as
tests/test_safety.py scores the sets. Needs the git history; prints figures only.

    python3 scripts/safety_blind_history.py [--thresholds 0.7,0.8]
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bianque import safety_model as m  # noqa: E402

# the commit that added each set (git log -- tests/data/safety_indep.tsv)
ADDED_IN = {"1": "35474ed", "2": "49313fc", "3": "49313fc", "4": "49313fc", "5": "87ce69f", "6": "87ce69f",
            "7": "87ce69f", "8": "3cdcc31", "9": "3cdcc31", "10": "3cdcc31", "11": "3fe1311",
            "12": "558190f", "13": "558190f", "14": "558190f"}


def old_rules(commit: str, folder: Path):
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}^:bianque/safety.py"],
                            check=True, capture_output=True, text=True).stdout
    path = folder / f"safety_{commit}.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location(f"safety_before_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", default=str(m.THRESHOLD))
    parser.add_argument("--sets", default=",".join(ADDED_IN), help="comma-separated set numbers")
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    rows = m.training_rows()  # sets outside m.TRAIN_SETS are never trained on: there the model is the committed one
    unseen = [r for r in m.read_rows(m.DATA_DIR / "safety_indep.tsv") if r.set not in m.TRAIN_SETS]
    totals: dict[float, list] = {t: [] for t in thresholds}
    with tempfile.TemporaryDirectory() as folder:
        for held in args.sets.split(","):
            commit = ADDED_IN[held]
            rules = old_rules(commit, Path(folder))
            if held in m.TRAIN_SETS:
                model = m.as_model(*m.fit([r for r in rows if r.set != held]))
                test = [r for r in rows if r.set == held]
            else:
                model, test = m.load(), [r for r in unseen if r.set == held]
            said = lambda t, e, rules=rules: bool(rules.red_flags(t, list(e)))  # noqa: E731
            alone = m.score(test, said)
            line = f"set {held:>2}: rules before it ({commit}^) {alone[0]:.3f} / {alone[1]:.3f}"
            for t in thresholds:
                mod = m.score(test, lambda x, e: m.fires(x, e, t, model))
                both = m.score(test, lambda x, e: said(x, e) or m.fires(x, e, t, model))
                totals[t].append((alone, mod, both))
                line += f" | t={t}: model {mod[0]:.3f} / {mod[1]:.3f}, rules OR model {both[0]:.3f} / {both[1]:.3f}"
            print(line, flush=True)
    for t, v in totals.items():
        mean = [(sum(x[k][0] for x in v) / len(v), sum(x[k][1] for x in v) / len(v)) for k in range(3)]
        print(f"mean t={t} (recall / false alarms): rules {mean[0][0]:.3f} / {mean[0][1]:.3f}, model "
              f"{mean[1][0]:.3f} / {mean[1][1]:.3f}, rules OR model {mean[2][0]:.3f} / {mean[2][1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
