"""How large the CoE iterates are at initialisation, per residual mode (one CPU process).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/iteration_norms.py [--config configs/tiny/coe.yaml]

Builds one CoE layer of the config (EP = 1) for each variant: inner, outer, and outer with
model.coe.iteration_norm, feeds it x(0) ~ N(0, 1) of shape [S, B, H] (what the pre-MLP RMSNorm
hands it at init: per-token norm sqrt(H)), and prints the mean per-token L2 norm of every
router's input x(t-1), t = 1..C, and of the layer's output, and output / input.
"""

from __future__ import annotations

import argparse
import warnings

import torch


def measure(config) -> dict:
    from megatron_coe.model import build_moe_layer

    layer = build_moe_layer(config)
    seen = []
    hooks = [router.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
             for router in dict.fromkeys(layer.routers)]
    torch.manual_seed(0)
    m = config.model
    x = torch.randn(m.seq_length, 4, m.hidden_size)
    with torch.no_grad():
        out, _ = layer(x)
    for h in hooks:
        h.remove()

    def norm(t):
        return t.float().norm(dim=-1).mean().item()

    return {"router_inputs": [norm(t) for t in seen], "output": norm(out),
            "ratio": norm(out) / norm(x)}


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/coe.yaml")
    parser.add_argument("--iterations", type=int, nargs="+", default=[2, 3])
    args = parser.parse_args(argv)
    from megatron_coe import parallel
    from megatron_coe.config import load_config

    variants = {"inner": ["model.coe.residual=inner"],
                "outer": ["model.coe.residual=outer"],
                "outer + iteration_norm": ["model.coe.residual=outer",
                                           "model.coe.iteration_norm=true"]}
    print(f"{args.config}, EP = 1, x(0) ~ N(0, 1); mean per-token L2 norm")
    print("| residual | C | router input t = 1..C | layer output | output / input |")
    print("|---|---|---|---|---|")
    for c in args.iterations:
        for name, overrides in variants.items():
            config = load_config(args.config, ["parallel.expert=1", f"model.coe.iterations={c}",
                                               *overrides])
            r = measure(config)
            inputs = " / ".join(f"{v:.3g}" for v in r["router_inputs"])
            print(f"| {name} | {c} | {inputs} | {r['output']:.3g} | {r['ratio']:.3g} |",
                  flush=True)
            parallel.destroy()


if __name__ == "__main__":
    main()
