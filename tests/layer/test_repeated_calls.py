"""Transformer Engine modules called more than once per micro-batch (repeated_calls.py).

TE is not installed here, so the expert linears are stand-ins that follow the two rules this
guard is about, as Megatron-Core 0.19.2's TE wrappers and TE 2.x implement them:
  * the wrapper (TELinear.forward / TEGroupedLinear.forward) passes ``is_first_microbatch`` to TE,
    or None when ``disable_parameter_transpose_cache`` is set, then sets it to False;
  * TE's backward with ``fuse_wgrad_accumulation`` writes ``main_grad = dW`` when the flag it saw
    was True and adds ``main_grad += dW`` otherwise (grouped_linear.py / linear.py backward).
Sources and lines: docs/reliability.md, "FP8 with Transformer Engine".  One process, EP = 1.
"""

import dataclasses
import functools

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_coe.config import config_from_dict

S, B, H = 6, 3, 32


def make_config(iterations, overlap=False, recompute="none"):
    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  # per-expert linears (SequentialMLP's layout), which the stand-ins replace;
                  # TEGroupedMLP's TEGroupedLinear takes the same flag and the same guard
                  "moe": {"num_experts": 4, "topk": 2, "expert_hidden_size": 24,
                          "shared_expert_hidden_size": 16, "grouped_gemm": False},
                  "coe": {"iterations": iterations}},
        "parallel": {"overlap_expert_comm": overlap},
        "train": {"recompute": recompute},
    })


class _FusedWgrad(torch.autograd.Function):
    """y = x W^T; dW goes to weight.main_grad, written or added as TE decides from the flag."""

    @staticmethod
    def forward(ctx, x, weight, is_first_microbatch):
        ctx.save_for_backward(x, weight)
        ctx.is_first_microbatch = is_first_microbatch
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        wgrad = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if ctx.is_first_microbatch:  # accumulate = fuse_wgrad_accumulation and not flag
            weight.main_grad.copy_(wgrad)
        else:
            weight.main_grad.add_(wgrad)
        return grad_out @ weight, None, None


class _TEWrapperLike:
    """The attributes and forward of Megatron's TE wrappers, with fused wgrad accumulation."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_first_microbatch = True  # TELinear.__init__ / TEGroupedLinear.__init__
        self.disable_parameter_transpose_cache = self.config.disable_parameter_transpose_cache
        self.fuse_wgrad_accumulation = True
        self.weight.main_grad = torch.zeros_like(self.weight)

    def forward(self, x, *_, **__):
        flag = None if self.disable_parameter_transpose_cache else self.is_first_microbatch
        out = _FusedWgrad.apply(x, self.weight, flag)
        self.is_first_microbatch = False
        return out, None


class _TEColumn(_TEWrapperLike, ColumnParallelLinear):
    pass


class _TERow(_TEWrapperLike, RowParallelLinear):
    pass


def _te_like(spec_fn):
    """coe_block_spec, with every expert and shared-expert linear made a TE-wrapper stand-in."""

    def build(*args, **kwargs):
        block = spec_fn(*args, **kwargs)
        layer_specs = []
        for spec in block.layer_specs:
            mlp = spec.submodules.mlp
            subs = mlp.keywords["submodules"]
            swapped = {}
            for name in ("experts", "shared_experts"):
                part = getattr(subs, name)
                linears = dataclasses.replace(part.keywords["submodules"], linear_fc1=_TEColumn,
                                              linear_fc2=_TERow)
                swapped[name] = functools.partial(part.func, *part.args,
                                                  **{**part.keywords, "submodules": linears})
            mlp = functools.partial(
                mlp.func, *mlp.args,
                **{**mlp.keywords, "submodules": dataclasses.replace(subs, **swapped)})
            layer_specs.append(dataclasses.replace(
                spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp)))
        block.layer_specs = layer_specs
        return block

    return build


def _build(config, te_like):
    from megatron_coe.model import build as build_module

    if not te_like:
        return build_module.build_moe_layer(config)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "coe_block_spec", _te_like(build_module.coe_block_spec))
        return build_module.build_moe_layer(config)


def _te_linears(module):
    return [m for m in module.modules() if isinstance(m, _TEWrapperLike)]


def _forward_backward(config):
    """The layer with TE-like expert linears and the same layer with plain linears (same
    weights), after one forward + backward: (the TE-like layer, the plain layer's parameters by
    name)."""
    torch.manual_seed(0)
    te = _build(config, True)
    plain = _build(config, False)
    plain.load_state_dict(te.state_dict())
    x, gy = torch.randn(S, B, H), torch.randn(S, B, H)
    for layer in (te, plain):
        (layer(x)[0] * gy).sum().backward()
    return te, dict(plain.named_parameters())


@pytest.mark.parametrize("iterations,overlap", [(2, False), (3, False), (1, True), (2, True)])
def test_every_call_adds_its_weight_gradient(iterations, overlap):
    """main_grad of every expert / shared-expert weight = the gradient of the whole chain (the
    sum over all calls), as autograd computes it with plain linears."""
    te, grads = _forward_backward(make_config(iterations, overlap))
    checked = 0
    for name, p in te.named_parameters():
        if hasattr(p, "main_grad"):
            torch.testing.assert_close(p.main_grad, grads[name].grad, rtol=1e-5, atol=1e-6,
                                       msg=name)
            checked += 1
    assert checked == len(_te_linears(te)) > 0


def test_without_the_guard_calls_2_to_C_are_lost(monkeypatch):
    """The hazard is real in this model of TE: with the flag passed through, iteration 1's
    backward (run last) overwrites main_grad, so it equals iteration 1's gradient alone."""
    from megatron_coe.model import repeated_calls

    monkeypatch.setattr(repeated_calls, "accumulate_every_call", lambda module: 0)
    te, grads = _forward_backward(make_config(2))
    wrong = [name for name, p in te.named_parameters()
             if hasattr(p, "main_grad") and not torch.allclose(p.main_grad, grads[name].grad)]
    assert wrong


@pytest.mark.parametrize("iterations,overlap,experts,shared", [
    (1, False, False, False),  # one call per micro-batch: the FP8 weight cache is kept
    (1, True, True, False),    # two halves: routed experts twice, shared expert once
    (2, False, True, True),
])
def test_which_modules_lose_the_flag(iterations, overlap, experts, shared):
    layer = _build(make_config(iterations, overlap), True)
    assert {m.disable_parameter_transpose_cache for m in _te_linears(layer.experts)} == {experts}
    assert {m.disable_parameter_transpose_cache
            for m in _te_linears(layer.shared_experts)} == {shared}


def test_module_without_fused_accumulation_keeps_its_cache():
    from megatron_coe.model.repeated_calls import accumulate_every_call

    class Wrapper(torch.nn.Module):
        def __init__(self, fused):
            super().__init__()
            self.disable_parameter_transpose_cache = False
            self.fuse_wgrad_accumulation = fused

    parent = torch.nn.Sequential(Wrapper(False), Wrapper(True), torch.nn.Linear(2, 2))
    assert accumulate_every_call(parent) == 1
    assert [m.disable_parameter_transpose_cache for m in parent[:2]] == [False, True]
    assert accumulate_every_call(None) == 0


@pytest.mark.parametrize("recompute,calls", [("experts", 4), ("moe", 1)])
def test_fp8_recompute_goes_through_te_checkpoint(recompute, calls, monkeypatch):
    """Under FP8 the recompute must run inside TE's checkpoint (which re-enters the FP8
    autocast): Megatron's tensor_parallel.checkpoint would recompute the TE modules in bf16."""
    import megatron.core.extensions.transformer_engine as te_ext
    from megatron.core import tensor_parallel

    from megatron_coe.model import build_moe_layer

    seen = []

    def te_checkpoint(fn, distribute, rng_tracker, tp_group, *tensors):
        seen.append(rng_tracker is tensor_parallel.random.get_cuda_rng_tracker)
        return tensor_parallel.checkpoint(fn, distribute, *tensors)

    monkeypatch.setattr(te_ext, "te_checkpoint", te_checkpoint)
    torch.manual_seed(0)
    layer = build_moe_layer(make_config(2, recompute=recompute))
    x = torch.randn(S, B, H, requires_grad=True)
    layer(x)[0].sum().backward()
    assert seen == []  # bf16/fp32: Megatron's own checkpoint
    layer.config.fp8 = "hybrid"  # the TE-only checks of TransformerConfig refuse it on CPU
    try:
        layer(x)[0].sum().backward()
    finally:
        layer.config.fp8 = None
    assert seen == [True] * calls


@pytest.mark.gpu
@pytest.mark.parametrize("iterations", [2, 3])
def test_te_fp8_main_grad_holds_every_iteration_on_gpu(iterations):
    """With Transformer Engine, FP8 (tensorwise) and gradient-accumulation fusion, every expert
    and shared-expert weight's main_grad equals the bf16 gradient of the whole chain within FP8
    error (relative 0.1), i.e. holds all C iterations' contributions (with iteration 1's
    overwriting, it would miss (C-1)/C of them)."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from megatron.core.fp8_utils import get_fp8_context

    from megatron_coe.config import config_from_dict
    from megatron_coe.model import build_moe_layer

    def layer(fp8):
        config = config_from_dict({
            "device": "cuda", "precision": "bf16", "fp8": {"enabled": fp8},
            "model": {"num_layers": 1, "hidden_size": 64, "num_attention_heads": 4,
                      "moe": {"num_experts": 4, "topk": 2, "expert_hidden_size": 64,
                              "shared_expert_hidden_size": 64},
                      "coe": {"iterations": iterations},
                      "transformer_overrides": {"gradient_accumulation_fusion": fp8}}})
        torch.manual_seed(0)
        return build_moe_layer(config)

    fp8_layer, bf16_layer = layer(True), layer(False)
    bf16_layer.load_state_dict(fp8_layer.state_dict(), strict=False)
    fused = [p for m in fp8_layer.modules() if getattr(m, "fuse_wgrad_accumulation", False)
             for p in m.parameters(recurse=False)]
    assert fused
    for p in fused:
        p.main_grad = torch.zeros_like(p, dtype=torch.float32)
    x = torch.randn(64, 2, 64, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    fp8_layer.set_is_first_microbatch()  # as Megatron's schedule does on each step's first
    with get_fp8_context(fp8_layer.config):
        y = fp8_layer(x)[0]
    (y * gy).sum().backward()
    (bf16_layer(x)[0] * gy).sum().backward()
    reference = dict(bf16_layer.named_parameters())
    for name, p in fp8_layer.named_parameters():
        if hasattr(p, "main_grad"):
            ref = reference[name].grad.float()
            assert (p.main_grad - ref).norm() <= 0.1 * ref.norm(), name
