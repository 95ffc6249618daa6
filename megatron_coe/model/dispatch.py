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

Overlapped schedule (``parallel.overlap_expert_comm``, :meth:`CoEAlltoAllTokenDispatcher.
overlapped_experts`): each rank's local experts are split in two halves A = [0, L/2) and
B = [L/2, L), and so are the rows every rank sends (a row belongs to the half of its expert):

    launch dispatch(A), dispatch(B)          asynchronous all-to-alls
    shared expert                             runs while both are in flight
    wait A; experts(A); launch combine(A)     dispatch(B) still in flight
    wait B; experts(B); launch combine(B)     combine(A) in flight
    wait combine(A), combine(B); rows back in their original order

Backward mirrors it (each "wait" node's backward launches the reverse all-to-all, each
"launch" node's backward waits for it), so the shared expert's and one half's gradient compute
runs while the other half's exchange is in flight.  Splitting by expert rather than by token
keeps every expert's rows, and their order, exactly those of the plain schedule, and routing
(with its aux loss over all tokens) is untouched: the results are bit-identical to the plain
schedule (tests/distributed/test_overlap.py).  Cost: 4*C all-to-alls per forward instead of
2*C, carrying the same bytes.

Bookkeeping: :class:`A2ACounters` accumulates, per (iteration, phase, direction), the number of
calls and the rows / bytes sent to and received from every peer.  Rows sent to one's own rank
are counted too (they are part of the collective) and are reported apart as ``self_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_coe.model.permutation import TokenOrder, gathered


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
        raise _a2a_error(group, what, err) from err
    return out


class _Exchange:
    """One expert-parallel exchange (a dispatch or a combine) in two halves, each its own
    asynchronous all-to-all, in both directions.

    ``splits[h]`` = (rows sent to, rows received from) every peer by half h in the forward
    direction (backward reverses them).  ``segments[h]`` = the row ranges of half h in this
    rank's local row order (the dispatch's send side, the combine's receive side): a half is
    gathered from, or scattered back into, those ranges with plain slice copies."""

    def __init__(self, meta, splits, segments, specs, n_rows):
        self.group, self.counters, self.iteration, self.phase, self.layer = meta
        self.splits, self.segments, self.specs, self.n_rows = splits, segments, specs, n_rows
        self.work, self.send, self.recv, self.what = [None] * 2, [None] * 2, [None] * 2, [""] * 2

    def launch(self, h: int, rows: torch.Tensor, direction: str) -> None:
        sent, received = self.splits[h] if direction == "forward" else self.splits[h][::-1]
        self.counters.record(self.iteration, self.phase, direction, sent, received, rows.shape[1])
        self.send[h] = rows.contiguous()  # kept alive until the collective is done
        self.recv[h] = rows.new_empty((sum(received), rows.shape[1]))
        self.what[h] = (f"layer {self.layer}, CoE iteration {self.iteration + 1}, {self.phase} "
                        f"half {h + 1} {direction}")
        try:
            self.work[h] = dist.all_to_all_single(self.recv[h], self.send[h], received, sent,
                                                  group=self.group, async_op=True)
        except RuntimeError as err:
            raise _a2a_error(self.group, self.what[h], err) from err

    def wait(self, h: int) -> torch.Tensor:
        try:
            self.work[h].wait()
        except RuntimeError as err:
            raise _a2a_error(self.group, self.what[h], err) from err
        recv = self.recv[h]
        self.work[h] = self.send[h] = self.recv[h] = None
        return recv

    def gather(self, rows: torch.Tensor, h: int) -> torch.Tensor:
        return torch.cat([rows[a:b] for a, b in self.segments[h]])

    def scatter(self, halves: list[torch.Tensor]) -> torch.Tensor:
        out = halves[0].new_empty((self.n_rows, halves[0].shape[1]))
        for h, rows in enumerate(halves):
            at = 0
            for a, b in self.segments[h]:
                out[a:b] = rows[at:at + b - a]
                at += b - a
        return out


def _materialize(grads, specs, n_rows, device):
    """Gradients of row-aligned outputs, with zeros of the right shape for those autograd
    left as None."""
    return [g if g is not None else torch.zeros((n_rows, *tail), dtype=dtype, device=device)
            for g, (dtype, tail) in zip(grads, specs)]


class _LaunchBothHalves(torch.autograd.Function):
    """Dispatch, forward: pack the rows once and start both halves' all-to-alls; the empty
    output only orders the graph.  Backward: wait for both reverse all-to-alls (started by
    :class:`_WaitHalf`) and put each half's gradient rows back where the rows came from."""

    @staticmethod
    def forward(ctx, ex, *tensors):
        ctx.ex = ex
        packed = pack_rows(list(tensors))
        for h in (0, 1):
            ex.launch(h, ex.gather(packed, h), "forward")
        return tensors[0].new_empty(0)

    @staticmethod
    def backward(ctx, _):
        ex = ctx.ex
        return (None, *unpack_rows(ex.scatter([ex.wait(0), ex.wait(1)]), ex.specs))


class _WaitHalf(torch.autograd.Function):
    """Dispatch, forward: wait for half h and unpack its received rows.  Backward: start the
    reverse all-to-all of their gradients."""

    @staticmethod
    def forward(ctx, ex, h, order):
        ctx.ex, ctx.h, ctx.order = ex, h, (order.dtype, order.device)
        received = ex.wait(h)
        ctx.n_rows = received.shape[0]
        return tuple(unpack_rows(received, ex.specs))

    @staticmethod
    def backward(ctx, *grads):
        ex, (dtype, device) = ctx.ex, ctx.order
        ex.launch(ctx.h, pack_rows(_materialize(grads, ex.specs, ctx.n_rows, device)), "backward")
        return None, None, torch.zeros(0, dtype=dtype, device=device)


class _LaunchHalf(torch.autograd.Function):
    """Combine, forward: start half h's all-to-all of the expert outputs.  Backward: wait for
    the reverse all-to-all started by :class:`_WaitBothHalves`."""

    @staticmethod
    def forward(ctx, ex, h, rows):
        ctx.ex, ctx.h = ex, h
        ex.launch(h, pack_rows([rows]), "forward")
        return rows.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return None, None, *unpack_rows(ctx.ex.wait(ctx.h), ctx.ex.specs)


class _WaitBothHalves(torch.autograd.Function):
    """Combine, forward: wait for both halves and put the rows back in their original order.
    Backward: split the gradient into the halves and start both reverse all-to-alls."""

    @staticmethod
    def forward(ctx, ex, order0, order1):
        ctx.ex, ctx.order = ex, (order0.dtype, order0.device)
        return unpack_rows(ex.scatter([ex.wait(0), ex.wait(1)]), ex.specs)[0]

    @staticmethod
    def backward(ctx, grad):
        ex, (dtype, device) = ctx.ex, ctx.order
        packed = pack_rows([grad])
        for h in (0, 1):
            ex.launch(h, ex.gather(packed, h), "backward")
        empty = torch.zeros(0, dtype=dtype, device=device)
        return None, empty, empty


def _a2a_error(group, what: str, err: Exception) -> RuntimeError:
    return RuntimeError(f"CoE all-to-all failed ({what}, expert-parallel group of "
                        f"{dist.get_world_size(group)} ranks): {err}")


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
        packed = pack_rows(_materialize(grads, ctx.specs, sum(out_splits), ctx.device))
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
    C sequential iterations can share this object.  ``triton_sums`` sums each token's rows in
    the local permutation's inverse by the Triton kernel (model.fused_kernels: triton;
    model/permutation.py)."""

    def __init__(self, *args, triton_sums: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.iteration = 0
        self.layer_number = None  # set by the layer, for error messages
        self.counters = A2ACounters(self.ep_group.rank() if self.ep_size > 1 else 0)
        c = self.config
        # One expert-parallel and one tensor-parallel rank, dropless: nothing is exchanged and
        # Megatron's sort of the received rows by local expert ([source rank][expert] ->
        # [expert][source rank]) is the identity.  Then the counts per expert stay on the
        # device (Megatron copies them to the host and waits for them, once per call, for
        # that sort's split sizes), and the sort's two copies of every row, forward and
        # backward, are skipped.  Experts that need the counts on the host read them there
        # (SequentialMLP, TEGroupedMLP, LocalExperts: one read); GroupedExperts does not.
        dropless = (not self.drop_and_pad and c.moe_expert_capacity_factor is None
                    and not c.moe_router_padding_for_quantization)
        self.local_only = self.ep_size == 1 and self.tp_size == 1 and dropless
        # Dropless top-k without padding gives every token exactly k rows: then the local
        # permutation and its inverse run as gathers (model/permutation.py), not atomic adds
        self.rows_per_token = (c.moe_router_topk if dropless and not c.moe_permute_fusion
                               else None)
        self.token_order = TokenOrder()  # one sort of the rows' tokens per dispatch
        self.triton_sums = triton_sums

    def rows_index(self):
        """The index of the last dispatch's rows, rows[r] = tokens[index[r]], where the experts
        receive exactly those rows (one rank, dropless, the permutation as gathers), else
        None (model/gather_recompute.py)."""
        if self.local_only and self.rows_per_token is not None:
            return self.reversed_local_input_permutation_mapping
        return None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        with gathered(self.rows_per_token, self.token_order, self.triton_sums):
            return super().dispatch_preprocess(hidden_states, routing_map, probs)

    def combine_postprocess(self, hidden_states):
        with gathered(self.rows_per_token, self.token_order, self.triton_sums):
            return super().combine_postprocess(hidden_states)

    def combine_postprocess_adding(self, hidden_states, addends: tuple[torch.Tensor, ...]):
        """(:meth:`combine_postprocess` + each of ``addends`` in turn, True) where the
        unpermutation adds them to its sums (model/permutation.py), else (combine_postprocess's
        output, False): the caller adds them."""
        with gathered(self.rows_per_token, self.token_order, self.triton_sums,
                      addends) as added:
            out = super().combine_postprocess(hidden_states)
        return out, bool(added)

    def _maybe_dtoh_and_synchronize(self, point, tokens_per_expert=None):
        if self.local_only:
            return tokens_per_expert
        return super()._maybe_dtoh_and_synchronize(point, tokens_per_expert)

    def dispatch_postprocess(self, global_input_tokens, global_probs):
        if not self.local_only:
            return super().dispatch_postprocess(global_input_tokens, global_probs)
        tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
        return global_input_tokens, tokens_per_expert, global_probs

    def combine_preprocess(self, hidden_states):
        if not self.local_only:
            return super().combine_preprocess(hidden_states)
        return hidden_states

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

    def overlapped_experts(self, tokens, probs, experts, side=None):
        """Dispatch, experts and combine for the rows of :meth:`dispatch_preprocess`, in two
        halves of the local experts whose all-to-alls overlap the other half's expert compute
        and ``side()`` (the shared expert).  See the module docstring for the schedule.

        ``experts(rows, counts, probs, lo, hi)`` runs local experts [lo, hi) on rows sorted by
        expert, ``counts`` rows each.  Returns (rows in the order of ``tokens``, side's result)."""
        L, P = self.num_local_experts, self.ep_size
        if P == 1 or L < 2 or self.tp_size > 1 or self.drop_and_pad:
            raise ValueError("the overlapped schedule needs expert parallelism, at least 2 "
                             "local experts, expert_tensor = 1 and no padding to capacity")
        sent = self.routing_map.sum(dim=0).view(P, L).cpu()        # [dest rank, its expert]
        recv = self.num_global_tokens_per_local_expert.view(P, L).cpu()  # [src rank, my expert]
        starts = torch.cat([sent.new_zeros(1), sent.flatten().cumsum(0)]).tolist()
        halves = [(0, L // 2), (L // 2, L)]
        splits = [(sent[:, lo:hi].sum(1).tolist(), recv[:, lo:hi].sum(1).tolist())
                  for lo, hi in halves]
        segments = [[(starts[r * L + lo], starts[r * L + hi]) for r in range(P)]
                    for lo, hi in halves]
        n = tokens.shape[0]
        meta = (self.ep_group, self.counters, self.iteration, "dispatch", self.layer_number)
        dispatch = _Exchange(meta, splits, segments,
                             [(t.dtype, t.shape[1:]) for t in (tokens, probs)], n)
        order = _LaunchBothHalves.apply(dispatch, tokens, probs)
        side_out = side() if side is not None else None

        meta = (self.ep_group, self.counters, self.iteration, "combine", self.layer_number)
        combine = _Exchange(meta, [pair[::-1] for pair in splits], segments,
                            [(tokens.dtype, tokens.shape[1:])], n)
        launched = []
        for h, (lo, hi) in enumerate(halves):
            rows, row_probs = _WaitHalf.apply(dispatch, h, order)
            width, split = hi - lo, recv[:, lo:hi]
            # [src rank][expert] -> [expert][src rank], as Megatron's dispatch_postprocess does
            by_expert = torch.arange(P * width).view(P, width).T.flatten()
            rows, row_probs = sort_chunks_by_idxs(rows, split.flatten(), by_expert,
                                                  probs=row_probs,
                                                  fused=self.config.moe_permute_fusion)
            out = experts(rows, split.sum(0), row_probs, lo, hi)
            by_rank = torch.arange(width * P).view(width, P).T.flatten()
            out, _ = sort_chunks_by_idxs(out, split.T.flatten(), by_rank,
                                         fused=self.config.moe_permute_fusion)
            launched.append(_LaunchHalf.apply(combine, h, out))
        return _WaitBothHalves.apply(combine, *launched), side_out
