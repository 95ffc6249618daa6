#!/usr/bin/env bash
# Single-node launcher:  NPROC=2 launch/torchrun.sh CONFIG.yaml [dotted.key=value ...]
# Runs one process per device (NPROC, default 2) with torchrun's standalone rendezvous, through
# megatron_coe.launch: torchrun's arguments and agent, plus a clean stop on SIGTERM / Ctrl-C
# (checkpoint, exit 0) and a one-line failure report.  Relative paths (the config, run_dir,
# data) are taken from the directory you call it from; the checkout's package is put first on
# PYTHONPATH.  The config path and overrides are passed through as arguments, never evaluated
# by a shell.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m megatron_coe.launch --standalone --nproc-per-node "${NPROC:-2}" \
    -m "${COE_ENTRY:-megatron_coe.train}" "$@"
