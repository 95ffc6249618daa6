"""A router's softmax, top-k and dense outputs as one Triton kernel, and its backward as one
(``model.fused_kernels: triton``; used by model/aux_topk.py for Megatron's TopKRouter).

For T tokens' fp32 logits l [T, N] (softmax scores taken before the top-k, no renormalisation,
no expert groups or bias), per token:

    s = softmax(l)                                  scores        [T, N] fp32 (the aux losses')
    chosen = the k largest l, ties to the lower expert index, a NaN above any number
    probs = s where chosen, else 0                  probabilities [T, N] fp32
    map = chosen                                    routing map   [T, N] bool

    backward:  g = dprobs where chosen, else 0  +  dscores
               dl = s * (g - sum_j s_j g_j)

Megatron computes the same with torch's softmax, ``torch.topk`` over s, two scatters and, for
the aux losses, a second softmax of l; its backward is a gather, the top-k's scatter and two
softmax backwards.  softmax is monotone, so the k largest l are the k largest s, and the
routing is Megatron's but for two kinds of token: those with two scores equal at the k-th
place (equal logits, or scores that round to the same fp32 value), where torch's top-k may
take either, and those with a NaN logit, whose scores are all NaN (Megatron's top-k of them is
arbitrary; the layer's non-finite check reports them).  The scores and probabilities are
Megatron's up to the rounding of the exponentials and of the sums' order (within about 1e-6
relative); one softmax is taken, not two, and the aux losses' gradient joins the routing's in
one softmax backward.  Each program also writes its block's tokens per expert, from which
model/triton_row_index.py finds the dispatcher's rows without a sort.

One program per BLOCK_T tokens, all N experts of a token in one block (N <= MAX_EXPERTS).
Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module
is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from megatron_coe.model.tensor_memo import TensorMemo

MAX_EXPERTS = 1024  # experts one program holds per token; more are routed by Megatron's ops
TILE = 2048  # values per program: BLOCK_T x BLOCK_N
WARPS = 4


@triton.jit
def coe_topk_softmax(logits_ptr, probs_ptr, map_ptr, scores_ptr, counts_ptr, T, N,
                     K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_in = (cols < N)[None, :]
    mask = (tokens < T)[:, None] & col_in
    offsets = tokens[:, None] * N + cols[None, :]
    logits = tl.load(logits_ptr + offsets, mask=mask, other=-float("inf"))
    e = tl.exp(logits - tl.max(logits, 1)[:, None])
    scores = e / tl.sum(e, 1)[:, None]
    key = tl.where(logits != logits, float("inf"), logits)  # a NaN ranks first
    chosen = tl.zeros([BLOCK_T, BLOCK_N], tl.int32) != 0
    for _ in tl.static_range(K):
        free = col_in & ~chosen
        best = tl.max(tl.where(free, key, -float("inf")), 1)
        pick = tl.min(tl.where(free & (key == best[:, None]), cols[None, :], BLOCK_N), 1)
        chosen = chosen | (cols[None, :] == pick[:, None])
    tl.store(scores_ptr + offsets, scores, mask=mask)
    tl.store(probs_ptr + offsets, tl.where(chosen, scores, 0.0), mask=mask)
    tl.store(map_ptr + offsets, chosen.to(tl.uint8), mask=mask)
    # the block's tokens per expert, for the rows' index without a sort (triton_row_index.py)
    tl.store(counts_ptr + tl.program_id(0).to(tl.int64) * N + cols,
             tl.sum((chosen & mask).to(tl.int32), 0), mask=cols < N)


@triton.jit
def coe_topk_softmax_backward(dprobs_ptr, dscores_ptr, scores_ptr, map_ptr, out_ptr, T, N,
                              HAS_DPROBS: tl.constexpr, HAS_DSCORES: tl.constexpr,
                              BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = (tokens < T)[:, None] & (cols < N)[None, :]
    offsets = tokens[:, None] * N + cols[None, :]
    scores = tl.load(scores_ptr + offsets, mask=mask, other=0.0)
    g = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    if HAS_DPROBS:
        chosen = tl.load(map_ptr + offsets, mask=mask, other=0) != 0
        g += tl.where(chosen, tl.load(dprobs_ptr + offsets, mask=mask, other=0.0), 0.0)
    if HAS_DSCORES:
        g += tl.load(dscores_ptr + offsets, mask=mask, other=0.0)
    dot = tl.sum(scores * g, 1)
    tl.store(out_ptr + offsets, scores * (g - dot[:, None]), mask=mask)


def _blocks(N: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_N): a token's experts in one block, TILE values a program."""
    block_n = triton.next_power_of_2(N)
    return max(TILE // block_n, 1), block_n


class TopkSoftmax(torch.autograd.Function):
    """(probs, routing_map, scores) of fp32 logits [T, N] (module docstring)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int):
        ctx.set_materialize_grads(False)  # no zero tensor for an unused output's gradient
        T, N = logits.shape
        logits = logits.contiguous()
        probs = torch.empty_like(logits)
        scores = torch.empty_like(logits)
        routing_map = torch.empty((T, N), dtype=torch.bool, device=logits.device)
        block_t, block_n = _blocks(N)
        blocks = triton.cdiv(T, block_t)
        counts = torch.empty((blocks, N), dtype=torch.int32, device=logits.device)
        if T:
            coe_topk_softmax[(blocks,)](
                logits, probs, routing_map.view(torch.uint8), scores, counts, T, N, K=k,
                BLOCK_T=block_t, BLOCK_N=block_n, num_warps=WARPS)
        ctx.mark_non_differentiable(routing_map)
        ctx.save_for_backward(scores, routing_map)
        _LAST_MAP.remember(routing_map, (counts, block_t, k))
        return probs, routing_map, scores

    @staticmethod
    @once_differentiable
    def backward(ctx, dprobs, _dmap, dscores):
        scores, routing_map = ctx.saved_tensors
        T, N = scores.shape
        if dprobs is None and dscores is None:
            return None, None
        out = torch.empty_like(scores)
        if T:
            block_t, block_n = _blocks(N)
            coe_topk_softmax_backward[(triton.cdiv(T, block_t),)](
                scores if dprobs is None else dprobs.float().contiguous(),
                scores if dscores is None else dscores.float().contiguous(),
                scores, routing_map.view(torch.uint8), out, T, N,
                HAS_DPROBS=dprobs is not None, HAS_DSCORES=dscores is not None,
                BLOCK_T=block_t, BLOCK_N=block_n, num_warps=WARPS)
        return out, None


# the last routing map the kernel wrote -> (its tokens per expert in each block, block_t, k)
_LAST_MAP = TensorMemo()


def block_counts(routing_map: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(tokens per expert in each block of ``block_t`` tokens [blocks, N] int32, block_t, k)
    when ``routing_map`` is the last map :class:`TopkSoftmax` wrote, unchanged, else None."""
    return _LAST_MAP.get(routing_map)


def runs(logits: torch.Tensor, k: int) -> bool:
    """Whether :func:`topk_softmax` takes these logits: 2-D fp32, 1 <= k <= N <= MAX_EXPERTS."""
    return (logits.dim() == 2 and logits.dtype == torch.float32
            and 1 <= k <= logits.shape[1] <= MAX_EXPERTS)


def topk_softmax(logits: torch.Tensor, k: int):
    """(probs [T, N] fp32, routing_map [T, N] bool, scores [T, N] fp32) of fp32 logits [T, N]:
    the top-k of softmax(logits), dense, and the softmax itself (module docstring)."""
    if not runs(logits, k):
        raise ValueError(f"topk_softmax takes 2-D fp32 logits of 1..{MAX_EXPERTS} experts and "
                         f"1 <= k <= experts, got {tuple(logits.shape)} {logits.dtype}, k={k}")
    return TopkSoftmax.apply(logits, k)
