"""A weight's gradients from several uses in one backward pass, summed into its fp32 gradient
buffer in one pass.

A CoE layer uses its routed experts' weights W once per iteration.  Autograd sums the C
gradients of one backward pass in W's dtype, and the DDP hook then writes the sum into W's fp32
buffer ``main_grad`` (``ddp.WriteFirstDDP``: copied for the step's first gradient, added after):

    autograd:  s = dW_C + dW_(C-1) + ... + dW_1        in W's dtype, in arrival order
    DDP hook:  main_grad (+)= fp32(s)

With :func:`use` around each use of W, the backward of each use keeps the partial sum itself and
the last use of the pass writes the buffer in one fused pass:

    main_grad (+)= fp32(dtype(s' + dW_1)),   s' = dW_C + ... + dW_2

The same sums in the same order and the same fp32 add: bit for bit the values autograd and the
hook give (tests/layer/test_wgrad_sum.py).  Per element of a bf16 weight with C = 2 that moves 8
bytes instead of 12 for a step's first gradient (autograd's add: 6; the copy: 6) and 12 instead
of 16 for a later one: the routed experts' 545 M weights of CoE-2(4/64) at paper scale are 2.2
GB fewer per micro-batch.  The fused pass is a Triton kernel on CUDA for bf16 and fp32
gradients (model/triton_sum_into.py); elsewhere torch's two ops do the same.

Uses are counted in the forward (with gradients enabled) and counted off in the backward; the
last one writes.  A backward pass that ends with a partial sum kept (uses of W whose backward
belongs to a later pass: several micro-batches in flight, a forward never backpropagated) writes
it when the pass ends, as the hook would have (a callback queued with autograd's engine per
weight and pass, dropped with a pass that fails).  Activation recompute recounts the uses it runs
again; expert recompute's backward passes (one per use) write one gradient each, as the hook
did.  Counts and sums reset with the buffers (``WriteFirstDDP.zero_grad_buffer``).

It applies where WriteFirstDDP writes the buffers (``ddp.applies``: no overlapped reduction,
whose hook needs the parameter's ``grad``, no other writer of ``main_grad``); elsewhere, and for
a weight outside any DDP, :func:`use` returns W itself.  The weights' gradients reach only their
buffers: ``torch.autograd.grad`` with respect to them is not supported while it applies.
"""

from __future__ import annotations

import warnings

import torch


def use(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` for one use whose gradient is summed with the pass's others (module
    docstring), or ``weight`` itself where that does not apply (``weight.wgrad_sum``, which
    WriteFirstDDP sets while it writes the buffers).  Take it in the call that consumes it, so
    that the uses' backward order is their consumers' (autograd's summation order)."""
    if not (torch.is_grad_enabled() and weight.requires_grad
            and getattr(weight, "wgrad_sum", False)):
        return weight
    weight.wgrad_uses = getattr(weight, "wgrad_uses", 0) + 1
    return _Use.apply(weight)


def reset(weight: torch.Tensor) -> None:
    """Forget counted uses and kept sums (with the buffers, at a step's start; a sum kept by a
    backward pass that failed is dropped with the step)."""
    weight.wgrad_uses = 0
    weight.wgrad_partial = None


class _Use(torch.autograd.Function):
    """W itself, forward; backward: W's gradient from this use goes to :func:`_contribute`, not
    to autograd's sum (nothing is returned for W)."""

    @staticmethod
    def forward(ctx, weight):
        ctx.weight = weight
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        _contribute(ctx.weight, grad)
        return None


def _contribute(weight, grad: torch.Tensor) -> None:
    """One use's gradient: written with the kept sum when it is the last counted use, else kept
    (summed in arrival order) until the last use or the end of this backward pass.  More
    gradients than counted uses (a graph backpropagated twice with retain_graph) are kept and
    written at the pass's end, as autograd sums them there."""
    weight.wgrad_uses = getattr(weight, "wgrad_uses", 0) - 1
    partial = getattr(weight, "wgrad_partial", None)
    if weight.wgrad_uses == 0:
        weight.wgrad_partial = None
        _write(weight, partial, grad)
        return
    weight.wgrad_uses = max(weight.wgrad_uses, 0)
    if partial is None:  # written at the end of this pass unless the last use comes first
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _write_kept(weight))
    weight.wgrad_partial = grad if partial is None else partial + grad


def _write_kept(weight) -> None:
    """At the end of a backward pass: write the sum kept for ``weight``, if still kept."""
    partial = getattr(weight, "wgrad_partial", None)
    if partial is not None:
        weight.wgrad_partial = None
        _write(weight, None, partial)


def _write(weight, partial, grad: torch.Tensor) -> None:
    """main_grad (+)= fp32(dtype(partial + grad)) (grad alone without a partial), copied for
    the step's first gradient as WriteFirstDDP's hook copies."""
    main = weight.main_grad
    first = not getattr(weight, "main_grad_written", True)
    if not (partial is not None and main.is_cuda and _fused(main, partial, grad, first)):
        total = grad if partial is None else partial + grad
        if first:
            main.copy_(total)
        else:
            main.add_(total)
    weight.main_grad_written = True


_KERNEL_FAILED: list[str] = []  # why the Triton kernel could not run here, once known


def _fused(main, partial, grad, first: bool) -> bool:
    """main (+)= fp32(dtype(partial + grad)) by the Triton kernel; False (nothing written) where
    it cannot run: other dtypes, or a Triton that fails on this GPU (tried once, then torch's
    two ops, which give the same values)."""
    if _KERNEL_FAILED or partial.dtype not in (torch.bfloat16, torch.float32):
        return False
    try:
        from megatron_coe.model.triton_sum_into import sum_into

        sum_into(main, partial, grad, accumulate=not first)
    except ValueError:  # sum_into's own checks: a caller's bug, not this GPU's
        raise
    except Exception as e:  # Triton's compile and launch errors have no common base class
        _KERNEL_FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"wgrad_sum: the Triton kernel failed here ({_KERNEL_FAILED[0]}); "
                      "summing with torch's ops (same values, one more pass)")
        return False
    return True
