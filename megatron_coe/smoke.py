"""coe-smoke: build the configured model and run forward + backward on seeded random tokens.

    torchrun --nproc-per-node 2 -m megatron_coe.smoke configs/tiny/coe.yaml [key=value ...]

Prints, from rank 0, the loss, the gradient norm, each CoE iteration's router statistics and
the all-to-all calls and bytes of every CoE layer.  A check that the stack works end to end on
this machine, before (and independently of) a training run.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="coe-smoke", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--steps", type=int, default=2, help="forward+backward passes")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Megatron-Core warns at import about TE/apex fallbacks that a CPU run uses on purpose.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_coe.config import load_config

    try:
        config = load_config(args.config, args.overrides)  # fails before any process group
    except ValueError as err:
        print(f"coe-smoke: bad config: {err}", file=sys.stderr)
        return 2

    import torch.distributed as dist
    from megatron_coe.model import build_model, coe_layers
    from megatron_coe.router_stats import install_tracker

    model = build_model(config)
    rank = dist.get_rank()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed + rank)
    b, s, v = config.train.micro_batch_size, config.model.seq_length, config.model.vocab_size
    for step in range(args.steps):
        tokens = torch.randint(0, v, (b, s + 1), generator=gen).to(device)
        position_ids = torch.arange(s, device=device).expand(b, s)
        losses = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        loss = losses.float().mean()
        loss.backward()
        grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters()
                                   if p.grad is not None))
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"local grad norm {grad_norm.item():.4f}")
        model.zero_grad(set_to_none=True)

    if rank == 0:
        tracker = install_tracker()
        for name, entry in sorted(tracker.metrics.items()):
            values = ", ".join(f"{v:.4f}" for v in entry.values.tolist())
            print(f"{name:40s} per layer: {values}")
        for i, layer in enumerate(coe_layers(model)):
            fwd = layer.token_dispatcher.counters.total("forward")
            bwd = layer.token_dispatcher.counters.total("backward")
            load = layer.tokens_per_expert
            print(f"CoE layer {i + 1}: C={layer.iterations} residual={layer.residual} "
                  f"router={layer.router_mode}; a2a forward {fwd['calls']} calls "
                  f"{fwd['sent_bytes']} B sent, backward {bwd['calls']} calls; "
                  f"tokens per expert (local, per iteration) min {load.min(1).values.tolist()} "
                  f"max {load.max(1).values.tolist()}")
    from megatron_coe import parallel

    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
