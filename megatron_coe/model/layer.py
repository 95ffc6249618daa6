"""CoELayer: Megatron-Core's MoE layer run C times in sequence, experts shared across iterations.

Shapes: S sequence, B micro-batch, H hidden, N experts, k routed experts per iteration.

    x(0) = x                      [S, B, H]  input of the MLP sub-layer (after pre-MLP norm)
    F_t(x) = sum_{i in topk(R_t(x))} g(t, i) * E_i(x)  +  S(x)          t = 1..C
    inner:     x(t) = x(t-1) + F_t(x(t-1));  returns sum_t F_t = x(C) - x(0)
               (the transformer layer adds it to the residual stream)
    outer:     x(t) = F_t(x(t-1));           returns x(C)   (added to the residual stream)
    reference: x(t) = x(t-1) + F_t(x(t-1));  returns x(C), and CoETransformerLayer makes it the
               new residual stream (the public CoE reference code's decoder layer); with the
               Triton kernels x(t-1) + (routed + shared) is summed in the unpermutation's
               kernel, the bits of those adds (``fused_residual``)
    iteration_norm (model.coe.iteration_norm, off by default): F_t reads Norm_t(x(t-1)) for
               t >= 2 (x(0) is already the pre-MLP norm's output), as pre-norm transformers
               norm each sub-layer's input; Norm_t is the layer's norm type, [H] weight = 1.
               Without it the outer residual's x(t) shrinks by ~1e-3 per iteration at
               std-0.02 init (docs/study-cpu-gsm8k.md).

R_t is iteration t's router ("independent", the default) or one router for all iterations
("shared").  Every router is a stock Megatron TopKRouter: its aux loss, z-loss and expert bias
are its own, attached to its own probabilities.  The routed experts E_i and the shared expert S
are built once and used in every iteration.  Each iteration runs Megatron's pipeline
route -> dispatch_preprocess -> all-to-all -> experts -> all-to-all -> combine, through
:class:`CoEAlltoAllTokenDispatcher`, so with expert parallelism there are 2*C all-to-alls per
layer per forward (4*C, same bytes, with ``overlap``: the two-half schedule of dispatch.py,
which also runs the shared expert while the dispatch is in flight).  ``recompute_experts``
(train.recompute: experts) recomputes each iteration's expert MLPs, routed and shared, in
backward: only their inputs are kept (on one rank the routed rows as their gather of x,
model/gather_recompute.py), no all-to-all is repeated, results are bit-identical in fp32 (in
bf16 with C > 1 the experts' weight gradients reach their fp32 buffer one iteration at a time:
within rounding).
With C = 1 and
independent routing this is exactly Megatron's MoELayer: the same parameters, built in the same order (the extra routers are created last, so the
random initialisation of a C = 1 layer is unchanged).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_coe.model import aux_topk, repeated_calls
from megatron_coe.model.dispatch import CoEAlltoAllTokenDispatcher
from megatron_coe.model.gather_recompute import recomputed_from_gather
from megatron_coe.model.grouped_experts import GroupedExperts
from megatron_coe.finite import each_finite
from megatron_coe import router_stats


class CoELayer(MoELayer):
    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: str | None = None,
        *,
        iterations: int = 1,
        residual: str = "inner",
        router_mode: str = "independent",
        overlap: bool = False,
        recompute_experts: bool = False,
        iteration_norm=None,
        fused_kernels: str = "compile",
    ):
        if config.moe_token_dispatcher_type != "alltoall":
            raise ValueError(
                f"CoELayer needs moe_token_dispatcher_type='alltoall', got "
                f"{config.moe_token_dispatcher_type!r}"
            )
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, is_mtp_layer, name)
        self.iterations = iterations
        self.residual = residual
        self.router_mode = router_mode
        self.overlap = overlap
        self.recompute_experts = recompute_experts
        # the routers' softmax and top-k as one Triton kernel (model/triton_router.py)
        self.triton_routing = fused_kernels == "triton"
        # reference residual with the Triton kernels: x(t) = x(t-1) + F_t summed in the
        # unpermutation's kernel, and the gradients of x(t-1)'s four uses in one (_Fan)
        self.fused_residual = (residual == "reference" and fused_kernels == "triton"
                               and iteration_norm is None)
        self.token_dispatcher = CoEAlltoAllTokenDispatcher(
            self.num_local_experts,
            self.local_expert_indices,
            config=self.config,
            pg_collection=pg_collection,
            triton_sums=fused_kernels == "triton",
        )
        # self.router (registered by MoELayer) is iteration 1's router; iterations 2..C get
        # their own when routing is independent.  Created last: see the module docstring.
        extra = iterations - 1 if router_mode == "independent" else 0
        self.extra_routers = torch.nn.ModuleList(
            self.submodules.router(
                config=self.config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer
            )
            for _ in range(extra)
        )
        # Norm_t for iterations 2..C (``iteration_norm``: the norm module class, or None);
        # created after the routers, and norms draw no random numbers: init is unchanged.
        self.iteration_norms = torch.nn.ModuleList(
            iteration_norm(config=self.config, hidden_size=self.config.hidden_size,
                           eps=self.config.layernorm_epsilon)
            for _ in range(iterations - 1 if iteration_norm is not None else 0))
        # Local tokens routed to each expert in each iteration, summed since the last reset
        # (each training forward counted once, also when recomputed in backward).
        self.tokens_per_expert = torch.zeros(iterations, self.config.num_moe_experts)
        # Non-finite values seen since the last reset, per iteration: [C, 2] for (router
        # probabilities, iteration output F_t, or x(t) where fused_residual sums it;
        # first_nonfinite calls both "expert output").  Tensor ops only, all iterations checked
        # together at the end of the layer's forward: no device sync.
        self.nonfinite = torch.zeros(iterations, 2, dtype=torch.bool)
        # TE linears called more than once per micro-batch must add every call's weight
        # gradient (repeated_calls.py): the routed experts with C > 1 or the two-half
        # schedule, the shared expert with C > 1.
        if iterations > 1 or overlap:
            repeated_calls.accumulate_every_call(self.experts)
        if iterations > 1:
            repeated_calls.accumulate_every_call(getattr(self, "shared_experts", None))

    @property
    def routers(self) -> list:
        """The router of each iteration, in order (the same object C times when shared)."""
        if self.router_mode == "shared":
            return [self.router] * self.iterations
        return [self.router, *self.extra_routers]

    def set_layer_number(self, layer_number: int):
        super().set_layer_number(layer_number)
        self.token_dispatcher.layer_number = layer_number
        for router in self.extra_routers:
            router.set_layer_number(layer_number)

    def reset_step_stats(self) -> None:
        """Zero the per-iteration expert load and non-finite flags (once per step)."""
        self.tokens_per_expert.zero_()
        self.nonfinite.zero_()

    def first_nonfinite(self) -> str | None:
        """Where non-finite values first appeared since the last reset, or None."""
        bad = self.nonfinite.cpu()
        for t in range(self.iterations):
            for kind, name in enumerate(("router probabilities", "expert output")):
                if bad[t, kind]:
                    return f"layer {self.layer_number}, CoE iteration {t + 1}: {name}"
        return None

    def _iteration(self, t: int, x, padding_mask, residual: bool = False):
        """F_t(x): route, dispatch, experts, combine, plus the shared expert; with
        ``residual`` x + F_t(x)."""
        self.token_dispatcher.iteration = t
        overlap = self.overlap and self.token_dispatcher.ep_size > 1
        x_shared, x_router, x_rows, *x_residual = _Fan.apply(x, 4 if residual else 3,
                                                             self.token_dispatcher.triton_sums)
        # not a `with` nor try/finally: TorchDynamo cannot resume a frame inside either after a
        # graph break (Megatron's router breaks), and would run the rest of the iteration
        # eagerly.  An exception in between leaves the mark set until the next iteration's or
        # the next model's (router_stats.install_tracker).
        router_stats.set_iteration(t)
        shared_out = None if overlap else self._shared_expert(x_shared)
        aux_topk.set_triton(self.triton_routing)
        probs, routing_map = self.routers[t](x_router, padding_mask)
        aux_topk.set_triton(False)
        router_stats.set_iteration(None)
        router_probs = probs
        if not self.training or torch.is_grad_enabled():
            # counts: exact.  Under recompute (moe, full) a training forward runs twice: first
            # without grad, then again in backward; count once, as Megatron's routers do
            self.tokens_per_expert[t].add_(routing_map.detach().sum(dim=0))
        hidden, probs = self.preprocess(x_rows, probs, routing_map)
        if overlap:
            out, shared_out = self.token_dispatcher.overlapped_experts(
                hidden, probs, self._local_experts, lambda: self._shared_expert(x_shared)
            )
        else:
            hidden, probs = self.dispatch(hidden, probs)
            if self.recompute_experts:
                # only the expert MLPs are recomputed: the dispatcher's per-iteration state
                # (counts, sort order) is used here, not in backward
                rows, counts, row_probs = self.token_dispatcher.dispatch_postprocess(hidden,
                                                                                     probs)
                out = self._local_experts(rows, counts, row_probs, 0, self.num_local_experts,
                                          tokens=x_rows)
                out = self.token_dispatcher.combine_preprocess(out)
            else:
                out, _ = self.routed_experts_compute(hidden, probs)
            out = self.combine(out)
        if residual:
            f = self._plus_residual(out, shared_out, x_residual[0])
        else:
            f = self.postprocess(out, shared_out)
        self._checked += [router_probs, f]
        return f

    def _plus_residual(self, out, shared_out, x):
        """postprocess(out, shared_out) + x, the bits of those adds, summed in the
        unpermutation where it runs as gathers (model/permutation.py)."""
        if not self.config.moe_latent_size:
            addends = (x,) if shared_out is None else (shared_out, x)
            out, added = self.token_dispatcher.combine_postprocess_adding(out, addends)
            if added:
                return out
            return (out if shared_out is None else out + shared_out) + x
        return self.postprocess(out, shared_out) + x

    def _recomputed(self, fn, *tensors):
        """fn(*tensors), recomputed in backward under ``recompute_experts`` (only ``tensors``
        are kept; the RNG state is replayed), else run plainly."""
        if self.recompute_experts and self.training and torch.is_grad_enabled():
            return repeated_calls.checkpoint(self.config, self.tp_group, fn, *tensors)
        return fn(*tensors)

    def _shared_expert(self, x):
        if not self.use_shared_expert or self.shared_expert_overlap:
            return self.shared_experts_compute(x)  # None, or Megatron's own overlap
        return self._recomputed(self.shared_experts_compute, x)

    def _local_experts(self, rows, counts, probs, lo: int, hi: int, tokens=None):
        """See :meth:`_local_experts_now`; recomputed in backward under ``recompute_experts``,
        from the rows' gather where the rows are ``tokens``' gather by the dispatcher's index
        (one rank, dropless: model/gather_recompute.py).  Experts that read the counts on the
        host get them there once, not again in the recompute (grouped experts take them on the
        device)."""
        if (self.recompute_experts and torch.is_tensor(counts) and counts.device.type != "cpu"
                and not isinstance(self.experts, GroupedExperts)):
            counts = counts.cpu()
        run = lambda r, p: self._local_experts_now(r, counts, p, lo, hi)  # noqa: E731
        index = self.token_dispatcher.rows_index()
        if (tokens is not None and index is not None and self.recompute_experts
                and self.training and torch.is_grad_enabled()
                and not (self.config.fp8 or self.config.fp4 or self.config.moe_latent_size)):
            return recomputed_from_gather(run, rows, probs,
                                          tokens.reshape(-1, tokens.shape[-1]), index)
        return self._recomputed(run, rows, probs)

    def _local_experts_now(self, rows, counts, probs, lo: int, hi: int):
        """Local experts [lo, hi) on ``rows`` (sorted by expert, ``counts`` rows each).

        Megatron's SequentialMLP runs a Python loop over its experts; it is narrowed to
        [lo, hi) for the call, so the other experts do not run (on zero rows, their weight
        gradients would still be zero-filled).  Grouped-GEMM experts get zero rows for the
        experts outside [lo, hi) instead."""
        experts, n = self.experts, self.num_local_experts
        if isinstance(experts, SequentialMLP) and (lo, hi) != (0, n):
            every = experts.local_experts
            experts.local_experts, experts.num_local_experts = every[lo:hi], hi - lo
            try:
                out, bias = experts(rows, counts, probs)
            finally:
                experts.local_experts, experts.num_local_experts = every, n
        elif (lo, hi) == (0, n):  # as the dispatcher gave them (on the device, if there)
            out, bias = experts(rows, counts, probs)
        else:
            tokens_per_expert = torch.zeros(n, dtype=torch.long)
            tokens_per_expert[lo:hi] = counts
            out, bias = experts(rows, tokens_per_expert, probs)
        assert bias is None, "expert bias is not supported with the all-to-all dispatcher"
        return out

    def _chain(self, x0, padding_mask=None):
        x, delta = x0, None
        self._checked = []  # each iteration's router probabilities and output
        for t in range(self.iterations):
            if self.fused_residual:  # reference, x(t) = x(t-1) + F_t summed by the kernels
                x = self._iteration(t, x, padding_mask, residual=True)
                continue
            normed = self.iteration_norms[t - 1](x) if t and self.iteration_norms else x
            f = self._iteration(t, normed, padding_mask)
            if self.residual == "outer":
                x = f
            elif self.residual == "reference":
                x = x + f
            else:  # inner: the sum of F_t is returned; x(t) only feeds the next iteration
                delta = f if delta is None else delta + f
                if t + 1 < self.iterations:
                    x = x + f
        # all C iterations' checks at once: 2C reductions + 6 launches (finite.py)
        with torch.no_grad():
            self.nonfinite |= ~each_finite(self._checked).view(self.iterations, 2)
        self._checked = []
        # inner: sum of F_t, not x(C) - x(0), to avoid cancellation in low precision.
        return (delta if self.residual == "inner" else x), None

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None:
            raise ValueError("CoELayer does not support partial CUDA-graph capture")
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError("MoE/CoE with tensor parallelism needs sequence parallelism")
        if self.tokens_per_expert.device != hidden_states.device:
            self.tokens_per_expert = self.tokens_per_expert.to(hidden_states.device)
            self.nonfinite = self.nonfinite.to(hidden_states.device)
        if padding_mask is not None:
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.moe_layer_recompute and self.training:
            # Recomputes all C iterations in backward (2*C more all-to-alls).
            return repeated_calls.checkpoint(self.config, self.tp_group, self._chain,
                                             hidden_states, padding_mask)
        return self._chain(hidden_states, padding_mask)


class _Fan(torch.autograd.Function):
    """x -> three aliases of x for its consumers (shared expert, router, token rows), and a
    fourth for the reference residual's add where the layer sums it in the unpermutation,
    whose gradients are summed in one fixed order: ((router + rows) + shared) + residual, the
    order autograd happens to use in Megatron's MoELayer (so a C = 1 layer stays
    bit-identical to it; the residual's term last, as autograd adds it to x's other
    gradient).  Without it the order would follow the order in which autograd runs the
    consumers' backward, which differs between the plain and the overlapped schedule, and
    float addition is not associative.  ``triton``: the sum in one Triton kernel, the same bits
    (model/triton_gather_sum.py)."""

    @staticmethod
    def forward(ctx, x, uses: int = 3, triton: bool = False):
        ctx.set_materialize_grads(False)
        ctx.triton = triton
        return tuple(x.view_as(x) for _ in range(uses))

    @staticmethod
    def backward(ctx, shared, router, rows, residual=None):
        grads = [g for g in (router, rows, shared, residual) if g is not None]
        if ctx.triton and len(grads) > 1:
            from megatron_coe.model import triton_gather_sum

            if (grads[0].dtype in triton_gather_sum.DTYPES and grads[0].dim()
                    and all(g.dtype == grads[0].dtype and g.shape == grads[0].shape
                            for g in grads)):
                return triton_gather_sum.sum_in_order(*grads), None, None
        total = None
        for g in grads:
            total = g if total is None else total + g
        return total, None, None
