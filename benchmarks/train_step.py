"""Whole training steps of CoE against MoE at equal expert passes, as coe-train runs them.

    python benchmarks/train_step.py                  # CPU: CoE-2(4/64) vs MoE(8/64), EP = 1 and 2
    python benchmarks/train_step.py --ep 2 --rounds 40 --out benchmarks/results/train_step_cpu.json

A step is what the training loop does between two log lines: zero the gradient buffers, run
Megatron's forward-backward schedule over the step's micro-batches (train.run_schedule, real
batches from the config's data), check the gradients are finite, and take the optimizer step
under the loop's CPU remapping.  Every variant (CoE and MoE, and at EP > 1 each on the plain and
the overlapped expert-parallel schedule) is built in the same processes and they take turns, one
step each per round (A B C D A B C D ...), with a barrier before every step, so a slow moment of
this shared host lands on all of them.  Printed per comparison: the median of the per-round
ratios with their quartiles, each variant's median step time, and the ratio of training FLOPs
per token (CoE-2(4/64) runs its shared expert twice: 10 expert passes per token against 9).
Every step's loss is kept as well: the overlapped schedule must reproduce the plain one's
exactly, and the output says whether it did.  Results go to ``--out`` as JSON.  A measurement,
not a test.

The configs are the CPU-scale paper configs (configs/tiny/coe-2-4of64.yaml and moe-8of64.yaml:
4 layers, hidden 128, MLA, 63 routed + 1 shared expert of hidden 88).  At EP > 1 the routed
count becomes 64, since EP must divide it (``--experts-ep``).  ``--set KEY=VALUE ...`` applies
more overrides to both configs (e.g. ``model.seq_length=1024``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PAIR = ("configs/tiny/coe-2-4of64.yaml", "configs/tiny/moe-8of64.yaml")


def variants(args, ep):
    """(label, config path, overrides) of every variant timed on ``ep`` ranks."""
    common = [f"parallel.expert={ep}", f"train.micro_batch_size={args.micro_batch}",
              f"train.global_batch_size={args.micro_batch * args.micros * ep}"]
    if ep > 1:
        common.append(f"model.moe.num_experts={args.experts_ep}")
    common += args.set
    out = []
    for path, name in zip(PAIR, ("CoE-2(4/64)", "MoE(8/64)")):
        out.append((f"{name} plain", path, common))
        if ep > 1:
            out.append((f"{name} overlapped", path,
                        common + ["parallel.overlap_expert_comm=true"]))
    return out


def run(args, ep):
    """Build every variant on this rank, then time ``args.rounds`` rounds of one step each."""
    from megatron_coe import parallel

    tmp = [tempfile.mkdtemp(prefix="coe-train-step-") if int(os.environ["RANK"]) == 0 else None]
    try:
        return _timed_rounds(args, ep, tmp)
    finally:
        if tmp[0] and int(os.environ["RANK"]) == 0:
            shutil.rmtree(tmp[0], ignore_errors=True)
        parallel.destroy()


def _timed_rounds(args, ep, tmp):
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from megatron_coe import parallel
    from megatron_coe.config import load_config
    from megatron_coe.data import dataset
    from megatron_coe.metrics import train_flops_per_token
    from megatron_coe.model import coe_layers
    from megatron_coe.optim_step import take_step
    from megatron_coe.train import run_schedule

    from variant import build_variant

    timers = comm = None
    if args.phases:
        from phases import PhaseTimers

        timers = PhaseTimers().install()
    if args.comm:
        from comm import CollectiveTimers

        comm = CollectiveTimers().install()
    built = []
    for label, path, overrides in variants(args, ep):
        config = load_config(path, overrides)
        device = parallel.initialize(config)
        if not built:  # rank 0 writes the data, the others read it from the same directory
            dist.broadcast_object_list(tmp, src=0)
        run_dir = Path(tmp[0]) / str(len(built))
        if dist.get_rank() == 0:
            run_dir.mkdir()
        dist.barrier()
        model, optimizer, scheduler, train_ds = build_variant(config, run_dir)
        built.append((label, config, model, optimizer, scheduler, train_ds))

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def step(config, model, optimizer, scheduler, train_ds, i):
        t = config.train
        batches = list(dataset.micro_batches(train_ds, i * t.global_batch_size,
                                             t.global_batch_size, t.micro_batch_size,
                                             dp_rank, dp_size))
        model.zero_grad_buffer()
        optimizer.zero_grad()
        total = run_schedule(model, batches, config, forward_only=False)
        return take_step(model, optimizer, scheduler, total, config, device).loss

    # Each variant draws from its own random streams (torch's and Megatron's tracker), as it
    # would alone, so that plain and overlapped runs stay comparable with dropout on.
    rng = {label: (torch.get_rng_state(), tracker.get_states()) for label, *_ in built}
    times = {label: [] for label, *_ in built}
    losses = {label: [] for label, *_ in built}
    phase_ms = {label: [] for label, *_ in built}
    phase_calls = {}
    comm_ms = {label: [] for label, *_ in built}  # this rank's, per step: collective -> ms
    comm_calls = {label: [] for label, *_ in built}
    a2a_bytes = {label: [] for label, *_ in built}
    counters = {label: [layer.token_dispatcher.counters for layer in coe_layers(model)]
                for label, _, model, *_ in built} if comm else {}
    for i in range(args.warmup + args.rounds):
        for label, config, model, optimizer, scheduler, train_ds in built:
            torch.set_rng_state(rng[label][0])
            tracker.set_states(rng[label][1])
            dist.barrier()
            before = timers.snapshot() if timers else None
            before_comm = comm.snapshot() if comm else None
            for counter in counters.get(label, ()):
                counter.reset()
            start = time.perf_counter()
            loss = step(config, model, optimizer, scheduler, train_ds, i)
            if i >= args.warmup:
                times[label].append(time.perf_counter() - start)
                if timers:
                    ms, phase_calls[label] = timers.since(before)
                    phase_ms[label].append(ms)
                if comm:
                    ms, calls = comm.since(before_comm)
                    comm_ms[label].append(ms)
                    comm_calls[label].append(calls)
                    sent = [counter.total() for counter in counters[label]]
                    a2a_bytes[label].append(sum(t["sent_bytes"] - t["self_bytes"] for t in sent))
            rng[label] = (torch.get_rng_state(), tracker.get_states())
            losses[label].append(loss)
    dist.barrier()
    comm_ranks = None
    if comm:  # every rank's collective times, and the idle transport's, gathered on rank 0
        from comm import probe_all_to_all

        comm.uninstall()
        probe = probe_all_to_all(parallel_state.get_expert_model_parallel_group())
        comm_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(comm_ranks, {"ms": comm_ms, "calls": comm_calls,
                                            "a2a_bytes_to_peers": a2a_bytes, "probe": probe})
    t = built[0][1].train
    return {"ep": ep, "tokens_per_step": t.global_batch_size * built[0][1].model.seq_length,
            "step_s": times, "losses": losses,
            "phase_ms": phase_ms if timers else None, "phase_calls": phase_calls,
            "comm": comm_ranks,
            "flops_per_token": {label: train_flops_per_token(config)
                                for label, config, *_ in built}}


def quartiles(xs):
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2]}


def compare(step_s, a, b):
    """Per-round ratios a / b (the rounds are alternated, so each ratio shares its moment)."""
    return quartiles([x / y for x, y in zip(step_s[a], step_s[b])])


def _median_per_name(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median over steps of each name's ms (0 in a step that did not call it)."""
    return {k: statistics.median(step.get(k, 0.0) for step in steps)
            for k in sorted({k for step in steps for k in step})}


def summarize(res):
    s = res["step_s"]
    flops = res["flops_per_token"]
    out = {"ep": res["ep"], "tokens_per_step": res["tokens_per_step"],
           "median_step_s": {k: statistics.median(v) for k, v in s.items()},
           "flops_per_token": flops,
           "flops_coe_over_moe": flops["CoE-2(4/64) plain"] / flops["MoE(8/64) plain"],
           "coe_over_moe": {"plain": compare(s, "CoE-2(4/64) plain", "MoE(8/64) plain")}}
    if res["phase_ms"]:  # rank 0's forward phases: median ms per step, calls per step
        out["phase_ms"] = {label: _median_per_name(steps)
                           for label, steps in res["phase_ms"].items()}
        out["phase_calls"] = res["phase_calls"]
    if res.get("comm"):
        out["comm"] = _summarize_comm(res["comm"])
    out["step_s"], out["losses"] = s, res["losses"]  # every timed step, every step's loss
    if res["ep"] > 1:  # the overlapped schedule must train exactly like the plain one
        out["overlapped_losses_equal_plain"] = {
            name: res["losses"][f"{name} overlapped"] == res["losses"][f"{name} plain"]
            for name in ("CoE-2(4/64)", "MoE(8/64)")}
        out["coe_over_moe"]["overlapped"] = compare(s, "CoE-2(4/64) overlapped",
                                                    "MoE(8/64) overlapped")
        out["overlapped_over_plain"] = {
            name: compare(s, f"{name} overlapped", f"{name} plain")
            for name in ("CoE-2(4/64)", "MoE(8/64)")}
    return out


def _summarize_comm(ranks):
    """Per variant and rank: median ms and calls per step of each collective, and (with a peer)
    the all-to-alls' time against what their calls and bytes take on the idle transport."""
    out = {"probe": [r["probe"] for r in ranks], "variants": {}}
    for label in ranks[0]["ms"]:
        per_rank = []
        for r in ranks:
            ms, calls = _median_per_name(r["ms"][label]), _median_per_name(r["calls"][label])
            sent = statistics.median(r["a2a_bytes_to_peers"][label])
            entry = {"ms": ms, "calls": calls, "a2a_bytes_to_peers": sent}
            if r["probe"] is not None:  # EP = 1 has no peer, and no all-to-all
                idle = (calls.get("all_to_all_single", 0) * r["probe"]["latency_ms"]
                        + sent / (r["probe"]["gb_per_s"] * 1e9) * 1e3)
                entry["a2a_idle_transport_ms"] = idle
                entry["a2a_beyond_transport_ms"] = ms.get("all_to_all_single", 0.0) - idle
            per_rank.append(entry)
        out["variants"][label] = per_rank
    return out


def _report_comm(summary):
    ep, comm = summary["ep"], summary["comm"]
    if all(p is not None for p in comm["probe"]):
        probes = "; ".join(f"rank {i}: latency {p['latency_ms']:.2f} ms, {p['gb_per_s']:.2f} GB/s"
                           for i, p in enumerate(comm["probe"]))
        print(f"EP={ep} idle all-to-all transport: {probes}")
    print(f"EP={ep} collectives, median ms per step (calls per step), rank 0 / rank 1 ...")
    for label, ranks in comm["variants"].items():
        names = sorted({k for r in ranks for k in r["ms"]})
        for name in names:
            print(f"EP={ep}   {label:24s} {name:28s}" + " /".join(
                f"{r['ms'].get(name, 0.0):7.1f} ({r['calls'].get(name, 0):3.0f})" for r in ranks))
        if "a2a_idle_transport_ms" not in ranks[0]:
            continue
        print(f"EP={ep}   {label:24s} {'a2a on idle transport':28s}" + " /".join(
            f"{r['a2a_idle_transport_ms']:7.1f}      " for r in ranks)
            + "  (" + ", ".join(f"{r['a2a_bytes_to_peers'] / 2**20:.1f} MiB" for r in ranks)
            + " to peers)")
        print(f"EP={ep}   {label:24s} {'a2a beyond it':28s}" + " /".join(
            f"{r['a2a_beyond_transport_ms']:7.1f}      " for r in ranks))


def report(summary):
    ep = summary["ep"]
    print(f"EP={ep} training FLOPs per token CoE-2(4/64) / MoE(8/64) = "
          f"{summary['flops_coe_over_moe']:.3f} (the shared expert runs in every iteration)")
    for label, t in summary["median_step_s"].items():
        print(f"EP={ep} {label:24s} step {t * 1e3:7.1f} ms "
              f"({summary['tokens_per_step'] / t:,.0f} tokens/s)")
    for name, same in summary.get("overlapped_losses_equal_plain", {}).items():
        print(f"EP={ep} {name}: losses of every step, overlapped == plain: {same}")
    if "phase_ms" in summary:
        _report_phases(summary)
    if "comm" in summary:
        _report_comm(summary)
    for group in ("coe_over_moe", "overlapped_over_plain"):
        for name, r in summary.get(group, {}).items():
            what = "CoE-2(4/64) / MoE(8/64)" if group == "coe_over_moe" else "overlapped / plain"
            print(f"EP={ep} {what}, {name}: {r['median']:.3f} "
                  f"(quartiles {r['q1']:.3f}-{r['q3']:.3f})")


def _report_phases(summary):
    """Rank 0's forward time per layer phase (benchmarks/phases.py), one column per variant."""
    ep, phases = summary["ep"], summary["phase_ms"]
    labels = list(phases)
    names = ["router", "preprocess", "dispatch", "experts", "combine", "postprocess", "shared",
             "overlapped"]
    print(f"EP={ep} forward ms per step on rank 0 (calls): " + " | ".join(labels))
    for name in names:
        if any(name in phases[label] for label in labels):
            print(f"EP={ep}   {name:12s}" + "".join(
                f"{phases[label].get(name, 0.0):9.1f} ({summary['phase_calls'][label].get(name, 0):3d})"
                for label in labels))
    layer = {label: phases[label].get("layer", 0.0) for label in labels}
    rows = {"layer glue": {label: layer[label] - sum(phases[label].get(n, 0.0) for n in names)
                           for label in labels},
            "layer total": layer,
            "rest of step": {label: summary["median_step_s"][label] * 1e3 - layer[label]
                             for label in labels}}
    for what, row in rows.items():
        print(f"EP={ep}   {what:12s}" + "".join(f"{row[label]:9.1f}      " for label in labels))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    p.add_argument("--experts-ep", type=int, default=64,
                   help="routed experts at EP > 1 (EP must divide it)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--micros", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides, applied to both configs")
    p.add_argument("--phases", action="store_true",
                   help="also time the layer's forward phases (router, permutation, all-to-alls, "
                   "experts, ...) on rank 0: benchmarks/phases.py")
    p.add_argument("--comm", action="store_true",
                   help="also time every rank's collectives per step, and the idle all-to-all "
                   "transport's latency and bandwidth: benchmarks/comm.py")
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.micro_batch < 1 or args.micros < 1:
        p.error("--rounds, --micro-batch and --micros must be >= 1, --warmup >= 0")
    from processes import spawn, write_results

    summaries = []
    for ep in args.ep:
        summary = summarize(spawn(run, ep, args, ep))
        report(summary)
        summaries.append(summary)
    write_results(args.out, args, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
