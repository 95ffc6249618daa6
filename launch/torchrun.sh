#!/usr/bin/env bash
# Single-node launcher:  NPROC=2 launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]
# Runs one process per device (NPROC, default 2) with torchrun's standalone rendezvous.
# The config path and overrides are passed through as arguments, never evaluated by a shell.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" \
    -m "${COE_ENTRY:-megatron_coe.train}" "$@"
