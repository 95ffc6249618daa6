"""One training step's optimizer update and what it asks of the host.

After the forward-backward over the step's micro-batches, the loop needs to know the step's
loss, whether the loss and every gradient are finite (a non-finite step is skipped, counted,
and leaves the weights, moments and LR schedule as they were), and the gradient norm (clipping,
the log line).  :func:`take_step` does it in one of two ways.

Megatron's step (host-side; TE's or apex's FusedAdam, torch's foreach or per-tensor AdamW, fp16):

    loss = read(all-reduced loss sum / count)                 host read 1
    ok   = read(every gradient finite, all-reduced)           host read 2 (not fp16)
    Megatron's optimizer.step(): ||g|| (host read 3 without TE or apex), g *= c, AdamW(g),
    main -> model copy;  c = min(clip_grad / (||g|| + 1e-6), 1)

fp16's loss scaler checks the gradients itself (and reads its scale).  A GPU waits at each read
until everything before it has run, then waits for the host to issue what follows.

On the device (torch's fused AdamW, bf16 or fp32): nothing is read until the update is queued

    n    = ||g||, Megatron's gradients for the norm, reduced over its grad-stats groups
    skip = not finite(loss) or not finite(n)
    s    = max((n + 1e-6) / clip_grad, 1)                     (clip_grad > 0)
    AdamW(g / s) unless skip, main -> model copy
    read [loss sum, token count, n, skip]                     the step's one host read

torch's fused AdamW kernel takes ``grad_scale`` (s) and ``found_inf`` (skip) as device tensors,
the attributes through which torch's GradScaler hands them to it: it divides the gradients by s
as it reads them (no clip pass over the gradients) and, where found_inf is set, changes no weight
or moment and takes the step count back.  A non-finite gradient makes the norm non-finite (NaN
and inf survive the sum of squares), so the norm is the gradient check.  The host issues the
whole update while the GPU still runs the backward, and waits once, at the end.

Against Megatron's step: g / s and g * c differ by the rounding of one division (the weights
agree to within fp32 rounding, tests/layer/test_optim_step.py); the norm is computed from the same
per-tensor norms, its square root in fp32 instead of float64.  Finite gradients whose squares
overflow fp32 (a norm above ~1.8e19) give an infinite norm: the step is skipped, where Megatron's
step applies an update from zeroed gradients; both count it as non-finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepResult:
    loss: float  # the step's mean loss over every rank's tokens (NaN without tokens)
    grad_norm: float  # NaN where none was computed (a skipped step on Megatron's path)
    applied: bool  # the update ran (the LR schedule moves)
    finite: bool  # not a non-finite step (an fp16 overflow is not one)
    overflow: bool = False  # fp16: skipped by the loss scaler, which lowered its scale
    loss_scale: float | None = None  # fp16: the scale this step's loss was multiplied by


def take_step(model, optimizer, scheduler, total: torch.Tensor, config, device) -> StepResult:
    """The optimizer step after a forward-backward whose loss (sum, count) over this rank's
    micro-batches is ``total``: on the device where :func:`runs_on_device`, else Megatron's.
    The LR scheduler moves only if the update was applied."""
    if runs_on_device(optimizer, config, device):
        result = _step_on_device(model, optimizer, total, config, device)
    else:
        result = _megatron_step(model, optimizer, total, config, device)
    if result.applied:
        scheduler.step(increment=1)
    return result


def runs_on_device(optimizer, config, device) -> bool:
    """Whether the update can run without a host read: every inner optimizer is torch's AdamW
    with the fused kernel (optim.adam_implementation) and none has a loss scaler (fp16's).
    Decided once per optimizer (again after optim.use_adam_implementation) and agreed by all
    ranks: one all-reduce and one read, at the first step."""
    import torch.distributed as dist

    from megatron_coe.checkpoint import torch_optimizers

    agreed = vars(optimizer).get("_coe_step_on_device")
    if agreed is None:
        # a stub (no parameters on this rank) has no torch optimizer
        subs = [sub for sub in getattr(optimizer, "chained_optimizers", [optimizer])
                if not getattr(sub, "is_stub_optimizer", False)]
        inner = torch_optimizers(optimizer)
        here = (config.precision != "fp16" and len(inner) == len(subs)
                and all(getattr(sub, "grad_scaler", None) is None for sub in subs)
                and all(group.get("fused") for opt in inner for group in opt.param_groups))
        flag = torch.tensor([1.0 if here else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        agreed = vars(optimizer)["_coe_step_on_device"] = bool(flag.item())
    return agreed


def reduce_loss(total: torch.Tensor, device) -> torch.Tensor:
    """(sum, count) of the loss summed over the data- and context-parallel ranks (and over the
    pipeline, whose last stage holds it), float64 on ``device``; nothing read."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    total = total.to(device=device, dtype=torch.float64)  # NCCL reduces device tensors only
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def mean_loss_over_dp(total: torch.Tensor, device) -> float:
    """The mean loss over every rank's tokens, read on the host (0 / 0 = NaN: no tokens)."""
    total = reduce_loss(total, device)
    return (total[0] / total[1]).item()


def gradient_tensors(model) -> list[torch.Tensor]:
    """Every gradient of ``model`` in as few tensors as possible: Megatron DDP's contiguous
    gradient buffers (each holds the main_grad of many parameters, and zero padding), and any
    gradient outside them.  A buffer whose storage is shared with the parameters is not used."""
    buffers = []
    ddp_buffers = [getattr(model, name, None) for name in ("buffers", "expert_parallel_buffers")]
    for b in (b for group in ddp_buffers if isinstance(group, (list, tuple)) for b in group):
        g, w = getattr(b, "grad_data", None), getattr(b, "param_data", None)
        if g is not None and (w is None or w.untyped_storage().data_ptr()
                              != g.untyped_storage().data_ptr()):
            buffers.append(g)
    covered = {b.untyped_storage().data_ptr() for b in buffers}
    rest = []
    for p in model.parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None and g.untyped_storage().data_ptr() not in covered:
            rest.append(g)
    return buffers + rest


def grads_are_finite(model, device) -> bool:
    """True iff every gradient on every rank is finite (one all-reduce, one host read)."""
    import torch.distributed as dist

    from megatron_coe.finite import each_finite

    grads = gradient_tensors(model)
    # one reduction per gradient buffer, one device tensor, one sync: not one per parameter
    ok = (each_finite(grads).all().float().reshape(1) if grads
          else torch.ones(1, device=device))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def grad_norm(optimizer, device) -> torch.Tensor:
    """The gradients' global l2 norm as Megatron's ``get_grad_norm`` computes it (the same
    gradients, per-tensor norms and reductions), as a 0-dim fp32 device tensor: nothing read.
    A chained optimizer whose parts share one grad-stats group reduces all their gradients at
    once, as Megatron's does; otherwise each part reduces over its own group."""
    import torch.distributed as dist

    from megatron_coe.multi_tensor import l2_norm

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    shared = getattr(optimizer, "grads_states_parallel_group_is_shared", lambda: True)()
    parts = ([([g for sub in subs for g in sub.get_grads_for_grad_norm()],
               subs[0].get_grad_stats_parallel_group())] if shared else
             [(sub.get_grads_for_grad_norm(), sub.get_grad_stats_parallel_group())
              for sub in subs])
    total = torch.zeros(1, dtype=torch.float, device=device)
    for grads, group in parts:
        sq = (l2_norm(None, None, [grads], False)[0].to(device) ** 2 if grads
              else torch.zeros(1, dtype=torch.float, device=device))
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
        total = total + sq
    return total.sqrt().reshape(())


def _step_on_device(model, optimizer, total, config, device) -> StepResult:
    from megatron_coe import cpu
    from megatron_coe.checkpoint import torch_optimizers

    with torch.no_grad(), cpu.cuda_to_cpu():
        loss = reduce_loss(total, device)
        if optimizer.prepare_grads():  # bf16 / fp32: no scaler, nothing read
            raise RuntimeError("the optimizer found an overflow without a loss scaler")
        norm = grad_norm(optimizer, device)
        skip = ~(torch.isfinite(loss[0] / loss[1]) & torch.isfinite(norm))
        found_inf = skip.float()  # 0-dim, as GradScaler's
        clip = config.optimizer.clip_grad
        scale = ((norm + 1.0e-6) / clip).clamp(min=1.0) if clip > 0 else None
        inner = torch_optimizers(optimizer)
        for opt in inner:  # read by torch's AdamW.step, as GradScaler's are
            opt.grad_scale, opt.found_inf = scale, found_inf
        try:
            optimizer.step_with_ready_grads()
        finally:
            for opt in inner:  # a later step must not see this step's verdict
                del opt.grad_scale, opt.found_inf
        stats = torch.cat([loss, norm.double().reshape(1), skip.double().reshape(1)])
    loss_sum, count, n, skipped = stats.tolist()  # the one host read
    return StepResult(loss=loss_sum / count if count else math.nan, grad_norm=n,
                      applied=not skipped, finite=not skipped)


def _megatron_step(model, optimizer, total, config, device) -> StepResult:
    from megatron_coe import cpu

    fp16 = config.precision == "fp16"
    loss = mean_loss_over_dp(total, device)
    scale = optimizer.get_loss_scale().item() if fp16 else None
    if not (math.isfinite(loss) and (fp16 or grads_are_finite(model, device))):
        return StepResult(loss=loss, grad_norm=math.nan, applied=False, finite=False,
                          loss_scale=scale)
    with torch.no_grad(), cpu.cuda_to_cpu():
        applied, norm, _ = optimizer.step()
    norm = math.nan if norm is None else float(norm)
    overflow = fp16 and not applied and scale > config.optimizer.min_loss_scale
    # Megatron applies an update whatever the norm; a non-finite norm still counts as non-finite
    return StepResult(loss=loss, grad_norm=norm, applied=applied,
                      finite=overflow or (applied and math.isfinite(norm)), overflow=overflow,
                      loss_scale=scale)
