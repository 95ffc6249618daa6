"""The language-model loss's two Triton kernels (``model.fused_kernels: triton``; loss.py holds
the math and the autograd function).

For a row of logits z (V values) and its target t:

    forward:   lse = m + log sum_v exp(z_v - m),  m = max_v z_v;   loss = lse - z_t
    backward:  dz_v = g * (exp(z_v - lse) - [v == t])

The forward is one pass over the row (one program per row): a running max over BLOCK-wide steps
and a sum of exponentials per lane, rescaled when the max grows (one exponential per logit) and
summed at the end, so the logits are read once in their own dtype (math in fp32) and only
``lse`` is kept for backward.  The backward is
one program per (row, BLOCK of the vocabulary): it reads the logits once and writes the gradient
once, in the logits' dtype.  A target outside [0, V) picks m and has no one-hot term, as
Megatron's vocabulary-parallel cross entropy gives with one partition (loss.py).

Runs on CUDA; on CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module
is imported), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK = 4096  # vocabulary entries per program step


@triton.jit
def coe_cross_entropy_forward(logits_ptr, target_ptr, loss_ptr, lse_ptr, V, row_stride,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    m = tl.full((), -3.0e38, tl.float32)  # running max (finite: no inf - inf)
    s = tl.zeros([BLOCK], tl.float32)  # per lane: sum of exp(z - m)
    for start in range(0, V, BLOCK):
        z = tl.load(base + start + cols, mask=start + cols < V,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)  # one exp per logit; masked lanes add 0
        m = m_new
    lse = m + tl.log(tl.sum(s, 0))
    t = tl.load(target_ptr + row)
    hit = (t >= 0) & (t < V)
    z_t = tl.load(base + tl.where(hit, t, 0)).to(tl.float32)
    tl.store(loss_ptr + row, lse - tl.where(hit, z_t, m))
    tl.store(lse_ptr + row, lse)


@triton.jit
def coe_cross_entropy_backward(logits_ptr, target_ptr, lse_ptr, grad_ptr, out_ptr, V,
                               row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < V
    z = tl.load(logits_ptr + row * row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    g = tl.load(grad_ptr + row)
    t = tl.load(target_ptr + row)
    dz = g * (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0))
    tl.store(out_ptr + row * V + cols, dz.to(out_ptr.dtype.element_ty), mask=inside)


def _block(V: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(V))
    return block, 8 if block >= 2048 else 4


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` as [rows, V], unit stride along V."""
    z = logits.reshape(-1, logits.shape[-1])
    return z if z.stride(-1) == 1 else z.contiguous()


def token_loss(logits: torch.Tensor, target: torch.Tensor):
    """(loss, lse), each fp32 with ``target``'s shape, for ``logits`` [..., V]."""
    V = logits.shape[-1]
    z = _rows(logits)
    t = target.reshape(-1).contiguous()
    loss = torch.empty(t.shape, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(loss)
    block, warps = _block(V)
    if z.shape[0] > 0:
        coe_cross_entropy_forward[(z.shape[0],)](z, t, loss, lse, V, z.stride(0), BLOCK=block,
                                                 num_warps=warps)
    return loss.view(target.shape), lse.view(target.shape)


def logits_grad(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                grad: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """d loss / d logits (the logits' dtype and shape) for the loss's gradient ``grad``; with
    ``in_place``, written over the logits (each program reads its block before it writes it)
    where their rows are contiguous, else over the contiguous copy made to read them."""
    V = logits.shape[-1]
    z = _rows(logits)
    if in_place and not z.is_contiguous():
        z = z.contiguous()
    out = z if in_place else torch.empty(z.shape, dtype=logits.dtype, device=z.device)
    block, warps = _block(V)
    if z.shape[0] > 0:
        coe_cross_entropy_backward[(z.shape[0], triton.cdiv(V, block))](
            z, target.reshape(-1).contiguous(), lse.reshape(-1).contiguous(),
            grad.reshape(-1).float().contiguous(), out, V, z.stride(0), BLOCK=block,
            num_warps=warps)
    return out.view(logits.shape)
