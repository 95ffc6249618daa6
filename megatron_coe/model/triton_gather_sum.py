"""Each token's k expert rows gathered and summed in one Triton kernel (``model.fused_kernels:
triton``): the unpermutation's forward and the permutation's backward (model/permutation.py).

For T tokens, k rows each, rows [T k, H] and ``order`` [T k] listing token t's rows at
order[t k .. t k + k):

    out[t] = dtype( (...((0 + r_0) + r_1) + ...) + r_(k-1) ),    r_j = rows[order[t k + j]]

summed in fp32 in that order and rounded once to the rows' dtype (bf16 as torch rounds:
triton_rounding.py).  With addends a_1 .. a_m ([T, H] each, m <= 3), each is then added as
torch adds it, in fp32 and rounded to the dtype after each add:

    out[t] = dtype( dtype(out[t] + a_1[t]) + a_2[t] ) ...    (the bits of torch's out + a_1 + a_2)

The CoE layer's reference residual adds the shared expert's output and the iteration's input
this way (x(t) = x(t-1) + (routed + shared), layer.py), and :func:`sum_in_order` is the same
kernel without the gather (k = 1, row t of the first tensor): the gradients of a tensor's uses
summed in a fixed order, in one pass instead of one torch add per term.
  torch's ``rows.index_select(0, order).view(T, k, H).sum(1)`` writes the
gathered [T k, H] copy and reads it back; this reads each row once and writes each token once,
(k + 1) T H values moved instead of (3k + 1) T H.  One program per BLOCK_T tokens x BLOCK_H
columns; the row indices are int64, so offsets do not overflow.

Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module
is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_coe.model.triton_rounding import rounded_to_bf16

DTYPES = (torch.bfloat16, torch.float32)  # the rows' dtypes the kernel sums
TILE = 2048  # elements per program: BLOCK_T x BLOCK_H
WARPS = 4


@triton.jit
def coe_gather_sum(rows_ptr, order_ptr, add1_ptr, add2_ptr, add3_ptr, out_ptr, T, H,
                   K: tl.constexpr, GATHER: tl.constexpr, ADDENDS: tl.constexpr,
                   BF16: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_in = tokens < T
    mask = token_in[:, None] & (cols < H)[None, :]
    total = tl.zeros([BLOCK_T, BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        if GATHER:
            row = tl.load(order_ptr + tokens * K + j, mask=token_in, other=0).to(tl.int64)
        else:
            row = tokens
        total += tl.load(rows_ptr + row[:, None] * H + cols[None, :], mask=mask,
                         other=0.0).to(tl.float32)
    if BF16:
        total = rounded_to_bf16(total)
    at = tokens[:, None] * H + cols[None, :]
    if ADDENDS >= 1:
        total += tl.load(add1_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if BF16:
            total = rounded_to_bf16(total)
    if ADDENDS >= 2:
        total += tl.load(add2_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if BF16:
            total = rounded_to_bf16(total)
    if ADDENDS >= 3:
        total += tl.load(add3_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if BF16:
            total = rounded_to_bf16(total)
    tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(H: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): a row's width in one step up to 1024 columns, TILE values a program."""
    block_h = min(triton.next_power_of_2(H), 1024)
    return max(TILE // block_h, 1), block_h


MAX_ADDENDS = 3


def gather_sum(rows: torch.Tensor, order: torch.Tensor | None, k: int,
               addends: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """[T, *rows.shape[1:]]: for each token t the sum of rows[order[t k .. t k + k)], for rows
    of a dtype in :data:`DTYPES`, plus each of ``addends`` (of that shape and dtype) in order,
    rounded after each add as torch rounds.  ``order`` None: row t, k = 1."""
    if rows.dtype not in DTYPES:
        raise ValueError(f"gather_sum sums {DTYPES} rows, got {rows.dtype}")
    if order is None and k != 1:
        raise ValueError(f"gather_sum without an order takes 1 row per token, not {k}")
    if order is not None and (order.dim() != 1 or order.numel() % k):
        raise ValueError(f"gather_sum: an order of {tuple(order.shape)} for {k} rows per token")
    T = rows.shape[0] if order is None else order.numel() // k
    shape = (T, *rows.shape[1:])
    if len(addends) > MAX_ADDENDS or any(a.shape != shape or a.dtype != rows.dtype
                                         for a in addends):
        raise ValueError(f"gather_sum adds up to {MAX_ADDENDS} tensors of {shape} "
                         f"{rows.dtype}, got {[(tuple(a.shape), a.dtype) for a in addends]}")
    flat = rows.flatten(1).contiguous()
    H = flat.shape[1]
    out = torch.empty((T, H), dtype=rows.dtype, device=rows.device)
    if T and H:
        extra = [a.reshape(T, H).contiguous() for a in addends]
        extra += [out] * (MAX_ADDENDS - len(extra))  # not read
        block_t, block_h = _blocks(H)
        coe_gather_sum[(triton.cdiv(T, block_t), triton.cdiv(H, block_h))](
            flat, out if order is None else order.contiguous(), *extra, out, T, H, K=k,
            GATHER=order is not None, ADDENDS=len(addends), BF16=rows.dtype == torch.bfloat16,
            BLOCK_T=block_t, BLOCK_H=block_h, num_warps=WARPS)
    return out.view(shape)


def sum_in_order(first: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """(...((first + others[0]) + others[1]) + ...), the bits of torch's adds in that order,
    in one pass: tensors of one shape and a dtype in :data:`DTYPES`, at most
    1 + MAX_ADDENDS of them."""
    if first.dim() == 0:
        raise ValueError("sum_in_order adds tensors of at least one dimension")
    return gather_sum(first, None, 1, others)
