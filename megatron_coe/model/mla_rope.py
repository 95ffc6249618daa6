"""MLA's rotary embedding as Megatron-Core's fused Triton kernels (``model.mla.rope_fusion``).

Megatron's MLA applies RoPE to the rotary part of each head's query, q_pe [s, b, n, d_r], and to
the one rotary key all heads share, k_pe [s, b, 1, d_r], then concatenates each head's parts:

    query = [q_nope | rope(q_pe)]                 [s, b, n, d_qk + d_r]
    key   = [k_nope | rope(k_pe) for every head]  [s, b, n, d_qk + d_r]
    rope(x)[i] = x_1 cos(theta_i p) - x_2 sin(theta_i p), ...   (x_1, x_2: x's even and odd
                 elements, theta_i = base^(-2i / d_r), p the position)

With ``apply_rope_fusion`` it does this in two Triton kernels (megatron/core/fusions/
fused_mla_yarn_rope_apply.py): one rotates q_pe in place, one writes the keys and values from
the up-projection's output and k_pe; their backwards mirror them.  It runs them for YaRN RoPE
only, whose frequencies are (1 - m_i) theta_i / s + m_i theta_i and whose attention scale is
(0.1 mscale ln(s) + 1)^2: at a scaling factor s = 1 both are RoPE's (a frequency may come out
one fp32 ulp off), so the model is built with YaRN at s = 1 (model/build.py).

Each kernel is tuned by Triton's autotuner over 8 head-block sizes, timed on the GPU at the
first call of each process.  The key's backward sums the shared k_pe's gradient over the heads
in blocks of that size, so two processes could sum it in different orders (a resumed run would
not give the bits of an uninterrupted one).  :func:`pin_head_block` keeps one block size,
:data:`HEAD_BLOCK` heads: the same order in every process, and no timing in the first step.
"""

from __future__ import annotations

import torch

from megatron_coe.model import probe

HEAD_BLOCK = 8  # heads per program: the paper configs' 8 heads in one
KERNELS = ("rotary_fwd_q_kernel", "rotary_bwd_q_kernel", "rotary_fwd_kv_kernel",
           "rotary_bwd_kv_kernel")


def pin_head_block() -> None:
    """Every fused MLA RoPE kernel runs with :data:`HEAD_BLOCK` heads per program (process-wide,
    idempotent)."""
    from megatron.core.fusions import fused_mla_yarn_rope_apply as fused

    for name in KERNELS:
        kernel = getattr(fused, name)
        kept = [c for c in kernel.configs if c.kwargs.get("BLOCK_H") == HEAD_BLOCK]
        if not kept:
            raise RuntimeError(f"megatron-core's {name} has no {HEAD_BLOCK}-head block to pin")
        kernel.configs = kept[:1]


_ERRORS: dict[tuple, str | None] = {}


def kernels_error(dtype: torch.dtype, heads: int, qk_head_dim: int, rope_dim: int,
                  v_head_dim: int) -> str | None:
    """None when the fused kernels run forward and backward on the current GPU in ``dtype`` at
    these head dims, on one token, else the error in one line (model/probe.py)."""
    def run(device):
        from megatron.core.fusions.fused_mla_yarn_rope_apply import (
            fused_apply_mla_rope_for_kv, fused_apply_mla_rope_for_q)

        pin_head_block()

        def rand(*shape):
            return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

        q = rand(1, 1, heads, qk_head_dim + rope_dim)
        kv, k_pe = rand(1, 1, heads, qk_head_dim + v_head_dim), rand(1, 1, 1, rope_dim)
        cos = torch.ones(1, rope_dim, device=device, dtype=dtype)
        sin = torch.zeros(1, rope_dim, device=device, dtype=dtype)
        query = fused_apply_mla_rope_for_q(q.clone(), cos, sin, qk_head_dim, rope_dim)
        key, value = fused_apply_mla_rope_for_kv(kv, k_pe, cos, sin, rope_dim, qk_head_dim,
                                                 v_head_dim)
        (query.float().sum() + key.float().sum() + value.float().sum()).backward()

    return probe.error(_ERRORS, (dtype, heads, qk_head_dim, rope_dim, v_head_dim), "cuda", run)
