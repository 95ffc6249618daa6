"""Transformer Engine modules that a CoE layer calls more than once per micro-batch.

A CoE layer calls its routed experts C times per micro-batch (2C with
``parallel.overlap_expert_comm``: each iteration runs the experts in two halves) and its shared
expert C times.  Megatron-Core's TE wrappers (TELinear, TEGroupedLinear) and TE itself assume one
call per micro-batch; two things follow (sources and line numbers: docs/reliability.md, "FP8
with Transformer Engine").

``is_first_microbatch``.  The wrapper passes True on a module's first call after
``set_is_first_microbatch`` (and on its first call ever), False after, or None when
``disable_parameter_transpose_cache`` is set.  TE reads the one flag twice:

    forward:  True or None  -> quantize the weight (into the FP8 weight cache if not None)
              False         -> reuse the cached FP8 weight
    backward, with fuse_wgrad_accumulation (gradient_accumulation_fusion):
              True          -> main_grad  = dW        (overwrite)
              False or None -> main_grad += dW

Backward runs the C calls in reverse, so call 1's (True) runs last and overwrites main_grad with
its own dW: calls 2..C's weight gradients are lost.  :func:`accumulate_every_call` makes such
modules see None, so every call adds (Megatron's DDP zeroes main_grad before each step); the
price is one weight quantization per call instead of per step under FP8.  Without gradient-
accumulation fusion the flag is harmless (dW goes to autograd, which adds) and the cached FP8
weight is right to reuse: the weights do not change between the calls of a step.

Recompute.  ``tensor_parallel.checkpoint`` recomputes in backward, outside ``fp8_autocast``, so
TE modules would recompute in bf16 and the gradients would not be those of the FP8 forward;
:func:`checkpoint` uses TE's checkpoint under FP8/FP4, as Megatron's MoELayer does.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def accumulate_every_call(module: torch.nn.Module | None) -> int:
    """Make every Megatron TE wrapper under ``module`` that fuses weight-gradient accumulation
    pass ``is_first_microbatch=None`` to TE, so that every call adds its weight gradient to
    ``main_grad``.  Returns how many modules were changed."""
    changed = 0
    for m in module.modules() if module is not None else ():
        if getattr(m, "fuse_wgrad_accumulation", False) and hasattr(
                m, "disable_parameter_transpose_cache"):
            m.disable_parameter_transpose_cache = True
            changed += 1
    return changed


def checkpoint(config, tp_group, fn, *tensors):
    """``fn(*tensors)`` recomputed in backward (only ``tensors`` kept, RNG state replayed);
    under FP8/FP4 through TE's checkpoint, which recomputes inside the recorded FP8 recipe."""
    if config.fp8 or config.fp4:
        from megatron.core.extensions.transformer_engine import te_checkpoint

        return te_checkpoint(fn, False, tensor_parallel.random.get_cuda_rng_tracker, tp_group,
                             *tensors)
    return tensor_parallel.checkpoint(fn, False, *tensors)
