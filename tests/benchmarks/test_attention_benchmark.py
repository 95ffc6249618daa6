"""The attention benchmark's documented command runs from a checkout at its smallest shape and
records both attentions' times for every backend it tries.  No timing is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_attention_benchmark_runs(tmp_path):
    out = tmp_path / "attention.json"
    cmd = [sys.executable, "benchmarks/attention.py", "--threads", "1", "--reps", "1",
           "--shapes", "tiny-mha", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    assert row["shape"] == "tiny-mha" and row["unfused_ms"] > 0
    assert set(row["fused_ms"]) == {"default", "math"}
    assert all(ms > 0 for ms in row["fused_ms"].values())
    assert "tiny-mha" in done.stdout and "x)" in done.stdout  # the printed ratio
