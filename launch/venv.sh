#!/usr/bin/env bash
# Create (or update) .venv with this package for local CPU development and CI.
# megatron-core 0.19.x needs Python >= 3.12; on machines whose default python3 is older,
# pyenv's 3.12 is selected by PYENV_VERSION (override it if your pyenv holds another 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYENV_VERSION="${PYENV_VERSION:-3.12.1}"
PY="${PYTHON:-python3.12}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch from PyPI is a CUDA build that also runs on CPU (~1 minute, ~5 GB).
.venv/bin/pip install -q -e '.[test]' 'torch==2.14.1'
