"""Overhead of the CPU backend on a training step, as a ratio.

    python benchmarks/cpu_backend.py

The backend's name redirects (cpu.py) cost nothing per op; its only per-op cost is the scoped
TorchFunctionMode (`cpu.cuda_to_cpu`) that remaps Megatron's hard-coded CUDA placements.  The
training loop runs Megatron's forward-backward schedule inside that mode.  This times forward +
backward of the tiny CoE GPT (configs/tiny/coe.yaml, one process) inside and outside the mode,
alternately, and prints the median ratio.

Two replacements of Megatron's own MoE functions give the same results faster: the backend's
permutation, and the routers' aux losses reusing the routing's top-k (model/aux_topk.py, on
every device).  Then
this times one router, and one CoE-2(4/64) layer at EP = 1 (2048 tokens, 64 experts of the CPU
paper configs' sizes), forward + backward on one thread, with those redirects and with
Megatron's functions put back, alternately; checks their outputs and gradients are equal; and
prints the median ratios.  A measurement, not a test.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch


def main() -> int:
    warnings.filterwarnings("ignore")
    from megatron_coe import cpu, parallel
    from megatron_coe.config import load_config
    from megatron_coe.model import build_model

    config = load_config("configs/tiny/coe.yaml", ["parallel.expert=1"])
    model = build_model(config)
    tokens = torch.randint(0, 256, (4, 65))
    pos = torch.arange(64).expand(4, 64)

    def forward():
        return model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)

    def in_mode():
        with cpu.cuda_to_cpu():
            step()

    def as_train_loop():  # the schedule (and backward) in the mode, the model's forward outside
        with cpu.cuda_to_cpu():
            with cpu.outside_cuda_to_cpu():
                loss = forward()
            loss.backward()
        model.zero_grad(set_to_none=True)

    runs = {"plain": step, "whole step in mode": in_mode, "as the training loop": as_train_loop}
    times = {name: [] for name in runs}
    for i in range(23):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    for name in runs:
        t = statistics.median(times[name])
        print(f"tiny CoE GPT forward+backward, {name}: {t * 1e3:.1f} ms, ratio to plain "
              f"{t / plain:.3f} (median of 20)")
    parallel.destroy()
    moe_redirects()
    return 0


def moe_redirects(rounds: int = 30) -> None:
    """One router, and one CoE-2(4/64) layer, with the MoE replacements and without."""
    from megatron.core.transformer.moe import moe_utils, router, token_dispatcher

    from megatron_coe import parallel
    from megatron_coe.config import config_from_dict
    from megatron_coe.model import build_moe_layer

    torch.set_num_threads(1)
    config = config_from_dict({"model": {
        "num_layers": 1, "hidden_size": 128, "num_attention_heads": 4,
        "moe": {"num_experts": 64, "topk": 4, "expert_hidden_size": 88,
                "shared_expert_hidden_size": 88, "aux_loss": "seq_aux_loss"},
        "coe": {"iterations": 2}}})
    torch.manual_seed(0)
    layer = build_moe_layer(config).train()
    x = torch.randn(256, 8, 128, requires_grad=True)  # 2048 tokens
    names = [(token_dispatcher, "permute", moe_utils.permute),
             (router, "topk_routing_with_score_function",
              moe_utils.topk_routing_with_score_function),
             (router, "compute_routing_scores_for_aux_loss",
              moe_utils.compute_routing_scores_for_aux_loss)]
    redirected = [getattr(module, attr) for module, attr, _ in names]

    def use(redirects: bool) -> None:
        for (module, attr, megatron), mine in zip(names, redirected):
            setattr(module, attr, mine if redirects else megatron)

    def router_step():
        probs, _ = layer.router(x)
        probs.sum().backward()

    def layer_step():
        y, _ = layer(x)
        y.sum().backward()
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in layer.parameters()]

    results = {}
    for name, fn in (("router", router_step), ("CoE-2(4/64) layer", layer_step)):
        times = {True: [], False: []}
        for i in range(rounds + 3):
            for redirects in (True, False):
                use(redirects)
                layer.zero_grad(set_to_none=True)
                x.grad = None
                start = time.perf_counter()
                results[redirects] = fn()
                if i >= 3:
                    times[redirects].append(time.perf_counter() - start)
        on, off = (statistics.median(times[r]) for r in (True, False))
        print(f"{name} forward+backward, 2048 tokens x 64 experts, one thread: Megatron's "
              f"functions {off * 1e3:.2f} ms, the replacements {on * 1e3:.2f} ms, ratio "
              f"{on / off:.3f} (median of {rounds})")
    use(True)
    y, dx, grads = results[True]
    y0, dx0, grads0 = results[False]
    same = (torch.equal(y, y0) and torch.equal(dx, dx0)
            and all(torch.equal(a, b) for a, b in zip(grads, grads0)))
    print(f"layer output and every gradient equal with and without the redirects: {same}")
    parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
