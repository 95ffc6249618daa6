"""CoE layer cost against MoE at equal expert passes per token: time, all-to-all, memory.

    python benchmarks/coe_layer.py                      # CPU, 1 rank (EP = 1) and 2 ranks (EP = 2)
    python benchmarks/coe_layer.py --ep 2 --hidden 1024 --expert-hidden 704 --tokens 1024
    python benchmarks/coe_layer.py --device cuda --precision bf16 --ep 1   # on a GPU with TE

For each pair it builds both layers (63 routed + 1 shared expert, DeepSeek-V2-Lite style, the
shared expert counted as a pass), then times forward+backward alternately (A B A B ...) and
prints the median ratio CoE / MoE.  Also printed, per layer and step: all-to-all calls and
bytes (summed over the expert-parallel ranks) from the dispatcher's counters with the
expected values beside them, and the activation memory kept for backward (bytes of the tensors
autograd saves, measured with saved-tensor hooks).  Then: time against C; at EP > 1 the
overlapped schedule (parallel.overlap_expert_comm) against the plain one; CoE-2(4/64) / MoE(8/64)
at other tokens per rank (--tokens-sweep); and what recomputing the whole MoE/CoE layer in
backward (train.recompute=moe), or only each iteration's expert MLPs (train.recompute=experts),
or only the grouped experts' activation (train.recompute=moe_act, against grouped experts),
costs in time and gives back in saved activations, beside the fused SwiGLU
(model.swiglu_fusion) (kept after
the forward, and peak over forward + backward, the recomputed forward included); and on CPU the
local spec's LocalExperts against Megatron's SequentialMLP forward; and grouped-GEMM experts
(model.moe.grouped_gemm: GroupedExperts on CPU, TEGroupedMLP with TE) against one GEMM per
expert (LocalExperts on CPU, SequentialMLP with TE), alternated --overlap-repeat times.  Results go
to ``--out`` as JSON.  Nothing here passes or fails: these are measurements.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from saved_tensors import SavedTensors

PAIRS = [  # (name, iterations, topk) ; CoE first, MoE at the same expert passes second
    ("CoE-2(4/64) vs MoE(8/64)", (2, 4), (1, 8)),
    ("CoE-4(2/64) vs MoE(8/64)", (4, 2), (1, 8)),
    ("CoE-2(8/64) vs MoE(16/64)", (2, 8), (1, 16)),
]
SCALING = [(c, 2) for c in (1, 2, 3, 4)]  # time vs C at fixed k
SECTIONS = ["pairs", "scaling", "overlap", "tokens", "recompute", "experts", "grouped"]


def make_config(args, iterations, topk, overlap=False, recompute="none", grouped=None,
                fusion=None):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "device": args.device, "precision": args.precision,
        "model": {"num_layers": 1, "hidden_size": args.hidden, "num_attention_heads": 8,
                  "swiglu_fusion": fusion,
                  "moe": {"num_experts": 63 if args.ep in (1, 3, 7) else 64, "topk": topk,
                          "expert_hidden_size": args.expert_hidden,
                          "shared_expert_hidden_size": None if args.no_shared_expert
                          else args.expert_hidden,
                          "aux_loss": "seq_aux_loss",
                          "grouped_gemm": args.device == "cuda" if grouped is None else grouped},
                  "coe": {"iterations": iterations}},
        "parallel": {"expert": args.ep, "overlap_expert_comm": bool(overlap) and args.ep > 1},
        "train": {"recompute": recompute},
    })


def saved_activation_bytes(layer, x) -> dict[str, int]:
    """Bytes of the non-parameter tensors autograd holds for backward, over one forward +
    backward: "kept" after the forward (what waits for backward), "peak" at any moment
    (recompute included: the recomputed forward's tensors count while they live)."""
    with SavedTensors(layer) as saved:
        y, _ = layer(x)
        kept = saved.now
        y.float().sum().backward()
    return {"kept": kept, "peak": saved.peak}


def fwd_bwd(layer, x):
    y, _ = layer(x)
    y.float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def bench(args, configs, tokens=None, repeat=None, megatron_experts=()):
    """Build one layer per config (same seed), time forward+backward of each in turn (A B A B
    ...), and read each one's all-to-all counters and saved activations.  Layers whose index is
    in ``megatron_experts`` run their experts through SequentialMLP's own forward instead of
    LocalExperts' lean one (same weights, bit-identical results)."""
    from megatron_coe.model import build_moe_layer

    layers = []
    for i, config in enumerate(configs):
        torch.manual_seed(0)
        layers.append(build_moe_layer(config))
        if i in megatron_experts:
            from megatron_coe.model.experts import LocalExperts

            assert isinstance(layers[-1].experts, LocalExperts), type(layers[-1].experts)
            layers[-1].experts._lean = False
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    device = next(layers[0].parameters()).device
    if dtype != torch.float32:
        layers = [layer.to(dtype) for layer in layers]
    for layer in layers:
        layer.train()
    x = torch.randn(tokens or args.tokens, 1, args.hidden, device=device, dtype=dtype,
                    requires_grad=True)
    times = [[] for _ in layers]
    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    for i in range(args.warmup + (repeat or args.repeat)):
        for j, layer in enumerate(layers):
            layer.token_dispatcher.counters.reset()
            if distributed:  # every rank starts together: no wait leaks into the next timing
                torch.distributed.barrier()
            start = time.perf_counter()
            fwd_bwd(layer, x)
            if i >= args.warmup:
                times[j].append(time.perf_counter() - start)
    a2a = []
    for layer in layers:  # calls per rank; bytes summed over the expert-parallel ranks
        total = layer.token_dispatcher.counters.total()
        sent = torch.tensor([total["sent_bytes"]], dtype=torch.float64)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sent)
        a2a.append({"calls": total["calls"], "sent_bytes": int(sent.item())})
    acts = [saved_activation_bytes(layer, x) for layer in layers]
    return [statistics.median(t) for t in times], a2a, acts


def expected_a2a(args, iterations, topk, ep, overlap=False):
    """Per layer, one forward+backward, dropless, all EP ranks together: each rank makes 2*C
    calls each way (4*C with the overlapped schedule: two halves per exchange); every
    token-expert pair crosses once per direction in dispatch (hidden + a 4-byte prob) and once
    in combine (hidden), forward and backward."""
    if ep == 1:
        return {"calls": 0, "sent_bytes": 0}
    elem = {"fp32": 4, "bf16": 2}[args.precision]
    pairs = ep * args.tokens * topk * iterations
    return {"calls": 4 * iterations * (2 if overlap else 1),
            "sent_bytes": 2 * pairs * (2 * args.hidden * elem + 4)}


def side_by_side(times, before: str, after: str) -> dict:
    """Medians of [CoE before, CoE after, MoE before, MoE after] (one alternated run), with
    the after / before ratio of each layer and the CoE / MoE ratio of each variant."""
    names = [f"{layer}_{variant}" for layer in ("coe", "moe") for variant in (before, after)]
    return {"median_s": dict(zip(names, times)),
            f"{after}_over_{before}": {"coe": times[1] / times[0], "moe": times[3] / times[2]},
            "coe_over_moe": {before: times[0] / times[2], after: times[1] / times[3]}}


def side_by_side_line(r, before: str, after: str) -> str:
    t, g, c = r["median_s"], r[f"{after}_over_{before}"], r["coe_over_moe"]
    return (f"CoE-2(4/64) {t[f'coe_{before}'] * 1e3:.1f} -> {t[f'coe_{after}'] * 1e3:.1f} ms "
            f"(x{g['coe']:.3f}), MoE(8/64) {t[f'moe_{before}'] * 1e3:.1f} -> "
            f"{t[f'moe_{after}'] * 1e3:.1f} ms (x{g['moe']:.3f}); CoE/MoE {c[before]:.3f} -> "
            f"{c[after]:.3f}")


def run(args):
    """One rank's share of every comparison; rank 0's results are returned."""
    import torch.distributed as dist

    from megatron_coe import parallel

    ep = args.ep
    res = {"pairs": [], "scaling_with_C": [], "overlap": [], "tokens_sweep": [], "recompute": [],
           "experts": [], "grouped": []}
    want = set(args.sections)
    for name, coe, moe in PAIRS if "pairs" in want else ():
        times, a2a, acts = bench(args, [make_config(args, *coe), make_config(args, *moe)])
        res["pairs"].append({
            "pair": name, "ep": ep, "tokens_per_rank": args.tokens, "median_s": times,
            "ratio": times[0] / times[1], "a2a": a2a,
            "a2a_expected": [expected_a2a(args, *coe, ep), expected_a2a(args, *moe, ep)],
            "activation_bytes": [a["kept"] for a in acts]})
    for c, k in SCALING if "scaling" in want else ():
        times, _, acts = bench(args, [make_config(args, c, k), make_config(args, 1, k)])
        res["scaling_with_C"].append({"C": c, "topk": k, "median_s": times[0],
                                      "ratio_to_C1": times[0] / times[1],
                                      "activation_bytes": acts[0]["kept"]})
    coe, moe = PAIRS[0][1], PAIRS[0][2]
    if ep > 1 and "overlap" in want:  # plain and overlapped CoE-2(4/64) and MoE(8/64), alternated
        configs = [make_config(args, *shape, overlap=o) for shape in (coe, moe) for o in (0, 1)]
        times, a2a, _ = bench(args, configs, repeat=args.overlap_repeat)
        res["overlap"].append({
            **side_by_side(times, "plain", "overlap"),
            "a2a": a2a,
            "a2a_expected": [expected_a2a(args, *coe, ep, o) for o in (0, 1)]
            + [expected_a2a(args, *moe, ep, o) for o in (0, 1)]})
    # other tokens per rank; at EP > 1 with the overlapped schedule too
    for tokens in args.tokens_sweep if "tokens" in want else ():
        modes = (0, 1) if ep > 1 else (0,)
        configs = [make_config(args, *shape, overlap=o) for o in modes for shape in (coe, moe)]
        times, _, _ = bench(args, configs, tokens)
        res["tokens_sweep"].append({"tokens_per_rank": tokens, "median_s": times[:2],
                                    "ratio": times[0] / times[1],
                                    "ratio_overlapped": times[2] / times[3] if ep > 1 else None,
                                    "median_s_overlapped": times[2:]})
    if "recompute" in want:
        # unfused SwiGLU throughout but in the last rows
        modes = {"none": "", "moe": " + recompute", "experts": " + expert recompute"}
        configs = [make_config(args, *shape, recompute=r, fusion=False) for shape in (coe, moe)
                   for r in modes]
        labels = [name + suffix for name in ("CoE-2(4/64)", "MoE(8/64)")
                  for suffix in modes.values()]
        # moe_act recomputes grouped experts' activation, and the fused SwiGLU keeps less of
        # it: against grouped experts keeping it
        for name, shape in (("CoE-2(4/64)", coe), ("MoE(8/64)", moe)):
            for r, fusion, suffix in (("none", False, ", grouped"),
                                      ("moe_act", False, ", grouped + activation recompute"),
                                      ("none", True, ", grouped + fused SwiGLU")):
                configs.append(make_config(args, *shape, recompute=r, grouped=True,
                                           fusion=fusion))
                labels.append(name + suffix)
        times, _, acts = bench(args, configs)
        for label, t, a in zip(labels, times, acts):
            res["recompute"].append({"layer": label, "median_s": t, **a})
    if args.device == "cpu" and "experts" in want:  # LocalExperts against SequentialMLP
        configs = [make_config(args, *shape) for shape in (coe, moe) for _ in (0, 1)]
        times, _, _ = bench(args, configs, megatron_experts=(0, 2))
        res["experts"].append(side_by_side(times, "megatron", "local"))
    if "grouped" in want:  # per-expert GEMMs (LocalExperts / SequentialMLP) against grouped
        configs = [make_config(args, *shape, grouped=g) for shape in (coe, moe)
                   for g in (False, True)]
        times, _, _ = bench(args, configs, repeat=args.overlap_repeat)
        res["grouped"].append(side_by_side(times, "loop", "grouped"))
    dist.barrier()
    parallel.destroy()
    return res


def report(res, ep):
    for r in res["pairs"]:
        print(f"EP={ep} {r['pair']:28s} time CoE/MoE = {r['ratio']:.3f} "
              f"({r['median_s'][0] * 1e3:.1f} / {r['median_s'][1] * 1e3:.1f} ms); "
              f"a2a calls {r['a2a'][0]['calls']}/{r['a2a'][1]['calls']} "
              f"(expected {r['a2a_expected'][0]['calls']}/{r['a2a_expected'][1]['calls']}), "
              f"bytes sent {r['a2a'][0]['sent_bytes']}/{r['a2a'][1]['sent_bytes']} "
              f"(expected {r['a2a_expected'][0]['sent_bytes']}/"
              f"{r['a2a_expected'][1]['sent_bytes']}); activations "
              f"{r['activation_bytes'][0] / 2**20:.1f}/{r['activation_bytes'][1] / 2**20:.1f} MiB")
    for r in res["scaling_with_C"]:
        print(f"EP={ep} C={r['C']} k={r['topk']}: {r['median_s'] * 1e3:.1f} ms, "
              f"x{r['ratio_to_C1']:.2f} of C=1; activations {r['activation_bytes'] / 2**20:.1f} MiB")
    for r in res["overlap"]:
        print(f"EP={ep} overlap: {side_by_side_line(r, 'plain', 'overlap')}; a2a calls "
              f"{[a['calls'] for a in r['a2a']]} (expected "
              f"{[a['calls'] for a in r['a2a_expected']]}), bytes "
              f"{[a['sent_bytes'] for a in r['a2a']]}")
    for r in res["tokens_sweep"]:
        print(f"EP={ep} tokens/rank {r['tokens_per_rank']}: CoE-2(4/64)/MoE(8/64) = "
              f"{r['ratio']:.3f} ({r['median_s'][0] * 1e3:.1f} / {r['median_s'][1] * 1e3:.1f} ms)"
              + (f"; overlapped {r['ratio_overlapped']:.3f} ({r['median_s_overlapped'][0] * 1e3:.1f}"
                 f" / {r['median_s_overlapped'][1] * 1e3:.1f} ms)" if r["ratio_overlapped"] else ""))
    for r in res["recompute"]:
        print(f"EP={ep} {r['layer']:31s} {r['median_s'] * 1e3:.1f} ms; saved activations kept "
              f"after forward {r['kept'] / 2**20:.1f} MiB, peak {r['peak'] / 2**20:.1f} MiB")
    for r in res["experts"]:
        print(f"EP={ep} experts, SequentialMLP -> LocalExperts: "
              f"{side_by_side_line(r, 'megatron', 'local')}")
    for r in res["grouped"]:
        print(f"EP={ep} experts, one GEMM per expert -> grouped GEMM: "
              f"{side_by_side_line(r, 'loop', 'grouped')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=176)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--no-shared-expert", action="store_true",
                   help="routed experts only: CoE-C(k/N) and MoE(Ck/N) then do equal FLOPs")
    p.add_argument("--tokens-sweep", type=int, nargs="*", default=[256, 4096],
                   help="also time CoE-2(4/64) against MoE(8/64) at these tokens per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--overlap-repeat", type=int, default=20,
                   help="timed runs of each layer in the overlap comparison (EP > 1) and the "
                        "grouped-GEMM one")
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS,
                   help="which comparisons to run (default: all)")
    p.add_argument("--out", default="benchmarks/results/coe_layer.json")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.overlap_repeat < 1 or args.warmup < 0:
        p.error("--repeat and --overlap-repeat must be >= 1, --warmup >= 0")
    from processes import spawn, write_results

    all_results = []
    for ep in args.ep:
        res = spawn(run, ep, argparse.Namespace(**{**vars(args), "ep": ep}))
        res["ep"] = ep
        all_results.append(res)
        report(res, ep)
    write_results(args.out, args, all_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
