"""The routers' gating GEMM on bf16 hidden states, with fp32 logits and no fp32 copy of them.

Router t of a CoE layer maps the [T, H] hidden states x to [T, N] logits with its [N, H]
weight W.  With ``moe_router_dtype: fp32`` and no Transformer Engine, Megatron computes

    forward:   logits = x.float() @ W.float()^T
    backward:  dx = (g @ W.float()).to(bf16),   dW = (g^T @ x.float()).to(W.dtype)

for the fp32 logits gradient g: an fp32 copy of x in the forward and again in the backward
(16k x 1024 values per call at the paper's micro-batch 32) and three GEMMs without tensor
cores.  A CoE layer makes C such calls per forward.  Here, on CUDA with bf16 x and W:

    forward:   logits = mm(x, W^T) -> fp32      (bf16 inputs, fp32 accumulation and output)
    backward:  g = g_hi + g_lo + r,   g_hi = bf16(g),   g_lo = bf16(g - g_hi),   |r| <= 2^-16 |g|
               G = [g_hi | g_lo]                                           [T, 2N] bf16
               dx = G @ [W ; W]            one bf16 GEMM (fp32 accumulation), bf16 output
               dW = top + bottom of mm(G^T, x) -> fp32 [2N, H],  cast to W.dtype

A product of two bf16 numbers is exact in fp32, so the logits are Megatron's up to the order
of the fp32 sums.  g - g_hi is exact in fp32 and g_lo rounds it to bf16's 8 significant bits, so
the two terms carry g to within 2^-16 of its size (bf16(g) alone: 2^-8).  dx and dW then differ
from Megatron's fp32 GEMMs by about 2^-16 of the sum of their terms' magnitudes at most, before
their final rounding (dx to bf16, dW to W's dtype) (tests/layer/test_router_gemm.py).  A NaN or
infinite g stays non-finite in dx and dW.

:func:`install` puts :func:`gating_linear` in Megatron's router module in place of its
``router_gating_linear`` (process-wide: the model builders call it, unless
``model.moe.router_gemm`` is fp32, so the last model built sets it for every model in the
process).  With Transformer Engine installed Megatron's function already runs its forward as
bf16 -> fp32 GEMM, and casts to fp32 in its backward; this path replaces both.  It takes the
bf16 path for CUDA tensors under eager or CUDA-graph execution when this torch has the
``out_dtype`` matmul (``aten::mm.dtype``, CUDA only), and gives every other call to Megatron:
CPU, fp16 (its narrower exponent range would not hold the split), fp32 or fp64 routers, a
bias, and torch.compile (whose fake tensors lacked ``mm.dtype`` in torch 2.9).
"""

from __future__ import annotations

import functools

import torch


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 for bf16 a and b: cuBLAS's bf16 GEMM with fp32 output on CUDA; elsewhere
    the same products (exact in fp32) through an fp32 GEMM."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class HalfGatingLinear(torch.autograd.Function):
    """logits = x @ W^T in fp32 from bf16 x [..., H] and W [N, H] (module docstring)."""

    @staticmethod
    def forward(ctx, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inp, weight)
        x = inp.reshape(-1, inp.shape[-1])
        return _mm_fp32(x, weight.t()).view(*inp.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inp, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).float()
        hi = g.to(torch.bfloat16)
        lo = (g - hi.float()).to(torch.bfloat16)
        split = torch.cat([hi, lo], dim=1)  # [T, 2N]
        grad_inp = None
        if ctx.needs_input_grad[0]:
            grad_inp = torch.mm(split, torch.cat([weight, weight], dim=0))
            grad_inp = grad_inp.view(inp.shape)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            both = _mm_fp32(split.t(), inp.reshape(-1, inp.shape[-1]))  # [2N, H]
            n = weight.shape[0]
            grad_weight = (both[:n] + both[n:]).to(weight.dtype)
        return grad_inp, grad_weight


@functools.cache
def _out_dtype_matmul() -> bool:
    """Whether this torch has the bf16 x bf16 -> fp32 matmul (torch >= 2.8, CUDA)."""
    return hasattr(torch.ops.aten.mm, "dtype")


def applies(inp: torch.Tensor, weight: torch.Tensor, bias, router_dtype: torch.dtype) -> bool:
    """Whether :func:`gating_linear` takes the bf16 path for this call (module docstring)."""
    return (inp.is_cuda and inp.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and router_dtype == torch.float32 and bias is None
            and not torch.compiler.is_compiling() and _out_dtype_matmul())


def gating_linear(inp: torch.Tensor, weight: torch.Tensor, bias, router_dtype: torch.dtype):
    """Megatron's ``router_gating_linear(inp, weight, bias, router_dtype)``, through the bf16
    GEMMs where :func:`applies`."""
    if applies(inp, weight, bias, router_dtype):
        return HalfGatingLinear.apply(inp, weight)
    from megatron.core.transformer.moe import moe_utils

    return moe_utils.router_gating_linear(inp, weight, bias, router_dtype)


def install(bf16: bool = True) -> None:
    """Make Megatron's routers compute their logits through :func:`gating_linear`
    (``model.moe.router_gemm: bf16``), or through Megatron's own function (``fp32``):
    process-wide, for the models built next."""
    from megatron.core.transformer.moe import moe_utils, router

    router.router_gating_linear = gating_linear if bf16 else moe_utils.router_gating_linear
