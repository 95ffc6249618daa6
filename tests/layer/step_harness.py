"""What the training-step tests share: a two-layer GPT config at test size, its micro-batches of
random tokens, and model, optimizer and scheduler built from one seed."""

import torch

from megatron_coe.config import config_from_dict


def step_config(iterations=2, topk=2, micro_batches=2, precision="fp32", optimizer=None,
                train=None, device="cpu"):
    """Two layers, hidden 32, 7 routed experts of hidden 16 and a shared one, sequence length
    12, micro-batches of 2 sequences; ``optimizer`` and ``train`` add fields."""
    return config_from_dict({
        "device": device,
        "precision": precision,
        "model": {"impl": "local",  # also where Transformer Engine is installed
                  "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "vocab_size": 64, "seq_length": 12,
                  "moe": {"num_experts": 7, "topk": topk, "expert_hidden_size": 16,
                          "shared_expert_hidden_size": 16, "aux_loss": "seq_aux_loss"},
                  "coe": {"iterations": iterations}},
        "optimizer": optimizer or {},
        "schedule": {"warmup_steps": 0},
        "train": {"micro_batch_size": 2, "global_batch_size": 2 * micro_batches, "steps": 10,
                  **(train or {})}})


def step_batches(config, seed):
    """The step's micro-batches (global / micro batch size of them) of random tokens."""
    g = torch.Generator().manual_seed(seed)
    t, s = config.train, config.model.seq_length
    out = []
    for _ in range(t.global_batch_size // t.micro_batch_size):
        tokens = torch.randint(0, config.model.vocab_size, (t.micro_batch_size, s + 1),
                               generator=g)
        out.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                    "position_ids": torch.arange(s).expand(t.micro_batch_size, s),
                    "loss_mask": torch.ones(t.micro_batch_size, s)})
    return out


def megatron_step(model, optimizer, scheduler, total, config, device):
    """optim_step.take_step on Megatron's path (optimizer.step()) whatever the AdamW kernel:
    the reference the step on the device is compared with."""
    from megatron_coe.optim_step import _megatron_step

    result = _megatron_step(model, optimizer, total, config, device)
    if result.applied:
        scheduler.step(increment=1)
    return result


def built(config):
    """(DDP model, optimizer, scheduler) built from seed 0, as coe-train builds them."""
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model

    torch.manual_seed(0)
    model = wrap_model(config, build_model(config))
    optimizer, scheduler = build_optimizer(config, model)
    return model, optimizer, scheduler
