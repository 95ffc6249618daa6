"""all_finite agrees with torch.isfinite(x).all() wherever the non-finite element sits (vector
lanes and the scalar tail of the reduction), in every float dtype the models use, and does not
flag large finite values."""

import pytest
import torch

from megatron_coe.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 37, 1000])
def test_every_position_and_kind_of_non_finite_is_found(dtype, n):
    x = torch.randn(n).to(dtype)
    assert all_finite(x).item() is True
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in range(n):
            y = x.clone()
            y[i] = bad
            assert all_finite(y).item() is False, (bad, i)
            assert all_finite(y.view(1, n, 1)).item() is False


def test_large_finite_values_and_odd_inputs():
    big = torch.full((3, 5), torch.finfo(torch.float32).max)
    big[1, 2] = -torch.finfo(torch.float32).max
    assert all_finite(big).item() is True  # a sum would overflow; the extremes do not
    assert all_finite(torch.empty(0)).item() is True
    assert all_finite(torch.arange(5)).item() is True  # integers are always finite
    strided = torch.randn(8, 6)[:, ::2]
    strided[3, 1] = float("nan")
    assert all_finite(strided).item() is False
    z = torch.randn(4, dtype=torch.complex64)
    assert all_finite(z).item() is True
    z[2] = complex(0.0, float("inf"))
    assert all_finite(z).item() is False


def test_fp8_and_conjugated_views():
    x = torch.randn(40).to(torch.float8_e5m2)  # no aminmax kernel for FP8: the slow path
    assert all_finite(x).item() is True
    x[17] = float("inf")
    assert all_finite(x).item() is False
    z = torch.randn(6, dtype=torch.complex64).conj()
    assert all_finite(z).item() is True
    z = z.resolve_conj()
    z[4] = complex(float("nan"), 0.0)
    assert all_finite(z.conj()).item() is False
