"""The dispatcher's row index from the router kernel's routing map, without a sort
(``model.fused_kernels: triton``; used by model/permutation.py).

For a routing map M [T, N] that gives every token exactly k experts, the dispatcher lists the
T k rows expert by expert, each expert's tokens in increasing order.  With c[p, e] the tokens
of block p (``block_t`` tokens each; model/triton_router.py counts them as it routes) sent to
expert e:

    start[e]   = sum_{e' < e} sum_p c[p, e']                 expert e's first row
    before[p, e] = sum_{p' < p} c[p', e]                     its rows taken by earlier blocks
    row(t, e)  = start[e] + before[p(t), e] + #{t' < t in block p(t): M[t', e]}     (M[t, e])

    index[row(t, e)] = t        the row's token            (Megatron's permute: a stable sort)
    experts[row(t, e)] = e      the row's expert           (a search of the counts)
    order[t k + j] = row(t, e_j)  token t's rows, e_0 < ... < e_(k-1)
                                                           (argsort(index, stable), a sort)

All integers, so equal to what they replace.  One program per block of tokens: a scan of its
[block_t, N] slice of M down the tokens (the rank within the block) and across the experts
(j), and three scattered stores.  Runs on CUDA; on CPU only under Triton's interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_coe.model import triton_router


@triton.jit
def coe_row_index(map_ptr, first_ptr, index_ptr, experts_ptr, order_ptr, T, N,
                  K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    tokens = block * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_N)
    mask = (tokens < T)[:, None] & (cols < N)[None, :]
    routed = (tl.load(map_ptr + tokens[:, None] * N + cols[None, :], mask=mask, other=0) != 0)
    routed = routed & mask
    ones = routed.to(tl.int32)
    rank = tl.cumsum(ones, 0) - ones  # earlier tokens of this block sent to the same expert
    j = tl.cumsum(ones, 1) - ones  # the token's earlier experts
    first = tl.load(first_ptr + block * N + cols, mask=cols < N, other=0).to(tl.int64)
    row = first[None, :] + rank.to(tl.int64)
    tl.store(index_ptr + row, tokens[:, None] + 0 * row, mask=routed)
    tl.store(experts_ptr + row, cols[None, :].to(tl.int64) + 0 * row, mask=routed)
    tl.store(order_ptr + tokens[:, None] * K + j.to(tl.int64), row, mask=routed)


def rows_of(routing_map: torch.Tensor, rows: int):
    """(index, experts, order) [rows] int64 each, as above, when ``routing_map`` is the router
    kernel's last map, unchanged, with k = rows / T experts per token; else None."""
    found = triton_router.block_counts(routing_map)
    T, N = routing_map.shape
    if found is None or rows != T * found[2]:
        return None
    counts, block_t, k = found
    totals = counts.sum(0, dtype=torch.int64)
    # first[p, e] = start[e] + before[p, e]: the row of block p's first token sent to e
    first = counts.cumsum(0, dtype=torch.int64) - counts + (totals.cumsum(0) - totals)
    index = torch.empty(rows, dtype=torch.int64, device=routing_map.device)
    experts, order = torch.empty_like(index), torch.empty_like(index)
    if rows:
        coe_row_index[(counts.shape[0],)](
            routing_map.view(torch.uint8), first, index, experts, order, T, N, K=k,
            BLOCK_T=block_t, BLOCK_N=triton.next_power_of_2(N), num_warps=triton_router.WARPS)
    return index, experts, order
