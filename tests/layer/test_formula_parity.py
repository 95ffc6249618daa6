"""The CoE layer equals the formula (plain PyTorch, from the layer's own weights), and with
C = 1 equals Megatron-Core's own MoELayer.  One process, EP = 1, float32."""

import itertools

import pytest
import torch

from megatron_coe.config import config_from_dict
from reference import coe_forward, layer_weights, max_rel_err

S, B, H = 6, 3, 32


def make_config(iterations, residual, router, shared, capacity_factor=None, aux="none",
                device="cpu"):
    # per-expert weights (LocalExperts), addressed below as parameters; grouped experts equal
    # LocalExperts bit for bit in the same layer (tests/layer/test_grouped_experts.py)
    moe = {"num_experts": 8, "topk": 2, "expert_hidden_size": 24, "aux_loss": aux,
           "capacity_factor": capacity_factor, "grouped_gemm": False}
    if shared:
        moe["shared_expert_hidden_size"] = 16
    return config_from_dict({
        "device": device,
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4, "moe": moe,
                  "coe": {"iterations": iterations, "residual": residual, "router": router}},
    })


def run_layer(layer, x, gy):
    x = x.clone().requires_grad_(True)
    y, bias = layer(x)
    assert bias is None
    (y * gy).sum().backward()
    return y.detach(), x.grad


CASES = list(itertools.product([1, 2, 3], ["inner", "outer", "reference"],
                                ["independent", "shared"], [False, True]))


@pytest.mark.parametrize("iterations,residual,router,shared", CASES)
def test_layer_matches_formula(iterations, residual, router, shared):
    check_layer_matches_formula(iterations, residual, router, shared, "cpu")


def check_layer_matches_formula(iterations, residual, router, shared, device):
    """Also run on one GPU by tests/layer/test_gpu_layer.py (fp32 there too)."""
    from megatron_coe.model import build_moe_layer

    torch.manual_seed(iterations * 100 + len(residual) * 10 + shared)
    layer = build_moe_layer(make_config(iterations, residual, router, shared, device=device))
    n_routers = len({id(r) for r in layer.routers})
    assert n_routers == (iterations if router == "independent" else 1)
    x = torch.randn(S, B, H).to(device)
    gy = torch.randn(S, B, H).to(device)
    y, gx = run_layer(layer, x, gy)

    routers, experts, shared_w = layer_weights(layer)
    ref_params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    by_id = {id(p): r for p, r in zip(layer.parameters(), ref_params)}
    routers_r = [by_id[id(w)] for w in routers]
    experts_r = [(by_id[id(a)], by_id[id(b)]) for a, b in experts]
    shared_r = None if shared_w is None else (by_id[id(shared_w[0])], by_id[id(shared_w[1])])
    xr = x.reshape(-1, H).clone().requires_grad_(True)
    yr = coe_forward(xr, routers_r, experts_r, shared_r, topk=2, residual=residual)
    (yr * gy.reshape(-1, H)).sum().backward()

    assert max_rel_err(y.reshape(-1, H), yr.detach()) <= 1e-5
    assert max_rel_err(gx.reshape(-1, H), xr.grad) <= 1e-5
    for (name, p), r in zip(layer.named_parameters(), ref_params):
        assert p.grad is not None, name
        assert max_rel_err(p.grad, r.grad) <= 1e-5, name
    # every router took part: each one's gradient is non-zero
    for r in routers:
        assert r.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor,aux", [(None, "seq_aux_loss"), (1.0, "aux_loss")])
def test_c1_equals_megatron_moe_layer(capacity_factor, aux):
    """C = 1, independent routing: same parameter names, same init, same output and grads
    (bit for bit) as Megatron-Core's MoELayer, aux losses included."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_coe.model.layer import CoELayer
    from megatron_coe.model import build_moe_layer

    config = make_config(1, "inner", "independent", True, capacity_factor, aux)
    torch.manual_seed(7)
    coe = build_moe_layer(config)
    torch.manual_seed(7)
    stock = build_moe_layer(config, stock_megatron=True)
    assert isinstance(coe, CoELayer) and type(stock) is MoELayer
    assert type(coe.experts).__name__ == "LocalExperts" and coe.experts._lean
    assert type(stock.experts).__name__ == "SequentialMLP"
    assert coe.state_dict().keys() == stock.state_dict().keys()
    for (name, a), b in zip(coe.state_dict().items(), stock.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b), f"init differs: {name}"
    x = torch.randn(S, B, H)
    gy = torch.randn(S, B, H)
    y1, gx1 = run_layer(coe, x, gy)
    y2, gx2 = run_layer(stock, x, gy)
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    for (name, p), q in zip(coe.named_parameters(), stock.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_capacity_drops_tokens_over_capacity_in_every_iteration():
    """With a capacity factor, the routing map each iteration's router emits keeps exactly the
    highest-probability tokens of each expert up to capacity (reference rule)."""
    from megatron_coe.model import build_moe_layer
    from reference import drop_over_capacity, route

    torch.manual_seed(3)
    layer = build_moe_layer(make_config(3, "inner", "independent", False, capacity_factor=0.5))
    seen = []
    hooks = [r.register_forward_hook(lambda m, args, out: seen.append((args[0], out[1])))
             for r in layer.extra_routers] + [
        layer.router.register_forward_hook(lambda m, args, out: seen.append((args[0], out[1])))]
    run_layer(layer, torch.randn(S, B, H), torch.randn(S, B, H))
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    for t, (x_t, routing_map) in enumerate(seen):
        probs, full = route(x_t.detach().reshape(-1, H), layer.routers[t].weight, 2)
        expected = drop_over_capacity(probs, full, 2, 0.5, [S * B])
        assert torch.equal(routing_map, expected), f"iteration {t + 1}"
        assert (full & ~expected).any(), "the test should actually drop tokens"


@pytest.mark.parametrize("residual", ["inner", "outer", "reference"])
def test_transformer_layer_residual(residual):
    """The decoder layer adds the CoE output to the residual (inner, outer) or replaces the
    stream with x(C) (reference)."""
    from megatron_coe.model.layer import CoELayer
    from megatron_coe.model import build_model

    config = make_config(2, residual, "independent", True)
    torch.manual_seed(0)
    model = build_model(config)
    layer = model.decoder.layers[0]
    assert isinstance(layer.mlp, CoELayer)
    captured = {}
    layer.mlp.register_forward_hook(lambda m, a, out: captured.update(out=out[0]))
    h = torch.randn(S, B, H)
    out = layer._forward_mlp(h)
    if residual == "reference":
        expected = captured["out"]
    else:
        expected = h + captured["out"]
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
