"""CoETransformerLayer: Megatron's TransformerLayer, with the CoE "reference" residual mode.

Megatron's layer always adds the MLP output to the pre-norm residual:  h' = h + mlp(norm(h)).
The public CoE reference code instead replaces the stream by the CoE chain's last state:

    x(0) = norm(h);  x(t) = x(t-1) + F_t(x(t-1));  h' = x(C)

For a CoELayer in "reference" mode this subclass gives the MLP bias-dropout-add a zero
residual, so h' = dropout(x(C)).  Every other layer (dense, MoE, CoE inner/outer) is untouched.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer


class CoETransformerLayer(TransformerLayer):
    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        if getattr(self.mlp, "residual", None) == "reference":
            residual = torch.zeros_like(residual)
        return super()._forward_post_mlp(mlp_output_with_bias, residual)
