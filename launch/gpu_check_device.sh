#!/usr/bin/env bash
# The one-GPU check on a machine without network access: megatron-core (and any other missing
# package) installed from the wheel folder .whl/ beside this checkout, then
# `python -m megatron_coe.gpu_check`, its JSON and logs written under $OUT (default:
# benchmarks/results).  Extra arguments go to the check, e.g. --parts a b.  GPU_TESTS, a
# space-separated list of test files, runs their gpu-marked tests first (`pytest -m gpu`;
# log: $OUT/gpu_tests.log; pytest from the wheel folder where the machine has none).
# COE_KERNELS=1 then times the CoE path's Triton kernels alone (benchmarks/coe_kernels.py:
# $OUT/coe_kernels.json and .log).  KEPT_MEMORY=1 counts what the memory target's pair keeps
# for backward on the GPU, by part, without recompute and with the experts' (benchmarks/
# kept_memory.py: $OUT/kept_memory.json and .log).  AGAIN="ARGS", a space-separated argument
# list, runs the check a second time after the first with those arguments instead (e.g. the
# paper's global batch: AGAIN="--parts b --global-batch 64 --micro-batches 32 8 --set ..."):
# $OUT/gpu_check_again.json and .log.
#
#   mkdir -p .whl && pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2 \
#       pytest iniconfig pluggy packaging pygments
#   OUT=/some/dir GPU_TESTS="tests/layer/test_router_gemm.py" launch/gpu_check_device.sh
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
if [ -n "${GPU_TESTS:-}" ]; then
    read -r -a gpu_tests <<< "$GPU_TESTS"
    python3 -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}" > "$out/gpu_tests.log" 2>&1
    echo "gpu tests: exit $?" | tee -a "$out/gpu_tests.log"
fi
if [ -n "${COE_KERNELS:-}" ]; then
    python3 benchmarks/coe_kernels.py --out "$out/coe_kernels.json" > "$out/coe_kernels.log" 2>&1
    echo "coe kernels: exit $?" | tee -a "$out/coe_kernels.log"
fi
if [ -n "${KEPT_MEMORY:-}" ]; then
    python3 benchmarks/kept_memory.py --device cuda --configs "MoE(8/64)" "CoE-2(4/48)" \
        --recompute none experts --out "$out/kept_memory.json" > "$out/kept_memory.log" 2>&1
    echo "kept memory: exit $?" | tee -a "$out/kept_memory.log"
fi
python3 -m megatron_coe.gpu_check --out "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
if [ -n "${AGAIN:-}" ]; then
    read -r -d '' -a again <<< "$AGAIN"  # every line's words
    python3 -m megatron_coe.gpu_check --out "$out/gpu_check_again.json" "${again[@]}" 2>&1 \
        | tee "$out/gpu_check_again.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
exit "$status"
