"""SharedExpert: Megatron's SharedExpertMLP whose fused SwiGLU is this package's Triton kernel
(``model.fused_kernels: triton`` with ``model.swiglu_fusion``), in the local spec.

    y = (silu(Z1) * Z2) W2^T,   Z = [Z1 | Z2] = x W1^T

Megatron's MLP runs its fused SwiGLU (``bias_swiglu_impl``, torch.compile'd) between the two
linears; here the same math is triton_swiglu.swiglu, which keeps only Z for backward, as
Megatron's does.  A CoE layer runs the shared expert in every iteration, so this kernel runs C
times per layer and micro-batch.  Everything else is SharedExpertMLP's own: its parameters,
checkpoints, and its forward wherever this kernel does not apply (the SwiGLU unfused, a sigmoid
gate, linear biases, Megatron's overlapped shared expert, activations stored in FP8 or offloaded
to the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP


class SharedExpert(SharedExpertMLP):
    def __init__(self, *args, fused_kernels: str = "compile", **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.triton_swiglu = (
            fused_kernels == "triton" and c.bias_activation_fusion and c.gated_linear_unit
            and self.activation_func is F.silu and not c.use_te_activation_func
            and not c.add_bias_linear and not self.use_shared_expert_gate
            and not c.moe_shared_expert_overlap and not c.activation_func_fp8_input_store
            and not c.cpu_offloading and c.activation_func_clamp_value is None
            and c.glu_linear_offset == 0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.triton_swiglu:
            return super().forward(hidden_states)
        from megatron_coe.model.triton_swiglu import swiglu

        z, _ = self.linear_fc1(hidden_states)
        out, _ = self.linear_fc2(swiglu(z))
        return out
