"""The fused core attention (torch's scaled_dot_product_attention) equals the local spec's
unfused one within fp32 tolerance, forward and backward, for MHA, MLA's unequal head dims and
grouped-query attention, with torch's math backend and with its default CPU kernel; it falls back
to the unfused path for inputs it cannot express; dropout keeps the unfused distribution and
draws from the model-parallel RNG fork; the spec uses it where it applies."""

import contextlib
import functools

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_coe.config import config_from_dict

TOL = dict(atol=2e-6, rtol=1e-5)
BACKENDS = {"math": functools.partial(sdpa_kernel, SDPBackend.MATH),
            "default": contextlib.nullcontext}


def _config(attention="mha", overrides=None, seq_length=12):
    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64,
             "seq_length": seq_length, "attention": attention,
             "mla": {"kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4,
                     "v_head_dim": 6},
             "moe": {"num_experts": 4, "topk": 1, "expert_hidden_size": 16},
             "coe": {"iterations": 2}}
    if overrides:
        model["transformer_overrides"] = overrides
    return config_from_dict({"model": model})


def _pair(overrides=None, layer_number=1, **kwargs):
    """(unfused, fused) core attentions built alike."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_coe import parallel
    from megatron_coe.model import transformer_config
    from megatron_coe.model.attention import MLADotProductAttention
    from megatron_coe.model.fused_attention import FusedDotProductAttention

    config = _config(overrides=overrides)
    parallel.initialize(config)
    tf = transformer_config(config)
    return tuple(cls(tf, layer_number, AttnMaskType.causal, "self", **kwargs)
                 for cls in (MLADotProductAttention, FusedDotProductAttention))


def _qkv(sq, b, heads, groups, d_qk, d_v, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, d_qk, generator=g, requires_grad=True)
    k = torch.randn(sq, b, groups, d_qk, generator=g, requires_grad=True)
    v = torch.randn(sq, b, groups, d_v, generator=g, requires_grad=True)
    return q, k, v


def _run(attn, q, k, v, mask=None):
    """Output and the gradients of q, k, v for a fixed random output gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attn(q, k, v, mask)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


# (name, attention kwargs, heads, K/V groups, d_qk, d_v, transformer overrides)
CASES = [
    ("mha", {}, 4, 4, 8, 8, None),
    ("mla", dict(softmax_scale=0.3, k_channels=12, v_channels=6), 4, 4, 12, 6, None),
    ("gqa", {}, 4, 2, 8, 8, {"num_query_groups": 2}),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name,kwargs,heads,groups,d_qk,d_v,overrides", CASES,
                         ids=[c[0] for c in CASES])
def test_fused_equals_unfused(backend, name, kwargs, heads, groups, d_qk, d_v, overrides):
    unfused, fused = _pair(overrides, **kwargs)
    q, k, v = _qkv(16, 2, heads, groups, d_qk, d_v)
    ref = _run(unfused, q, k, v)
    with BACKENDS[backend]():
        got = _run(fused, q, k, v)
    assert got[0].shape == ref[0].shape == (16, 2, heads * d_v)
    for what, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, w=what: f"{name} {w}: {m}")


def test_query_key_layer_scaling_keeps_the_net_scale():
    """apply_query_key_layer_scaling divides the scale by the layer number and the unfused
    softmax multiplies it back: the fused call must use the net scale."""
    unfused, fused = _pair({"apply_query_key_layer_scaling": True}, layer_number=3)
    assert unfused.softmax_scale == pytest.approx(8 ** -0.5 / 3)
    q, k, v = _qkv(10, 2, 4, 4, 8, 8)
    for a, b in zip(_run(fused, q, k, v), _run(unfused, q, k, v)):
        torch.testing.assert_close(a, b, **TOL)


def test_explicit_mask_runs_the_unfused_path():
    """A given attention mask (Megatron: True = masked, filled with -10000) is not expressed by
    the fused call; the unfused path runs, bit for bit."""
    unfused, fused = _pair()
    q, k, v = _qkv(10, 2, 4, 4, 8, 8)
    mask = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(3)) < 0.3
    for a, b in zip(_run(fused, q, k, v, mask), _run(unfused, q, k, v, mask)):
        assert torch.equal(a, b)


def test_dropout_distribution_and_rng_fork():
    """Dropout: none in eval mode; in training the same mean (dropout is unbiased) and spread
    over many draws (one batch of identical sequences) as the unfused attention's, drawn inside
    the model-parallel RNG tracker's fork, which leaves the default generator where it was."""
    unfused, fused = _pair(attention_dropout=0.5)
    plain, _ = _pair()
    draws = 2000
    q, k, v = (t.detach().expand(-1, draws, -1, -1).contiguous() for t in _qkv(8, 1, 4, 4, 8, 8))
    expected = plain(q[:, :1], k[:, :1], v[:, :1], None)
    fused.eval()
    assert torch.allclose(fused(q[:, :1], k[:, :1], v[:, :1], None), expected, **TOL)
    fused.train()
    unfused.train()
    before = torch.get_rng_state()
    got, ref = (m(q, k, v, None) for m in (fused, unfused))
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.allclose(got[:, :1], expected)
    assert (got.mean(1, keepdim=True) - expected).abs().max() < 0.15
    spread_ratio = got.std(1).mean() / ref.std(1).mean()
    assert 0.95 < spread_ratio < 1.05, spread_ratio


def test_spec_uses_fused_attention_where_it_applies():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_coe.model import transformer_config
    from megatron_coe.model.attention import MLADotProductAttention
    from megatron_coe.model.cp_attention import ContextParallelAttention
    from megatron_coe.model.fused_attention import FusedDotProductAttention
    from megatron_coe.model.spec import coe_block_spec

    def core(tf, fused=None):
        kwargs = {} if fused is None else {"fused_attention": fused}
        block = coe_block_spec(tf, None, False, **kwargs)
        return {s.submodules.self_attention.submodules.core_attention for s in block.layer_specs}

    mha, mla = transformer_config(_config("mha")), transformer_config(_config("mla"))
    assert core(mha, True) == core(mla, True) == {FusedDotProductAttention}
    assert core(mha) == core(mla) == {FusedDotProductAttention}  # the default, CPU and CUDA
    assert core(mha, False) == {DotProductAttention}
    assert core(mla, False) == {MLADotProductAttention}
    window = transformer_config(_config(overrides={"window_size": (4, 0)}))
    assert core(window, True) == {DotProductAttention}
    cp = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                           context_parallel_size=2)
    assert core(cp, True) == {ContextParallelAttention}


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_gpt_with_fused_attention_equals_unfused(attention, monkeypatch):
    """Whole model (MLA: its own softmax scale): the fused attention, the default on CPU too,
    gives the unfused attention's losses and gradients within tolerance."""
    from megatron_coe.model import build, build_model, spec
    from megatron_coe.model.fused_attention import FusedDotProductAttention

    results = []
    for fused in (False, True):
        monkeypatch.setattr(build, "coe_block_spec",
                            functools.partial(spec.coe_block_spec, fused_attention=fused))
        torch.manual_seed(0)
        model = build_model(_config(attention))
        cores = {type(layer.self_attention.core_attention) for layer in model.decoder.layers}
        assert (cores == {FusedDotProductAttention}) == fused
        tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(2))
        losses = model(tokens[:, :-1], torch.arange(12).expand(2, 12), None,
                       labels=tokens[:, 1:])
        losses.mean().backward()
        results.append((losses.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, **TOL)
    assert got_grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
