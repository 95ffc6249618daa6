"""CoE layer cost against MoE at equal expert passes per token: time, all-to-all, memory.

    python benchmarks/coe_layer.py                      # CPU, 1 rank (EP = 1) and 2 ranks (EP = 2)
    python benchmarks/coe_layer.py --ep 2 --hidden 1024 --expert-hidden 704 --tokens 1024
    python benchmarks/coe_layer.py --device cuda --precision bf16 --ep 1   # on a GPU with TE

For each pair it builds both layers (63 routed + 1 shared expert, DeepSeek-V2-Lite style, the
shared expert counted as a pass), then times forward+backward alternately (A B A B ...) and
prints the median ratio CoE / MoE.  Also printed, per layer and step: all-to-all calls and
bytes (summed over the expert-parallel ranks) from the dispatcher's counters with the
expected values beside them, and the activation memory kept for backward (bytes of the tensors
autograd saves, measured with saved-tensor hooks).  Results go to
``--out`` as JSON.  Nothing here passes or fails: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

PAIRS = [  # (name, iterations, topk) ; CoE first, MoE at the same expert passes second
    ("CoE-2(4/64) vs MoE(8/64)", (2, 4), (1, 8)),
    ("CoE-4(2/64) vs MoE(8/64)", (4, 2), (1, 8)),
    ("CoE-2(8/64) vs MoE(16/64)", (2, 8), (1, 16)),
]
SCALING = [(c, 2) for c in (1, 2, 3, 4)]  # time vs C at fixed k


def make_config(args, iterations, topk):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "device": args.device, "precision": args.precision,
        "model": {"num_layers": 1, "hidden_size": args.hidden, "num_attention_heads": 8,
                  "moe": {"num_experts": 63 if args.ep in (1, 3, 7) else 64, "topk": topk,
                          "expert_hidden_size": args.expert_hidden,
                          "shared_expert_hidden_size": args.expert_hidden,
                          "aux_loss": "seq_aux_loss", "grouped_gemm": args.device == "cuda"},
                  "coe": {"iterations": iterations}},
        "parallel": {"expert": args.ep},
    })


def saved_activation_bytes(layer, x) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = layer(x)
    y.float().sum().backward()
    return total


def fwd_bwd(layer, x):
    y, _ = layer(x)
    y.float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()


def bench_pair(args, coe_cfg, moe_cfg):
    from megatron_coe.model import build_moe_layer

    torch.manual_seed(0)
    layers = [build_moe_layer(coe_cfg), build_moe_layer(moe_cfg)]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    device = next(layers[0].parameters()).device
    if dtype != torch.float32:
        layers = [layer.to(dtype) for layer in layers]
    for layer in layers:
        layer.train()
    x = torch.randn(args.tokens, 1, args.hidden, device=device, dtype=dtype, requires_grad=True)
    times = [[], []]
    for i in range(args.warmup + args.repeat):
        for j, layer in enumerate(layers):
            layer.token_dispatcher.counters.reset()
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
    return times, a2a, acts


def expected_a2a(args, iterations, topk, ep):
    """Per layer, one forward+backward, dropless, all EP ranks together: each rank makes 2*C
    calls each way; every token-expert pair crosses once per direction in dispatch (hidden + a
    4-byte prob) and once in combine (hidden), forward and backward."""
    if ep == 1:
        return {"calls": 0, "sent_bytes": 0}
    elem = {"fp32": 4, "bf16": 2}[args.precision]
    pairs = ep * args.tokens * topk * iterations
    return {"calls": 4 * iterations, "sent_bytes": 2 * pairs * (2 * args.hidden * elem + 4)}


def run(rank, world, args, port, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    import torch.distributed as dist

    from megatron_coe import parallel

    out = []
    for name, coe, moe in PAIRS:
        times, a2a, acts = bench_pair(args, make_config(args, *coe), make_config(args, *moe))
        out.append({"pair": name, "ep": args.ep, "tokens_per_rank": args.tokens,
                    "median_s": [statistics.median(t) for t in times],
                    "ratio": statistics.median(times[0]) / statistics.median(times[1]),
                    "a2a": a2a, "a2a_expected": [expected_a2a(args, *coe, args.ep),
                                                 expected_a2a(args, *moe, args.ep)],
                    "activation_bytes": acts})
    scaling = []
    for c, k in SCALING:
        times, _, acts = bench_pair(args, make_config(args, c, k), make_config(args, 1, k))
        scaling.append({"C": c, "topk": k, "median_s": statistics.median(times[0]),
                        "ratio_to_C1": statistics.median(times[0]) / statistics.median(times[1]),
                        "activation_bytes": acts[0]})
    if rank == 0:
        results.put({"pairs": out, "scaling_with_C": scaling})
    dist.barrier()
    parallel.destroy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=176)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/coe_layer.json")
    args = p.parse_args(argv)
    import torch.multiprocessing as mp

    all_results = []
    for ep in args.ep:
        a = argparse.Namespace(**{**vars(args), "ep": ep})
        from megatron_coe.parallel import free_port

        port = free_port()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.start_processes(run, args=(ep, a, port, q), nprocs=ep, join=True, start_method="spawn")
        res = q.get()
        res["ep"] = ep
        all_results.append(res)
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
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}", "results": all_results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
