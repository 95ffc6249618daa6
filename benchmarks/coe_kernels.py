"""The CoE path's Triton kernels, each alone against the ops it replaces, at the paper configs'
shapes: forward + backward time of both, and their ratio.

    python benchmarks/coe_kernels.py --device cuda [--out FILE]

Per top-k (4: CoE-2(4/64), 8: MoE(8/64)), for T tokens, N experts, hidden H:
- routing: Megatron's softmax, top-k and two scatters, the aux losses' softmax, and their
  backward, against model/triton_router.py (forward and backward);
- row index: Megatron's permute's row index (a stable sort of the map), the argsort of the rows'
  tokens and the search for the rows' experts, against model/triton_row_index.py;
- residual forward: the rows' sum kernel, then + shared expert + x(t-1) as torch's adds, against
  the sum kernel with both addends;
- residual backward: the four gradients of x(t-1) as torch's adds, against sum_in_order.

Each pair's outputs are compared first (the routing map and the integers equal, the residual's
sums bit for bit, the probabilities within 1e-5), so a wrong kernel cannot time well.  Times are
medians over ``--repeat`` calls.  On a GPU each pair is timed eagerly (CUDA events: the host's
launches count where the GPU waits for them) and as a replayed CUDA graph (the GPU's time
alone, as under ``train.cuda_graph: full_iteration``).  On CPU the kernels run through Triton's
interpreter, which says nothing about speed (``--device cpu`` only checks that it runs).  A
measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, device: str, repeat: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls, after ``warmup``: on a GPU
    between CUDA events, so the host's launches count where the GPU waits for them."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def graph_timed(fn, repeat: int, warmup: int) -> float:
    """Median milliseconds of one replay of ``fn`` captured as a CUDA graph: the GPU's time
    alone, as a training step under ``train.cuda_graph: full_iteration`` runs it."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed(graph.replay, "cuda", repeat, warmup)


def cases(T: int, N: int, k: int, H: int, device: str):
    """(name, baseline, kernel, check) for one top-k: check() compares their outputs and
    prepares what the timed calls read."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    from megatron_coe.model import triton_gather_sum, triton_router, triton_row_index

    gen = torch.Generator(device=device).manual_seed(k)
    logits = torch.randn(T, N, device=device, generator=gen)
    dprobs, dscores = torch.randn(2, T, N, device=device, generator=gen)

    def megatron_routing():
        x = logits.detach().requires_grad_(True)
        probs, routing_map = moe_utils.topk_routing_with_score_function(x, k,
                                                                        use_pre_softmax=True)
        scores = torch.softmax(x, dim=-1, dtype=torch.float32)
        torch.autograd.backward([probs, scores], [dprobs, dscores])
        return probs, routing_map, x.grad

    def kernel_routing():
        x = logits.detach().requires_grad_(True)
        probs, routing_map, scores = triton_router.topk_softmax(x, k)
        torch.autograd.backward([probs, scores], [dprobs, dscores])
        return probs, routing_map, x.grad

    def check_routing():
        want, got = megatron_routing(), kernel_routing()
        scale = want[2].abs().max().clamp_min(1e-30)
        return (torch.equal(want[1], got[1]) and bool((want[0] - got[0]).abs().max() <= 1e-5)
                and bool((want[2] - got[2]).abs().max() / scale <= 1e-5))

    rows = T * k
    empty = torch.zeros(T, 0, device=device)
    made = {}

    def route():  # the router kernel's last map, which the row index reads
        made["map"] = triton_router.topk_softmax(logits, k)[1]

    def megatron_rows():
        routing_map = made["map"]
        _, _, index, _, _ = moe_utils.permute(empty, routing_map, None, rows)
        ends = routing_map.sum(0).cumsum(0)
        experts = torch.searchsorted(ends, torch.arange(rows, device=device), right=True)
        return index, experts, torch.argsort(index, stable=True)

    def kernel_rows():
        return triton_row_index.rows_of(made["map"], rows)

    def check_rows():
        route()
        got = kernel_rows()
        return got is not None and all(torch.equal(a, b) for a, b in zip(megatron_rows(), got))

    def bf16(n):
        return torch.randn(n, H, generator=gen, device=device).to(torch.bfloat16)

    expert_rows = bf16(rows)
    order = torch.randperm(rows, generator=gen, device=device)
    shared, x = bf16(T), bf16(T)
    grads = [bf16(T) for _ in range(4)]

    def torch_residual():
        return x + (triton_gather_sum.gather_sum(expert_rows, order, k) + shared)

    def kernel_residual():
        return triton_gather_sum.gather_sum(expert_rows, order, k, (shared, x))

    def torch_grads():
        return ((grads[0] + grads[1]) + grads[2]) + grads[3]

    def kernel_grads():
        return triton_gather_sum.sum_in_order(*grads)

    return [
        ("routing", megatron_routing, kernel_routing, check_routing),
        ("row index", megatron_rows, kernel_rows, check_rows),
        ("residual forward", torch_residual, kernel_residual,
         lambda: torch.equal(torch_residual(), kernel_residual())),
        ("residual backward", torch_grads, kernel_grads,
         lambda: torch.equal(torch_grads(), kernel_grads())),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tokens", type=int, default=16384, help="T: 32 x 512 by default")
    parser.add_argument("--experts", type=int, default=63)
    parser.add_argument("--topk", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":  # the kernels through Triton's interpreter, set before its import
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(ROOT))
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        print("coe_kernels: --device cuda needs a GPU (--device cpu runs the interpreter)")
        return 2
    results = []
    for k in args.topk:
        for name, baseline, kernel, check in cases(args.tokens, args.experts, k, args.hidden,
                                                   args.device):
            row = {"case": name, "topk": k, "equal": check()}
            for mode in ("eager", "graph") if args.device == "cuda" else ("eager",):
                try:
                    base, fused = (timed(f, args.device, args.repeat, args.warmup)
                                   if mode == "eager" else graph_timed(f, args.repeat, args.warmup)
                                   for f in (baseline, kernel))
                except Exception as e:  # a capture the ops do not allow: recorded, not fatal
                    row[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                    print(f"top-{k}  {name:18s} {mode:5s} {row[mode]['error']}")
                    continue
                row[mode] = {"baseline_ms": base, "kernel_ms": fused, "speedup": base / fused}
                print(f"top-{k}  {name:18s} {mode:5s} {base:8.3f} ms -> {fused:8.3f} ms  "
                      f"x{base / fused:5.2f}  {'equal' if row['equal'] else 'DIFFERENT'}")
            results.append(row)
    out = {"device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
           "torch": torch.__version__, "triton": triton.__version__,
           "shapes": {"tokens": args.tokens, "experts": args.experts, "hidden": args.hidden},
           "repeat": args.repeat, "warmup": args.warmup, "results": results,
           "command": " ".join(["python", "benchmarks/coe_kernels.py", *(argv or sys.argv[1:])])}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
