"""model/permutation.py: the dropless permutation and its inverse as gathers.  The row sums equal
Megatron's atomic scatter-adds (exactly in fp64, within rounding in fp32 and bf16); a CoE layer
runs them (and not Megatron's index_add_/scatter_add_) and gives the scatter path's outputs and
gradients within rounding; routing that does not give every token k rows runs Megatron's."""

import pytest
import torch

from layer_harness import fwd_bwd, layer_config, seeded_layers


def _expert_major_index(tokens, experts, k, generator):
    """Each token's k distinct experts; the rows' tokens listed expert by expert."""
    picks = torch.rand(tokens, experts, generator=generator).topk(k, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, picks, True)
    return routing_map.T.nonzero()[:, 1]


def test_gathered_sums_equal_the_scatter_adds():
    from megatron_coe.model.permutation import TokenOrder, _GatherRows, _SumRows

    g = torch.Generator().manual_seed(0)
    T, E, k, H = 37, 9, 3, 5
    index = _expert_major_index(T, E, k, g)
    order = TokenOrder().of(index)
    x = torch.randn(T, H, dtype=torch.float64, generator=g, requires_grad=True)
    rows = _GatherRows.apply(x, index, order, k)
    assert torch.equal(rows, x.index_select(0, index))
    d_rows = torch.randn(rows.shape, dtype=torch.float64, generator=g)
    rows.backward(d_rows)
    scatter = torch.zeros(T, H, dtype=torch.float64).index_add_(0, index, d_rows)
    assert torch.allclose(x.grad, scatter, rtol=1e-12, atol=1e-12)

    r = torch.randn(T * k, H, dtype=torch.float64, generator=g, requires_grad=True)
    y = _SumRows.apply(r, index, order, k)
    assert torch.allclose(y, torch.zeros(T, H, dtype=torch.float64).index_add_(0, index, r),
                          rtol=1e-12, atol=1e-12)
    dy = torch.randn(T, H, dtype=torch.float64, generator=g)
    y.backward(dy)
    assert torch.equal(r.grad, dy.index_select(0, index))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_coe_layer_with_gathers_equals_the_scatter_path(dtype, tol, monkeypatch):
    from megatron_coe.model import permutation

    gathered, scattered = seeded_layers(layer_config(), layer_config(), dtype=dtype)
    assert gathered.token_dispatcher.rows_per_token == 2
    scattered.token_dispatcher.rows_per_token = None  # Megatron's permute and unpermute
    calls = []
    for name in ("_GatherRows", "_SumRows"):
        cls = getattr(permutation, name)
        monkeypatch.setattr(cls, "apply", (lambda apply, name: lambda *a: (
            calls.append(name), apply(*a))[1])(cls.apply, name))
    x = torch.randn(40, 2, 32, dtype=dtype)
    ours = fwd_bwd(gathered, x)
    assert calls == ["_GatherRows", "_SumRows"] * 2  # each of the 2 iterations
    calls.clear()
    for a, b in zip(ours, fwd_bwd(scattered, x)):
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale) <= tol
    assert not calls


def test_one_sort_per_dispatch(monkeypatch):
    """The rows' token order is sorted once per CoE iteration, for the unpermutation's forward
    and the permutation's backward together; a changed or another index is sorted again."""
    from megatron_coe.model.permutation import TokenOrder

    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: (sorts.append(1), argsort(*a, **kw))[1])
    layer, = seeded_layers(layer_config())
    fwd_bwd(layer, torch.randn(40, 2, 32))
    assert len(sorts) == 2  # 2 iterations

    orders, g = TokenOrder(), torch.Generator().manual_seed(0)
    index = _expert_major_index(11, 5, 2, g)
    first = orders.of(index)
    assert orders.of(index) is first and len(sorts) == 3
    assert orders.of(index.clone()) is not first and len(sorts) == 4
    index[0] = index[1]  # in place: its version changes
    assert orders.of(index) is not first and len(sorts) == 5


def test_inference_mode():
    """Inference tensors keep no version counter: the order is then taken afresh each time,
    and the layer gives what it gives under no_grad."""
    layer, = seeded_layers(layer_config())
    layer.eval()
    x = torch.randn(40, 2, 32)
    with torch.no_grad():
        expected, _ = layer(x)
    with torch.inference_mode():
        got, _ = layer(x)
    assert torch.equal(got, expected)


def test_routing_without_k_rows_per_token_runs_megatrons_permutation(monkeypatch):
    from megatron_coe.model import permutation

    # capacity dropping: tokens may keep fewer than k rows
    layer, = seeded_layers(layer_config(capacity_factor=1.0))
    assert layer.token_dispatcher.rows_per_token is None
    monkeypatch.setattr(permutation._GatherRows, "apply", None)  # would fail if called
    fwd_bwd(layer, torch.randn(40, 2, 32))


def test_row_probabilities_equal_megatrons():
    """The rows' probabilities and their gradient, bit for bit Megatron's permute's (whose
    backward accumulates into zeros where ours writes)."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_coe.model.permutation import _RowProbs

    g = torch.Generator().manual_seed(0)
    T, E, k = 37, 9, 3
    scores = torch.rand(T, E, generator=g)
    scores[:, [0, 4, 8]] -= 2  # experts 0, 4 and 8 (first, middle, last) get no rows
    picks = scores.topk(k, dim=1).indices
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, picks, True)
    assert routing_map[:, [0, 4, 8]].sum() == 0
    probs = torch.rand(T, E, generator=g).requires_grad_(True)
    _, theirs, index, _, _ = moe_utils.permute(torch.zeros(T, 0), routing_map, probs, T * k)
    ours = _RowProbs.apply(probs, index, routing_map)
    assert torch.equal(ours, theirs)
    d = torch.randn(T * k, generator=g)
    (grad_theirs,) = torch.autograd.grad(theirs, probs, d)
    (grad_ours,) = torch.autograd.grad(ours, probs, d)
    assert torch.equal(grad_ours, grad_theirs)
    assert torch.equal(grad_ours != 0, routing_map)
