"""train.recompute: moe_act (Megatron's recompute_modules: [moe_act]) on the local spec's grouped
experts: outputs and every gradient bit-identical to keeping the activation, with less kept for
backward; the settings it does not cover are refused by name."""

import sys
from pathlib import Path

import pytest
import torch

from layer_harness import fwd_bwd, layer_config, seeded_layers
from megatron_coe.config import config_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from coe_layer import saved_activation_bytes  # noqa: E402


def _config(recompute, iterations=2, topk=2, **moe):
    return layer_config(iterations, topk, recompute, **moe)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("iterations,topk", [(1, 4), (2, 2), (3, 1)])
def test_recomputed_activation_gives_the_same_bits_and_keeps_less(dtype, iterations, topk):
    plain, recomputed = seeded_layers(_config("none", iterations, topk),
                                      _config("moe_act", iterations, topk), dtype=dtype)
    assert not plain.experts.recompute_activation and recomputed.experts.recompute_activation
    x = torch.randn(40, 2, 32, dtype=dtype)
    for a, b in zip(fwd_bwd(recomputed, x), fwd_bwd(plain, x)):
        assert torch.equal(a, b)
    kept = [saved_activation_bytes(layer, x)["kept"] for layer in (plain, recomputed)]
    # per routed row the activation and fc2 keep Z (2F) and p instead of Z, act(Z1),
    # Z2 + offset, act(Z1) (Z2 + offset) and A p: 4F elements less
    rows, f = 40 * 2 * topk * iterations, 24
    assert kept[0] - kept[1] == rows * 4 * f * x.element_size(), kept


def test_moe_act_needs_grouped_experts_and_moe_layers():
    with pytest.raises(ValueError, match="recomputes the activation of grouped experts"):
        _config("moe_act", grouped_gemm=False)
    with pytest.raises(ValueError, match="train.recompute=moe_act needs MoE/CoE layers"):
        config_from_dict({"model": {"num_layers": 1, "hidden_size": 32,
                                    "num_attention_heads": 4, "moe": None, "coe": None},
                          "train": {"recompute": "moe_act"}})
