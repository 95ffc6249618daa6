"""The routers' gating GEMM on bf16 hidden states (model/router_gemm.py) against Megatron's fp32
``router_gating_linear``: the same logits, and gradients that round to the same bf16 values but
for about 0.2 % of them, which differ by one unit in the last place.  Keeping only the high
bf16 half of the logits' gradient would change about 40 % of them, by up to hundreds of ulps
where the sums cancel.

On CPU the bf16 x bf16 -> fp32 GEMM is emulated by an fp32 GEMM of the same (exactly
representable) products, so these tests check the split of the gradient and the GEMMs' shapes
and transposes; the ``gpu`` tests run cuBLAS's kernels."""

import pytest
import torch

from megatron_coe.model import router_gemm

T, H, N = 4096, 256, 63


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).bfloat16()
    w = (torch.randn(N, H, generator=g) * 0.02).bfloat16()
    # logits' gradients of every size from 1e-6 to 1, as a softmax router's are
    grad = torch.randn(T, N, generator=g) * torch.logspace(-6, 0, N)
    return x.to(device), w.to(device), grad.to(device)


def _megatron(x, w, grad, monkeypatch):
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(moe_utils, "te_general_gemm", None)  # its torch GEMMs, as without TE
    return _run(lambda a, b: moe_utils.router_gating_linear(a, b, None, torch.float32),
                x, w, grad)


def _run(fn, x, w, grad):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fn(x, w)
    y.backward(grad)
    return y.detach(), x.grad, w.grad


def _close(ours, theirs, magnitude):
    """Every element equal to Megatron's, or one bf16 ulp apart, or, where the sum cancels,
    apart by at most 2^-15 of the sum of its terms' magnitudes (``magnitude``: twice the
    split's bound); returns the fraction that differ."""
    assert ours.dtype == theirs.dtype == torch.bfloat16
    a, b = ours.float(), theirs.float()
    bound = 2.0 ** -7 * torch.maximum(a.abs(), b.abs()) + 2.0 ** -15 * magnitude
    assert ((a - b).abs() <= bound).all(), ((a - b).abs() / bound).max()
    return (a != b).float().mean().item()


def _check(ours, theirs, x, w, grad, logits_rtol):
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = ours, theirs
    assert y.dtype == y_ref.dtype == torch.float32 and y.shape[-1] == N
    torch.testing.assert_close(y, y_ref, rtol=logits_rtol, atol=1e-6)
    x, g = x.reshape(-1, H).float().abs(), grad.reshape(-1, N).abs()
    assert _close(dx, dx_ref, (g @ w.float().abs()).view(dx.shape)) < 0.01
    assert _close(dw, dw_ref, g.t() @ x) < 0.01


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gradients_round_as_megatrons(device, monkeypatch):
    x, w, grad = _inputs(device)
    ours = _run(router_gemm.HalfGatingLinear.apply, x, w, grad)
    # CPU: the same fp32 GEMM of the logits as Megatron's, bit for bit
    _check(ours, _megatron(x, w, grad, monkeypatch), x, w, grad,
           0.0 if device == "cpu" else 1e-5)


def test_three_dimensional_input(monkeypatch):
    """[S, B, H] hidden states, as the router receives them."""
    x, w, grad = _inputs("cpu")
    x3, grad3 = x.view(T // 4, 4, H), grad.view(T // 4, 4, N)
    ours = _run(router_gemm.HalfGatingLinear.apply, x3, w, grad3)
    theirs = _megatron(x3, w, grad3, monkeypatch)
    assert ours[0].shape == (T // 4, 4, N) and ours[1].shape == x3.shape
    _check(ours, theirs, x3, w, grad3, 0.0)


def test_non_finite_gradients_stay_non_finite():
    """A NaN or infinite logits gradient reaches exactly its token's dx row and its expert's
    dW row, still non-finite (the step's check must see it)."""
    x, w, grad = _inputs("cpu")
    for bad in (float("nan"), float("inf")):
        g = grad.clone()
        g[5, 7] = bad
        _, dx, dw = _run(router_gemm.HalfGatingLinear.apply, x, w, g)
        rows = (~dx.float().isfinite()).any(dim=1)
        assert rows.nonzero().flatten().tolist() == [5]
        assert (~dw.float().isfinite()).any(dim=1).nonzero().flatten().tolist() == [7]


def test_weight_gradient_alone(monkeypatch):
    """Only the weight needs a gradient (the hidden states come from a frozen stem)."""
    x, w, grad = _inputs("cpu")
    w = w.clone().requires_grad_(True)
    router_gemm.HalfGatingLinear.apply(x, w).backward(grad)
    theirs = _megatron(x, w.detach(), grad, monkeypatch)[2]
    x_, g = x.float().abs(), grad.abs()
    assert _close(w.grad, theirs, g.t() @ x_) < 0.01


_NOT_APPLYING = [  # (what, args -> args): every case the split does not cover
    ("a bias", lambda x, w: (x, w, torch.zeros(N, dtype=x.dtype, device=x.device),
                             torch.float32)),
    ("fp16", lambda x, w: (x.half(), w.half(), None, torch.float32)),
    ("an fp64 router", lambda x, w: (x, w, None, torch.float64)),
    ("fp32 hidden states", lambda x, w: (x.float(), w.float(), None, torch.float32)),
]


def test_megatrons_path_where_it_does_not_apply(monkeypatch):
    """CPU tensors run Megatron's function (so CPU runs are unchanged bit for bit), whatever
    their dtypes."""
    from megatron.core.transformer.moe import moe_utils

    calls = []
    original = moe_utils.router_gating_linear
    monkeypatch.setattr(moe_utils, "router_gating_linear",
                        lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(router_gemm, "HalfGatingLinear", None)  # any use would raise
    x, w, _ = _inputs("cpu")
    cases = [(x, w, None, torch.float32)] + [make(x, w) for _, make in _NOT_APPLYING]
    for args in cases:
        assert not router_gemm.applies(*args)
        router_gemm.gating_linear(*args)
    assert len(calls) == len(cases)


@pytest.mark.parametrize("choice", ["bf16", "fp32"])
def test_installed_by_the_model_builder(choice):
    """model.moe.router_gemm picks the gating function of the models built next; anything else
    is refused by name."""
    from megatron.core.transformer.moe import moe_utils, router

    from megatron_coe.config import config_from_dict
    from megatron_coe.model import build_moe_layer

    def config(router_gemm):
        return config_from_dict({"model": {
            "num_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
            "moe": {"num_experts": 4, "topk": 2, "expert_hidden_size": 8,
                    "router_gemm": router_gemm}}})

    build_moe_layer(config(choice))
    expected = router_gemm.gating_linear if choice == "bf16" else moe_utils.router_gating_linear
    assert router.router_gating_linear is expected
    with pytest.raises(ValueError, match="model.moe.router_gemm"):
        config("bf32")


@pytest.mark.gpu
def test_applies_on_cuda_bf16():
    """The device's torch has the out_dtype matmul, and the rule picks it for bf16 routers and
    for nothing else."""
    x, w, _ = _inputs("cuda")
    assert router_gemm.applies(x, w, None, torch.float32)
    for what, make in _NOT_APPLYING:
        assert not router_gemm.applies(*make(x, w)), what
