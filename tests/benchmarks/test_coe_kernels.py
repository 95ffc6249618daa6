"""benchmarks/coe_kernels.py runs from a checkout at toy sizes on CPU (its kernels through
Triton's interpreter): every pair's outputs agree, and the JSON holds each case per top-k.  No
timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.usefixtures("triton_interpreter")
def test_kernel_benchmark_compares_equal_outputs(tmp_path):
    out = tmp_path / "kernels.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/coe_kernels.py", "--device", "cpu", "--tokens", "70",
         "--experts", "7", "--topk", "2", "3", "--hidden", "16", "--repeat", "1", "--warmup",
         "0", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    cases = ["routing", "row index", "residual forward", "residual backward"]
    assert [(r["case"], r["topk"]) for r in res["results"]] == [
        (case, k) for k in (2, 3) for case in cases]
    assert all(r["equal"] and r["eager"]["kernel_ms"] > 0 for r in res["results"])
