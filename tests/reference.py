"""Plain-PyTorch Chain-of-Experts, written from the formula, for parity tests.

    x(0) = x;  F_t(x) = sum_{i in topk_k(softmax(x W_t^T))} p(t,i) E_i(x) + S(x)
    inner:     x(t) = x(t-1) + F_t(x(t-1)),  output sum_t F_t
    outer:     x(t) = F_t(x(t-1)),           output x(C)
    reference: x(t) = x(t-1) + F_t(x(t-1)),  output x(C)
    E_i(x) = W2_i (silu(A_i x) * (B_i x)),  [A_i; B_i] = W1_i   (SwiGLU, no biases)

Token dropping (capacity factor cf), applied per group of tokens (a group = one rank's tokens,
Megatron's rule): capacity = ceil(T_g * k / N * cf); for each expert, of the tokens of the
group that chose it, only the ``capacity`` with the largest probability keep it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert(x, w1, w2):
    a, b = torch.chunk(x @ w1.t(), 2, dim=-1)
    return (F.silu(a) * b) @ w2.t()


def route(x, w_router, topk):
    probs = torch.softmax(x.float() @ w_router.float().t(), dim=-1)
    idx = probs.topk(topk, dim=-1).indices
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
    return probs, mask


def drop_over_capacity(probs, mask, topk, capacity_factor, group_sizes):
    """Keep, per group and expert, the ``capacity`` highest-probability tokens."""
    keep = torch.zeros_like(mask)
    start = 0
    for size in group_sizes:
        m = mask[start : start + size]
        p = probs[start : start + size].detach()
        n_experts = m.shape[1]
        capacity = math.ceil(size * topk / n_experts * capacity_factor)
        for e in range(n_experts):
            rows = torch.nonzero(m[:, e]).flatten()
            if rows.numel() > capacity:
                rows = rows[p[rows, e].argsort(descending=True)[:capacity]]
            keep[start + rows, e] = True
        start += size
    return keep


def coe_forward(x, routers, experts, shared, topk, residual, capacity_factor=None,
                group_sizes=None, masks_out=None):
    """x: [T, H]; routers: list of [N, H] (one per iteration); experts: list of (w1, w2);
    shared: (w1, w2) or None.  Returns the layer output [T, H]."""
    cur, delta = x, None
    for w_router in routers:
        probs, mask = route(cur, w_router, topk)
        if capacity_factor is not None:
            mask = drop_over_capacity(probs, mask, topk, capacity_factor,
                                      group_sizes or [x.shape[0]])
        if masks_out is not None:
            masks_out.append(mask)
        gates = (probs * mask).to(cur.dtype)
        f = sum(gates[:, i : i + 1] * expert(cur, w1, w2) for i, (w1, w2) in enumerate(experts))
        if shared is not None:
            f = f + expert(cur, *shared)
        if residual == "outer":
            cur = f
        else:
            cur = cur + f
            delta = f if delta is None else delta + f
    return delta if residual == "inner" else cur


def layer_weights(layer):
    """Pull (routers per iteration, experts, shared) out of a CoELayer as leaf tensors."""
    routers = [r.weight for r in layer.routers]
    experts = [(e.linear_fc1.weight, e.linear_fc2.weight) for e in layer.experts.local_experts]
    shared = None
    if layer.shared_experts is not None:
        shared = (layer.shared_experts.linear_fc1.weight, layer.shared_experts.linear_fc2.weight)
    return routers, experts, shared


def max_rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_norm_err(a, b) -> float:
    """||a - b|| / ||b||: for sums whose accumulation order differs (e.g. across ranks)."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
