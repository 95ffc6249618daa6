"""The routers' aux losses reuse the routing's top-k instead of taking it again; with
``model.fused_kernels: triton`` the routing's softmax and top-k are one kernel.

Megatron's TopKRouter (softmax scores, no renormalisation of the top-k) computes per call

    routing:   s = softmax(logits);  probs, idx = topk(s, k);  map = scatter(idx)
    aux loss:  s' = softmax(logits); idx' = topk(s', k);       map' = scatter(idx')

s' and s are the same op on the same tensor, so idx' = idx and map' = map bit for bit (the
same top-k call: sorted, as routing sorts when gradients are on).  Here the aux loss takes the
routing's map; s' is still computed as Megatron computes it, so the aux losses and every
gradient are unchanged (tests/layer/test_router_aux_topk.py, on CPU, ties included; the
same ops on any device).  Every other case
(renormalised top-k, expert groups, router replay, precomputed indices, TE's fused router,
a padding mask, other logits or k, no gradients) runs Megatron's function.

:func:`install` puts the two functions in Megatron's router module (process-wide, on every
device: the model builders call it); a CoE layer makes C router calls per forward, so each
call saves a top-k and a scatter.

A CoE layer built with ``model.fused_kernels: triton`` turns :func:`set_triton` on around each
of its router calls; the same case then runs model/triton_router.py instead: s, its top-k and
the dense probabilities and map in one kernel, and the aux losses take that s, so their
gradient and the routing's meet in one softmax backward.  The routing is the k largest
logits, Megatron's but where two scores are equal at the k-th place; the scores are Megatron's
within float rounding (tests/layer/test_triton_router.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_coe.model.tensor_memo import TensorMemo


class _Routing(NamedTuple):
    """The last routing top-k that the aux losses may reuse, remembered for its logits."""

    topk: int
    routing_map: torch.Tensor
    map_version: int  # the map's version counter then (an in-place change bumps it)
    scores: torch.Tensor | None  # softmax(logits) when the Triton kernel took it


_LAST_ROUTING = TensorMemo()  # logits -> _Routing
_TRITON = False  # route the eligible calls through model/triton_router.py (set_triton)


def _topk_routing_remembered(logits, topk, use_pre_softmax=False, num_groups=None,
                             group_topk=None, scaling_factor=None, score_function="softmax",
                             expert_bias=None, fused=False, router_replay=None,
                             dense_output=False, precomputed_indices=None):
    """moe_utils.topk_routing_with_score_function, remembering its routing map when it is the
    top-k of softmax(logits) over all experts, which is what the aux losses sort again.

    That holds for softmax scores taken before the top-k (``renormalize_topk: false``), with no
    expert groups, router replay, precomputed indices or fused kernel, and with gradients on:
    routing then sorts its top-k (``sorted=torch.is_grad_enabled()``) exactly as the aux loss's
    ``torch.topk`` does.  Capacity dropping comes after this call, so it does not matter."""
    from megatron.core.transformer.moe import moe_utils

    softmax_topk = (score_function == "softmax" and use_pre_softmax and not group_topk
                    and router_replay is None and precomputed_indices is None and not fused
                    and not dense_output)
    scores = None
    router = _triton_router() if _TRITON and softmax_topk and not scaling_factor else None
    if router is not None and router.runs(logits, topk):
        probs, routing_map, scores = router.topk_softmax(logits, topk)
    else:
        probs, routing_map = moe_utils.topk_routing_with_score_function(
            logits, topk, use_pre_softmax=use_pre_softmax, num_groups=num_groups,
            group_topk=group_topk, scaling_factor=scaling_factor,
            score_function=score_function, expert_bias=expert_bias, fused=fused,
            router_replay=router_replay, dense_output=dense_output,
            precomputed_indices=precomputed_indices)
    if softmax_topk and torch.is_grad_enabled():
        _LAST_ROUTING.remember(logits, _Routing(topk, routing_map, routing_map._version, scores))
    else:
        _LAST_ROUTING.forget()
    return probs, routing_map


def _aux_scores_from_routing(logits, topk, score_function, fused=False, padding_mask=None):
    """moe_utils.compute_routing_scores_for_aux_loss: softmax scores and the map of their top-k.

    When the routing just took that top-k of these very logits (same tensor, unmodified, same
    k: see :func:`_topk_routing_remembered`), its map is reused instead of a second
    ``torch.topk`` + scatter.  On CPU that took one router's forward + backward (2048 tokens x
    64 experts, one thread) from 6.57 to 5.03 ms (``benchmarks/cpu_backend.py``); in the H100
    trace of CoE-2(4/64) at micro-batch 32 Megatron's aux-loss scores took 0.67 ms per step,
    0.51 of it the top-k (benchmarks/results/trace_sites_cuda_coe_scatter.json).  The scores
    are computed as Megatron computes them.  Any other call (padding mask, other score
    function, fused) runs Megatron's own."""
    from megatron.core.transformer.moe import moe_utils

    last = _LAST_ROUTING.get(logits)
    _LAST_ROUTING.forget()
    if (last is None or last.topk != topk or last.map_version != last.routing_map._version
            or score_function != "softmax" or fused or padding_mask is not None):
        return moe_utils.compute_routing_scores_for_aux_loss(logits, topk, score_function,
                                                             fused=fused,
                                                             padding_mask=padding_mask)
    if last.scores is not None:
        return last.routing_map, last.scores
    return last.routing_map, torch.softmax(logits, dim=-1, dtype=torch.float32)


def _triton_router():
    from megatron_coe.model import triton_router  # imports triton: only when asked for

    return triton_router


def set_triton(on: bool) -> None:
    """The routing calls from now on through the Triton kernel where it applies (``on``), or
    Megatron's ops, with no routing remembered.  CoELayer sets it before each router call and
    clears it after: the routing and its aux losses run within one call, and a remembered
    routing past it would keep its scores' autograd graph (and what it saved) alive where no
    aux loss takes it (aux_loss: none, evaluation with gradients on)."""
    global _TRITON
    _TRITON = on
    _LAST_ROUTING.forget()


def install() -> None:
    """Route Megatron's TopKRouter through the two functions above (idempotent), with no
    routing remembered from an earlier model and Megatron's ops for the routing."""
    global _TRITON
    from megatron.core.transformer.moe import router

    _TRITON = False
    _LAST_ROUTING.forget()
    router.topk_routing_with_score_function = _topk_routing_remembered
    router.compute_routing_scores_for_aux_loss = _aux_scores_from_routing
