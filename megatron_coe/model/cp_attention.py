"""Core attention with context parallelism for Megatron's local (non-TE) spec, by all-gather.

Megatron-Core's local ``DotProductAttention`` refuses context parallelism (only TE's core
attention implements it), so on CPU a context-parallel run uses this module.  With P
context-parallel ranks the sequence of length S is cut into 2P chunks of S/(2P) tokens and rank
r holds chunks r and 2P-1-r (Megatron's load-balanced layout, from ``get_batch_on_this_cp_rank``;
rotary embeddings are sliced the same way by Megatron).  Per layer:

    K, V    = all-gather over the CP group of every rank's local keys and values
              (backward: the gradient is summed over the group and each rank keeps its part)
    pos(q)  = global positions of the local queries;  pos(k) = those of the gathered keys
    scores  = softmax_scale * Q K^T,  masked where pos(k) > pos(q)  (causal), softmax in fp32
    out     = softmax(scores) V                                       [sq, b, heads * d_v]

Grouped-query attention repeats each key/value group over its heads.  This trades memory (every
rank holds all keys and values) for simplicity; TE's ring attention is the GPU path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule


class _AllGatherSeq(torch.autograd.Function):
    """[s, ...] on each rank -> [P*s, ...] (rank order); backward sums over ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n], None


def chunk_positions(rank: int, size: int, seq_length: int, device=None) -> torch.Tensor:
    """Global positions of the tokens that context-parallel rank ``rank`` of ``size`` holds."""
    chunk = seq_length // (2 * size)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * size - 1 - rank) * chunk, (2 * size - rank) * chunk, device=device)
    return torch.cat([first, second])


class ContextParallelAttention(MegatronModule):
    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, k_channels=None, v_channels=None,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout):
            raise ValueError("context-parallel attention on the local spec has no dropout; "
                             "set attention_dropout to 0")
        self.group = parallel_state.get_context_parallel_group()
        k_channels = k_channels or config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(k_channels)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("context-parallel attention on the local spec takes no packed "
                             "sequences or attention bias")
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        sq = query.shape[0]
        key = _AllGatherSeq.apply(key, self.group)      # [P*sq, b, ng, d]
        value = _AllGatherSeq.apply(value, self.group)
        heads, groups = query.shape[2], key.shape[2]
        if heads != groups:  # grouped-query attention
            key = key.repeat_interleave(heads // groups, dim=2)
            value = value.repeat_interleave(heads // groups, dim=2)
        seq = sq * size
        q_pos = chunk_positions(rank, size, seq, query.device)
        k_pos = torch.cat([chunk_positions(r, size, seq, query.device) for r in range(size)])
        masked = k_pos[None, :] > q_pos[:, None]                       # [sq, P*sq]
        # [b, h, sq, sk]
        scores = torch.einsum("qbhd,kbhd->bhqk", query.float(), key.float()) * self.softmax_scale
        scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.einsum("bhqk,kbhd->qbhd", probs, value)
        return out.reshape(sq, out.shape[1], -1)
