"""One training variant built as coe-train builds it, for the benchmarks that step it themselves
(train_step.py, host_work.py).

    model, optimizer, scheduler, train_ds = build_variant(config, run_dir)

After ``parallel.initialize(config)``: the data prepared in ``run_dir`` (every rank must see
it), the model initialised from ``config.seed``, wrapped in Megatron's DDP, its optimizer and
LR schedule."""

from __future__ import annotations


def build_variant(config, run_dir):
    import torch

    from megatron_coe.data import dataset
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model

    tokenizer, prefixes = dataset.prepare(config, run_dir)
    train_ds, _, _ = dataset.build_datasets(config, run_dir, tokenizer, prefixes)
    torch.manual_seed(config.seed)
    model = wrap_model(config, build_model(config))
    optimizer, scheduler = build_optimizer(config, model)
    return model, optimizer, scheduler, train_ds
