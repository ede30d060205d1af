#!/usr/bin/env bash
# Sets up adcert on a fresh machine: the CPU build of torch first, then the rest under a
# constraint (so pip never swaps torch for a multi-GB CUDA build), then builds adcert._C
# against that torch. Idempotent: re-running only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
# AutoAttack for the certifier; --no-deps: its torchvision requirement would not import with CPU torch
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "torchattacks==3.5.1"
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e .
"$PY" -c "import adcert, torch; print('adcert', adcert.__version__, 'built against torch', torch.__version__)"
