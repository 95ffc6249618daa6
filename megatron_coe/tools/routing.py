"""coe-routing: how a trained CoE (or MoE) model routes its tokens, read from a checkpoint.

    coe-routing RUN_DIR [--checkpoint PATH] [--batches 8] [--out RUN_DIR/routing]

Runs the run's own validation batches (the first ``--batches`` global batches of its validation
split, so with ``--batches`` = ``train.eval_iters`` the loss it reports is the run's validation
loss) through the model restored from the run's latest checkpoint, in one CPU process whatever
the parallel layout of the training run, and records every router's top-k choice.  For each MoE
layer, with N routed experts, k chosen per iteration, C iterations, S_t(x) the set token x is
sent to in iteration t, and T tokens analysed:

    load(t, i)      = #{x : i in S_t(x)} / (k T)          distribution of tokens over experts;
                      summarised as max/uniform, min/uniform, unused experts and the entropy
                      H(load(t, .)) / log N (1 = perfectly even)
    repeat(t)       = mean_x |S_t(x) & S_{t-1}(x)| / k    t >= 2: how often an expert chosen in
                      iteration t-1 is chosen again in t (k / N if choices were independent
                      and uniform)
    distinct        = #{(S_1(x), ..., S_C(x))}             distinct expert combinations used,
                      against the possible binom(N, k)^C; the MoE with the same routed work
                      (top-kC of N, one iteration) has binom(N, kC).  Bounded by T.
    distinct union  = #{S_1(x) | ... | S_C(x)}             distinct sets of experts a token saw

Writes ``routing.json`` (every number above, plus the per-expert token counts of every layer and
iteration), ``routing.md`` (the summary table) and ``routing.png`` (per layer, each iteration's
expert load sorted by size) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch


def combinations(n: int, k: int, iterations: int) -> dict:
    """Possible expert combinations per token: CoE-C(k/N) and the MoE(kC/N) with the same
    routed work."""
    return {"coe": math.comb(n, k) ** iterations, "moe_same_work": math.comb(n, k * iterations)}


def layer_statistics(maps: list[torch.Tensor], topk: int) -> dict:
    """Routing statistics of one layer from its C routing maps ([T, N] bool, one per
    iteration, rows aligned on the same tokens)."""
    iterations, (tokens, n) = len(maps), maps[0].shape
    per_iter = []
    for t, m in enumerate(maps):
        counts = m.sum(dim=0).double()
        load = counts / counts.sum()
        nonzero = load[load > 0]
        entry = {
            "iteration": t + 1,
            "tokens_per_expert": counts.long().tolist(),
            "max_over_uniform": (load.max() * n).item(),
            "min_over_uniform": (load.min() * n).item(),
            "unused_experts": int((counts == 0).sum()),
            "entropy_ratio": (-(nonzero * nonzero.log()).sum() / math.log(n)).item(),
        }
        if t > 0:
            shared = (m & maps[t - 1]).sum(dim=1).double() / topk
            entry["repeat_rate"] = shared.mean().item()
            entry["repeat_rate_if_independent"] = topk / n
        per_iter.append(entry)
    # one row per token: the C routing maps side by side identify its combination
    rows = torch.cat(maps, dim=1)
    union = torch.stack(maps).any(dim=0)
    return {
        "tokens": tokens,
        "iterations": per_iter,
        "distinct_combinations": torch.unique(rows, dim=0).shape[0],
        "distinct_unions": torch.unique(union, dim=0).shape[0],
        "possible_combinations": combinations(n, topk, iterations),
    }


class RoutingRecorder:
    """Forward hooks on every router of the model's CoE layers, filing each routing map by
    (layer, iteration).  A shared router is called once per iteration; the iteration comes from
    the CoE layer that is running it."""

    def __init__(self, layers):
        from megatron_coe.router_stats import active_iteration

        self.maps: dict[int, dict[int, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
        self._handles = []
        for layer in layers:
            for router in {id(r): r for r in layer.routers}.values():
                def hook(module, args, output, number=layer.layer_number):
                    t = active_iteration() or 0
                    self.maps[number][t].append(output[1].detach().bool().cpu())
                self._handles.append(router.register_forward_hook(hook))

    def layer_maps(self) -> dict[int, list[torch.Tensor]]:
        return {number: [torch.cat(chunks[t]) for t in sorted(chunks)]
                for number, chunks in sorted(self.maps.items())}

    def close(self) -> None:
        for h in self._handles:
            h.remove()


# A run's config.yaml as one CPU process, whatever layout and kernels trained it: Megatron
# reshards the weights on load; auto picks the unfused ops and Megatron's loss on CPU, the same
# math as a GPU's kernels
ONE_CPU_PROCESS = [
    "device=cpu", "parallel.tensor=1", "parallel.pipeline=1", "parallel.expert=1",
    "parallel.expert_tensor=1", "parallel.context=1", "parallel.sequence_parallel=false",
    "fp8.enabled=false", "model.impl=local", "model.swiglu_fusion=null",
    "model.fused_kernels=auto", "model.loss_fusion=null", "model.mla.rope_fusion=null"]


def analyse(run_dir: Path, checkpoint_path: Path | None, batches: int) -> dict:
    from megatron.core.transformer.module import Float16Module

    from megatron_coe import checkpoint, parallel
    from megatron_coe.config import load_config
    from megatron_coe.data import dataset
    from megatron_coe.model import build_model, coe_layers
    from megatron_coe.train import run_schedule

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{config_file} does not exist: not a coe-train run directory")
    config = load_config(config_file, ONE_CPU_PROCESS)
    if config.model.moe is None:
        raise ValueError(f"{config_file}: a dense model has no routing to analyse")
    if checkpoint_path is None:
        found = checkpoint.list_checkpoints(run_dir / "checkpoints")
        if not found:
            raise ValueError(f"{run_dir / 'checkpoints'} holds no checkpoint")
        checkpoint_path = found[-1]
    tokenizer, prefixes = dataset.open_prepared(config, run_dir)
    try:
        gpt = build_model(config)
        meta = checkpoint.load_model(checkpoint_path, gpt, config)
        model = Float16Module(gpt.config, gpt) if config.precision != "fp32" else gpt
        _, valid_ds, _ = dataset.build_datasets(config, run_dir, tokenizer, prefixes)
        t = config.train
        recorder = RoutingRecorder(coe_layers(gpt))
        model.eval()
        total = torch.zeros(2)  # (loss sum, token count), as coe-train's validation
        with torch.no_grad():
            for b in range(batches):
                total += run_schedule(model, list(dataset.micro_batches(
                    valid_ds, b * t.global_batch_size, t.global_batch_size, t.micro_batch_size,
                    0, 1)), config, forward_only=True).cpu()
        recorder.close()
    finally:
        parallel.destroy()
    moe, coe = config.model.moe, config.model.coe
    layers = {str(n): layer_statistics(maps, moe.topk)
              for n, maps in recorder.layer_maps().items()}
    return {
        "run_dir": str(run_dir), "checkpoint": str(checkpoint_path), "step": meta["step"],
        "routed_experts": moe.num_experts, "topk": moe.topk,
        "iterations": coe.iterations if coe else 1,
        "residual": coe.residual if coe else None, "router": coe.router if coe else None,
        # the same batches as the run's validation when batches == train.eval_iters: a check
        # that the weights were restored (and resharded) correctly
        "valid_loss": (total[0] / total[1]).item(), "batches": batches,
        "layers": layers,
    }


def summary_table(result: dict) -> str:
    n, k, c = result["routed_experts"], result["topk"], result["iterations"]
    possible = combinations(n, k, c)
    lines = [
        f"Run `{result['run_dir']}`, checkpoint step {result['step']}: {c} iteration(s), top-{k} "
        f"of {n} routed experts. Possible combinations per token: binom({n},{k})^{c} = "
        f"{possible['coe']:.3e}; the MoE with the same routed work, binom({n},{k * c}) = "
        f"{possible['moe_same_work']:.3e}. Validation loss on the {result['batches']} batches "
        f"analysed: {result['valid_loss']:.4f}.",
        "",
        "| layer | iteration | max/uniform | min/uniform | unused experts | entropy ratio | "
        "repeat rate (independent) | distinct combinations / tokens | distinct unions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for number, layer in result["layers"].items():
        for it in layer["iterations"]:
            repeat = (f"{it['repeat_rate']:.3f} ({it['repeat_rate_if_independent']:.3f})"
                      if "repeat_rate" in it else "-")
            first = it["iteration"] == 1
            lines.append(
                f"| {number} | {it['iteration']} | {it['max_over_uniform']:.2f} | "
                f"{it['min_over_uniform']:.2f} | {it['unused_experts']} | "
                f"{it['entropy_ratio']:.3f} | {repeat} | "
                + (f"{layer['distinct_combinations']} / {layer['tokens']} | "
                   f"{layer['distinct_unions']} |" if first else "| |"))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 3), squeeze=False)
    n = result["routed_experts"]
    for ax, (number, layer) in zip(axes[0], layers.items()):
        for it in layer["iterations"]:
            counts = sorted(it["tokens_per_expert"], reverse=True)
            total = sum(counts)
            ax.plot([x * n / total for x in counts], label=f"iteration {it['iteration']}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"layer {number}", fontsize=9)
        ax.set_xlabel("experts, by load")
    axes[0][0].set_ylabel("load / uniform")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_coe.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="coe-routing", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint directory (default: the run's latest)")
    parser.add_argument("--batches", type=int, default=8, help="validation global batches")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/routing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.batches < 1:
            raise ValueError("--batches must be at least 1")
        result = analyse(args.run_dir, args.checkpoint, args.batches)
    except (ValueError, CheckpointError) as err:
        print(f"coe-routing: {err}", file=sys.stderr)
        return 2
    out = args.out or args.run_dir / "routing"
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(result, indent=1))
    table = summary_table(result)
    (out / "routing.md").write_text(table)
    plot(result, out / "routing.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
