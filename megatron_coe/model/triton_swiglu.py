"""SwiGLU as two Triton kernels (``model.fused_kernels: triton`` with ``model.swiglu_fusion``):
weighted for the routed experts (experts.scaled_activation), plain for the shared expert
(shared_expert.py, p = 1 below, no dp).

For fc1's output row z = [a | b] (2F values) and the row's routing probability p:

    forward:   y = silu(a) * b * p,                 silu(a) = a * sigmoid(a)
    backward:  da = g * p * b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))
               db = g * p * silu(a)
               dp = sum_f g * silu(a) * b

This is Megatron's fused (weighted) SwiGLU (megatron/core/fusions/fused_bias_swiglu.py), math in
fp32, rounded once to z's dtype, keeping only z and p for backward.  The forward is one program
per tile of BLOCK_R rows x BLOCK_F columns; the backward one program per BLOCK_R rows, walking
their columns in BLOCK_F steps, so that one program sums each row's dp (no atomics).  Each
reads its inputs once and writes its outputs once.  Loads are 16-byte vectors where F is a
multiple of 16 (Triton specialises on that; the paper configs' 704 is), scalar otherwise.

Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module
is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

TILE = 4096  # elements per program step: BLOCK_R x BLOCK_F


@triton.jit
def coe_swiglu_forward(z_ptr, p_ptr, out_ptr, R, F, HAS_P: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    row_in = rows < R
    mask = row_in[:, None] & (cols < F)[None, :]
    at = z_ptr + rows[:, None] * (2 * F) + cols[None, :]
    a = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(at + F, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    if HAS_P:
        y = y * tl.load(p_ptr + rows, mask=row_in, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows[:, None] * F + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def coe_swiglu_backward(z_ptr, p_ptr, g_ptr, dz_ptr, dp_ptr, R, F, HAS_P: tl.constexpr,
                        WANT_DP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_in = rows < R
    if HAS_P:
        p = tl.load(p_ptr + rows, mask=row_in, other=0.0).to(tl.float32)
    else:
        p = tl.full([BLOCK_R], 1.0, tl.float32)
    dp = tl.zeros([BLOCK_R], tl.float32)
    dz_type = dz_ptr.dtype.element_ty
    for start in range(0, F, BLOCK_F):
        cols = start + tl.arange(0, BLOCK_F)
        mask = row_in[:, None] & (cols < F)[None, :]
        at = rows[:, None] * (2 * F) + cols[None, :]
        a = tl.load(z_ptr + at, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(z_ptr + at + F, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows[:, None] * F + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        gp = g * p[:, None]
        da = gp * b * sig * (1.0 + a * (1.0 - sig))
        tl.store(dz_ptr + at, da.to(dz_type), mask=mask)
        tl.store(dz_ptr + at + F, (gp * silu).to(dz_type), mask=mask)
        if WANT_DP:
            dp += tl.sum(g * silu * b, axis=1)
    if WANT_DP:
        tl.store(dp_ptr + rows, dp.to(dp_ptr.dtype.element_ty), mask=row_in)


def _blocks(F: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_F, warps): the widest BLOCK_F of 1024 or less whose last step wastes at
    most an eighth of a row (F = 704: 256, three steps of which 64 lanes idle)."""
    block_f = 64
    for width in (1024, 512, 256, 128):
        if triton.cdiv(F, width) * width - F <= F // 8:
            block_f = width
            break
    return TILE // block_f, block_f, 8


class SwiGLU(torch.autograd.Function):
    """silu(z[:, :F]) * z[:, F:] (* p[:, None]) for z [R, 2F] and p [R] or None; output in z's
    dtype, dp in p's."""

    @staticmethod
    def forward(ctx, z, p):
        z = z.contiguous()
        p = None if p is None else p.contiguous()
        R, F = z.shape[0], z.shape[1] // 2
        out = torch.empty((R, F), dtype=z.dtype, device=z.device)
        ctx.save_for_backward(z, p)
        if R == 0:
            return out
        block_r, block_f, warps = _blocks(F)
        coe_swiglu_forward[(triton.cdiv(R, block_r), triton.cdiv(F, block_f))](
            z, z if p is None else p, out, R, F, HAS_P=p is not None, BLOCK_R=block_r,
            BLOCK_F=block_f, num_warps=warps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        z, p = ctx.saved_tensors
        R, F = z.shape[0], z.shape[1] // 2
        dz = torch.empty_like(z)
        dp = torch.empty_like(p) if p is not None and ctx.needs_input_grad[1] else None
        if R == 0:
            return dz, dp
        block_r, block_f, warps = _blocks(F)
        coe_swiglu_backward[(triton.cdiv(R, block_r),)](
            z, z if p is None else p, grad.contiguous(), dz, z if dp is None else dp, R, F,
            HAS_P=p is not None, WANT_DP=dp is not None, BLOCK_R=block_r, BLOCK_F=block_f,
            num_warps=warps)
        return dz, dp


def weighted_swiglu(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """silu(z[:, :F]) * z[:, F:] * p[:, None]: the routed experts' activation."""
    return SwiGLU.apply(z, p)


def swiglu(z: torch.Tensor) -> torch.Tensor:
    """silu(z[..., :F]) * z[..., F:] over z's last dim: the shared expert's activation."""
    return SwiGLU.apply(z.reshape(-1, z.shape[-1]), None).view(*z.shape[:-1], z.shape[-1] // 2)
