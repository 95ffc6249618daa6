"""Megatron-Core's training pieces, configured from a Config: Float16Module for bf16/fp16,
Megatron DDP, the (optionally distributed) optimizer, and the LR/WD scheduler.

LR schedule over ``train.steps`` optimizer steps: linear warmup from 0 to ``optimizer.lr`` over
``schedule.warmup_steps``, then ``cosine`` / ``linear`` decay to ``min_lr`` at the last step,
``constant``, or ``wsd`` (warmup, stable at lr, then a final cosine decay over
``schedule.wsd_decay_steps`` steps).  Weight decay is constant.

fp16: Megatron's fp16 optimizer keeps fp32 main weights and a loss scaler (dynamic unless
``optimizer.loss_scale`` is set); the forward-backward schedule scales the loss through
``config.grad_scale_func``, and ``optimizer.step()`` unscales, skips the step on overflow and
adjusts the scale.

AdamW's implementation: without Transformer Engine or apex, Megatron builds torch's AdamW with
neither ``fused`` nor ``foreach`` given, so torch picks its multi-tensor (foreach) loop on CUDA
and one update per tensor on CPU.  :func:`use_adam_implementation` makes it torch's fused AdamW
kernel on CUDA (one launch for many tensors: the many small expert and router tensors of a CoE
model; and the step without a host read, optim_step.py), foreach where fused cannot run or
``optimizer.fused`` is false, and leaves CPU as it was unless ``optimizer.fused`` is true (torch's
CPU fused kernel).  TE's and apex's FusedAdam, which Megatron prefers when installed, are left
alone.

Gradient clipping and the main -> model parameter copy: without apex or Transformer Engine,
Megatron's fallbacks read every gradient's norm back to the host; ``multi_tensor.install``
replaces them with torch's foreach ops (no sync, a few launches for all tensors).
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_coe import cpu, multi_tensor
from megatron_coe import ddp as ddp_module
from megatron_coe.checkpoint import torch_optimizers
from megatron_coe.config import Config


def wrap_model(config: Config, model):
    """GPTModel -> (Float16Module) -> Megatron DDP (its gradient buffers written by each step's
    first gradient where only its hook writes them: ddp.py).  Returns the DDP module."""
    tf_config = model.config
    if config.precision in ("bf16", "fp16"):
        model = Float16Module(tf_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.optimizer.distributed,
        check_for_nan_in_grad=False,  # we check (and skip) ourselves, see train.py
    )
    write_first = ddp_module.applies(model, tf_config, ddp_config)
    with cpu.cuda_to_cpu():
        ddp = ddp_module.WriteFirstDDP(tf_config, ddp_config, model, write_first=write_first)
    tf_config.finalize_model_grads_func = ddp_module.finalize_model_grads
    return ddp


def build_optimizer(config: Config, model):
    o = config.optimizer
    opt_config = OptimizerConfig(
        optimizer="adam",  # AdamW: decoupled_weight_decay=True
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.beta1,
        adam_beta2=o.beta2,
        adam_eps=o.eps,
        clip_grad=o.clip_grad,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=o.distributed,
        loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale,
        loss_scale_window=o.loss_scale_window,
        hysteresis=o.hysteresis,
    )
    multi_tensor.install()
    with cpu.cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [model])
    use_adam_implementation(optimizer, fused=o.fused, device_type=config.device)
    if config.precision == "fp16":  # the schedules multiply the loss by it before backward
        model.config.grad_scale_func = optimizer.scale_loss
    s, t = config.schedule, config.train
    style = {"wsd": "WSD"}.get(s.decay, s.decay)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr if s.decay != "constant" else o.lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=t.steps,
        lr_decay_style=style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
        # on resume the schedule follows the config (warmup, decay length and style), as
        # Megatron-LM's --override-opt_param-scheduler: a larger train.steps stretches the
        # decay instead of holding min_lr.  lr / min_lr cannot change (checkpoint.py)
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=s.wsd_decay_steps if s.decay == "wsd" else None,
        lr_wsd_decay_style="cosine" if s.decay == "wsd" else None,
    )
    return optimizer, scheduler


def adam_implementation(device_type: str, all_floating: bool = True,
                        fused: bool | None = None) -> dict:
    """torch AdamW's ``fused`` / ``foreach`` flags for parameters on ``device_type``, given
    ``optimizer.fused`` (None: auto).  The fused kernel needs floating-point parameters (which
    Megatron's fp32 main parameters are): on CUDA unless fused is false, then foreach; on other
    devices only if fused is true, else torch's defaults (None: on CPU one update per tensor,
    the CPU reference's arithmetic)."""
    if fused is None:
        fused = device_type == "cuda"
    if fused and all_floating:
        return {"fused": True, "foreach": False}
    if device_type == "cuda":
        return {"fused": False, "foreach": True}
    return {"fused": None, "foreach": None}


def use_adam_implementation(optimizer, flags: dict | None = None,
                            fused: bool | None = None, device_type: str | None = None) -> None:
    """Give each torch AdamW inside Megatron's ``optimizer`` the flags of
    :func:`adam_implementation` for ``device_type`` (the run's device; default: its parameters')
    and ``fused`` (or ``flags``), also after a checkpoint load has brought back the saving run's
    flags.  As torch does, the fused kernel keeps each ``step`` as float32 on the parameter's
    device, the other implementations on the host."""
    vars(optimizer).pop("_coe_step_on_device", None)  # optim_step.runs_on_device decides again
    for opt in torch_optimizers(optimizer):
        params = [p for g in opt.param_groups for p in g["params"]]
        chosen = flags
        if chosen is None:  # every rank alike, also one whose shard holds no parameter
            device = device_type or (params[0].device.type if params else "cpu")
            chosen = adam_implementation(device, all(p.is_floating_point() for p in params),
                                         fused)
        opt.defaults.update(chosen)
        for group in opt.param_groups:
            group.update(chosen)
            on_device = bool(group["fused"] or group["capturable"])
            for p in group["params"]:
                state = opt.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = (state["step"].to(p.device, torch.float32) if on_device
                                     else state["step"].cpu())
        opt._step_supports_amp_scaling = bool(chosen["fused"])  # as torch's constructor
