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
"""

from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_coe import cpu
from megatron_coe.config import Config


def wrap_model(config: Config, model):
    """GPTModel -> (Float16Module) -> Megatron DDP.  Returns the DDP module."""
    tf_config = model.config
    if config.precision in ("bf16", "fp16"):
        model = Float16Module(tf_config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=config.optimizer.distributed,
        check_for_nan_in_grad=False,  # we check (and skip) ourselves, see train.py
    )
    with cpu.cuda_to_cpu():
        ddp = DistributedDataParallel(tf_config, ddp_config, model)
    tf_config.finalize_model_grads_func = finalize_model_grads
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
    with cpu.cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [model])
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
