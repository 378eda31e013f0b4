#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements. Re-installs only when a requirements file changes.
#   bash scripts/setup.sh            # everything: serving, the build, the tests and the reference libraries
#   bash scripts/setup.sh --runtime  # only what building and serving need (requirements.txt): no pytest, no
#                                    # playwright, ruff or the test-only reference implementations
#   bash scripts/setup.sh --kserve   # the runtime and KServe's model server (requirements-kserve.txt), for
#                                    # python -m camserve.kserve
#   bash scripts/setup.sh --audit    # the runtime and the dataset audit on Ray Data (requirements-audit.txt), for
#                                    # scripts/audit.py
set -euo pipefail
cd "$(dirname "$0")/.."
requirements=requirements-dev.txt
case "${1:-}" in
  --runtime) requirements=requirements.txt ;;
  --kserve) requirements=requirements-kserve.txt ;;
  --audit) requirements=requirements-audit.txt ;;
  "") ;;
  *) echo "usage: bash scripts/setup.sh [--runtime | --kserve | --audit]" >&2; exit 2 ;;
esac

python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin=$candidate
      break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "error: Python 3.11 is required (torch 2.14.1 and torchvision 0.29.1 are pinned for it); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
# The install record: the requirement files' hash, then the sets installed with it. The test install (the default,
# requirements-dev.txt) holds every other set, and --kserve and --audit each hold the runtime's, so asking for a set
# that an installed one holds installs nothing.
stamp=.venv/.requirements.sha256
files=$( (cat requirements.txt requirements-kserve.txt requirements-audit.txt requirements-dev.txt requirements-references.txt pyproject.toml; echo "cpu=${CAMSERVE_TORCH_CPU:-}") | sha256sum | cut -d' ' -f1)
holds() {  # holds INSTALLED WANTED: whether the installed set includes the wanted one
  case "$1" in
    requirements-dev.txt) return 0 ;;
    requirements-kserve.txt | requirements-audit.txt) [ "$2" = "$1" ] || [ "$2" = requirements.txt ] ;;
    *) [ "$2" = "$1" ] ;;
  esac
}
installed=
[ "$(sed -n 1p "$stamp" 2>/dev/null)" = "$files" ] && installed=$(sed -n 2p "$stamp")
needed=1
for set in $installed; do
  if holds "$set" "$requirements"; then needed=; fi
done
if [ -n "$needed" ]; then
  echo "Installing requirements into .venv (first run: a few minutes) ..."
  if [ "${CAMSERVE_TORCH_CPU:-}" = 1 ]; then
    # Opt-in: PyTorch's CPU-only wheels of the pinned versions (about 4 GB less than PyPI's, which bundle CUDA).
    torch_pins=$(grep -E '^(torch|torchvision)==' requirements.txt)
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on \
      --index-url https://download.pytorch.org/whl/cpu $torch_pins
  fi
  .venv/bin/python -m pip install --disable-pip-version-check --progress-bar on -r "$requirements"
  if [ "$requirements" = requirements-dev.txt ]; then
    .venv/bin/python -m pip install --disable-pip-version-check --no-deps -r requirements-references.txt
  fi
  # The project itself, editable: camserve (served) and camtools (build and dev tools) import from anywhere.
  .venv/bin/python -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
  printf '%s\n%s\n' "$files" "$(echo $installed "$requirements")" >"$stamp"
fi
