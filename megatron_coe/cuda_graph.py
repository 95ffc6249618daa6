"""Full-iteration CUDA graph: a training step's forward-backward replayed by the GPU alone.

    train:
      cuda_graph: full_iteration     # Megatron-LM's --cuda-graph-impl full_iteration
      cuda_graph_warmup_steps: 2

On one GPU the paper-scale models are partly bound by the host: every ATen op is a kernel launch
with host time of its own, and a CoE iteration repeats the router, permutation and expert
launches (docs/performance.md, "Where the GPU time goes").  With this setting the step's
forward-backward over all its micro-batches (model, loss, backward, the gradients accumulated
into Megatron DDP's buffers, ``finalize_model_grads``) is captured once as one CUDA graph and
then replayed: one graph launch per step instead of one launch per op.

How: Megatron-Core's ``FullCudaGraphWrapper`` around the forward-backward function.  Steps
1..warmup run eagerly; the next step is captured and replayed, every later one replayed.  Before
each call the micro-batches are copied into static input buffers (the same addresses every
step).  Eagerly, outside the graph: the optimizer step with the step's host reads (one, with
torch's fused AdamW: megatron_coe/optim_step.py), validation, and the fault-injection steps
(train.inject_nonfinite_steps).

Why a step can be replayed (what capture needs, and where it holds):
- Static shapes.  The sequence length and micro-batch size are fixed; dropless top-k routing
  sends exactly tokens x k rows to the experts, sorted on the device (model/permutation.py);
  grouped experts take their group offsets on the device (model/grouped_experts.py).
- No host read of a device value inside the step: tests/layer/test_host_work.py counts a step's
  reads at PyTorch's dispatcher, and all are outside the schedule.  What would read the
  host is refused before any work (config.py, ``_validate_cuda_graph``): expert parallelism
  (split sizes), MoE layers other than the local spec's grouped experts in bf16 (torch's
  grouped GEMM kernel; its fallback for other dtypes reads the offsets), token dropping; and
  what a replay would get wrong: fp16's loss scaler (it rebinds its scale tensor), FP8's
  scaling state, dropout under recompute.
- State that outlives a step is updated in place, so the replayed kernels update the tensors
  the host reads: the CoE layers' expert load and non-finite flags, the aux-loss tracker, the
  aux-loss scale, DDP's gradient buffers; the optimizer writes the weights in place.
- Random numbers: Megatron's RNG tracker in its graph-safe form (parallel.initialize), whose
  generators the wrapper registers with the graph.
- Memory: the graph's pool keeps one step's activations; an eager validation or injected
  step after the capture allocates its own beside them.
- Streams: the run works on the capture stream from the start (:func:`use_stream`), so the
  autograd nodes and cuBLAS workspaces created during the warm-up belong to the stream that is
  captured.  torch's autograd refuses a capture in which a node belongs to the default stream
  unless ``torch.autograd.graph.set_override_stale_capture_stream`` is on (torch 2.14's
  documentation); Megatron's wrapper turns it on where torch has it.
"""

from __future__ import annotations

import torch


def enabled(config) -> bool:
    return config.train.cuda_graph != "none"


def use_stream(config) -> None:
    """Make this process's current stream the one graphs are captured on (with
    train.cuda_graph), or the default stream (without: a previous run in this process may have
    left the capture stream current).  CUDA only; call after the device is set."""
    if config.device != "cuda":
        return
    if enabled(config):
        from megatron.core.full_cuda_graph import get_shared_capture_stream

        stream = get_shared_capture_stream()
    else:
        stream = torch.cuda.default_stream()
    stream.wait_stream(torch.cuda.current_stream())  # after whatever the last one queued
    torch.cuda.set_stream(stream)


class CapturedSchedule:
    """Megatron's forward-backward function, captured after ``warmup_steps`` calls and then
    replayed; called like the function itself (keyword arguments).  Training steps only
    (train.run_schedule runs forward-only calls eagerly)."""

    def __init__(self, warmup_steps: int):
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper
        from megatron.core.pipeline_parallel import get_forward_backward_func

        release()  # a training built earlier in this process (the GPU check runs several)
        self.warmup_steps = warmup_steps
        self._wrapper = FullCudaGraphWrapper(get_forward_backward_func(),
                                             cuda_graph_warmup_steps=warmup_steps)

    def __call__(self, **kwargs):
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        capturing = FullCudaGraphWrapper.curr_iteration["training"] == self.warmup_steps
        try:
            result = self._wrapper(**kwargs)
        except RuntimeError as err:
            if not capturing:
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            raise RuntimeError(
                f"train.cuda_graph=full_iteration: capturing the training step as a CUDA graph "
                f"failed ({type(err).__name__}: {first}); something in the step reads the "
                f"device from the host or changes shape between steps. train.cuda_graph=none "
                f"runs it eagerly") from err
        if capturing and (not torch.distributed.is_initialized()
                          or torch.distributed.get_rank() == 0):
            print(f"train.cuda_graph: the training step ({kwargs['num_microbatches']} "
                  f"micro-batches) is captured as a CUDA graph after {self.warmup_steps} eager "
                  f"steps and replayed from now on", flush=True)
        return result

    def captured(self) -> bool:
        """Whether the step is captured already (every later call replays it)."""
        from megatron.core.full_cuda_graph import FullCudaGraphWrapper

        return FullCudaGraphWrapper.curr_iteration["training"] > self.warmup_steps


def release() -> None:
    """Drop the captured graphs (their memory pool's tensors with them) and the static input
    buffers, which Megatron's wrapper keeps in class attributes, process-wide."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper, StaticBufferLoader

    # reset_cuda_graph touches only the class attributes: no instance needed
    FullCudaGraphWrapper.reset_cuda_graph(FullCudaGraphWrapper)
    StaticBufferLoader.static_buffers = {"training": [], "validation": []}
