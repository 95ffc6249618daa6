"""What the expert-module tests (test_local_experts.py, test_grouped_experts.py) share: sizes,
the local spec's expert submodules, a TransformerConfig, one forward + backward."""

import dataclasses

import torch
import torch.nn.functional as F

from megatron_coe.config import config_from_dict

H, FFN, E = 32, 24, 6


def local_submodules(grouped: bool):
    """The local spec's expert MLP submodules (Megatron's linears) for grouped or per-expert
    experts."""
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider().grouped_mlp_modules(grouped).keywords["submodules"]


def tf_config(gated=True, hidden=H, ffn=FFN):
    """Megatron's TransformerConfig of a one-layer MoE with E experts (process groups set up);
    ``gated=False``: a plain GELU MLP instead of SwiGLU."""
    from megatron_coe import parallel
    from megatron_coe.model import transformer_config

    config = config_from_dict({"model": {"num_layers": 1, "hidden_size": hidden,
                                         "num_attention_heads": 4,
                                         "moe": {"num_experts": E, "topk": 2,
                                                 "expert_hidden_size": ffn}}})
    parallel.initialize(config)
    tf = transformer_config(config)
    if not gated:
        tf = dataclasses.replace(tf, gated_linear_unit=False, activation_func=F.gelu)
    return tf


def run(experts, x, counts, probs, gy):
    """Forward + backward of an experts module on rows ``x`` (``counts`` per expert): (output,
    the rows' gradient, the probabilities' gradient); weight gradients stay on the module."""
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    y, bias = experts(x, counts, probs)
    assert bias is None
    (y.float() * gy).sum().backward()
    return y, x.grad, probs.grad
