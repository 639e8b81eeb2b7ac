"""Under CI=true a missing ../shared is a failure with a clear message; elsewhere it skips."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROBE = '''
import pytest
from tests.conftest import shared_dir

def test_needs_fixture():
    shared_dir("no_such_reference_dir_for_probe")

@pytest.mark.parametrize("case", [pytest.param(None, marks=pytest.mark.skip(reason="reference fixtures not found at /x"))])
def test_param(case):
    pass

def test_other_skip():
    pytest.skip("unrelated reason")
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", repo / "tests" / "conftest.py")
    (repo / "tests" / "__init__.py").write_text("")
    (repo / "tests" / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(repo)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=120)


def test_missing_fixtures_skip_outside_ci(tmp_path):
    out = _run(tmp_path, None)
    assert out.returncode == 0, out.stdout
    assert "3 skipped" in out.stdout
    assert "reference fixtures not found" in out.stdout


def test_missing_fixtures_fail_under_ci(tmp_path):
    out = _run(tmp_path, "true")
    assert out.returncode == 1, out.stdout
    assert "CI=true but reference fixtures not found" in out.stdout
    assert "no_such_reference_dir_for_probe" in out.stdout
    assert "1 skipped" in out.stdout  # an unrelated skip stays a skip
