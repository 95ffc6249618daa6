"""Token permutation for dropless top-k routing, as gathers in both directions.

The dispatcher sorts a layer's T tokens x into N = T k rows grouped by expert (permute) and
sums each token's k expert outputs back (unpermute).  With ``index`` the token of each row
(expert-major, as Megatron's ``permute`` lists them):

    permute:    rows[r] = x[index[r]]                 backward: dx[t] = sum_{r: index[r]=t} drows[r]
    unpermute:  y[t] = sum_{r: index[r]=t} rows[r]    backward: drows[r] = dy[index[r]]

Megatron computes both sums by scattering rows into a zeroed [T, hidden] tensor with atomic
adds (index_add_ / scatter_add_), which on a GPU in bf16 take several times a gather's time.
Dropless top-k routing gives every token exactly k rows, so a stable sort of ``index``, the rows
in token order, makes each sum a gather and a reduction over k:

    sum_{r: index[r]=t} rows[r] = sum_j rows[order[t k + j]],    order = argsort(index, stable)

which reads each row once and writes each token once, without atomics.  The terms are the
same; the reduction adds them in another order and, in bf16, rounds once (in fp32) instead of
after every add, so results equal Megatron's within float rounding.  ``order`` is taken once per
dispatch: the permutation's backward and the unpermutation's forward of the same rows share it
(:class:`TokenOrder`).  With ``model.fused_kernels: triton`` the gather and the reduction are
one Triton kernel (model/triton_gather_sum.py): the same sums, in fp32 in the order j = 0..k-1,
without the gathered copy; it can also add the reference residual's terms to the sums
(``addends``, model/layer.py).  Where the router kernel made the routing map, the rows' tokens,
their experts and each token's rows come from it without a sort (model/triton_row_index.py).
The rows' probabilities are gathered as Megatron gathers them, and their gradient written back
without the sort of an accumulating scatter (:class:`_RowProbs`).

:func:`gathered` applies this to Megatron's dispatcher for the duration of one dispatch or
combine: it wraps the dispatcher module's ``permute`` and ``unpermute`` (Megatron's, or the CPU
backend's), which still choose the rows; anything but the dropless unpadded case runs them
unchanged.
"""

from __future__ import annotations

import contextlib
import torch

from megatron_coe.model.tensor_memo import TensorMemo


class _GatherRows(torch.autograd.Function):
    """rows = x[index]; backward: each token's k row gradients gathered and summed."""

    @staticmethod
    def forward(ctx, x, index, order, k, triton=False):
        ctx.save_for_backward(order)
        ctx.k, ctx.triton = k, triton
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad_rows):
        (order,) = ctx.saved_tensors
        return sum_by_token(grad_rows, order, ctx.k, ctx.triton), None, None, None, None


class _SumRows(torch.autograd.Function):
    """y[t] = sum of token t's k rows (+ each addend in turn); backward: dy gathered back to
    the rows, and dy itself for each addend."""

    @staticmethod
    def forward(ctx, rows, index, order, k, triton=False, *addends):
        ctx.save_for_backward(index)
        ctx.addends = len(addends)
        return sum_by_token(rows, order, k, triton, addends)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return (grad.index_select(0, index), None, None, None, None,
                *(grad for _ in range(ctx.addends)))


class _RowProbs(torch.autograd.Function):
    """The rows' routing probabilities, probs[index[r], expert of row r], as Megatron's permute
    gathers them from the transposed [experts, T] probabilities; backward: written into zeros, not
    accumulated: the rows' (token, expert) pairs are distinct, and an accumulating write
    (Megatron's, the backward of its gather) sorts its indices on a GPU."""

    @staticmethod
    def forward(ctx, probs, index, routing_map, experts=None):
        # rows are listed expert by expert: expert e has routing_map[:, e].sum() of them (a
        # search, not repeat_interleave, whose output size the host would have to read), unless
        # given.  The map's top-k rows hold exactly index.numel() entries (gather_permute's
        # condition); the clamp only keeps an index in range should that ever not hold.
        if experts is None:
            ends = routing_map.sum(dim=0).cumsum(0)
            experts = torch.searchsorted(ends, torch.arange(index.numel(), device=index.device),
                                         right=True).clamp_(max=routing_map.shape[1] - 1)
        ctx.save_for_backward(index, experts)
        ctx.shape = probs.shape
        return probs[index, experts]

    @staticmethod
    def backward(ctx, grad):
        index, experts = ctx.saved_tensors
        grad_probs = grad.new_zeros(ctx.shape)
        grad_probs[index, experts] = grad
        return grad_probs, None, None, None


def sum_by_token(rows: torch.Tensor, order: torch.Tensor, k: int, triton: bool = False,
                 addends: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """[T, ...]: for each token t, the sum of its k rows, which are rows[order[t k .. t k + k)]
    (``order`` = argsort(index, stable): :meth:`TokenOrder.of`), then + each of ``addends``
    in turn; by the Triton kernel with ``triton``, for the dtypes it sums (the same bits as
    torch's adds of the addends)."""
    if triton:
        from megatron_coe.model import triton_gather_sum

        if (rows.dtype in triton_gather_sum.DTYPES
                and len(addends) <= triton_gather_sum.MAX_ADDENDS):
            return triton_gather_sum.gather_sum(rows, order, k, addends)
    total = rows.index_select(0, order).view(-1, k, *rows.shape[1:]).sum(1)
    for addend in addends:
        total = total + addend
    return total


class TokenOrder:
    """argsort(index, stable=True) of the rows' tokens, taken once for the last ``index`` seen:
    a dispatcher's permute and its unpermute pass the same index tensor, unchanged."""

    def __init__(self):
        self._last = TensorMemo()

    def remember(self, index: torch.Tensor, order: torch.Tensor) -> None:
        """``order`` is argsort(index, stable=True), found otherwise (triton_row_index.py)."""
        self._last.remember(index, order)

    def of(self, index: torch.Tensor) -> torch.Tensor:
        order = self._last.get(index)
        if order is None:
            order = torch.argsort(index, stable=True)
            self._last.remember(index, order)
        return order


@contextlib.contextmanager
def gathered(k: int | None, orders: TokenOrder | None = None, triton: bool = False,
             addends: tuple[torch.Tensor, ...] = ()):
    """Within this context Megatron's dispatcher permutes and unpermutes by gathers, for
    routing that gives every token exactly ``k`` rows (None: no change).  ``orders`` keeps the
    rows' token order from a permute for the unpermute of the same rows (a dispatcher's own,
    across its dispatch and combine contexts); ``triton`` sums each token's rows by the Triton
    kernel (:func:`sum_by_token`).  ``addends`` (tensors of the unpermutation's output shape)
    are added to the one unpermutation within the context where it runs as gathers; the
    context yields a list that then holds ``True`` (else it stays empty: nothing was added)."""
    from megatron.core.transformer.moe import token_dispatcher as td

    orders = TokenOrder() if orders is None else orders
    added: list[bool] = []
    if k is None:
        yield added
        return
    permute, unpermute = td.permute, td.unpermute

    def gather_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False,
                       drop_and_pad=False, **kwargs):
        if (fused or drop_and_pad or kwargs.get("align_size", 0) or tokens.dim() != 2
                or num_out_tokens != tokens.shape[0] * k):
            return permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad,
                           **kwargs)
        found = None
        if triton:  # the router kernel's map: its rows without a sort (the same integers)
            from megatron_coe.model import triton_row_index

            found = triton_row_index.rows_of(routing_map, num_out_tokens)
        if found is None:
            # the rows' tokens as Megatron (or the CPU backend) picks them, on a zero-width view
            _, _, index, pad, counts = permute(tokens.detach()[:, :0], routing_map, None,
                                               num_out_tokens, fused, drop_and_pad, **kwargs)
            experts = None
        else:
            index, experts, order = found
            pad, counts = None, kwargs.get("tokens_per_expert")
            orders.remember(index, order)
        row_probs = (None if probs is None
                     else _RowProbs.apply(probs, index, routing_map, experts))
        return (_GatherRows.apply(tokens, index, orders.of(index), k, triton), row_probs, index,
                pad, counts)

    def gather_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None,
                         routing_map=None, fused=False, drop_and_pad=False, **kwargs):
        if (probs is not None or fused or drop_and_pad or kwargs.get("pad_offsets") is not None
                or permuted_tokens.dim() != 2
                or permuted_tokens.shape[0] != restore_shape[0] * k):
            return unpermute(permuted_tokens, sorted_indices, restore_shape, probs, routing_map,
                             fused, drop_and_pad, **kwargs)
        extra = ()
        shape = (restore_shape[0], permuted_tokens.shape[1])
        if addends and not added and all(a.numel() == shape[0] * shape[1]
                                         and a.shape[-1] == shape[1]
                                         and a.dtype == permuted_tokens.dtype for a in addends):
            extra = tuple(a.reshape(shape) for a in addends)
            added.append(True)
        return _SumRows.apply(permuted_tokens, sorted_indices, orders.of(sorted_indices), k,
                              triton, *extra)

    td.permute, td.unpermute = gather_permute, gather_unpermute
    try:
        yield added
    finally:
        td.permute, td.unpermute = permute, unpermute
