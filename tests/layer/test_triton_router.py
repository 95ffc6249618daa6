"""The routers' softmax and top-k as one Triton kernel (model/triton_router.py, taken by a CoE
layer built with model.fused_kernels=triton through model/aux_topk.py), on CPU through Triton's
interpreter and compiled on a GPU (``gpu`` marks):

- the routing map is Megatron's; the probabilities, the aux losses' scores and the logits'
  gradient are Megatron's within float rounding, with either gradient alone or both;
- every token gets exactly k experts whatever its logits (ties to the lower index, a NaN
  first, infinities), as the dispatcher's counts need;
- a CoE layer calls it once per iteration and its outputs, aux losses and gradients equal the
  same layer's with Megatron's routing; the cases the kernel does not cover run Megatron's."""

import pytest
import torch

from test_router_aux_topk import _layer, _step
from test_triton_kernels import device  # noqa: F401  (the fixture: cpu, interpreted; cuda)

interpreted = pytest.mark.usefixtures("triton_interpreter")


def _megatron(logits, k):
    """(probs, routing_map, scores) as Megatron's TopKRouter computes them (softmax first, no
    renormalisation): its routing function and its aux losses' softmax."""
    from megatron.core.transformer.moe import moe_utils

    probs, routing_map = moe_utils.topk_routing_with_score_function(logits, k,
                                                                    use_pre_softmax=True)
    return probs, routing_map, torch.softmax(logits, dim=-1, dtype=torch.float32)


def _tolerance(device):
    """Relative to the largest value: the interpreter's exp is NumPy's; a GPU's fp32 exp and
    division in Triton are approximate (a few ulp)."""
    return 1e-6 if device == "cpu" else 1e-5


def _close(a, b, rel):
    if not b.numel():
        return a.shape == b.shape
    scale = b.abs().max().clamp_min(1e-30)
    return bool(((a - b).abs().max() / scale) <= rel)


@pytest.mark.parametrize("tokens, experts, k", [(37, 63, 4), (64, 64, 8), (300, 7, 2),
                                                (9, 1, 1), (0, 12, 3)])
@pytest.mark.parametrize("grads", ["both", "probs", "scores"])
def test_kernel_equals_megatrons_routing(tokens, experts, k, grads, device):
    from megatron_coe.model import triton_router

    torch.manual_seed(tokens + experts)
    logits = (2 * torch.randn(tokens, experts)).to(device)
    dprobs, dscores = torch.randn(2, tokens, experts, device=device)
    got_logits, want_logits = (logits.clone().requires_grad_(True) for _ in range(2))
    got = triton_router.topk_softmax(got_logits, k)
    want = _megatron(want_logits, k)
    assert got[1].dtype == torch.bool and torch.equal(got[1], want[1])
    assert torch.equal(got[1].sum(1), torch.full((tokens,), k, device=device))
    for a, b in ((got[0], want[0]), (got[2], want[2])):
        assert a.dtype == torch.float32 and _close(a, b, _tolerance(device))
        assert torch.equal(a == 0, b == 0)
    for outputs, logits_ in ((got, got_logits), (want, want_logits)):
        loss = 0
        if grads in ("both", "probs"):
            loss = loss + (outputs[0] * dprobs).sum()
        if grads in ("both", "scores"):
            loss = loss + (outputs[2] * dscores).sum()
        loss.backward()
    assert _close(got_logits.grad, want_logits.grad, _tolerance(device))


def test_every_token_gets_k_experts(device):
    """Ties go to the lower expert index and a NaN ranks first (Megatron's top-k over the
    scores may pick others in both cases: the scores tie, or are all NaN), and a token of
    infinite or NaN logits still gets k distinct experts; its scores are torch's softmax's
    non-finite values."""
    from megatron_coe.model import triton_router

    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([
        [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied: the first three
        [1.0, 3.0, 2.0, 3.0, 2.0],  # 3, 3, then the first 2
        [0.0, nan, 5.0, 1.0, 2.0],  # NaN first, then 5, 2
        [-inf, -inf, -inf, -inf, -inf],
        [-inf, 1.0, -inf, 2.0, -inf],  # two finite, then the first -inf
        [0.0, inf, 1.0, inf, 2.0],
    ], device=device)
    probs, routing_map, scores = triton_router.topk_softmax(logits, 3)
    chosen = [[0, 1, 2], [1, 2, 3], [1, 2, 4], [0, 1, 2], [0, 1, 3], [1, 3, 4]]
    want = torch.zeros(6, 5, dtype=torch.bool)
    for row, experts in enumerate(chosen):
        want[row, experts] = True
    assert torch.equal(routing_map.cpu(), want)
    softmax = torch.softmax(logits, dim=-1)
    assert torch.equal(scores.isnan(), softmax.isnan())
    finite = softmax.isfinite()
    assert torch.allclose(scores[finite], softmax[finite], rtol=_tolerance(device), atol=0)
    torch.testing.assert_close(probs.cpu(), torch.where(want, scores.cpu(), 0.0), rtol=0, atol=0,
                               equal_nan=True)


def test_refuses_what_it_does_not_cover():
    pytest.importorskip("triton")
    from megatron_coe.model import triton_router

    for logits, k in ((torch.zeros(4, 8, dtype=torch.bfloat16), 2), (torch.zeros(4, 8), 9),
                      (torch.zeros(4, 8), 0), (torch.zeros(2, 4, 8), 2)):
        assert not triton_router.runs(logits, k)
        with pytest.raises(ValueError, match="topk_softmax takes 2-D fp32 logits"):
            triton_router.topk_softmax(logits, k)


def _kernel_calls(monkeypatch):
    from megatron_coe.model import triton_router

    calls, original = [], triton_router.TopkSoftmax.apply
    monkeypatch.setattr(triton_router.TopkSoftmax, "apply",
                        lambda *a: calls.append(1) or original(*a))
    return calls


@interpreted
@pytest.mark.parametrize("moe, uses_kernel", [
    ({"aux_loss": "seq_aux_loss"}, True),
    ({"aux_loss": "aux_loss", "z_loss_coeff": 0.01}, True),
    ({"aux_loss": "none"}, True),
    ({"aux_loss": "seq_aux_loss", "renormalize_topk": True}, False),
])
def test_coe_layer_with_the_routing_kernel_equals_megatrons_routing(moe, uses_kernel,
                                                                    monkeypatch):
    from megatron_coe.model import aux_topk

    layer = _layer(**moe)
    assert not layer.triton_routing  # model.fused_kernels: compile on CPU unless asked for
    x = torch.randn(24, 3, 16)
    megatron = _step(layer, x, None)
    calls = _kernel_calls(monkeypatch)
    layer.triton_routing = True
    fused = _step(layer, x, None)
    assert len(calls) == (2 if uses_kernel else 0)  # once per CoE iteration
    assert not aux_topk._TRITON  # cleared after each router call, with the remembered routing
    assert aux_topk._LAST_ROUTING._entry is None
    y, dx, grads, losses = fused
    for a, b in ((y, megatron[0]), (dx, megatron[1]), *zip(grads, megatron[2])):
        assert _close(a, b, 1e-5)
    assert losses.keys() == megatron[3].keys()
    assert all(_close(losses[k], megatron[3][k], 1e-6) for k in losses)


@pytest.mark.parametrize("tokens, experts, k", [(37, 63, 4), (100, 7, 2), (64, 64, 8),
                                                (9, 5, 5), (0, 12, 3)])
def test_rows_of_the_kernels_map_are_megatrons_without_a_sort(tokens, experts, k, device):
    """The rows' tokens (Megatron's permute, a stable sort), their experts (the dispatcher's
    search of the counts) and each token's rows (argsort of the rows' tokens), from the router
    kernel's per-block counts."""
    from megatron.core.transformer.moe import moe_utils

    from megatron_coe.model import triton_router, triton_row_index

    torch.manual_seed(tokens + experts)
    logits = torch.randn(tokens, experts, device=device)
    logits[1::7] = 0  # ties: the lower experts
    logits[2::9, :2] = float("nan")  # NaN first
    logits[3::11, -1:] = float("inf")
    logits[4::13, 1:] = -float("inf")
    _, routing_map, _ = triton_router.topk_softmax(logits, k)
    index, row_experts, order = triton_row_index.rows_of(routing_map, tokens * k)
    _, _, want, _, _ = moe_utils.permute(torch.zeros(tokens, 0, device=device), routing_map,
                                         None, tokens * k)
    ends = routing_map.sum(0).cumsum(0)
    assert torch.equal(index, want)
    assert torch.equal(row_experts, torch.searchsorted(ends, torch.arange(tokens * k,
                                                                          device=device),
                                                       right=True))
    assert torch.equal(order, torch.argsort(want, stable=True))
    # only the kernel's own map, unchanged, read as k rows per token
    assert triton_row_index.rows_of(routing_map, tokens * k + 1) is None
    assert triton_row_index.rows_of(routing_map.clone(), tokens * k) is None
    routing_map[:, 0] = routing_map[:, 0]
    assert triton_row_index.rows_of(routing_map, tokens * k) is None
    with torch.inference_mode():  # no version counter: routed, not remembered
        _, routing_map, _ = triton_router.topk_softmax(logits, k)
        assert triton_row_index.rows_of(routing_map, tokens * k) is None


@interpreted
def test_coe_layer_takes_the_rows_from_the_kernels_map(monkeypatch):
    """Dispatching from the router kernel's map sorts nothing (no Megatron permute's sort, no
    argsort of the rows' tokens) and gives the same bits as dispatching by the sorts."""
    from megatron.core.transformer.moe import token_dispatcher

    from layer_harness import fwd_bwd, layer_config, seeded_layers
    from megatron_coe.model import triton_row_index

    # top-3: a token's rows summed in another order would give other bits
    layer, = seeded_layers(layer_config(topk=3, model={"swiglu_fusion": True,
                                                       "fused_kernels": "triton"}))
    x = torch.randn(40, 2, 32)
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **kw: sorts.append(1) or argsort(*a, **kw))
    permutes = []
    permute = token_dispatcher.permute
    monkeypatch.setattr(token_dispatcher, "permute",
                        lambda *a, **kw: permutes.append(1) or permute(*a, **kw))
    taken = fwd_bwd(layer, x)
    assert not sorts and not permutes
    layer.zero_grad(set_to_none=True)
    monkeypatch.setattr(triton_row_index, "rows_of", lambda *a: None)
    sorted_ = fwd_bwd(layer, x)
    assert len(permutes) == 2 and len(sorts) == 2  # per iteration: Megatron's permute, argsort
    for a, b in zip(taken, sorted_):
        assert torch.equal(a, b)
