"""fp32 -> bf16 rounding for this package's Triton kernels, written out on the fp32 bits:

    bits' = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000      (NaN kept as it is)

the nearest bf16, ties to even, as torch's conversion rounds.  Triton's cast rounds so when
compiled, but its interpreter (the CPU tests) truncates and mis-converts subnormals, so a kernel
whose bf16 output must equal torch's bit for bit rounds with this first; the cast of the result
is then exact on both.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rounded_to_bf16(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), still as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
