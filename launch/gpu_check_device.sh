#!/usr/bin/env bash
# The one-GPU check on a machine without network access: megatron-core (and any other missing
# package) installed from the wheel folder .whl/ beside this checkout, then
# `python -m megatron_coe.gpu_check`, its JSON and logs written under $OUT (default:
# benchmarks/results).  Extra arguments go to the check, e.g. --parts a b.
#
#   mkdir -p .whl && pip download --no-deps --only-binary=:all: -d .whl megatron-core==0.19.2
#   OUT=/some/dir launch/gpu_check_device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/coe-site .whl/*.whl
    export PYTHONPATH="/tmp/coe-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import megatron.core, torch; print('torch', torch.__version__, '| megatron-core',
    megatron.core.__version__, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
set +e
python3 -m megatron_coe.gpu_check --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
exit "$status"
