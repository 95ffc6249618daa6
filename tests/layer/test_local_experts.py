"""LocalExperts (the local spec's experts) against Megatron-Core's SequentialMLP: the same
weights give bit-identical outputs and gradients (rows, probabilities, every weight), for
uneven and empty experts, fp32 and bf16, gated and plain activations; settings the lean forward
does not implement fall back to SequentialMLP's own."""

import dataclasses

import pytest
import torch

from experts_harness import E, H, local_submodules, run, tf_config


def build(gated: bool, dtype):
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_coe.model.experts import LocalExperts

    tf = tf_config(gated)
    submodules = local_submodules(False)
    pg = get_default_pg_collection()
    torch.manual_seed(0)
    stock = SequentialMLP(E, tf, submodules, pg_collection=pg)
    lean = LocalExperts(E, tf, submodules, pg_collection=pg)
    lean.load_state_dict(stock.state_dict())
    return stock.to(dtype), lean.to(dtype)


def grads(experts):
    return [p.grad for p in experts.parameters()]


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_experts_bit_identical_to_sequential_mlp(gated, dtype, monkeypatch):
    stock, lean = build(gated, dtype)
    calls = lean_calls(monkeypatch)
    counts = torch.tensor([5, 0, 17, 1, 0, 9])  # uneven, with empty experts
    n = int(counts.sum())
    x = torch.randn(n, H).to(dtype)
    probs = torch.rand(n)  # Megatron keeps routing probabilities in fp32
    gy = torch.randn(n, H)
    a, b = run(stock, x, counts, probs, gy), run(lean, x, counts, probs, gy)
    assert len(calls) == 2 * E  # the lean path ran
    assert a[0].dtype == b[0].dtype == dtype
    for u, v in zip(a[:3], b[:3]):
        assert torch.equal(u, v)
    for (name, _), u, v in zip(stock.named_parameters(), grads(stock), grads(lean)):
        assert torch.equal(u, v), name
    assert any(g.abs().sum() > 0 for g in grads(lean))
    assert lean.state_dict().keys() == stock.state_dict().keys()


def lean_calls(monkeypatch) -> list:
    """Counts the lean path's linear calls."""
    from megatron_coe.model import experts

    calls = []
    apply = experts._Linear.apply
    monkeypatch.setattr(experts._Linear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def test_local_experts_take_the_lean_path(monkeypatch):
    stock, lean = build(True, torch.float32)
    calls = lean_calls(monkeypatch)
    counts = torch.tensor([3, 2, 0, 4, 1, 2])
    run(lean, torch.randn(12, H), counts, torch.rand(12), torch.randn(12, H))
    assert len(calls) == 2 * E  # fc1 and fc2 of every expert, empty ones included


def assert_megatron_forward(stock, other, monkeypatch):
    """``other`` runs SequentialMLP's own forward (no lean linear call) and gives ``stock``'s
    output and input gradient."""
    calls = lean_calls(monkeypatch)
    counts = torch.tensor([3, 2, 0, 4, 1, 2])
    x, probs, gy = torch.randn(12, H), torch.rand(12), torch.randn(12, H)
    a, b = run(stock, x, counts, probs, gy), run(other, x, counts, probs, gy)
    assert calls == []
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("change", ["frozen weight", "forward pre-hook", "forward hook"])
def test_local_experts_fall_back_where_the_lean_forward_does_not_apply(change, monkeypatch):
    """Megatron's own forward (no lean linear call) and the same results."""
    stock, lean = build(True, torch.float32)
    for experts in (stock, lean):
        linear = experts.local_experts[0].linear_fc1
        if change == "frozen weight":
            linear.weight.requires_grad_(False)
        elif change == "forward pre-hook":  # e.g. DDP's overlapped parameter all-gather
            linear.register_forward_pre_hook(lambda module, args: None)
        else:
            linear.register_forward_hook(lambda module, args, out: None)
    assert_megatron_forward(stock, lean, monkeypatch)
    if change == "frozen weight":
        assert grads(lean)[0] is None


def test_local_experts_keep_megatron_forward_for_other_linears(monkeypatch):
    """Transformer Engine's (or any other) linear classes: SequentialMLP's own forward."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_coe.model.experts import LocalExperts

    stock, _ = build(True, torch.float32)

    class OtherLinear(ColumnParallelLinear):
        pass

    submodules = dataclasses.replace(local_submodules(False), linear_fc1=OtherLinear)
    other = LocalExperts(E, stock.config, submodules, pg_collection=get_default_pg_collection())
    assert not other._lean
    other.load_state_dict(stock.state_dict())
    assert_megatron_forward(stock, other, monkeypatch)
