"""benchmarks/trace_sites.py: a trace's kernels go to the line that launched them: a forward
kernel to the innermost project frame around its launch, a backward kernel (autograd's thread,
no project frame) to its forward op's frame through the sequence number, an optimizer kernel to
the optimizer phase; a kernel without a recorded launch is kept, not dropped."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _trace():
    def span(cat, name, tid, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur,
                "args": args}

    def launch(tid, ts, corr):
        return span("cuda_runtime", "cudaLaunchKernel", tid, ts, 1, correlation=corr)

    def kernel(name, ts, dur, corr):
        return span("kernel", name, 7, ts, dur, correlation=corr)

    return {"traceEvents": [
        # forward, main thread: a project frame around an ATen op that launches a GEMM
        span("python_function", "torch/nn/modules/module.py(1): _call_impl", 1, 0, 120),
        span("python_function", "/x/megatron_coe/model/experts.py(42): forward", 1, 5, 100),
        # an earlier op that recorded the same counter value without making a node
        span("python_function", "/x/megatron_coe/data/batches.py(7): next_batch", 1, 1, 3),
        span("cpu_op", "aten::to", 1, 2, 1, **{"Sequence number": 5}),
        span("cpu_op", "aten::mm", 1, 10, 10, **{"Sequence number": 5}),
        # nested spans starting together: the outer one is the thread's outermost
        span("cpu_op", "aten::t", 1, 10, 2, **{"Sequence number": 5}),
        launch(1, 12, 1), kernel("sm90_xmma_gemm_bf16", 30, 7.0, 1),
        # backward, autograd's thread: no project frame; its forward op has sequence number 5
        span("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 2, 200, 100,
             **{"Sequence number": 5}),
        span("cpu_op", "aten::mm", 2, 210, 10),
        launch(2, 215, 2), kernel("sm90_xmma_gemm_bf16", 230, 9.0, 2),
        # optimizer
        span("python_function", "/y/megatron/core/optimizer/optimizer.py(776): step", 1, 400,
             100),
        span("cpu_op", "aten::_fused_adamw_", 1, 440, 20),
        launch(1, 450, 3), kernel("multi_tensor_apply_kernel<FusedAdam>", 460, 4.0, 3),
        # a kernel whose launch the trace lost
        kernel("vectorized_elementwise_kernel<MulFunctor>", 600, 2.0, 99),
    ]}


def test_kernels_go_to_the_lines_that_launched_them(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trace_sites

    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    rows = {(r["phase"], r["site"]): r
            for r in trace_sites.by_site(trace_sites.attribute(trace_sites.load_trace(path)), 1)}
    site = "megatron_coe/model/experts.py(42): forward"
    assert rows[("forward", site)]["ms_per_step"] == 7.0e-3
    assert rows[("backward", site)]["ms_per_step"] == 9.0e-3
    assert rows[("backward", site)]["split_ms"] == {"GEMM: mm": 9.0e-3}
    opt = rows[("optimizer", "megatron/core/optimizer/optimizer.py(776): step")]
    assert opt["split_ms"] == {"optimizer: _fused_adamw_": 4.0e-3}
    assert rows[("?", "(no launch recorded)")]["kernels_per_step"] == 1

    out = tmp_path / "sites.json"
    done = subprocess.run([sys.executable, "benchmarks/trace_sites.py", str(path), "--steps",
                           "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert abs(result["kernel_ms_per_step"] - 22.0e-3) < 1e-12
    assert result["classes_ms_per_step"]["GEMM"] == 16.0e-3
    assert len(result["sites"]) == 4
