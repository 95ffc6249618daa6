"""What the CoE-layer tests share: a one-layer CoE config at test size, layers built from one
seed, and one forward + backward that returns the output and every gradient."""

import torch

from megatron_coe.config import config_from_dict


def layer_config(iterations=2, topk=2, recompute="none", device="cpu", model=None, **moe):
    """One CoE layer: hidden 32, 7 routed experts of hidden 24 and a shared one, sequence aux
    loss; ``model`` adds model fields, ``moe`` MoE fields."""
    return config_from_dict({
        "device": device,
        "model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                  "moe": {"num_experts": 7, "topk": topk, "expert_hidden_size": 24,
                          "shared_expert_hidden_size": 24, "aux_loss": "seq_aux_loss", **moe},
                  "coe": {"iterations": iterations}, **(model or {})},
        "train": {"recompute": recompute}})


def seeded_layers(*configs, dtype=torch.float32):
    """One layer per config, each built from seed 0 (the same weights where shapes agree)."""
    from megatron_coe.model import build_moe_layer

    layers = []
    for config in configs:
        torch.manual_seed(0)
        layers.append(build_moe_layer(config).to(dtype))
    return layers


def fwd_bwd(layer, x):
    """[output, input gradient, every parameter's gradient] of one forward + backward of a
    fixed weighted sum of the output."""
    x = x.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum().backward()
    return [y.detach(), x.grad, *(p.grad.clone() for p in layer.parameters())]
