"""model.swiglu_fusion: the SwiGLU activations as Megatron's fused kernels (torch.compile; on CPU
inductor's C++ kernels).  LocalExperts stays bit-identical to SequentialMLP, which calls the same
fused function; a CoE layer (grouped experts, shared expert) equals the separate ops within
float rounding, fp32 and bf16, and keeps less for backward; the config resolves and refuses it
by name."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from experts_harness import E, H, local_submodules, run, tf_config
from layer_harness import fwd_bwd, layer_config, seeded_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from coe_layer import saved_activation_bytes  # noqa: E402


def _config(fusion, recompute="none", device="cpu", **model):
    return layer_config(recompute=recompute, device=device,
                        model={"swiglu_fusion": fusion, **model})


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fused_coe_layer_equals_the_separate_ops_and_keeps_less(dtype, tol):
    from megatron_coe.model.grouped_experts import GroupedExperts

    plain, fused = seeded_layers(_config(False), _config(True), dtype=dtype)
    assert isinstance(fused.experts, GroupedExperts)
    assert fused.config.bias_activation_fusion and not plain.config.bias_activation_fusion
    x = torch.randn(40, 2, 32, dtype=dtype)
    for a, b in zip(fwd_bwd(fused, x), fwd_bwd(plain, x)):
        assert a.dtype == b.dtype
        scale = b.float().abs().max().clamp_min(1e-6)
        assert ((a.float() - b.float()).abs().max() / scale) <= tol
    kept = [saved_activation_bytes(layer, x)["kept"] for layer in (plain, fused)]
    # per routed row the activation keeps Z (2F) and p instead of Z, act(Z1), Z2 + offset and
    # act(Z1) (Z2 + offset): 3F elements less (fc2 keeps A p either way); per row of the
    # shared expert (all 80 rows, each iteration; no p) Z instead of Z, act(Z1), Z2 + offset
    routed, shared, f = 80 * 2 * 2, 80 * 2, 24
    assert kept[0] - kept[1] == (routed * 3 + shared * 2) * f * x.element_size(), kept


def test_moe_act_on_the_fused_activation_gives_the_same_bits():
    fused, recomputed = seeded_layers(_config(True), _config(True, "moe_act"))
    assert recomputed.experts.recompute_activation
    x = torch.randn(40, 2, 32)
    for a, b in zip(fwd_bwd(recomputed, x), fwd_bwd(fused, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_local_experts_bit_identical_to_sequential_mlp_when_fused(dtype, monkeypatch):
    from megatron.core.fusions import fused_bias_swiglu
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_coe.model import experts
    from megatron_coe.model.experts import LocalExperts

    tf = dataclasses.replace(tf_config(), bias_activation_fusion=True)
    pg = get_default_pg_collection()
    torch.manual_seed(0)
    stock = SequentialMLP(E, tf, local_submodules(False), pg_collection=pg).to(dtype)
    lean = LocalExperts(E, tf, local_submodules(False), pg_collection=pg).to(dtype)
    lean.load_state_dict(stock.state_dict())
    assert lean._lean
    fused_calls = []
    apply = fused_bias_swiglu.WeightedSwiGLUFunction.apply
    monkeypatch.setattr(fused_bias_swiglu.WeightedSwiGLUFunction, "apply",
                        lambda *a: fused_calls.append(1) or apply(*a))
    linear_calls = []
    linear = experts._Linear.apply
    monkeypatch.setattr(experts._Linear, "apply", lambda *a: linear_calls.append(1) or linear(*a))
    counts = torch.tensor([5, 0, 17, 1, 0, 9])
    n = int(counts.sum())
    x, probs, gy = torch.randn(n, H).to(dtype), torch.rand(n), torch.randn(n, H)
    a, b = run(stock, x, counts, probs, gy), run(lean, x, counts, probs, gy)
    assert len(linear_calls) == 2 * E and len(fused_calls) >= 2 * E  # both fused, lean path ran
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for (name, p), q in zip(stock.named_parameters(), lean.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_swiglu_fusion_resolves_and_refuses_by_name(monkeypatch):
    from megatron_coe.checkpoint import model_definition
    from megatron_coe.config import swiglu_fusion
    from megatron_coe.model import build

    offset = {"transformer_overrides": {"glu_linear_offset": 1.0}}
    assert swiglu_fusion(_config(None)) is False  # auto: off on CPU
    assert swiglu_fusion(_config(None, device="cuda")) is True
    assert build.resolve_swiglu_fusion(_config(None)) == (False, "auto: off on CPU")
    assert build.resolve_swiglu_fusion(_config(True)) == (True, "model.swiglu_fusion=true")
    # auto steps aside for settings the fused kernel cannot run; an explicit true is refused
    assert build.resolve_swiglu_fusion(_config(None, device="cuda", **offset)) == (
        False, "auto: off with transformer_overrides.glu_linear_offset=1.0")
    with pytest.raises(ValueError, match="fused SwiGLU, which cannot run with "
                                         "model.transformer_overrides.glu_linear_offset=1.0"):
        _config(True, device="cuda", **offset)
    # Megatron's own name for it is the same setting
    megatron = {"transformer_overrides": {"bias_activation_fusion": True}}
    assert swiglu_fusion(_config(None, **megatron)) is True
    with pytest.raises(ValueError, match="contradicts model.transformer_overrides"):
        _config(False, **megatron)
    # auto on CUDA keeps the fusion only where torch.compile ran it (tried once, remembered)
    monkeypatch.setitem(build._FUSED_SWIGLU_ERRORS, ("cuda", torch.float32),
                        "BackendCompilerFailed: no Triton")
    assert build.resolve_swiglu_fusion(_config(None, device="cuda")) == (
        False, "auto: torch.compile failed on this GPU (BackendCompilerFailed: no Triton); "
        "unfused SwiGLU")
    monkeypatch.setitem(build._FUSED_SWIGLU_ERRORS, ("cuda", torch.float32), None)
    assert build.resolve_swiglu_fusion(_config(None, device="cuda"))[0] is True
    assert build.fused_swiglu_error("cpu", torch.float32) is None  # inductor's C++ kernels
    # a kernel choice, not the model: checkpoints load either way
    assert model_definition(_config(True)) == model_definition(_config(False))
