"""train.recompute=experts: each CoE iteration's expert MLPs (routed and shared) are recomputed
in backward.  Same outputs and gradients, bit for bit, as without recompute; the activations
kept for backward shrink (only the experts' inputs are kept).  One process, EP = 1."""

import sys
from pathlib import Path

import pytest
import torch

from megatron_coe.config import config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from coe_layer import saved_activation_bytes  # noqa: E402

S, B, H = 6, 3, 32


def make_config(iterations, shared, recompute, capacity_factor=None):
    moe = {"num_experts": 8, "topk": 2, "expert_hidden_size": 24,
           "capacity_factor": capacity_factor}
    if shared:
        moe["shared_expert_hidden_size"] = 16
    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4, "moe": moe,
                  "coe": {"iterations": iterations}},
        "train": {"recompute": recompute},
    })


def forward_backward(layer, x, gy):
    """(output, input grad, parameter grads, bytes of the tensors saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    x = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(x)
    (y * gy).sum().backward()
    return y.detach(), x.grad, [p.grad for p in layer.parameters()], sum(saved)


@pytest.mark.parametrize("iterations,shared,capacity_factor",
                         [(1, True, None), (2, True, None), (3, False, None), (2, True, 0.5)])
def test_expert_recompute_is_bit_identical_and_keeps_less(iterations, shared, capacity_factor):
    from megatron_coe.model import build_moe_layer

    torch.manual_seed(0)
    plain = build_moe_layer(make_config(iterations, shared, "none", capacity_factor))
    recomputed = build_moe_layer(make_config(iterations, shared, "experts", capacity_factor))
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.recompute_experts and not plain.recompute_experts
    x, gy = torch.randn(S, B, H), torch.randn(S, B, H)
    a, b = forward_backward(plain, x, gy), forward_backward(recomputed, x, gy)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for (name, _), u, v in zip(plain.named_parameters(), a[2], b[2]):
        assert torch.equal(u, v), name
    assert b[3] < a[3]  # the experts' hidden activations are not kept


def test_expert_recompute_needs_moe_layers():
    with pytest.raises(ValueError, match="recompute=experts needs MoE"):
        config_from_dict({"model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4},
                          "train": {"recompute": "experts"}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iterations", [1, 2])
def test_routed_experts_recomputed_from_their_rows_gather(iterations, dtype, monkeypatch):
    """On one rank, dropless, the routed experts' recompute keeps the layer's tokens and the
    rows' index instead of the rows (model/gather_recompute.py): the bits of the plain expert
    recompute, and C x T k x H values fewer kept for backward."""
    from megatron_coe.model import build_moe_layer, gather_recompute, layer

    torch.manual_seed(0)
    config = make_config(iterations, True, "experts")
    ref = build_moe_layer(config).to(dtype)
    x, gy = torch.randn(S, B, H, dtype=dtype), torch.randn(S, B, H, dtype=dtype)
    results, kept = {}, {}
    for path in ("gather", "plain"):
        if path == "plain":  # the rows kept, as Megatron's checkpoint keeps its inputs
            monkeypatch.setattr(layer, "recomputed_from_gather",
                                lambda fn, rows, probs, tokens, index:
                                layer.CoELayer._recomputed(lay, fn, rows, probs))
        lay = build_moe_layer(config).to(dtype)
        lay.load_state_dict(ref.state_dict())
        calls = []
        real = gather_recompute._FromGather.apply
        monkeypatch.setattr(gather_recompute._FromGather, "apply",
                            lambda *a: calls.append(1) or real(*a))
        results[path] = forward_backward(lay, x, gy)
        assert len(calls) == (iterations if path == "gather" else 0)
        kept[path] = saved_activation_bytes(lay, x.clone().requires_grad_())["kept"]
    a, b = results["gather"], results["plain"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for (name, _), u, v in zip(ref.named_parameters(), a[2], b[2]):
        assert torch.equal(u, v), name
    rows = S * B * config.model.moe.topk * H * x.element_size()
    assert kept["plain"] - kept["gather"] == iterations * rows


def test_the_recompute_from_the_rows_gather_refuses_autograd_grad():
    """Like Megatron's checkpoint: its backward writes the experts' weight gradients, which
    torch.autograd.grad would not expect."""
    from megatron_coe.model.gather_recompute import recomputed_from_gather

    w = torch.randn(4, 4, requires_grad=True)
    tokens = torch.randn(3, 4, requires_grad=True)
    index = torch.tensor([0, 2, 2, 1])
    rows = tokens.index_select(0, index)
    out = recomputed_from_gather(lambda r, p: (r @ w) * p.unsqueeze(-1), rows,
                                 torch.rand(4), tokens.detach(), index)
    with pytest.raises(RuntimeError, match="not compatible with torch.autograd.grad"):
        torch.autograd.grad(out.sum(), tokens)
    out = recomputed_from_gather(lambda r, p: (r @ w) * p.unsqueeze(-1), rows,
                                 torch.rand(4), tokens.detach(), index)
    out.sum().backward()
    assert tokens.grad is not None and w.grad is not None
