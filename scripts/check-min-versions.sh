#!/usr/bin/env bash
# Do the declared minimum versions hold? Builds its OWN virtual environment (never the caller's
# interpreter), installs every direct dependency of pyproject.toml pinned to its lower bound
# (`name>=X` becomes `name==X`: pip has no lowest-direct resolution, pinning is the same thing for
# direct dependencies), installs the package without dependencies and runs the test suite there.
#
#   bash scripts/check-min-versions.sh                 # venv in a temporary directory
#   MIN_VENV=/work/venv-min bash scripts/check-min-versions.sh -x tests/test_apps.py
#
# torch is the exception: its lower bound is an API floor (torch.OutOfMemoryError, torch 2.5) and
# old CPU builds are not always reachable, so the torch to install is TORCH_PIN (default
# "torch==2.13.0", the CPU build CI installs). Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MIN_VENV:-$(mktemp -d /tmp/bianque-min.XXXXXX)}
python=${PYTHON:-python3}
"$python" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
mapfile -t pins < <("$py" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)
    if name == "torch":
        continue
    low = re.search(r">=\s*([^,;\s]+)", spec)
    print(f"{name}=={low.group(1)}" if low else name)
PY
)
echo "+ pins: ${TORCH_PIN:-torch==2.13.0} ${pins[*]}"
"$py" -m pip install -q "${TORCH_PIN:-torch==2.13.0}" "${pins[@]}"
"$py" -m pip install -q --no-deps -e .
"$py" -m pip list --format=freeze | grep -iE '^(torch|transformers|sentencepiece|safetensors|huggingface.hub|accelerate|streamlit|tqdm|psutil|pytest|playwright)=='
# -p no:cacheprovider: leave no .pytest_cache behind; PYTHONPATH: subprocess tests import this tree.
PYTHONPATH="$PWD" "$py" -m pytest -q -p no:cacheprovider "$@"
