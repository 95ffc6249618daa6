"""The training step's CPU checks on one CUDA GPU, where the fused AdamW kernel, the gradient
norm and the written gradient buffers run as in a CUDA training: the optimizer step on the device
against Megatron's step (megatron_coe/optim_step.py), a skipped non-finite step, and the
gradient buffers written instead of zeroed (megatron_coe/ddp.py).  ``pytest -m gpu``; skipped
without a GPU.  A module of its own: its process group is NCCL's, the CPU tests' is gloo's."""

import pytest

from test_ddp_write_first import check_written_buffers
from test_optim_step import check_nonfinite_step, check_step_matches_megatrons


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_step_on_the_device_matches_megatrons_on_gpu(precision):
    check_step_matches_megatrons(precision, 0.05, "cuda")


@pytest.mark.gpu
def test_a_nonfinite_step_changes_nothing_on_gpu():
    check_nonfinite_step("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["none", "experts"])
def test_written_buffers_equal_zeroed_and_accumulated_ones_on_gpu(recompute):
    check_written_buffers(recompute, "bf16", "cuda")
