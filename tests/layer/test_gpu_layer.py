"""The single-GPU layer tests: EP = 1, C = 1..3, every residual and router mode, on one CUDA
GPU against the same plain-PyTorch formula as on CPU (tests/layer/test_formula_parity.py), with
the same float32 tolerance (TF32 off, as torch defaults), a model with MLA's fused RoPE
against one without (tests/layer/test_mla_rope_fusion.py), and the reference residual summed
in the compiled Triton kernels against torch's adds, bit for bit
(tests/layer/test_fused_residual.py).  ``pytest -m gpu``; skipped without
a GPU.  A module of its own: its process group is NCCL's, the CPU tests' is gloo's."""

import pytest

from test_formula_parity import CASES, check_layer_matches_formula


@pytest.mark.gpu
@pytest.mark.parametrize("iterations,residual,router,shared", CASES)
def test_layer_matches_formula_on_gpu(iterations, residual, router, shared, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_layer_matches_formula(iterations, residual, router, shared, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 5e-2)])
def test_rope_fusion_builds_the_same_model_on_gpu(precision, tol, monkeypatch):
    """model.mla.rope_fusion on the GPU, where Megatron's kernels also run in bf16 (the
    interpreter cannot), compiled, at the paper configs' rotary dim of 64."""
    import torch

    from test_mla_rope_fusion import check_rope_fusion_builds_the_same_model

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_rope_fusion_builds_the_same_model("cuda", precision, tol, monkeypatch, rope_dim=64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_residual_gives_the_same_bits_on_gpu(dtype):
    import torch

    from test_fused_residual import check_fused_residual_bits

    check_fused_residual_bits("cuda", getattr(torch, dtype))
