#!/usr/bin/env bash
# Do the declared minimum versions hold? Builds its OWN virtual environment (never the caller's
# interpreter), installs every direct dependency of pyproject.toml -- the core list and every
# optional extra except those in MIN_SKIP_EXTRAS (default "cuda": cpm_kernels needs a GPU) --
# pinned to its lower bound (`name[extra]>=X,...` becomes `name[extra]==X`: pip has no
# lowest-direct resolution; pinning is the same thing for direct dependencies), installs the
# package without dependencies and runs the test suite there. Extras are read from pyproject.toml
# each run, so an extra added later (ray, eval packages, ...) is covered without editing this file.
#
#   bash scripts/check-min-versions.sh                 # venv in a temporary directory, whole suite
#   MIN_VENV=/tmp/venv-min bash scripts/check-min-versions.sh -x tests/test_apps.py
#   MIN_VENV=/tmp/venv-min MIN_REUSE=1 bash scripts/check-min-versions.sh tests/test_cli.py
#
# MIN_REUSE=1 skips creating and installing when MIN_VENV already holds a finished install.
# torch is the exception: its lower bound is an API floor (torch.OutOfMemoryError, torch 2.5) and
# old CPU builds are not always reachable (PyPI's torch is the multi-GB CUDA build), so the torch to
# install is TORCH_PIN (default "torch==2.13.0", the CPU build CI installs). Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MIN_VENV:-$(mktemp -d /tmp/bianque-min.XXXXXX)}
python=${PYTHON:-python3}
py="$venv/bin/python"
pins_of() {  # the pins for this pyproject.toml, one a line
  "$py" - "${MIN_SKIP_EXTRAS-cuda}" <<'PY'
import re, sys, tomllib
skip = set(sys.argv[1].split())
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = list(project["dependencies"])
for extra, deps in project.get("optional-dependencies", {}).items():
    if extra not in skip:
        specs += deps
for spec in specs:
    spec, _, marker = spec.partition(";")
    name = re.match(r"\s*([A-Za-z0-9_.\-]+(\[[^\]]*\])?)", spec).group(1)
    if re.match(r"torch(\[|$)", name):
        continue
    low = re.search(r"(?:>=|==|~=)\s*([^,\s]+)", spec)
    pin = f"{name}=={low.group(1)}" if low else name
    print(pin + (f"; {marker.strip()}" if marker.strip() else ""))
PY
}
if [ "${MIN_REUSE:-0}" != 1 ] || [ ! -x "$py" ]; then
  "$python" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  mapfile -t pins < <(pins_of)
  echo "+ pins: ${TORCH_PIN:-torch==2.13.0} ${pins[*]}"
  "$py" -m pip install -q "${TORCH_PIN:-torch==2.13.0}" "${pins[@]}" 2>&1 \
    | sed '/^WARNING: Location .* is ignored/d'  # this machine's absent local index folders; pipefail keeps pip's status
  "$py" -m pip install -q --no-deps -e .
else
  mapfile -t pins < <(pins_of)
fi
# Show what was installed for each pinned name, and fail if pip resolved any other version.
PINS="${pins[*]}" "$py" - <<'PY'
import os, re, sys
from importlib.metadata import version
from pip._vendor.packaging.version import Version  # pip's own copy: the venv has nothing else
bad = []
for pin in os.environ["PINS"].split(" "):
    m = re.match(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^;\s]+)", pin)
    if not m:
        continue
    got = version(m.group(1))
    print(f"  {m.group(1)}=={got}")
    if Version(Version(got).public) != Version(m.group(2)):
        bad.append(f"{m.group(1)}: wanted {m.group(2)}, installed {got}")
import torch
print(f"  torch=={torch.__version__}")
sys.exit("pins not honoured: " + "; ".join(bad) if bad else 0)
PY
# -p no:cacheprovider: leave no .pytest_cache behind; PYTHONPATH: subprocess tests import this tree.
PYTHONPATH="$PWD" "$py" -m pytest -q -p no:cacheprovider "$@"
