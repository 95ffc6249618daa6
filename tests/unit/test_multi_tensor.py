"""The foreach replacements of Megatron's multi-tensor fallbacks (megatron_coe/multi_tensor.py)
give the fallbacks' bits on CPU, read nothing back to the host, and replace only the fallbacks."""

import importlib

import pytest
import torch
from megatron.core import utils

from megatron_coe import cpu, multi_tensor
from megatron_coe.host_ops import HostOps


def tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (64, 33), (1,), (3, 5, 8), (1000,), (2, 1)]
    return [torch.randn(s, generator=g, dtype=torch.float32).mul(10 ** (i - 3)).to(dtype)
            for i, s in enumerate(shapes)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l2_norm_equals_megatrons_fallback_bit_for_bit(seed):
    ts = tensors(seed)
    flag = torch.zeros(1, dtype=torch.int)
    with cpu.cpu_backend(), cpu.cuda_to_cpu():  # the fallback builds its result on "cuda"
        expected, _ = utils.local_multi_tensor_l2_norm(2048 * 32, flag, [ts], False)
    got, none = multi_tensor.l2_norm(2048 * 32, flag, [ts], False)
    assert none is None and got.dtype == torch.float32 and got.shape == (1,)
    assert torch.equal(got, expected), (got, expected)
    with HostOps() as ops:
        multi_tensor.l2_norm(2048 * 32, flag, [ts], False)
    assert ops.syncs == 0
    assert ops.launches <= 4  # foreach norm, stack, (cast), vector norm


@pytest.mark.parametrize("factor", [1.0, 0.37, 1e-6])
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16])
def test_scale_and_copy_equal_megatrons_fallback(factor, dst_dtype):
    src = tensors(3)
    flag = torch.zeros(1, dtype=torch.int)
    expected = [torch.zeros_like(t, dtype=dst_dtype) for t in src]
    got = [torch.zeros_like(t, dtype=dst_dtype) for t in src]
    utils.local_multi_tensor_scale(2048 * 32, flag, [src, expected], factor)
    multi_tensor.scale(2048 * 32, flag, [src, got], factor)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # in place (gradient clipping scales the gradients themselves)
    inplace_expected, inplace_got = tensors(4), tensors(4)
    utils.local_multi_tensor_scale(2048 * 32, flag, [inplace_expected, inplace_expected], factor)
    multi_tensor.scale(2048 * 32, flag, [inplace_got, inplace_got], factor)
    assert all(torch.equal(a, b) for a, b in zip(inplace_got, inplace_expected))
    with HostOps() as ops:
        multi_tensor.scale(2048 * 32, flag, [src, got], factor)
    assert ops.syncs == 0 and ops.launches <= 2


def test_install_replaces_only_the_fallbacks():
    clip = importlib.import_module("megatron.core.optimizer.clip_grads")
    opt = importlib.import_module("megatron.core.optimizer.optimizer")
    saved = (clip.l2_norm_impl, clip.multi_tensor_scale_impl, opt.multi_tensor_scale_impl)
    try:
        clip.l2_norm_impl = utils.local_multi_tensor_l2_norm
        clip.multi_tensor_scale_impl = utils.local_multi_tensor_scale
        kernel = object()  # what apex or Transformer Engine would provide
        opt.multi_tensor_scale_impl = kernel
        replaced = multi_tensor.install()
        assert clip.l2_norm_impl is multi_tensor.l2_norm
        assert clip.multi_tensor_scale_impl is multi_tensor.scale
        assert opt.multi_tensor_scale_impl is kernel
        assert replaced == ["megatron.core.optimizer.clip_grads.l2_norm_impl",
                            "megatron.core.optimizer.clip_grads.multi_tensor_scale_impl"]
        assert multi_tensor.install() == []  # idempotent
    finally:
        clip.l2_norm_impl, clip.multi_tensor_scale_impl, opt.multi_tensor_scale_impl = saved
