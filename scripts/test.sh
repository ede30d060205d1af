#!/usr/bin/env bash
# Sets up adcert (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` or `bash scripts/test.sh tests/test_ops_reference.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m pytest tests -q "$@"
