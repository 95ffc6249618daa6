"""MLA on the local (CPU) spec: our core attention equals causal softmax attention with MLA's
separate query/key and value head dims, and a CoE GPT with MLA runs forward and backward."""

import torch
import torch.nn.functional as F

from megatron_coe.config import config_from_dict


def _config(attention="mla"):
    return config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "vocab_size": 64, "seq_length": 12, "attention": attention,
                  "mla": {"kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4,
                          "v_head_dim": 6},
                  "moe": {"num_experts": 4, "topk": 1, "expert_hidden_size": 16},
                  "coe": {"iterations": 2}},
    })


def test_mla_core_attention_matches_sdpa():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_coe import parallel
    from megatron_coe.model.attention import MLADotProductAttention
    from megatron_coe.model import transformer_config

    config = _config()
    parallel.initialize(config)
    attn = MLADotProductAttention(transformer_config(config), 1, AttnMaskType.causal, "self",
                                  softmax_scale=0.3, k_channels=12, v_channels=6)
    sq, b, heads = 5, 2, 4
    q, k = torch.randn(sq, b, heads, 12), torch.randn(sq, b, heads, 12)
    v = torch.randn(sq, b, heads, 6)
    out = attn(q, k, v, None)
    ref = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3),
                                         v.permute(1, 2, 0, 3), is_causal=True, scale=0.3)
    ref = ref.permute(2, 0, 1, 3).reshape(sq, b, heads * 6)
    assert out.shape == (sq, b, heads * 6)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)


def test_coe_gpt_with_mla_forward_backward():
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from megatron_coe.model import build_model, coe_layers

    torch.manual_seed(0)
    model = build_model(_config())
    assert all(isinstance(layer.self_attention, MLASelfAttention) for layer in model.decoder.layers)
    assert len(coe_layers(model)) == 2
    tokens = torch.randint(0, 64, (2, 13))
    losses = model(tokens[:, :-1], torch.arange(12).expand(2, 12), None, labels=tokens[:, 1:])
    losses.mean().backward()
    assert torch.isfinite(losses).all()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
