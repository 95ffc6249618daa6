"""Fused core attention for Megatron's local (non-TE) spec: torch's scaled_dot_product_attention.

The same attention as the unfused core attention (Megatron's ``DotProductAttention``, or
:class:`~megatron_coe.model.attention.MLADotProductAttention` for MLA's head dims), in one call
that torch sends to a fused kernel: cuDNN, flash or memory-efficient attention on CUDA (flash
needs equal q/k and v head dims, so MLA gets cuDNN or memory-efficient), its flash-style kernel or
the math fallback on CPU.  With np query heads, ng <= np key/value groups:

    Q [sq, b, np, d_qk],  K [sk, b, ng, d_qk],  V [sk, b, ng, d_v]   (MLA: d_qk = qk_head_dim +
                                                          qk_pos_emb_head_dim, d_v = v_head_dim)
    scores = scale * Q K^T             [b, np, sq, sk]   each K/V group serves np/ng query heads
    probs  = dropout(softmax(scores, keys after the query masked when causal))
    out    = probs V  ->  [sq, b, np * d_v]

``scale`` is the one the unfused attention applies: the attention's own (MLA's
mscale^2 / sqrt(d_qk)) or 1/sqrt(d_qk); ``apply_query_key_layer_scaling`` divides it by the layer
number and multiplies the scores back inside the unfused softmax, which cancels, so one net scale
goes to the kernel.  The kernels sum in another order: results equal the unfused ones within
float tolerance, not bit for bit.  Dropout (training only) draws from the model-parallel RNG
tracker's fork, as the unfused attention does, so it keeps its distribution, not its mask.

Inputs the fused call does not express exactly run the unfused path (which also raises
Megatron's own errors for what it refuses): an explicit ``attention_mask`` (Megatron fills
masked scores with -10000, which differs from a kernel's -inf on fully masked rows), packed
sequences, an attention bias, and causal attention with sq != sk.  Settings it does not cover at
all (sliding-window attention, a softmax offset) are excluded in :func:`fused_attention_applies`,
and the spec then keeps the unfused attention.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType

from megatron_coe.model.attention import MLADotProductAttention


def fused_attention_applies(transformer_config) -> bool:
    """Whether :class:`FusedDotProductAttention` computes the same attention as the local spec's
    unfused one for this config (sliding windows and softmax offsets it does not implement)."""
    return (transformer_config.window_size is None
            and getattr(transformer_config, "softmax_type", "vanilla") == "vanilla")


class FusedDotProductAttention(MLADotProductAttention):
    """Core attention by ``F.scaled_dot_product_attention``.  Takes MLA's ``k_channels`` /
    ``v_channels`` (without them it is Megatron's ``DotProductAttention``: d_qk = d_v =
    kv_channels); parameters, output shape and state dict are the unfused attention's."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        sq, sk = query.shape[0], key.shape[0]
        # Like the unfused attention, the mask type is the one the module was built with.
        causal = self.attn_mask_type == AttnMaskType.causal and sq > 1
        if (attention_mask is not None or packed_seq_params is not None
                or attention_bias is not None or (causal and sq != sk)):
            return super().forward(query, key, value, attention_mask,
                                   attn_mask_type=attn_mask_type, attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params)
        heads, groups = query.shape[2], key.shape[2]
        # Net scale: the unfused softmax multiplies the scores back by the layer number.
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        dropout = self.attention_dropout.p if self.training else 0.0
        rng = (tensor_parallel.get_cuda_rng_tracker().fork()
               if dropout > 0.0 and not self.config.sequence_parallel
               else contextlib.nullcontext())
        with rng:
            # [s, b, n, d] -> [b, n, s, d]: strided views, which the kernels accept.
            context = F.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3), value.permute(1, 2, 0, 3),
                dropout_p=dropout, is_causal=causal, scale=scale, enable_gqa=heads != groups,
            )
        # [b, np, sq, d_v] -> [sq, b, np * d_v]
        return context.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1)
