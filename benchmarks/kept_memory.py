"""Activation memory of whole models: what one forward keeps for backward, per token, by part
of the model and by CoE iteration, under each recompute mode; and the GPU peaks that implies.

    python benchmarks/kept_memory.py --out benchmarks/results/kept_memory_cpu.json \
        --measured benchmarks/results/gpu_check_cuda_graph_triton_mb8.json --logits-gradient-freed

Each config (the paper's MoE(8/64), CoE-2(4/64) and CoE-2(4/48) by default) is built as
coe-train builds it (bf16, the Triton kernels with the fused loss and SwiGLU, grouped experts;
on CPU the kernels run through Triton's interpreter) under each ``--recompute`` mode, and one
micro-batch of ``--micro-batch`` sequences runs forward.  Every tensor autograd saves is counted
once per storage (benchmarks/saved_tensors.py) under the part of the model that saved it:
attention, norms, routers, routed experts and shared expert (each per iteration), the norms of
iterations 2..C where the config has them, dispatch and residual (the MoE/CoE layer's own
work), output layer and loss.  Printed: KiB per token of each part, summed over the layers, and
the total.

On a GPU every part is what a CUDA run keeps.  On CPU the attention and the norms keep other
tensors than on a GPU (torch's math attention keeps fp32 probabilities where cuDNN keeps q, k,
v, the output and a log-sum-exp; the CPU RMSNorm keeps an fp32 copy of its input), while the
MoE/CoE layer runs the same code on both.  So the GPU peaks implied are taken from a measured
GPU check (``--measured``, its ``peak_mem_gib`` per config and micro-batch, all with no
recompute) and changed by what each mode takes from the MoE/CoE layer's parts only:

    peak(config, mode, micro-batch) = measured peak(config, micro-batch)
                                      - micro-batch x sequence x (layer kept(none) - layer kept(mode))

With ``--logits-gradient-freed`` (a measured run from before the fused loss wrote the logits'
gradient over them) what that takes off every peak comes off as well: the loss's backward held
logits and gradient, [T, V] each; the output layer's backward, the peak after it, holds the
gradient with the hidden states' [T, H] and the weight's [V, H] gradients (bf16).  The
CoE-2(4/48) / MoE(8/64) ratio of these peaks is printed per micro-batch.  Estimates, not
measurements: a GPU check measures.  Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"MoE(8/64)": "configs/paper/moe-8of64.yaml",
           "CoE-2(4/64)": "configs/paper/coe-2-4of64.yaml",
           "CoE-2(4/48)": "configs/paper/coe-2-4of48.yaml"}
RATIO = ("CoE-2(4/48)", "MoE(8/64)")  # the memory target's pair
LAYER_PARTS = ("routers", "routed experts", "shared expert", "iteration norms",
               "dispatch and residual")
PER_ITERATION = ("routers", "routed experts", "shared expert", "iteration norms")


def part_of(name: str) -> str:
    """The part of the model a module (its name in the model) belongs to."""
    if ".self_attention" in name:
        return "attention"
    if name.endswith("layernorm"):
        return "norms"
    if ".mlp.router" in name or ".mlp.extra_routers" in name:
        return "routers"
    if ".mlp.shared_experts" in name:
        return "shared expert"
    if ".mlp.experts" in name:
        return "routed experts"
    if ".mlp.iteration_norms" in name:
        return "iteration norms"
    if name.endswith(".mlp"):
        return "dispatch and residual"
    if "embedding" in name:
        return "embedding"
    if "decoder" in name:
        return "the layers' other work"
    return "output layer and loss"


class Labels:
    """The label of the module running now: its part, and for a per-iteration part its
    iteration (the how-manieth call of that part in the current MoE/CoE layer)."""

    def __init__(self, model):
        self.stack, self.calls = ["output layer and loss"], Counter()
        for name, module in model.named_modules():
            if not name:
                continue
            if name.endswith(".mlp"):  # a new MoE/CoE layer: iterations count from 1
                module.register_forward_pre_hook(lambda *a: self.calls.clear())
            path = name.split(".")
            entry = (path[-1] in ("router", "experts", "shared_experts")
                     or path[-2:-1] in (["extra_routers"], ["iteration_norms"]))
            module.register_forward_pre_hook(
                lambda *a, p=part_of(name), e=entry: self.stack.append(self._label(p, e)))
            module.register_forward_hook(self._leave)

    def _leave(self, *args) -> None:  # a forward hook: returning a value would replace outputs
        self.stack.pop()

    def _label(self, part: str, entry: bool) -> str:
        if entry:
            self.calls[part] += 1
            return f"{part} {self.calls[part]}"
        if part in PER_ITERATION:  # inside an iteration's module: that iteration
            return self.stack[-1]
        return part

    def __call__(self) -> str:
        return self.stack[-1]


def kept(path: str, mode: str, args) -> dict:
    """KiB per token by label, for ``path`` under recompute ``mode``."""
    import torch

    from megatron_coe.config import load_config
    from megatron_coe.model import build_model, with_resolved_impl
    from megatron_coe.optim import wrap_model
    from saved_tensors import SavedTensors

    config = with_resolved_impl(load_config(ROOT / path, [
        f"device={args.device}", "precision=bf16", "model.fused_kernels=triton",
        "model.loss_fusion=true", "model.swiglu_fusion=true", f"train.recompute={mode}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch}", *args.set]))
    torch.manual_seed(0)
    model = wrap_model(config, build_model(config))
    labels = Labels(model)
    s, b = config.model.seq_length, args.micro_batch
    tokens = torch.randint(0, config.model.vocab_size, (b, s + 1), device=args.device)
    position_ids = torch.arange(s, device=args.device).expand(b, s)
    with SavedTensors(model, labels) as saved:
        # the loss holds the graph, and so what it keeps, until the counts are read
        loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:])
        by_label = {k: v / (b * s) / 1024 for k, v in saved.by_label.items() if v}
        del loss
    return {"kib_per_token": by_label, "total": sum(by_label.values()),
            "layer": sum(v for k, v in by_label.items() if k.rstrip(" 0123456789")
                         in LAYER_PARTS),
            "tokens": b * s, "seq_length": s, "vocab_size": config.model.vocab_size,
            "hidden_size": config.model.hidden_size}


def logits_gradient_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """What the fused loss's gradient written over the logits takes off a bf16 peak: the loss's
    backward held logits and gradient, [T, V] each; the output layer's backward, now the peak,
    holds the gradient with the hidden states' [T, H] and the weight's [V, H] gradients."""
    return 2 * max(0, tokens * vocab - tokens * hidden - vocab * hidden)


def implied_peaks(results: dict, measured: dict, logits_freed: bool) -> dict:
    """GPU peaks (GiB) per config, mode and measured micro-batch, and the memory ratio."""
    out = {}
    for mb, entry in measured["paper"]["by_micro_batch"].items():
        for name, modes in results.items():
            peak = entry["variants"].get(name, {}).get("peak_mem_gib")
            if peak is None:
                continue
            base = modes["none"]
            tokens = int(mb) * base["seq_length"]
            for mode, r in modes.items():
                less = tokens * (base["layer"] - r["layer"]) * 1024
                if logits_freed:
                    less += logits_gradient_bytes(tokens, base["vocab_size"],
                                                  base["hidden_size"])
                out.setdefault(mb, {}).setdefault(mode, {})[name] = peak - less / 2**30
        for mode, peaks in out.get(mb, {}).items():
            if all(n in peaks for n in RATIO):
                peaks["ratio"] = peaks[RATIO[0]] / peaks[RATIO[1]]
    return out


def count_in_this_process(name: str, mode: str, args) -> dict:
    """kept() for the config called ``name``, in this process (``--worker``)."""
    if args.device == "cpu":  # the kernels through Triton's interpreter, set before its import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_coe import parallel
    from megatron_coe.config import load_config

    parallel.initialize(load_config(None, [f"device={args.device}"]))
    return kept(CONFIGS[name], mode, args)


def count_in_a_process(name: str, mode: str, args) -> dict:
    """kept() in a fresh process: a paper-scale model's memory is all returned after it."""
    cmd = [sys.executable, __file__, "--worker", name, mode, "--device", args.device,
           "--micro-batch", str(args.micro_batch), "--set", *args.set]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kept_memory: {name} under recompute {mode} failed:\n"
                         + done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--recompute", nargs="+", default=["none", "moe_act", "experts", "moe"])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], help="more config overrides")
    parser.add_argument("--measured", type=Path, help="a GPU check's JSON (part b)")
    parser.add_argument("--logits-gradient-freed", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:  # one config and mode in this process: its counts as the last line
        print(json.dumps(count_in_this_process(*args.worker, args)))
        return 0
    if "none" not in args.recompute:
        parser.error("--recompute needs none: the other modes are told against it")
    results: dict[str, dict] = {}
    for name in args.configs:
        for mode in args.recompute:
            r = results.setdefault(name, {})[mode] = count_in_a_process(name, mode, args)
            print(f"{name:12s} {mode:8s} kept {r['total']:7.1f} KiB/token, of which the "
                  f"MoE/CoE layers {r['layer']:6.1f}", flush=True)
    print("\nKiB per token, no recompute:")
    labels = sorted({k for modes in results.values() for k in modes["none"]["kib_per_token"]})
    print(f"{'part':26s}" + "".join(f"{n:>14s}" for n in results))
    for label in labels:
        print(f"{label:26s}" + "".join(
            f"{modes['none']['kib_per_token'].get(label, 0.0):14.2f}"
            for modes in results.values()))
    out = {"command": " ".join(sys.argv), "device": args.device,
           "micro_batch": args.micro_batch, "results": results}
    if args.measured:
        measured = json.loads(args.measured.read_text())
        peaks = implied_peaks(results, measured, args.logits_gradient_freed)
        print(f"\nGPU peaks implied from {args.measured} (GiB):")
        for mb, modes in peaks.items():
            for mode, p in modes.items():
                print(f"micro-batch {mb:>3s} {mode:8s} " + "  ".join(
                    f"{k} {v:.3f}" for k, v in p.items()))
        out.update(measured_from=str(args.measured), measured_date=measured.get("date"),
                   logits_gradient_freed=args.logits_gradient_freed, implied_peaks=peaks)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
