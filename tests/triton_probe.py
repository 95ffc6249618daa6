"""Whether this Triton's interpreter runs what model.fused_kernels=triton's kernels need on CPU
tensors: a loop whose bound is a runtime argument (``for start in range(0, n, BLOCK)``)."""

import functools

import triton
import triton.language as tl


@triton.jit
def _sum_in_blocks(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(total, axis=0))


@functools.cache
def interpreter_problem() -> str | None:
    """None where the interpreter runs the probe correctly, else why not (one line)."""
    import torch

    x = torch.arange(1.0, 11.0)
    out = torch.zeros(1)
    try:
        _sum_in_blocks[(1,)](x, out, x.numel(), BLOCK=4)
    except Exception as e:  # the interpreter's own failure, whatever its type
        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime "
                f"bound here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if out.item() != 55.0:
        return f"Triton {triton.__version__}'s interpreter summed 1..10 to {out.item()}, not 55"
    return None
