"""LocalExperts: Megatron-Core's SequentialMLP with a lean forward for the local (non-TE) spec.

For local expert e with rows X_e (sorted by expert), routing probabilities p_e, and weights
W1_e [2F, H] (gated) / [F, H], W2_e [H, F]:

    Z_e = X_e W1_e^T                                   (linear_fc1)
    A_e = act(Z_e[:, :F]) * (Z_e[:, F:] + offset)      (gated linear unit; act(Z_e) if not gated)
    Y_e = (A_e * p_e) W2_e^T                           (probabilities scale the activation,
                                                        then linear_fc2)

which is exactly what SequentialMLP computes through one Megatron MLP module per expert, op for
op, with the linears' backward written as Megatron's (dX = dY W, dW = dY^T X): outputs and
gradients are bit-identical (tests/layer/test_formula_parity.py).  What it drops is per-expert
framework work: module calls, hooks, NVTX ranges, and Megatron's per-call checks for features
that are off here.  A CoE layer calls the experts C times per step (2C with the overlapped
schedule), so that fixed cost weighs C times as much as in an MoE layer; on 2 CPU ranks it is
about 8 ms per 32 experts per forward + backward (benchmarks/coe_layer.py).

Parameters, state dict and sharded (checkpoint) state dict are SequentialMLP's.  Any setting the
lean forward does not implement (FP8/FP4, expert tensor parallelism, biases, TE
activations, clamped GLU, probabilities on the input, gradient-accumulation fusion, weight
rematerialisation, frozen weights, CPU offloading, autocast, forward hooks on the experts or their
linears, Transformer Engine linears) runs SequentialMLP's own forward instead.
The Transformer Engine spec keeps Megatron's experts: spec.py only uses this class in the local
spec.
"""

from __future__ import annotations

import torch
import torch.nn.modules.module as nn_hooks
from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_coe.config import LEAN_EXPERTS_UNSUPPORTED


def unsupported_setting(config, expert_tp_size: int) -> str | None:
    """The first setting that the lean expert forwards (LocalExperts here, GroupedExperts in
    grouped_experts.py) do not implement, named; None when they apply."""
    if expert_tp_size > 1:
        return "expert tensor parallelism (expert_tensor_parallel_size > 1)"
    for field, what in LEAN_EXPERTS_UNSUPPORTED.items():
        if getattr(config, field, None) not in (None, False):
            return f"{what} ({field})"
    return None


def host_counts(tokens_per_expert) -> list[int]:
    """Rows per expert as Python ints (a device sync when they are a device tensor)."""
    if torch.is_tensor(tokens_per_expert):
        return tokens_per_expert.tolist()
    return [int(n) for n in tokens_per_expert]


def scaled_activation(config, z: torch.Tensor, probs: torch.Tensor,
                      fused_kernels: str = "compile") -> torch.Tensor:
    """A * p from Z = X W1^T, rows of any experts: A = act(Z[:, :F]) * (Z[:, F:] + offset)
    gated, act(Z) otherwise; each row scaled by its routing probability, in A's dtype.

    With ``bias_activation_fusion`` (model.swiglu_fusion; SwiGLU, offset 0) this is one fused
    weighted SwiGLU kernel forward and one backward, which compute silu(Z1) * Z2 * p in fp32,
    round once to Z's dtype (the separate ops round after each op below 32 bits) and keep only
    Z and p for backward.  ``fused_kernels`` (model.fused_kernels) picks the kernel: "compile",
    Megatron's torch.compile'd one, as its SequentialMLP and TEGroupedMLP call it; "triton",
    the Triton kernels of triton_swiglu.py (Megatron's again where
    ``activation_func_fp8_input_store`` keeps Z in FP8)."""
    c = config
    if c.bias_activation_fusion:
        if fused_kernels == "triton" and not c.activation_func_fp8_input_store:
            from megatron_coe.model.triton_swiglu import weighted_swiglu

            return weighted_swiglu(z, probs)
        return weighted_bias_swiglu_impl(z, None, probs.unsqueeze(-1),
                                         c.activation_func_fp8_input_store)
    if c.gated_linear_unit:
        z_act, z_lin = torch.chunk(z, 2, dim=-1)
        a = c.activation_func(z_act) * (z_lin + c.glu_linear_offset)
    else:
        a = c.activation_func(z)
    return (a * probs.unsqueeze(-1)).to(a.dtype)


class _Linear(torch.autograd.Function):
    """Y = X W^T; backward as Megatron's LinearWithGradAccumulationAndAsyncCommunication
    computes it without tensor parallelism: dX = dY W, dW = dY^T X (contiguous operands)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.contiguous().t().matmul(x.contiguous())
        return grad_x, grad_w


class LocalExperts(SequentialMLP):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        first = self.local_experts[0] if len(self.local_experts) else None
        self._lean = (
            first is not None
            and type(first.linear_fc1) is ColumnParallelLinear  # Megatron's own, not TE's
            and type(first.linear_fc2) is RowParallelLinear
            and unsupported_setting(self.config, self.tp_group.size()) is None
            and not first.linear_fc1.gradient_accumulation_fusion
            and not first.linear_fc2.gradient_accumulation_fusion
            and getattr(first.linear_fc1, "gtp_remat_size", 1) == 1
            and getattr(first.linear_fc2, "gtp_remat_size", 1) == 1
        )

    def _lean_applies(self) -> bool:
        """Checked per call: things that can change after construction.  Module hooks on the
        experts (e.g. DDP's parameter all-gather with overlap_param_gather, FSDP) only run if
        the modules are called; autocast and frozen weights take Megatron's own paths."""
        if not self._lean or torch.is_autocast_enabled():
            return False
        if nn_hooks._global_forward_pre_hooks or nn_hooks._global_forward_hooks:
            return False
        for expert in self.local_experts:
            for m in (expert, expert.linear_fc1, expert.linear_fc2):
                if m._forward_pre_hooks or m._forward_hooks:
                    return False
            if not (expert.linear_fc1.weight.requires_grad
                    and expert.linear_fc2.weight.requires_grad):
                return False
        return True

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        if not self._lean_applies():
            return super().forward(permuted_local_hidden_states, tokens_per_expert,
                                   permuted_probs)
        c = self.config
        counts = host_counts(tokens_per_expert)
        rows = torch.split(permuted_local_hidden_states, counts)
        probs = torch.split(permuted_probs, counts)
        out = []
        for expert, x, p in zip(self.local_experts, rows, probs):
            z = _Linear.apply(x, expert.linear_fc1.weight)
            a = scaled_activation(c, z, p)
            out.append(_Linear.apply(a, expert.linear_fc2.weight))
        return torch.cat(out, dim=0), None
