"""Host work per training step, CoE against MoE: ops launched, device reads, host time; with
``--profile``, where the device's time goes, by kernel class.

    python benchmarks/host_work.py                            # CPU: the paper configs' structure
    python benchmarks/host_work.py --device cuda --full-size --profile   # one GPU, paper sizes

On a GPU a small model's step is bound by the host when its kernels are short: the step then
takes the host's time per launched op times the ops, and every read of a device value
(``.item()``, a split size, a count moved to the host) drains the GPU's queue.  Both are counted
at PyTorch's dispatcher (megatron_coe/host_ops.py), where they do not depend on the device or
on the widths, so a CPU run gives a GPU run's counts (the CPU backend's own replacements left
out).  Per config (configs/paper: MoE(8/64), CoE-2(4/64), MoE(7/64), CoE-2(3/64)), in one rank:

- launches and syncs of one training step (after the warm-up, at least one step: the first
  makes one-off reads), split into the forward-backward schedule and the step after it (the
  loss, the gradient check and the update, as coe-train runs them: megatron_coe/optim_step.py
  with AdamW as on CUDA, torch's fused kernel), with the Python function behind each sync;
- launches per layer call (the step's forward-backward launches over layers x micro-batches)
  and the CoE/MoE ratios of launches and of step time;
- the median step time over ``--steps`` steps after ``--warmup``: on CPU at small widths this
  is mostly host time (Python, dispatch), the cost a GPU run pays per op before any kernel;
- with ``--profile``, a torch.profiler trace of two steps: on CUDA the kernels' time per class
  (GEMM, attention, element-wise, reductions, copies and indexing, optimizer, communication,
  memory copies) and the fraction of the steps' wall time during which some kernel ran (the
  rest is the GPU waiting for the host); on CPU the same classes over the ATen ops' own time.

Without ``--full-size`` the configs keep their structure (MLA, 4 layers, 63 or 47 routed + 1
shared expert become 15 or 11 + 1, same top-k and C) at hidden 64 and 2 x 64 tokens per
micro-batch, 4 micro-batches per step, as the paper's 32 x 512 tokens are 4 micro-batches of
8.  ``--full-size`` runs the paper configs as they are (bf16, 8 x 512 tokens per micro-batch):
a GPU's work.  Results go to ``--out`` as JSON; nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("MoE(8/64)", "moe-8of64.yaml"), ("CoE-2(4/64)", "coe-2-4of64.yaml"),
           ("MoE(7/64)", "moe-7of64.yaml"), ("CoE-2(3/64)", "coe-2-3of64.yaml")]
PAIRS = [("CoE-2(4/64)", "MoE(8/64)"), ("CoE-2(3/64)", "MoE(7/64)")]
PROFILED_STEPS = 2  # with --profile

# kernel (CUDA) or ATen op (CPU) name -> class; first match wins
CLASSES = [
    ("views (no kernel)", r"^aten::(as_strided|select|slice|view|_unsafe_view|expand|reshape|t|"
                          r"transpose|unsqueeze|squeeze|detach|alias|empty|empty_strided|"
                          r"permute|split|unbind|chunk|narrow|lift_fresh)$"),
    ("communication", r"nccl|all_to_all|allreduce|all_reduce|c10d|gloo"),
    # torch.compile's generated kernels (the fused SwiGLU), named after the ops they fuse
    ("compiled (Triton)", r"^triton_"),
    # this package's hand-written Triton kernels (model.fused_kernels: triton): the loss, the
    # SwiGLU, the rows' sums, the router, the rows' index, the weight gradients' sums
    ("Triton (this package)", r"^coe_"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(fprop|bprop|dgrad)|_efficient_attention"),
    ("GEMM", r"gemm|cutlass|xmma|cublas|nvjet|matmul|grouped_mm|\bmm\b|aten::mm|aten::bmm"
             r"|aten::addmm"
             r"|aten::linear|wgrad|dgrad"),
    ("memory copy", r"^memcpy|^memset|Memcpy|Memset"),
    ("copy, index, permute", r"index|gather|scatter|copy|cat|sort|radix|topk|permute|nonzero"
                             r"|masked|split|transpose|contiguous|clone|stack|where"),
    ("reduction, softmax, norm", r"reduce|softmax|norm|sum|mean|amax|aminmax|max|min|argmax"
                                  r"|cumsum|scan"),
    ("element-wise", r"elementwise|vectorized|unrolled|pointwise|fill|silu|gelu|mul|add|div|sub"
                     r"|exp|log|sqrt|rsqrt|pow|neg|sigmoid|tanh|clamp|eq|ne|lt|gt|bitwise|abs"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in CLASSES:
        if re.search(pattern, low if cls != "memory copy" else name):
            return cls
    return "other"


def variants(args):
    from megatron_coe.gpu_check import toy_overrides

    from megatron_coe.config import load_config

    common = [f"device={args.device}", "data.source=arithmetic", "data.paths=[]",
              "data.tokenizer=byte", "train.tensorboard=false", "schedule.warmup_steps=0",
              f"train.steps={max(1, args.warmup) + args.steps + 3}"]
    out = []
    for name, file in CONFIGS:
        if name not in args.configs:
            continue
        path = ROOT / "configs" / "paper" / file
        overrides = list(common)
        if not args.full_size:
            base = load_config(path, overrides)
            overrides += toy_overrides(base.model.moe.num_experts)
            overrides += ["model.num_layers=4", "train.micro_batch_size=2",
                          "train.global_batch_size=8"]
            if args.device == "cpu":
                overrides.append("precision=fp32")
        out.append((name, path, overrides + args.set))
    return out


def profile_classes(prof, device: str, wall_s: float) -> dict:
    """Time per class of the profiled kernels (CUDA) or ATen ops' self time (CPU), and on CUDA
    the fraction of the wall time covered by at least one kernel."""
    from torch.autograd import DeviceType

    per_class: dict[str, float] = collections.defaultdict(float)
    top: dict[str, float] = collections.defaultdict(float)
    spans = []
    for evt in prof.events():
        if device == "cuda":
            # kernels only: a user annotation (record_function, the optimizer's step) spans
            # kernels already counted
            if evt.device_type != DeviceType.CUDA or evt.is_user_annotation:
                continue
            us = evt.time_range.end - evt.time_range.start
            spans.append((evt.time_range.start, evt.time_range.end))
        else:
            if evt.device_type != DeviceType.CPU or not evt.name.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        per_class[kernel_class(evt.name)] += us
        top[evt.name] += us
    busy = None
    if spans:  # union of the kernels' intervals
        spans.sort()
        covered, (lo, hi) = 0.0, spans[0]
        for a, b in spans[1:]:
            if a > hi:
                covered, lo, hi = covered + hi - lo, a, b
            else:
                hi = max(hi, b)
        covered += hi - lo
        busy = covered / 1e6 / wall_s
    total = sum(per_class.values()) or 1.0
    ms = 1e3 * PROFILED_STEPS  # microseconds over the profiled steps -> ms per step
    return {"ms_per_step": {k: v / ms for k, v in sorted(per_class.items(),
                                                         key=lambda kv: -kv[1])},
            "share": {k: v / total for k, v in per_class.items()},
            "busy_fraction": busy,
            "top": {k: v / ms for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]}}


def run(args):
    """Every config in turn on this one rank: counts, step times, profile; each config's run
    directory (its prepared data) in a temporary directory removed at the end."""
    with tempfile.TemporaryDirectory(prefix="coe-host-work-") as tmp:
        return _run(args, Path(tmp))


def _run(args, tmp: Path):
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model
    from megatron.core.transformer.moe import moe_logging

    from megatron_coe import cuda_graph, parallel
    from megatron_coe.config import load_config
    from megatron_coe.data import dataset
    from megatron_coe.host_ops import HostOps
    from megatron_coe.metrics import train_flops_per_token
    from megatron_coe.optim import adam_implementation, use_adam_implementation
    from megatron_coe.optim_step import take_step
    from megatron_coe.step_profiler import write_trace
    from megatron_coe.train import run_schedule

    from variant import build_variant

    results = {}
    for name, path, overrides in variants(args):
        moe_logging.destroy_moe_metrics_tracker()
        config = load_config(path, overrides)
        if cuda_graph.enabled(config):  # its steps call the schedule itself, eagerly
            raise ValueError("host_work counts and times the eager step; the CUDA graph's step "
                             "time: gpu_check --compare train.cuda_graph=full_iteration")
        device = parallel.initialize(config)
        run_dir = tmp / path.stem
        run_dir.mkdir()
        model, optimizer, scheduler, train_ds = build_variant(config, run_dir)
        use_adam_implementation(optimizer, adam_implementation("cuda"))  # as on a GPU
        t = config.train
        dp = parallel_state.get_data_parallel_world_size()

        def step(i, counts=None):
            batches = list(dataset.micro_batches(train_ds, i * t.global_batch_size,
                                                 t.global_batch_size, t.micro_batch_size, 0, dp))
            model.zero_grad_buffer()
            optimizer.zero_grad()
            counter = HostOps if counts else contextlib.nullcontext
            regions = {}
            with counter() as regions["forward-backward"]:
                total = run_schedule(model, batches, config, False)
            with counter() as regions["step (loss, check, update)"]:
                loss = take_step(model, optimizer, scheduler, total, config, device).loss
            if device.type == "cuda":
                torch.cuda.synchronize()
            return loss, regions

        warm = max(1, args.warmup)  # the first step makes one-off reads (optimizer setup)
        for i in range(warm):
            step(i)
        times = []
        for i in range(warm, warm + args.steps):
            began = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - began)
        profile = None
        if args.profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                                   if device.type == "cuda" else [])
            began = time.perf_counter()
            with torch_profile(activities=activities, record_shapes=bool(args.trace),
                               with_stack=bool(args.trace)) as prof:
                for i in range(PROFILED_STEPS):
                    step(warm + args.steps + i)
            profile = profile_classes(prof, device.type, time.perf_counter() - began)
            if args.trace:  # for chrome://tracing or Perfetto, gzipped
                trace = write_trace(prof, Path(args.trace) / f"{path.stem}.json.gz")
                profile["trace"] = str(trace)
            # shapes and Python stacks cost host time: busy_fraction is lower with --trace
            profile["with_stack"] = bool(args.trace)
        # counted last: under the counting dispatch mode TorchDynamo runs compiled functions
        # eagerly (megatron_coe/host_ops.py), which must not reach the timed or profiled steps
        _, regions = step(warm + args.steps + (PROFILED_STEPS if args.profile else 0),
                          counts=True)
        micros = t.global_batch_size // t.micro_batch_size // dp
        fb = regions["forward-backward"]
        results[name] = {
            "config": str(path.relative_to(ROOT)), "overrides": overrides,
            "parameters_tensors": sum(1 for _ in model.parameters()),
            # counted eagerly when on (megatron_coe/host_ops.py); profiled as compiled
            "swiglu_fusion": bool(model.config.bias_activation_fusion),
            "loss_fusion": bool(unwrap_model(model).loss_fusion),
            "fused_kernels": unwrap_model(model).fused_kernels,
            "layers": config.model.num_layers, "micro_batches": micros,
            "tokens_per_step": t.global_batch_size * config.model.seq_length,
            "flops_per_token": train_flops_per_token(config),
            "launches": {k: r.launches for k, r in regions.items()},
            "syncs": {k: r.syncs for k, r in regions.items()},
            "sync_sites": {k: dict(r.sync_sites) for k, r in regions.items()},
            "top_ops": dict(fb.by_op.most_common(12)),
            "launches_per_layer_call": fb.launches / (config.model.num_layers * micros),
            "step_s": times, "median_step_s": statistics.median(times), "profile": profile}
        r = results[name]
        print(f"{name:12s} launches/step {sum(r['launches'].values()):6d} "
              f"({', '.join(f'{k} {v}' for k, v in r['launches'].items())}), "
              f"syncs/step {sum(r['syncs'].values())}, launches per layer call "
              f"{r['launches_per_layer_call']:.0f}, step {r['median_step_s'] * 1e3:.1f} ms",
              flush=True)
        if profile:
            shares = ", ".join(f"{k} {v:.1f} ms" for k, v in profile["ms_per_step"].items())
            busy = (f"; device busy {profile['busy_fraction'] * 100:.0f} % of the wall time"
                    if profile["busy_fraction"] is not None else "")
            print(f"{'':12s} per step: {shares}{busy}", flush=True)
        del model, optimizer
        parallel.destroy()
    ratios = {}
    for coe, moe in PAIRS:
        if coe not in results or moe not in results:
            continue
        a, b = results[coe], results[moe]
        ratios[f"{coe} / {moe}"] = {
            "launches": sum(a["launches"].values()) / sum(b["launches"].values()),
            "launches_per_layer_call": a["launches_per_layer_call"]
            / b["launches_per_layer_call"],
            "step_time": a["median_step_s"] / b["median_step_s"],
            "flops_per_token": a["flops_per_token"] / b["flops_per_token"]}
        q = ratios[f"{coe} / {moe}"]
        print(f"{coe} / {moe}: launches {q['launches']:.3f}, step time {q['step_time']:.3f}, "
              f"FLOPs per token {q['flops_per_token']:.3f}", flush=True)
    return {"device": args.device, "full_size": args.full_size, "configs": results,
            "ratios": ratios}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--full-size", action="store_true",
                   help="the paper configs as they are (a GPU's work), not their structure at "
                   "small widths")
    p.add_argument("--profile", action="store_true",
                   help="also profile two steps: time per kernel class (per ATen op class on "
                   "CPU), and on CUDA the fraction of the time some kernel runs")
    p.add_argument("--trace", metavar="DIR",
                   help="with --profile: also write each config's trace (shapes and Python "
                   "stacks) to DIR/<config>.json.gz, for chrome://tracing or Perfetto")
    p.add_argument("--configs", nargs="+", default=[name for name, _ in CONFIGS],
                   choices=[name for name, _ in CONFIGS], metavar="NAME",
                   help="which configs (default: all four); ratios need both of a pair")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides for every config")
    p.add_argument("--out", default="benchmarks/results/host_work_cpu.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.trace and not args.profile:
        p.error("--trace needs --profile")
    sys.path.insert(0, str(ROOT))
    from processes import spawn, write_results

    result = spawn(run, 1, args)
    write_results(args.out, args, [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
