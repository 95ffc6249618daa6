"""The routed experts recomputed in backward from their rows' gather, not from the rows.

Expert recompute (``train.recompute: experts``) keeps only the experts' inputs and runs their
forward again in backward.  The routed experts' input is the dispatcher's permuted rows, k
copies of the layer's tokens x:

    rows[r] = x[index[r]],   r = 1 .. T k        (the rows' tokens, expert by expert)

Without expert parallelism the rows are exactly that gather (model/permutation.py), so keeping
x and ``index`` keeps them: x is kept for backward anyway (the router's and the shared expert's
input), ``index`` too (the unpermutation's backward), and the rows, T k H values, are gathered
again when backward needs them, one gather per iteration.  At the paper's top-8 and hidden
1024 that is 16 KiB per token per layer in bf16 not kept.  The recomputed forward reads the same
values, so outputs and gradients are those of the plain expert recompute, bit for bit; the
rows' gradient goes back through the dispatcher's permutation as before.  Experts draw no
random numbers, so no RNG state is replayed (a checkpoint's other duty).
"""

from __future__ import annotations

from typing import Callable

import torch


class _FromGather(torch.autograd.Function):
    """fn(rows, probs) run without a graph; backward gathers the rows from (tokens, index),
    runs fn again with one, and returns the rows' and the probabilities' gradients."""

    @staticmethod
    def forward(ctx, fn, rows, probs, tokens, index):
        ctx.fn = fn
        ctx.save_for_backward(tokens, index, probs)
        with torch.no_grad():
            return fn(rows, probs)

    @staticmethod
    def backward(ctx, grad):
        if not torch.autograd._is_checkpoint_valid():  # as Megatron's checkpoint refuses it
            raise RuntimeError("expert recompute is not compatible with torch.autograd.grad "
                               "(its recomputed backward writes the experts' weight "
                               "gradients); use .backward()")
        tokens, index, probs = ctx.saved_tensors
        rows = tokens.detach().index_select(0, index).requires_grad_()
        probs = probs.detach().requires_grad_(probs.requires_grad)
        with torch.enable_grad():
            out = ctx.fn(rows, probs)
        torch.autograd.backward(out, grad)
        return None, rows.grad, probs.grad, None, None


def recomputed_from_gather(fn: Callable, rows: torch.Tensor, probs: torch.Tensor,
                           tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``fn(rows, probs)``, recomputed in backward from ``tokens`` [T, H] and ``index`` [T k],
    where ``rows`` is ``tokens[index]`` (not kept)."""
    if rows.shape != (index.numel(), tokens.shape[-1]) or rows.dtype != tokens.dtype:
        raise ValueError(f"rows {tuple(rows.shape)} {rows.dtype} are not the gather of tokens "
                         f"{tuple(tokens.shape)} {tokens.dtype} by {index.numel()} indices")
    return _FromGather.apply(fn, rows, probs, tokens, index)
