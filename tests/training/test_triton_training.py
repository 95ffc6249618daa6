"""coe-train with model.fused_kernels=triton (every kernel: loss, SwiGLU, rows' sums with the
reference residual's adds, router, rows' index) through Triton's interpreter on CPU trains as
with the compiled kernels and Megatron's ops: the same losses, gradient norms and expert loads
step by step, within float rounding."""

import pytest

from runner import check, metrics, torchrun


@pytest.mark.usefixtures("triton_interpreter")
def test_training_with_the_triton_kernels_follows_the_compiled_kernels(tmp_path):
    common = ["parallel.expert=1", "train.steps=4", "schedule.warmup_steps=1",
              "train.log_interval=1", "train.eval_interval=0", "model.swiglu_fusion=true",
              "model.coe.residual=reference"]
    runs = {}
    for kernels in ("compile", "triton"):
        run_dir = tmp_path / kernels
        check(torchrun([*common, f"run_dir={run_dir}", f"model.fused_kernels={kernels}",
                        f"model.loss_fusion={kernels == 'triton'}"], nproc=1))
        runs[kernels] = metrics(run_dir)
    assert sorted(runs["triton"]) == sorted(runs["compile"]) == [1, 2, 3, 4]
    for step, want in runs["compile"].items():
        got = runs["triton"][step]
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
