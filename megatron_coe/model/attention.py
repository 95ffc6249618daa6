"""Core attention for multi-latent attention (MLA) on Megatron's local (non-TE) spec.

MLA's queries/keys have head dim d_qk = qk_head_dim + qk_pos_emb_head_dim and its values head
dim d_v = v_head_dim, so MLASelfAttention builds its core attention with ``k_channels`` and
``v_channels``.  Megatron-Core 0.19's local ``DotProductAttention`` takes neither (only TE's
does), so MLA could not run on CPU.  This subclass accepts them and sizes the output for d_v:

    scores = softmax_scale * Q K^T  (per head, [b, np, sq, sk], d_qk contracted),  causal mask
    out    = softmax(scores) V      ([sq, b, np * d_v])

softmax_scale is MLA's own (1/sqrt(d_qk), times its yarn mscale when used).
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention


class MLADotProductAttention(DotProductAttention):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type,
                         attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        v_channels = v_channels or config.kv_channels
        self.hidden_size_per_attention_head_v = v_channels
        self.hidden_size_per_partition = (
            v_channels * config.num_attention_heads // self.tp_group.size()
        )
