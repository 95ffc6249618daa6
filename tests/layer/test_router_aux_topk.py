"""The routers' aux losses reuse the routing's top-k of the same scores (model/aux_topk.py,
installed by the model builders on every device) instead of taking it again: a CoE layer's
outputs, its aux losses and every gradient stay bit-identical to Megatron's own two top-k
calls, and every case the reuse does not cover runs Megatron's."""

import pytest
import torch

from megatron_coe.config import config_from_dict

S, B, H, N = 24, 3, 16, 12


def _layer(**moe):
    from megatron_coe.model import build_moe_layer

    config = config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": N, "topk": 3, "expert_hidden_size": 8,
                          "shared_expert_hidden_size": 8, **moe},
                  "coe": {"iterations": 2}},
    })
    torch.manual_seed(0)
    layer = build_moe_layer(config)
    layer.train()
    return layer


def _step(layer, x, padding_mask):
    from megatron.core.transformer.moe import moe_logging

    moe_logging.destroy_moe_metrics_tracker()
    tracker = moe_logging.get_moe_metrics_tracker()
    x = x.clone().requires_grad_(True)
    y, _ = layer(x, padding_mask=padding_mask)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    losses = {name: m.values.clone() for name, m in tracker.metrics.items()}
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads, losses


def _megatron_aux_calls(monkeypatch):
    """Count the calls that reach Megatron's own compute_routing_scores_for_aux_loss."""
    from megatron.core.transformer.moe import moe_utils

    calls = []
    original = moe_utils.compute_routing_scores_for_aux_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe_utils, "compute_routing_scores_for_aux_loss", counted)
    return calls


@pytest.mark.parametrize("moe, padded, reused", [
    ({"aux_loss": "seq_aux_loss"}, False, True),
    ({"aux_loss": "aux_loss", "z_loss_coeff": 0.01}, False, True),
    ({"aux_loss": "seq_aux_loss", "capacity_factor": 0.8}, False, True),
    ({"aux_loss": "seq_aux_loss", "renormalize_topk": True}, False, False),
    ({"aux_loss": "seq_aux_loss"}, True, False),
])
def test_aux_loss_topk_reuse_is_bit_identical(moe, padded, reused, monkeypatch):
    from megatron.core.transformer.moe import moe_utils, router

    from megatron_coe.model import aux_topk

    layer = _layer(**moe)
    assert router.compute_routing_scores_for_aux_loss is aux_topk._aux_scores_from_routing
    x = torch.randn(S, B, H)
    # Ties in the scores: two tokens with identical rows, and one token whose logits are all
    # equal (zero input, no router bias), where any k of N experts are a valid top-k.
    x[1] = x[0]
    x[2, 0] = 0
    padding_mask = None
    if padded:
        padding_mask = torch.zeros(B, S, dtype=torch.bool)
        padding_mask[:, -5:] = True
    calls = _megatron_aux_calls(monkeypatch)
    with_reuse = _step(layer, x, padding_mask)
    assert len(calls) == (0 if reused else 2)  # Megatron's own: once per CoE iteration
    monkeypatch.setattr(router, "topk_routing_with_score_function",
                        moe_utils.topk_routing_with_score_function)
    monkeypatch.setattr(router, "compute_routing_scores_for_aux_loss",
                        moe_utils.compute_routing_scores_for_aux_loss)
    megatron = _step(layer, x, padding_mask)
    assert len(calls) == (2 if reused else 4)
    y, dx, grads, losses = with_reuse
    assert torch.equal(y, megatron[0]) and torch.equal(dx, megatron[1])
    assert all(torch.equal(a, b) for a, b in zip(grads, megatron[2]))
    assert losses.keys() == megatron[3].keys() and losses
    assert all(torch.equal(losses[k], megatron[3][k]) for k in losses)
    assert all(torch.count_nonzero(g) for g in grads[:2])  # routers' weights got gradients


def test_reuse_only_for_the_same_topk():
    """The remembered top-k serves only the logits it was taken from, unmodified, once, with the
    same k, and only when the routing's top-k was the aux loss's; otherwise Megatron's own runs."""
    from megatron.core.transformer.moe import moe_utils, router

    from megatron_coe.model import aux_topk

    aux_topk.install()

    def aux_map(logits, k=3):
        got, scores = router.compute_routing_scores_for_aux_loss(logits, k, "softmax")
        want, want_scores = moe_utils.compute_routing_scores_for_aux_loss(logits, k, "softmax")
        assert torch.equal(got, want) and torch.equal(scores, want_scores)
        return got

    logits = torch.randn(10, N)
    _, routing_map = router.topk_routing_with_score_function(logits, 3, use_pre_softmax=True)
    assert aux_map(logits) is routing_map  # reused
    assert aux_map(logits) is not routing_map  # once
    for change in ("other tensor", "logits in place", "map in place", "other k", "no grad",
                   "renormalised", "group top-k", "precomputed indices"):
        routing = dict(use_pre_softmax=True)
        if change == "renormalised":
            routing["use_pre_softmax"] = False
        elif change == "group top-k":
            routing.update(num_groups=2, group_topk=2)
        elif change == "precomputed indices":
            routing["precomputed_indices"] = torch.randn(10, N).topk(3, dim=1).indices
        with torch.set_grad_enabled(change != "no grad"):
            _, routing_map = router.topk_routing_with_score_function(logits, 3, **routing)
        other = logits
        if change == "other tensor":
            other = logits.clone()
        elif change == "logits in place":
            logits.mul_(-1)
        elif change == "map in place":
            routing_map[:, 0] = ~routing_map[:, 0]
        got = aux_map(other, 2 if change == "other k" else 3)
        assert got is not routing_map, change
