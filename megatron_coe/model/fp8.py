"""FP8 grouped GEMMs for the experts, through torch's scaled matrix multiplies (fp8.backend: torch).

Shapes: G experts (groups); M_g rows (tokens) of expert g, sorted by expert; M = sum_g M_g;
K input features; N output features.  X [M, K], one stacked weight W [G, N, K], Y [M, N].

    Y_g = X_g W_g^T                                    for every expert g

Quantization to float8_e4m3fn (largest finite value 448), scaled from each call's own amax, so no
state carries over between calls, micro-batches or CoE iterations:

    rowwise:     s_x[m]    = amax_k |X[m, k]|    / 448   one scale per row (token) of X
                 s_w[g, n] = amax_k |W[g, n, k]| / 448   one scale per output column of W_g
    tensorwise:  s_x = amax |X| / 448,  s_w[g] = amax |W_g| / 448
    Xq = sat(X / s_x),  Wq = sat(W / s_w)              (sat: clamp to [-448, 448], then cast)
    Y_g[m, n] = s_x[m] s_w[g, n] (Xq_g Wq_g^T)[m, n]   products of FP8 values, fp32 accumulation

which is what ``torch._scaled_mm`` computes from (Xq, s_x, Wq^T, s_w).  Backward keeps bf16
master weights and bf16 gradients:

    dX_g = dY_g W_g     in FP8: dY scaled per row m (amax over n), W_g^T [K, N] per row k
    dW_g = dY_g^T X_g   in the activations' precision (X and dY are kept unquantized)

Devices: on CUDA with ``torch._scaled_grouped_mm`` (torch >= 2.8; Hopper) one grouped kernel, with
every group's rows padded to a multiple of 16 (:func:`pad_groups`; the kernel's alignment) and the
padding removed after; elsewhere one ``torch._scaled_mm`` per non-empty group (torch 2.14 has CPU
kernels for it, with a scale per row; torch 2.11's CPU kernel takes one scale per operand only,
so there the CPU is refused up front: :func:`cpu_problem`).  The grouped kernel takes e4m3
operands only, so gradients are e4m3 too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from megatron_coe.model.experts import host_counts

E4M3 = torch.float8_e4m3fn
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
ALIGN_ROWS = 16  # rows per group for the grouped CUDA kernel
RECIPES = ("rowwise", "tensorwise")
# amax below this is treated as this (a zero row quantizes to zeros with a finite scale)
_TINY = 1e-12


@functools.cache
def cpu_problem() -> str | None:
    """None where this torch's CPU ``_scaled_mm`` takes the scales :func:`grouped_scaled_mm`
    passes (a scale per row of A and per column of B), else why not, in one line."""
    a = torch.ones(16, 16).to(E4M3)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16),
                         out_dtype=torch.float32)
    except (RuntimeError, TypeError, AttributeError) as e:
        return (f"torch {torch.__version__}'s CPU _scaled_mm takes no scale per row "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:120]})")
    return None


@dataclass(frozen=True)
class Quantized:
    """FP8 ``data`` and fp32 ``scale`` (broadcastable to data): value = data * scale."""

    data: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.data.to(torch.float32) * self.scale).to(dtype)


def quantize(x: torch.Tensor, dims: Sequence[int], dtype: torch.dtype = E4M3) -> Quantized:
    """Scale ``x`` by the amax over ``dims`` (kept as size-1 dims of the scale) to the range of
    ``dtype`` and cast.  ``dims=(-1,)``: one scale per row; all dims: one per tensor."""
    top = FP8_MAX[dtype]
    if x.numel() == 0:  # e.g. a call with no rows (an overlapped half, a rank sent nothing)
        shape = [1 if d in {dd % x.dim() for dd in dims} else n for d, n in enumerate(x.shape)]
        return Quantized(x.to(dtype), torch.ones(shape, device=x.device))
    amax = x.detach().abs().amax(dim=tuple(dims), keepdim=True).to(torch.float32)
    scale = amax.clamp(min=_TINY) / top
    # x / scale can round just above top; the clamp makes the cast's overflow rule (NaN or
    # saturation, by torch version) never apply
    data = (x.to(torch.float32) / scale).clamp(-top, top).to(dtype)
    return Quantized(data, scale)


def quantize_rows(x: torch.Tensor, recipe: str) -> Quantized:
    """Activations [M, K]: a scale per row (rowwise) or one scale (tensorwise), shape [M, 1]."""
    q = quantize(x, (-1,) if recipe == "rowwise" else (0, 1))
    return Quantized(q.data, q.scale.expand(x.shape[0], 1))


def quantize_weight(w: torch.Tensor, recipe: str) -> Quantized:
    """Stacked weights [G, N, K]: a scale per output column n of each W_g (rowwise) or one per
    expert (tensorwise), shape [G, N, 1]."""
    q = quantize(w, (-1,) if recipe == "rowwise" else (-2, -1))
    return Quantized(q.data, q.scale.expand(*w.shape[:2], 1))


def padded_counts(counts: Sequence[int], multiple: int = ALIGN_ROWS) -> list[int]:
    return [-(-c // multiple) * multiple for c in counts]


def pad_groups(x: torch.Tensor, counts: Sequence[int], multiple: int = ALIGN_ROWS):
    """Rows of ``x`` (grouped by ``counts``) placed at the start of groups of a multiple of
    ``multiple`` rows, zeros after.  Returns (padded, padded counts, rows): ``padded[rows] == x``,
    which :func:`unpad_groups` inverts."""
    counts = host_counts(counts)
    padded = padded_counts(counts, multiple)
    size = torch.tensor(counts, dtype=torch.long, device=x.device)
    size_p = torch.tensor(padded, dtype=torch.long, device=x.device)
    shift = (torch.cumsum(size_p, 0) - size_p) - (torch.cumsum(size, 0) - size)
    rows = torch.arange(x.shape[0], device=x.device) + torch.repeat_interleave(
        shift, size, output_size=x.shape[0])
    out = x.new_zeros(sum(padded), *x.shape[1:])
    out[rows] = x
    return out, padded, rows


def unpad_groups(padded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows of a padded tensor that :func:`pad_groups` put there, in their first order."""
    return padded[rows]


def _grouped_kernel(a: Quantized, b: Quantized) -> bool:
    return (a.data.is_cuda and hasattr(torch, "_scaled_grouped_mm")
            and a.data.shape[1] % 16 == 0 and b.data.shape[1] % 16 == 0)


def grouped_scaled_mm(a: Quantized, b: Quantized, counts: Sequence[int],
                      out_dtype: torch.dtype) -> torch.Tensor:
    """Y_g = dequant(A_g) dequant(B_g)^T for A [M, K] (scale [M, 1]) grouped by ``counts`` and
    B [G, N, K] (scale [G, N, 1]); Y [M, N] in ``out_dtype``, fp32 accumulation."""
    counts = host_counts(counts)
    groups, n = b.data.shape[0], b.data.shape[1]
    if len(counts) != groups or sum(counts) != a.data.shape[0]:
        raise ValueError(f"{len(counts)} group sizes summing to {sum(counts)} for {groups} "
                         f"weights and {a.data.shape[0]} rows")
    if _grouped_kernel(a, b):
        data, padded, rows = pad_groups(a.data.view(torch.uint8), counts)  # no fp8 indexing
        scale, _, _ = pad_groups(a.scale, counts)
        offs = torch.cumsum(torch.tensor(padded, device=data.device), 0).to(torch.int32)
        y = torch._scaled_grouped_mm(
            data.view(a.data.dtype), b.data.transpose(-2, -1), scale.reshape(-1).contiguous(),
            b.scale.reshape(groups, n).contiguous(), offs=offs, out_dtype=torch.bfloat16)
        return unpad_groups(y, rows).to(out_dtype)
    y = torch.zeros(a.data.shape[0], n, dtype=out_dtype, device=a.data.device)
    start = 0
    for g, rows in enumerate(counts):
        if rows:
            # rowwise-scaled _scaled_mm gives bf16 on CUDA; fp32 elsewhere (exact reference)
            y[start:start + rows] = torch._scaled_mm(
                a.data[start:start + rows], b.data[g].t(),
                scale_a=a.scale[start:start + rows].contiguous(),
                scale_b=b.scale[g].reshape(1, n).contiguous(),
                out_dtype=torch.bfloat16 if a.data.is_cuda else torch.float32).to(out_dtype)
        start += rows
    return y


def _grouped_wgrad(grad_out: torch.Tensor, x: torch.Tensor, counts: list[int],
                   groups: int) -> torch.Tensor:
    """dW_g = dY_g^T X_g, [G, N, K], in the activations' precision."""
    if grad_out.is_cuda and hasattr(torch, "_grouped_mm") and grad_out.dtype == torch.bfloat16:
        offs = torch.cumsum(torch.tensor(counts, device=x.device), 0).to(torch.int32)
        return torch._grouped_mm(grad_out.t(), x, offs=offs)
    out = grad_out.new_zeros(groups, grad_out.shape[1], x.shape[1])
    start = 0
    for g, rows in enumerate(counts):
        if rows:
            out[g] = grad_out[start:start + rows].t() @ x[start:start + rows]
        start += rows
    return out


class _FP8GroupedLinear(torch.autograd.Function):
    """Y = grouped X W^T with FP8 operands; see the module docstring for the backward."""

    @staticmethod
    def forward(ctx, x, weight, counts, recipe):
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.recipe = counts, recipe
        return grouped_scaled_mm(quantize_rows(x, recipe), quantize_weight(weight, recipe),
                                 counts, x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            w_t = weight.transpose(-2, -1).contiguous()  # [G, K, N]: B_g for dY_g B_g^T
            grad_x = grouped_scaled_mm(quantize_rows(grad_out, ctx.recipe),
                                       quantize_weight(w_t, ctx.recipe), ctx.counts, x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _grouped_wgrad(grad_out, x.to(grad_out.dtype), ctx.counts,
                                    weight.shape[0]).to(weight.dtype)
        return grad_x, grad_w, None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts,
                       recipe: str = "rowwise") -> torch.Tensor:
    """Y [M, N] with Y_g = X_g W_g^T for X [M, K] sorted by expert (``counts[g]`` rows of expert
    g, a list or a 1-D tensor) and W [G, N, K]; FP8 GEMMs for Y and dX, high precision dW.
    ``recipe``: rowwise or tensorwise (fp8.recipe)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: use one of {RECIPES}")
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"expected X [M, K] and W [G, N, K], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return _FP8GroupedLinear.apply(x, weight, host_counts(counts), recipe)
