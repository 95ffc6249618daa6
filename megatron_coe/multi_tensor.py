"""Megatron-Core's multi-tensor fallbacks, as torch's foreach ops, for machines without apex or
Transformer Engine (a pip-installed CUDA torch).

With neither installed, Megatron's gradient clipping and its main -> model parameter copy use
``megatron.core.utils.local_multi_tensor_l2_norm`` and ``local_multi_tensor_scale``:

    l2 norm:  one torch.norm per gradient, each read back to the host (float), then their norm
              -> P device syncs and P + 2 launches per step for P parameters
    scale:    dst.copy_(src * s) per tensor -> 2 P launches

Here the same results come from multi-tensor ops, no sync:

    l2 norm:  n_i = torch._foreach_norm(grads, 2);  ||g|| = vector_norm(stack(n_i))   [1], fp32
    scale:    torch._foreach_mul_(dst, s) when dst is src, else
              torch._foreach_copy_(dst, src) (s = 1) or _foreach_copy_(dst, _foreach_mul(src, s))

On CPU foreach ops run each tensor through the same kernels (``linalg.vector_norm``, ``mul``,
``copy_``), so the results are bit-identical to Megatron's fallbacks (tests/unit/
test_multi_tensor.py).  On CUDA the scale and copy are elementwise and identical too; the
per-tensor norms come from torch's multi-tensor reduction, whose summation order differs from
``torch.norm``'s: the gradient norm (and the clip factor) may differ in the last bits.

:func:`install` replaces the fallbacks in Megatron's optimizer modules; it does nothing where
apex or Transformer Engine provides the real multi-tensor kernels.
"""

from __future__ import annotations

import torch


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for ``multi_tensor_l2norm``: (the l2 norm of all tensors, [1] fp32, None)."""
    del chunk_size, noop_flag, per_tensor, args
    tensors = [t for tensor_list in tensor_lists for t in tensor_list]
    if not tensors:  # Megatron does not call it so; its fallback returns a zero on the GPU
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.zeros(1, dtype=torch.float, device=device), None
    norms = torch.stack(torch._foreach_norm(tensors, 2)).float()
    return torch.linalg.vector_norm(norms).reshape(1), None


def scale(chunk_size, noop_flag, tensor_lists, factor):
    """Drop-in for ``multi_tensor_scale``: tensor_lists[1][i] = tensor_lists[0][i] * factor."""
    del chunk_size, noop_flag
    src, dst = tensor_lists
    if not dst:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, factor)
    elif factor == 1.0:
        torch._foreach_copy_(dst, src)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, factor))


_MODULES = {"megatron.core.optimizer.clip_grads": ("l2_norm_impl", "multi_tensor_scale_impl"),
            "megatron.core.optimizer.optimizer": ("multi_tensor_scale_impl",)}


def install() -> list[str]:
    """Put :func:`l2_norm` / :func:`scale` in place of Megatron's local fallbacks wherever those
    are in use; returns the names replaced (none with apex or Transformer Engine)."""
    import importlib

    from megatron.core import utils

    fallbacks = {utils.local_multi_tensor_l2_norm: l2_norm, utils.local_multi_tensor_scale: scale}
    replaced = []
    for module_name, attrs in _MODULES.items():
        module = importlib.import_module(module_name)
        for attr in attrs:
            ours = fallbacks.get(getattr(module, attr, None))
            if ours is not None:
                setattr(module, attr, ours)
                replaced.append(f"{module_name}.{attr}")
    return replaced
