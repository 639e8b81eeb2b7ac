"""Repository-level promises: CI runs the README's test command; apps stay thin; no patient-text prints."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    marker = re.search(r"^<!-- test-command: (.*) -->$", readme, re.M)
    assert marker, "README.md lacks the test-command marker .ci/run reads"
    # the command shown to readers is the one in the marker, and .ci/run executes the marker
    assert f"```bash\n{marker.group(1)}\n```" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci and "pytest" in marker.group(1)


def test_library_never_prints_outside_cli_tools():
    allowed = {"cli.py", "__main__.py", "bench.py", "finetune.py", "data.py", "convert.py"}
    offenders = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in (ROOT / "bianque").rglob("*.py")
        if p.name not in allowed
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if re.match(r"\s*print\(", line)
    ]
    assert offenders == []


def test_no_remote_code_and_no_device_env_edits():
    for p in list((ROOT / "bianque").rglob("*.py")) + list(ROOT.glob("*.py")):
        text = p.read_text(encoding="utf-8")
        assert "trust_remote_code=True" not in text, p
        assert not re.search(r"CUDA_VISIBLE_DEVICES['\"]?\s*\]?\s*=", text), p


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Development"):]
    layout = section[section.index("```"):section.index("```", section.index("```") + 3)]
    package = ROOT / "bianque"
    missing = [str(p.relative_to(ROOT)) for p in sorted(package.rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and p.name not in layout]
    missing += [f"{d.name}/" for d in sorted(package.iterdir())
                if d.is_dir() and (d / "__init__.py").exists() and f"{d.name}/" not in layout]
    assert missing == [], "README.md's layout tree (## Development) does not name these modules"
