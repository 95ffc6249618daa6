"""What a training step asks of the host, counted at PyTorch's dispatcher (megatron_coe/
host_ops.py): on a GPU each op that does work is a kernel launch, and each read of a device
value makes the host wait for the GPU.  The counts are those a CUDA run makes (the CPU backend's
own replacements are left out), so these CPU tests bound a GPU run's host syncs.

- EP = 1 dispatch (model/dispatch.py ``local_only``): no sync and no copy for Megatron's
  identity sort of the rows by local expert, bit-identical to Megatron's path.
- A whole training step (forward-backward over the micro-batches, the step's loss, the gradient
  check, the optimizer with gradient clipping), whatever the number of parameters, layers,
  micro-batches or CoE iterations: one sync with the update on the device (torch's fused AdamW,
  optim_step.py), after the whole update is queued; three on Megatron's step: the loss, the
  gradient check's verdict, the gradient norm Megatron returns as a float.  (coe-train's loop
  adds one: all ranks agree on a stop request.)
"""

import pytest
import torch

from layer_harness import fwd_bwd
from step_harness import built, megatron_step, step_batches, step_config
from megatron_coe.config import config_from_dict
from megatron_coe.host_ops import HostOps


def _layer_config(iterations, topk, grouped):
    return config_from_dict({"model": {
        "num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
        "moe": {"num_experts": 15, "topk": topk, "expert_hidden_size": 16,
                "shared_expert_hidden_size": 16, "aux_loss": "seq_aux_loss",
                "grouped_gemm": grouped},
        "coe": {"iterations": iterations}}})


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-expert"])
@pytest.mark.parametrize("iterations,topk", [(1, 4), (2, 2)])
def test_expert_parallel_size_one_dispatch_skips_the_identity_sort(grouped, iterations, topk):
    from megatron_coe.model import build_moe_layer

    config = _layer_config(iterations, topk, grouped)
    torch.manual_seed(0)
    fast = build_moe_layer(config)
    torch.manual_seed(0)
    megatron = build_moe_layer(config)
    assert fast.token_dispatcher.local_only
    megatron.token_dispatcher.local_only = False  # Megatron's own path: sort, counts to host
    x = torch.randn(48, 2, 32)
    with HostOps() as ops_fast:
        got = fwd_bwd(fast, x)
    with HostOps() as ops_megatron:
        expected = fwd_bwd(megatron, x)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # grouped experts take the counts on the device; the per-expert loop reads them once per
    # iteration; Megatron's sort reads its split sizes in forward and backward
    assert ops_fast.syncs == (0 if grouped else iterations), ops_fast.summary()
    assert ops_megatron.syncs > ops_fast.syncs, ops_megatron.summary()
    assert ops_fast.launches < ops_megatron.launches


@pytest.mark.parametrize("on_device", [True, False], ids=["on-device", "megatron"])
@pytest.mark.parametrize("iterations,micro_batches", [(1, 1), (2, 1), (2, 3)])
def test_the_host_reads_of_a_training_step(iterations, micro_batches, on_device):
    from megatron_coe import optim_step
    from megatron_coe.optim import use_adam_implementation
    from megatron_coe.train import run_schedule

    config = step_config(iterations, topk=4 // iterations, micro_batches=micro_batches,
                         optimizer={"clip_grad": 1.0})
    model, optimizer, scheduler = built(config)
    # AdamW as on CUDA (optim.adam_implementation): torch's CPU default reads each step count
    use_adam_implementation(optimizer, {"fused": True, "foreach": False})
    assert optim_step.runs_on_device(optimizer, config, torch.device("cpu"))
    step = optim_step.take_step if on_device else megatron_step
    n_params = sum(1 for _ in model.parameters())
    for _ in range(2):  # the first step also creates the optimizer state
        model.zero_grad_buffer()
        optimizer.zero_grad()
        with HostOps() as ops:
            total = run_schedule(model, step_batches(config, 1), config, forward_only=False)
            result = step(model, optimizer, scheduler, total, config, torch.device("cpu"))
        assert result.applied and result.grad_norm > 0 and 0 < result.loss < 10
        assert total[1] == 2 * 12 * micro_batches
    if on_device:
        assert ops.syncs == 1 and set(ops.sync_sites) == {"optim_step.py:_step_on_device"}, \
            ops.summary()
    else:
        assert ops.syncs == 3, ops.summary()
        assert set(ops.sync_sites) == {"optim_step.py:mean_loss_over_dp",
                                       "optim_step.py:grads_are_finite",
                                       "clip_grads.py:get_grad_norm_fp32"}, ops.summary()
    assert n_params > 20  # per-parameter reads would have shown


def test_kernel_classes_name_the_triton_kernels_apart():
    """The profile's classes tell this package's Triton kernels (model.fused_kernels=triton)
    from torch.compile's generated ones and from the GEMMs they sit beside."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from host_work import kernel_class

    from megatron_coe.model import (triton_cross_entropy, triton_gather_sum, triton_router,
                                    triton_row_index, triton_sum_into, triton_swiglu)

    for kernel in (triton_swiglu.coe_swiglu_forward, triton_swiglu.coe_swiglu_backward,
                   triton_cross_entropy.coe_cross_entropy_forward,
                   triton_cross_entropy.coe_cross_entropy_backward,
                   triton_gather_sum.coe_gather_sum, triton_router.coe_topk_softmax,
                   triton_router.coe_topk_softmax_backward, triton_row_index.coe_row_index,
                   triton_sum_into.coe_sum_into):
        assert kernel_class(kernel.fn.__name__) == "Triton (this package)"
    assert kernel_class("triton_poi_fused_mul_silu_split_0") == "compiled (Triton)"
    assert kernel_class("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NTN") == "GEMM"
