"""Where torch.compile has to split a CoE layer: graphs and graph breaks, with their reasons.

    python benchmarks/compile_breaks.py                                  # CPU, bf16, C = 1 and 2
    python benchmarks/compile_breaks.py --device cuda --out benchmarks/results/compile_breaks_cuda.json

One layer (the paper configs' structure at toy widths: 63 routed + 1 shared expert, top-k 4 of
C = 2 or 8 of C = 1, sequence-level aux loss, grouped experts) is traced by TorchDynamo
(``torch._dynamo.explain``) on one forward.  A CUDA graph or a whole-layer compile needs one
graph; every break is a point where the layer leaves compiled code (and, for CUDA graphs, a
shape or value the host must know).  Each break is reported with its reason and the source
line that caused it.  On CPU the CPU backend's replacements (megatron_coe/cpu.py) stand in for
some of Megatron's ops, so their breaks are CPU-only.  Results go to ``--out`` as JSON; nothing
here passes or fails.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def breaks(args, iterations: int, topk: int) -> dict:
    import torch._dynamo as dynamo

    from megatron_coe.config import config_from_dict
    from megatron_coe.model import build_moe_layer

    config = config_from_dict({
        "device": args.device, "precision": args.precision,
        "model": {"num_layers": 1, "hidden_size": args.hidden, "num_attention_heads": 4,
                  "moe": {"num_experts": 63, "topk": topk, "expert_hidden_size": args.hidden,
                          "shared_expert_hidden_size": args.hidden,
                          "aux_loss": "seq_aux_loss", "grouped_gemm": True},
                  "coe": {"iterations": iterations}}})
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    torch.manual_seed(0)
    layer = build_moe_layer(config).to(dtype)
    x = torch.randn(args.tokens, 1, args.hidden, dtype=dtype, device=args.device)
    dynamo.reset()
    explained = dynamo.explain(layer)(x)
    reasons = collections.Counter()
    for b in explained.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = "" if frame is None else (
            f"{frame.filename.split('site-packages/')[-1].replace(str(ROOT) + '/', '')}:"
            f"{frame.lineno}")
        reasons[f"{b.reason.strip().splitlines()[0][:140]} @ {where}"] += 1
    return {"iterations": iterations, "topk": topk, "graphs": explained.graph_count,
            "graph_breaks": explained.graph_break_count, "ops_in_graphs": explained.op_count,
            "reasons": dict(reasons.most_common())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    import logging

    # fake-tensor tracing logs every op it cannot run at this dtype: the breaks say enough
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    torch._logging.set_logs(dynamo=logging.ERROR)
    results = []
    for iterations, topk in ((1, 8), (2, 4)):
        r = breaks(args, iterations, topk)
        results.append(r)
        print(f"C={iterations} top-{topk}: {r['graphs']} graphs, {r['graph_breaks']} breaks, "
              f"{r['ops_in_graphs']} ops in graphs", flush=True)
        for reason, n in r["reasons"].items():
            print(f"  {n} x {reason}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                        "torch": torch.__version__, "results": results},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
