"""The single-GPU layer tests: EP = 1, C = 1..3, every residual and router mode, on one CUDA
GPU against the same plain-PyTorch formula as on CPU (tests/layer/test_formula_parity.py), with
the same float32 tolerance (TF32 off, as torch defaults).  ``pytest -m gpu``; skipped without
a GPU.  A module of its own: its process group is NCCL's, the CPU tests' is gloo's."""

import pytest

from test_formula_parity import CASES, check_layer_matches_formula


@pytest.mark.gpu
@pytest.mark.parametrize("iterations,residual,router,shared", CASES)
def test_layer_matches_formula_on_gpu(iterations, residual, router, shared, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    check_layer_matches_formula(iterations, residual, router, shared, "cuda")
