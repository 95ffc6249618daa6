"""Megatron DDP whose gradient buffers are written by each step's first gradient instead of being
zeroed and then accumulated into.

Megatron DDP keeps every parameter's gradient in a contiguous fp32 buffer (``main_grad``).  Each
step it zeroes the buffers, and a hook on each parameter's gradient accumulator adds every
gradient autograd produces:

    Megatron:  main_grad = 0  (all buffers);   main_grad += g   for each gradient g of the step
    here:      main_grad  = g for the step's first gradient of the parameter,  += g after it;
               main_grad  = 0 for a parameter that got none, before the gradients are reduced

The values are the same (0 + g is g exactly; the later sums are Megatron's, in the same order)
and nothing changes in the buffers' padding, which nothing writes.  What goes: a pass writing
every buffer (4 bytes per parameter) and, for the first gradient, the read of the buffer it was
added to (4 more), out of the 10 bytes per parameter that zeroing and a bf16 -> fp32 add move.
On one H100 the paper configs' buffers took 0.8 ms per step to zero and 2.7 ms to accumulate
into (docs/performance.md), about 1.9 ms of which this removes (an estimate until measured).

It holds while the DDP hook (and wgrad_sum.py's sums of a weight's several uses, which take its
place for those weights) is the only writer of ``main_grad`` before the reduction: the local
spec without gradient-accumulation fusion, delayed weight gradients, per-layer CUDA graphs or
overlapped reduction (:func:`applies`).  Transformer Engine's layers accumulate their weight
gradients into ``main_grad`` inside their GEMMs and keep Megatron's zeroing.  A parameter that
gets no gradient in a step (the check runs in ``finalize_model_grads``, before the reduction)
is zeroed there, so no stale gradient survives; under a CUDA graph the captured step holds the
same writes.
"""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel

from megatron_coe import wgrad_sum

_TE_MODULES = ("transformer_engine", "megatron.core.extensions.transformer_engine")


def applies(model, tf_config, ddp_config) -> bool:
    """Whether every gradient of ``model`` reaches ``main_grad`` through the DDP hook alone: no
    Transformer Engine module, no gradient-accumulation fusion or delayed weight gradients, no
    per-layer CUDA graphs (their backward graphs add weight gradients to ``main_grad``; the
    full-iteration graph replays the hook's own writes), no overlapped reduction (whose hook
    counts gradients as they come)."""
    te = any(type(m).__module__.startswith(_TE_MODULES) for m in model.modules())
    layer_graphs = (getattr(tf_config, "cuda_graph_impl", "none") not in ("none", "full_iteration")
                    or getattr(tf_config, "enable_cuda_graph", False))
    return not (te or layer_graphs or getattr(tf_config, "gradient_accumulation_fusion", False)
                or getattr(tf_config, "delay_wgrad_compute", False)
                or ddp_config.overlap_grad_reduce
                or getattr(ddp_config, "delay_wgrad_compute", False))


class WriteFirstDDP(DistributedDataParallel):
    """Megatron's DistributedDataParallel with the buffers written first (module docstring);
    ``write_first=False`` is Megatron's behaviour, for comparison."""

    def __init__(self, *args, write_first: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params_with_grad:
            param.main_grad_written = False
        self.write_first = write_first

    @property
    def write_first(self) -> bool:
        return self._write_first

    @write_first.setter
    def write_first(self, on: bool) -> None:
        self._write_first = on
        for param in self.params_with_grad:  # wgrad_sum.py writes the buffers too, while on
            param.wgrad_sum = on

    def _make_backward_post_hook(self, param):
        megatron_hook = super()._make_backward_post_hook(param)

        def hook(*unused):
            if (self.write_first and param.grad is not None
                    and not getattr(param, "main_grad_written", True)
                    and not param.grad_added_to_main_grad
                    and param in self.param_to_bucket_group):
                param.main_grad.copy_(param.grad.data)
                param.grad = None
                param.main_grad_written = True
            else:  # a later gradient of the step (added), or Megatron's buffers
                megatron_hook(*unused)

        return hook

    def zero_grad_buffer(self):
        if not self.write_first:
            return super().zero_grad_buffer()
        for param in self.params_with_grad:  # as Megatron's (no TE CUDA graphs here)
            param.grad_added_to_main_grad = False
            param.main_grad_written = False
            wgrad_sum.reset(param)
        for buffer in self.buffers + self.expert_parallel_buffers:
            for grad in getattr(buffer, "extra_main_grads", ()):  # outside the buffer: zeroed
                grad.zero_()
        for bucket_group in self.bucket_groups + self.expert_parallel_bucket_groups:
            bucket_group.reset()
        return None

    def zero_unwritten_grads(self) -> None:
        """Zero the gradient of every parameter that got none this step (before the reduction:
        :func:`finalize_model_grads`)."""
        if self.write_first:
            for param in self.params_with_grad:
                if not param.main_grad_written:
                    param.main_grad.zero_()
                    param.main_grad_written = True


def finalize_model_grads(model_chunks, *args, **kwargs):
    """Megatron's ``finalize_model_grads`` (the reductions of the gradients over the data- and
    other parallel ranks), after zeroing what no gradient wrote this step."""
    from megatron.core.distributed import finalize_model_grads as megatron_finalize

    for chunk in model_chunks:
        zero = getattr(chunk, "zero_unwritten_grads", None)
        if zero is not None:
            zero()
    return megatron_finalize(model_chunks, *args, **kwargs)
