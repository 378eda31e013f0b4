#!/usr/bin/env bash
# The full test suite: unit tests, then a real TorchServe on free loopback ports. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
