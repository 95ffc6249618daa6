"""The reference residual x(t) = x(t-1) + (routed + shared) summed in the unpermutation's Triton
kernel, and the gradients of x(t-1)'s uses summed in one (model/layer.py, _Fan;
model/triton_gather_sum.py), on CPU through Triton's interpreter:

- the kernel's addends and its sum without a gather give the bits of torch's adds in order;
- a CoE layer (model.fused_kernels=triton, residual reference) gives the same output and
  gradients, bit for bit, as the same layer adding with torch's ops, in fp32 and bf16, C = 1
  and 2, with and without a shared expert, under each recompute mode, and where the
  unpermutation cannot add (capacity dropping: the layer adds);
- it runs the kernels where the layer says it does."""

import pytest
import torch

from layer_harness import fwd_bwd, layer_config, seeded_layers
from test_triton_kernels import device  # noqa: F401  (the fixture: cpu, interpreted; cuda)

interpreted = pytest.mark.usefixtures("triton_interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_addends_and_sums_in_order_are_torchs_adds(dtype, device):
    from megatron_coe.model.triton_gather_sum import gather_sum, sum_in_order

    torch.manual_seed(0)
    T, k, H = 37, 3, 50
    rows = torch.randn(T * k, H).to(dtype).to(device)
    order = torch.randperm(T * k).to(device)
    # terms of very different sizes, so that each rounding matters
    a, b, c = (s * torch.randn(T, H).to(dtype).to(device) for s in (1.0, 300.0, 1e-3))
    base = gather_sum(rows, order, k)
    assert torch.equal(gather_sum(rows, order, k, (a, b)), (base + a) + b)
    assert torch.equal(gather_sum(rows, order, k, (c,)), base + c)
    assert torch.equal(sum_in_order(a, b, c, base), ((a + b) + c) + base)
    assert torch.equal(sum_in_order(c.view(T, 5, 10), a.view(T, 5, 10)), (c + a).view(T, 5, 10))
    with pytest.raises(ValueError, match="adds up to 3 tensors"):
        gather_sum(rows, order, k, (a, b, c, a))
    with pytest.raises(ValueError, match="adds up to 3 tensors"):
        gather_sum(rows, order, k, (a[:-1],))


def _config(iterations=2, shared=True, kernels="triton", residual="reference",
            iteration_norm=False, device="cpu", **moe):
    if not shared:
        moe["shared_expert_hidden_size"] = None
    triton = {"swiglu_fusion": True, "fused_kernels": "triton"} if kernels == "triton" else {}
    return layer_config(device=device,
                        model={**triton, "coe": {"iterations": iterations, "residual": residual,
                                                 "iteration_norm": iteration_norm}}, **moe)


def _counted(monkeypatch):
    """Calls of the kernel: [(with an order, number of addends)]."""
    from megatron_coe.model import triton_gather_sum

    calls, original = [], triton_gather_sum.gather_sum
    monkeypatch.setattr(triton_gather_sum, "gather_sum", lambda rows, order, k, addends=(): (
        calls.append((order is not None, len(addends))) or original(rows, order, k, addends)))
    return calls


def check_fused_residual_bits(device, dtype, iterations=2, shared=True, moe=None, adds=2,
                              monkeypatch=None):
    """A reference-residual layer with the Triton kernels on ``device``: the kernels called as
    the layer says (counted where ``monkeypatch`` is given), and the same output and gradients,
    bit for bit, as the same layer adding with torch's ops."""
    layer, = seeded_layers(_config(iterations, shared, device=device, **(moe or {})),
                           dtype=dtype)
    assert layer.fused_residual and layer.token_dispatcher.triton_sums
    x = torch.randn(40, 2, 32, dtype=dtype, device=device)
    calls = _counted(monkeypatch) if monkeypatch is not None else None
    fused = fwd_bwd(layer, x)
    layer.zero_grad(set_to_none=True)
    if calls is not None:
        # per iteration: the unpermutation with its addends where it runs as gathers (forward)
        # and the permutation's backward; the gradients of x's uses (router, rows, shared,
        # residual)
        gathered = [(True, adds), (True, 0)] if adds else []
        assert sorted(calls) == sorted(iterations * (gathered + [(False, 3 if shared else 2)]))
    layer.fused_residual = False  # the same layer, adding with torch's ops
    for a, b in zip(fused, fwd_bwd(layer, x)):
        assert torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iterations, shared, moe, adds", [
    (2, True, {}, 2), (1, True, {}, 2), (2, False, {}, 1),
    (2, True, {"capacity_factor": 1.0}, 0),  # not dropless: Megatron's unpermutation
])
def test_layer_sums_the_residual_in_the_kernels_bit_for_bit(dtype, iterations, shared, moe,
                                                            adds, monkeypatch):
    check_fused_residual_bits("cpu", dtype, iterations, shared, moe, adds, monkeypatch)


@interpreted
@pytest.mark.parametrize("recompute", ["moe", "experts", "moe_act"])
def test_recomputed_layers_sum_the_residual_bit_for_bit(recompute):
    """Under each recompute mode the layer's forward runs again in backward, with the same
    kernels: still the bits of the unfused adds."""
    config = layer_config(recompute=recompute, model={
        "swiglu_fusion": True, "fused_kernels": "triton",
        "coe": {"iterations": 2, "residual": "reference"}})
    layer, = seeded_layers(config, dtype=torch.bfloat16)
    assert layer.fused_residual
    x = torch.randn(40, 2, 32, dtype=torch.bfloat16)
    fused = fwd_bwd(layer, x)
    layer.zero_grad(set_to_none=True)
    layer.fused_residual = False
    for a, b in zip(fused, fwd_bwd(layer, x)):
        assert torch.equal(a, b)


@interpreted
def test_fused_residual_only_for_the_reference_residual_with_the_triton_kernels():
    from megatron_coe.model import build_moe_layer

    assert build_moe_layer(_config()).fused_residual
    for config in (_config(kernels="compile"), _config(residual="inner"),
                   _config(iteration_norm=True)):
        assert not build_moe_layer(config).fused_residual
