"""megatron_coe/model/fp8.py: FP8 quantization, scales, group padding and the grouped FP8 GEMM
with its gradients, on CPU (torch._scaled_mm has CPU kernels; skipped where they take no scale
per row)."""

import pytest
import torch

from megatron_coe.model import fp8

# the tests of the GEMM itself need torch's CPU _scaled_mm with a scale per row
gemm = pytest.mark.skipif(fp8.cpu_problem() is not None, reason=str(fp8.cpu_problem()))

E4M3 = torch.float8_e4m3fn


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make(counts, k=32, n=48, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g) * torch.logspace(-2, 2, sum(counts))[:, None]
    w = torch.randn(len(counts), n, k, generator=g) * 0.05
    return x.to(dtype), w.to(dtype)


@pytest.mark.parametrize("dims", [(-1,), (0, 1)])
def test_quantize_round_trip_within_e4m3_rounding(dims):
    x = torch.randn(64, 40) * torch.logspace(-3, 3, 64)[:, None]
    q = fp8.quantize(x, dims)
    assert q.data.dtype == E4M3 and q.scale.dtype == torch.float32
    err = (q.dequantize() - x).abs()
    # 3 mantissa bits: half a step is 2^-4 of |x| for normals; 2^-10 of the scale (half the
    # subnormal step 2^-9) below 2^-6
    assert torch.all(err <= 2.0 ** -4 * x.abs() + 2.0 ** -10 * q.scale)
    assert torch.isfinite(q.dequantize()).all()


def test_scales_are_amax_over_448_and_the_amax_lands_on_448():
    x = torch.randn(8, 24)
    x[3] = 0.0  # an all-zero row: zeros, finite scale
    rows = fp8.quantize_rows(x, "rowwise")
    assert rows.scale.shape == (8, 1)
    amax = x.abs().amax(1, keepdim=True)
    nonzero = amax[:, 0] > 0
    assert torch.equal(rows.scale[nonzero], amax[nonzero] / 448)
    assert torch.equal(rows.data.float().abs().amax(1)[nonzero], torch.full((7,), 448.0))
    assert torch.all(rows.data[3].float() == 0) and torch.isfinite(rows.scale).all()

    tensor = fp8.quantize_rows(x, "tensorwise")
    assert tensor.scale.shape == (8, 1) and torch.all(tensor.scale == x.abs().max() / 448)

    w = torch.randn(3, 16, 24)
    cols = fp8.quantize_weight(w, "rowwise")  # per output column n of each W_g
    assert cols.scale.shape == (3, 16, 1)
    assert torch.equal(cols.scale, w.abs().amax(-1, keepdim=True) / 448)
    experts = fp8.quantize_weight(w, "tensorwise")  # per expert
    assert torch.equal(experts.scale[:, 0, 0], w.abs().amax((1, 2)) / 448)


@pytest.mark.parametrize("counts", [[5, 0, 16, 17, 1], [0, 0, 3], [32, 16], [0], [7]])
def test_padding_to_16_keeps_rows_exactly_and_unpads(counts):
    x = torch.randn(sum(counts), 8)
    padded, sizes, rows = fp8.pad_groups(x, counts)
    assert all(s % 16 == 0 and c <= s < c + 16 for s, c in zip(sizes, counts))
    assert padded.shape == (sum(sizes), 8)
    assert torch.equal(padded[rows], x) and torch.equal(fp8.unpad_groups(padded, rows), x)
    start_p, start = 0, 0
    for c, s in zip(counts, sizes):  # each group's rows first in its padded block, zeros after
        assert torch.equal(padded[start_p:start_p + c], x[start:start + c])
        assert torch.all(padded[start_p + c:start_p + s] == 0)
        start_p, start = start_p + s, start + c
    same, sizes, _ = fp8.pad_groups(x, torch.tensor(counts), multiple=1)
    assert sizes == counts and torch.equal(same, x)


@gemm
@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("counts", [[7, 0, 20, 13], [0, 9, 0]])
def test_grouped_gemm_matches_the_dequantized_reference(recipe, counts):
    x, w = make(counts)
    a, b = fp8.quantize_rows(x, recipe), fp8.quantize_weight(w, recipe)
    y = fp8.grouped_scaled_mm(a, b, counts, torch.float32)
    xd, wd = a.dequantize(), b.dequantize()
    start = 0
    for g, c in enumerate(counts):  # exactly the GEMM of the dequantized operands (fp32)
        torch.testing.assert_close(y[start:start + c], xd[start:start + c] @ wd[g].t(),
                                   rtol=2e-5, atol=1e-5)  # fp32 summation order
        start += c


def reference(x, w, counts):
    out, start = [], 0
    for g, c in enumerate(counts):
        out.append(x[start:start + c] @ w[g].t())
        start += c
    return torch.cat(out)


@gemm
@pytest.mark.parametrize("recipe,bound", [("rowwise", 0.06), ("tensorwise", 0.12)])
def test_fp8_grouped_linear_is_within_fp8_error_of_fp32(recipe, bound):
    counts = [7, 0, 20, 13]
    x, w = make(counts)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y_ref = reference(x64, w64, counts)
    gy = torch.randn_like(y_ref)
    (y_ref * gy).sum().backward()

    xq, wq = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.fp8_grouped_linear(xq, wq, torch.tensor(counts), recipe)
    (y * gy.float()).sum().backward()
    assert y.dtype == x.dtype and xq.grad.shape == x.shape and wq.grad.shape == w.shape
    # quantized, and within the error of e4m3 (2^-4 per operand, relative, at worst)
    assert 0 < rel_err(y, y_ref) < bound
    assert 0 < rel_err(xq.grad, x64.grad) < bound
    # dW from the unquantized X and dY: the fp32 GEMM's own error only
    assert rel_err(wq.grad, w64.grad) < 1e-6
    assert torch.all(wq.grad[1] == 0)  # the empty group


@gemm
def test_bf16_gradients_close_to_bf16_training():
    counts = [16, 3, 0, 29]
    x, w = make(counts, dtype=torch.bfloat16, seed=1)
    gy = torch.randn(sum(counts), w.shape[1], dtype=torch.bfloat16)
    grads = []
    for fn in (lambda a, b: fp8.fp8_grouped_linear(a, b, counts),
               lambda a, b: reference(a, b, counts)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(a, b)
        (y.float() * gy.float()).sum().backward()
        assert y.dtype == a.grad.dtype == b.grad.dtype == torch.bfloat16
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        grads.append((y, a.grad, b.grad))
    (y8, gx8, gw8), (y16, gx16, gw16) = grads
    assert rel_err(y8, y16) < 0.06 and rel_err(gx8, gx16) < 0.06
    assert rel_err(gw8, gw16) < 0.01  # both bf16 GEMMs of the same bf16 operands


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_all_groups_empty(recipe):
    """A call with no rows: an overlapped half, or a rank that received no tokens."""
    x, w = torch.zeros(0, 32), torch.randn(3, 16, 32, requires_grad=True)
    x.requires_grad_()
    y = fp8.fp8_grouped_linear(x, w, [0, 0, 0], recipe)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.all(w.grad == 0) and x.grad.shape == (0, 32)


def test_bad_group_sizes_are_refused():
    x, w = make([4, 4])
    with pytest.raises(ValueError, match="2 group sizes summing to 9 for 2 weights and 8 rows"):
        fp8.fp8_grouped_linear(x, w, [4, 5])
    with pytest.raises(ValueError, match="recipe='delayed'"):
        fp8.fp8_grouped_linear(x, w, [4, 4], "delayed")


_SCALED_GROUPED_MM = getattr(torch, "_scaled_grouped_mm", None)


def _scaled_grouped_mm_on_cpu(mat_a, mat_b, scale_a, scale_b, offs=None, out_dtype=None):
    """torch._scaled_grouped_mm's 2d-3d contract, for CPU: the argument checks are torch's own
    (its meta kernel implements the CUDA kernel's checks), the values per group as documented:
    rows offs[g-1]:offs[g] of A times B[g], scaled by scale_a per row and scale_b[g] per column."""
    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            for t in (mat_a, mat_b, scale_a, scale_b, offs)]
    _SCALED_GROUPED_MM(*meta[:4], offs=meta[4], out_dtype=out_dtype)
    assert offs.dtype == torch.int32 and torch.all(offs % 16 == 0)
    out, start = [], 0
    for g, end in enumerate(offs.tolist()):
        a = mat_a[start:end].float() * scale_a[start:end, None]
        out.append(a @ (mat_b[g].float() * scale_b[g][None, :]))
        start = end
    return torch.cat(out).to(out_dtype)


@gemm
@pytest.mark.parametrize("counts", [[7, 0, 20, 13], [16, 32, 1]])
def test_the_grouped_kernel_path_pads_and_unpads(counts, monkeypatch):
    """The CUDA path (pad to 16, offsets, scale layouts, unpad) against the per-group path."""
    x, w = make(counts)
    a, b = fp8.quantize_rows(x, "rowwise"), fp8.quantize_weight(w, "rowwise")
    per_group = fp8.grouped_scaled_mm(a, b, counts, torch.float32)
    monkeypatch.setattr(fp8, "_grouped_kernel", lambda a, b: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _scaled_grouped_mm_on_cpu)
    grouped = fp8.grouped_scaled_mm(a, b, counts, torch.float32)
    # the grouped kernel's output is bf16
    torch.testing.assert_close(grouped, per_group.to(torch.bfloat16).float(), rtol=0, atol=0)
