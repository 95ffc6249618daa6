"""The CoE token dispatcher: Megatron's all-to-all dispatcher, one dispatch + one combine per
CoE iteration, with every all-to-all counted.

Per iteration t of a CoE layer on an expert-parallel group of P ranks:

    dispatch:  rows_TE -> a2a(input_splits -> output_splits) -> rows for this rank's experts
    combine:   expert outputs -> a2a(output_splits -> input_splits) -> rows back in place

Megatron-Core's stock dispatcher issues two all-to-alls for a dispatch (the token rows and, in a
second call, their routing probabilities).  Here both travel in ONE all-to-all: each row is
packed as raw bytes ``[hidden bytes | prob bytes]`` (bit-exact for any dtype pair) and unpacked
on arrival, so a CoE layer issues exactly 2*C all-to-alls per forward and 2*C per backward.
Everything else (permutation, capacity dropping, sorting chunks by local expert, TP gathers) is
Megatron's own code, inherited unchanged.

Bookkeeping: :class:`A2ACounters` accumulates, per (iteration, phase, direction), the number of
calls and the rows / bytes sent to and received from every peer.  Rows sent to one's own rank
are counted too (they are part of the collective) and are reported apart as ``self_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


@dataclass
class A2AEntry:
    """Totals of one (iteration, phase, direction) bucket; per-peer lists are indexed by rank
    within the expert-parallel group."""

    calls: int = 0
    sent_rows: list[int] = field(default_factory=list)
    recv_rows: list[int] = field(default_factory=list)
    sent_bytes: list[int] = field(default_factory=list)
    recv_bytes: list[int] = field(default_factory=list)

    def add(self, sent_rows, recv_rows, row_bytes: int) -> None:
        if not self.sent_rows:
            self.sent_rows = [0] * len(sent_rows)
            self.recv_rows = [0] * len(recv_rows)
            self.sent_bytes = [0] * len(sent_rows)
            self.recv_bytes = [0] * len(recv_rows)
        self.calls += 1
        for i, (s, r) in enumerate(zip(sent_rows, recv_rows)):
            self.sent_rows[i] += s
            self.recv_rows[i] += r
            self.sent_bytes[i] += s * row_bytes
            self.recv_bytes[i] += r * row_bytes


class A2ACounters:
    """All-to-all calls and bytes, keyed by (iteration, phase, direction).

    phase is "dispatch" or "combine"; direction is "forward" or "backward"."""

    def __init__(self, ep_rank: int):
        self.ep_rank = ep_rank
        self.entries: dict[tuple[int, str, str], A2AEntry] = defaultdict(A2AEntry)

    def record(self, iteration, phase, direction, sent_rows, recv_rows, row_bytes) -> None:
        self.entries[(iteration, phase, direction)].add(sent_rows, recv_rows, row_bytes)

    def reset(self) -> None:
        self.entries.clear()

    def total(self, direction: str | None = None) -> dict[str, int]:
        """Sum over iterations and phases: calls, bytes sent/received, and bytes to self."""
        out = {"calls": 0, "sent_bytes": 0, "recv_bytes": 0, "self_bytes": 0}
        for (_, _, d), e in self.entries.items():
            if direction is not None and d != direction:
                continue
            out["calls"] += e.calls
            out["sent_bytes"] += sum(e.sent_bytes)
            out["recv_bytes"] += sum(e.recv_bytes)
            out["self_bytes"] += e.sent_bytes[self.ep_rank] if e.sent_bytes else 0
        return out


# ---------------------------------------------------------------------------------------------
# Packing rows of several tensors into one byte matrix (exact, dtype-agnostic).
# ---------------------------------------------------------------------------------------------


def pack_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[n, ...] tensors of any dtypes -> uint8 [n, sum of row bytes]."""
    n = tensors[0].shape[0]
    # explicit row width: reshape(n, -1) is ambiguous when a rank has no rows (n = 0)
    parts = [t.reshape(n, _numel(t.shape[1:])).contiguous()
             .view(torch.uint8) for t in tensors]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def unpack_rows(packed: torch.Tensor, specs: list[tuple[torch.dtype, torch.Size]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack_rows`; ``specs`` holds (dtype, shape without the row dim)."""
    n, out, col = packed.shape[0], [], 0
    for dtype, tail in specs:
        width = _row_bytes(dtype, tail)
        chunk = packed[:, col : col + width].contiguous().view(dtype)
        out.append(chunk.reshape(n, *tail))
        col += width
    return out


def _numel(tail) -> int:
    numel = 1
    for s in tail:
        numel *= s
    return numel


def _row_bytes(dtype: torch.dtype, tail: torch.Size) -> int:
    return _numel(tail) * torch.empty((), dtype=dtype).element_size()


def _all_to_all_rows(group, rows: torch.Tensor, out_splits: list[int], in_splits: list[int],
                     what: str):
    out = rows.new_empty((sum(out_splits), rows.shape[1]))
    try:
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
    except RuntimeError as err:  # a dead, stuck or timed-out peer: say which collective
        raise RuntimeError(f"CoE all-to-all failed ({what}, expert-parallel group of "
                           f"{dist.get_world_size(group)} ranks): {err}") from err
    return out


class _CountedAllToAll(torch.autograd.Function):
    """One all-to-all carrying several row-aligned tensors; its backward is the reverse
    all-to-all of their gradients, also one call.  Both directions are counted."""

    @staticmethod
    def forward(ctx, meta, *tensors):
        group, out_splits, in_splits, counters, iteration, phase, layer = meta
        ctx.meta = meta
        ctx.specs = [(t.dtype, t.shape[1:]) for t in tensors]
        ctx.device = tensors[0].device
        packed = pack_rows(list(tensors))
        counters.record(iteration, phase, "forward", in_splits, out_splits, packed.shape[1])
        what = f"layer {layer}, CoE iteration {iteration + 1}, {phase} forward"
        out = _all_to_all_rows(group, packed, out_splits, in_splits, what)
        return tuple(unpack_rows(out, ctx.specs))

    @staticmethod
    def backward(ctx, *grads):
        group, out_splits, in_splits, counters, iteration, phase, layer = ctx.meta
        n_out = sum(out_splits)
        grads = [
            g if g is not None else torch.zeros((n_out, *tail), dtype=dtype, device=ctx.device)
            for g, (dtype, tail) in zip(grads, ctx.specs)
        ]
        packed = pack_rows(grads)
        counters.record(iteration, phase, "backward", out_splits, in_splits, packed.shape[1])
        what = f"layer {layer}, CoE iteration {iteration + 1}, {phase} backward"
        back = _all_to_all_rows(group, packed, in_splits, out_splits, what)
        return (None, *unpack_rows(back, ctx.specs))


def _as_list(splits, total_rows: int, ep_size: int) -> list[int]:
    if splits is None:  # pad-to-capacity mode: equal splits
        return [total_rows // ep_size] * ep_size
    if torch.is_tensor(splits):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]


class CoEAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher, reused by all C iterations of a CoE layer.

    The layer sets ``iteration`` before each dispatch.  Dispatcher state (splits, permutation
    maps) lives from one dispatch to its combine; what backward needs is held by autograd, so
    C sequential iterations can share this object."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.iteration = 0
        self.layer_number = None  # set by the layer, for error messages
        self.counters = A2ACounters(self.ep_group.rank() if self.ep_size > 1 else 0)

    def token_dispatch(self, permutated_local_input_tokens, permuted_probs):
        if self.ep_size == 1:  # no expert parallelism: nothing to exchange
            return super().token_dispatch(permutated_local_input_tokens, permuted_probs)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", self.tokens_per_expert
        )
        n = permutated_local_input_tokens.shape[0]
        self._in_splits = _as_list(self.input_splits, n, self.ep_size)
        self._out_splits = _as_list(
            self.output_splits, n if self.output_splits is None else 0, self.ep_size
        )
        meta = (self.ep_group, self._out_splits, self._in_splits, self.counters,
                self.iteration, "dispatch", self.layer_number)
        tokens, probs = _CountedAllToAll.apply(meta, permutated_local_input_tokens, permuted_probs)
        return tokens, probs

    def token_combine(self, hidden_states, async_finish: bool = True,
                      allocate_on_comm_stream: bool = True):
        if self.ep_size == 1:
            return super().token_combine(hidden_states)
        meta = (self.ep_group, self._in_splits, self._out_splits, self.counters,
                self.iteration, "combine", self.layer_number)
        (out,) = _CountedAllToAll.apply(meta, hidden_states)
        return out
