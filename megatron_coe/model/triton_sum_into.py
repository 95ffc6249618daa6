"""A weight's last two gradients summed into its fp32 gradient buffer, as one Triton kernel
(wgrad_sum.py):

    dest (+)= fp32(dtype(a + b))      a, b of the gradients' dtype (bf16 or fp32)

The sum is rounded to a's dtype first, as autograd's sum of the two is, so the result is bit for
bit torch's ``dest.copy_(a + b)`` (``dest.add_(a + b)`` with ``accumulate``; a NaN may carry
another payload) in one pass: a and b read once, dest written once (and read once when
accumulating), no intermediate tensor.  The bf16 rounding is torch's (triton_rounding.py).  One
program per BLOCK elements.

Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module
is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_coe.model.triton_rounding import rounded_to_bf16

BLOCK = 4096
DTYPES = (torch.bfloat16, torch.float32)  # the gradients' dtypes the kernel sums


@triton.jit
def coe_sum_into(dest_ptr, a_ptr, b_ptr, n, BF16: tl.constexpr, ACCUMULATE: tl.constexpr,
                 BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    total = a + b
    if BF16:  # rounded as torch rounds to bf16
        total = rounded_to_bf16(total)
    if ACCUMULATE:
        total = tl.load(dest_ptr + offs, mask=mask, other=0.0) + total
    tl.store(dest_ptr + offs, total, mask=mask)


def sum_into(dest: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """dest (+)= fp32(dtype(a + b)) for contiguous fp32 ``dest`` and ``a``, ``b`` of one dtype
    (:data:`DTYPES`) and dest's shape."""
    if dest.dtype != torch.float32 or not dest.is_contiguous():
        raise ValueError(f"sum_into writes a contiguous fp32 buffer, got {dest.dtype}")
    if (a.dtype != b.dtype or a.dtype not in DTYPES or a.shape != dest.shape
            or b.shape != dest.shape):
        raise ValueError(f"sum_into: operands {a.dtype}{tuple(a.shape)} and "
                         f"{b.dtype}{tuple(b.shape)} for a buffer of {tuple(dest.shape)}")
    n = dest.numel()
    if n == 0:
        return
    coe_sum_into[(triton.cdiv(n, BLOCK),)](dest, a.contiguous(), b.contiguous(), n,
                                           BF16=a.dtype == torch.bfloat16, ACCUMULATE=accumulate,
                                           BLOCK=BLOCK, num_warps=8)
