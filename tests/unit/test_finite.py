"""each_finite agrees with torch.isfinite(x).all() for every tensor of a list, wherever the
non-finite element sits (vector lanes and the scalar tail of the reduction), in every float dtype
the models use and in mixed lists, does not flag large finite values, and takes a fixed number
of ops for a whole list."""

import pytest
import torch

from megatron_coe.finite import each_finite
from megatron_coe.host_ops import HostOps


def finite(x) -> bool:
    return each_finite([x]).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 37, 1000])
def test_every_position_and_kind_of_non_finite_is_found(dtype, n):
    x = torch.randn(n).to(dtype)
    assert finite(x) is True
    for bad in (float("nan"), float("inf"), float("-inf")):
        for i in range(n):
            y = x.clone()
            y[i] = bad
            assert finite(y) is False, (bad, i)
            assert finite(y.view(1, n, 1)) is False


def test_large_finite_values_and_odd_inputs():
    big = torch.full((3, 5), torch.finfo(torch.float32).max)
    big[1, 2] = -torch.finfo(torch.float32).max
    assert finite(big) is True  # a sum would overflow; the extremes do not
    assert finite(torch.empty(0)) is True
    assert finite(torch.arange(5)) is True  # integers are always finite
    strided = torch.randn(8, 6)[:, ::2]
    strided[3, 1] = float("nan")
    assert finite(strided) is False
    z = torch.randn(4, dtype=torch.complex64)
    assert finite(z) is True
    z[2] = complex(0.0, float("inf"))
    assert finite(z) is False
    with pytest.raises(ValueError):
        each_finite([])


def test_fp8_and_conjugated_views():
    for dtype in (torch.float8_e5m2, torch.float8_e4m3fn):  # no aminmax kernel: an fp32 copy
        x = torch.randn(40).to(dtype)
        assert finite(x) is True
        x[17] = float("nan")
        assert finite(x) is False
    z = torch.randn(6, dtype=torch.complex64).conj()
    assert finite(z) is True
    z = z.resolve_conj()
    z[4] = complex(float("nan"), 0.0)
    assert finite(z.conj()) is False


def test_a_mixed_list_flags_exactly_its_non_finite_members():
    """bf16 next to fp32 (a CoE iteration's output and its router probabilities): the stack
    promotes without losing inf or NaN, and each tensor keeps its own flag."""
    torch.manual_seed(0)
    tensors = [torch.randn(64, 8), torch.randn(32).bfloat16(), torch.randn(5, 5).half(),
               torch.arange(4), torch.randn(3, 3).double(), torch.empty(0)]
    assert each_finite(tensors).tolist() == [True] * len(tensors)
    for i in (0, 1, 2, 4):
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = [t.clone() for t in tensors]
            broken[i].view(-1)[-1] = bad
            expected = [j != i for j in range(len(tensors))]
            assert each_finite(broken).tolist() == expected, (i, bad)


@pytest.mark.parametrize("n", [1, 8, 64])
def test_launches_do_not_grow_beyond_one_reduction_per_tensor(n):
    tensors = [torch.randn(16) for _ in range(n)]
    with HostOps() as ops:
        each_finite(tensors)
    assert ops.syncs == 0
    assert ops.launches == n + 4, ops.summary()  # n aminmax; stack, sub, eq, all
