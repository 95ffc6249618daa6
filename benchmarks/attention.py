"""Core attention forward + backward: the local spec's unfused attention against the fused one
(torch's scaled_dot_product_attention, megatron_coe/model/fused_attention.py), causal.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/attention.py [--threads 1] [--device cuda --dtype bf16]

Shapes: the README's tiny MHA model, the tiny MLA configs and the paper's MLA (q/k head 192,
v head 128).  For each it prints the median milliseconds of one forward + backward and the ratio
unfused / fused for the default backend torch picks and for each backend forced alone (math on
CPU; cuDNN, flash, memory-efficient and math on CUDA); a backend that refuses the shape prints
"n/a".  Timings only: the equality of the results is tested in tests/layer/test_fused_attention.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (micro-batch, heads, sequence, q/k head dim, v head dim)
SHAPES = {
    "tiny-mha": (4, 4, 64, 16, 16),      # configs/tiny/coe.yaml
    "tiny-mla": (8, 4, 256, 48, 32),     # configs/tiny/coe-2-4of64.yaml
    "paper-mla": (8, 8, 512, 192, 128),  # configs/paper/coe-2-4of64.yaml
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _modules(heads: int, d_qk: int, d_v: int, device: str):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_coe import parallel
    from megatron_coe.config import config_from_dict
    from megatron_coe.model import transformer_config
    from megatron_coe.model.attention import MLADotProductAttention
    from megatron_coe.model.fused_attention import FusedDotProductAttention

    config = config_from_dict({"device": device, "model": {
        "num_layers": 1, "hidden_size": heads * d_v, "num_attention_heads": heads,
        "vocab_size": 64, "seq_length": 64}})
    parallel.initialize(config)
    tf = transformer_config(config)
    kwargs = dict(softmax_scale=d_qk ** -0.5, k_channels=d_qk, v_channels=d_v)
    return [cls(tf, 1, AttnMaskType.causal, "self", **kwargs).to(device)
            for cls in (MLADotProductAttention, FusedDotProductAttention)]


def _time_ms(fn, reps: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads (default: torch's); 1 on a shared CPU box")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    forced = {"math": SDPBackend.MATH}
    if args.device == "cuda":
        forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                  "efficient": SDPBackend.EFFICIENT_ATTENTION, **forced}
    results = []
    print(f"device {args.device}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward + backward, median of {args.reps}")
    for name in args.shapes:
        b, heads, s, d_qk, d_v = SHAPES[name]
        unfused, fused = _modules(heads, d_qk, d_v, args.device)
        g = torch.Generator(args.device).manual_seed(0)
        q, k = (torch.randn(s, b, heads, d_qk, device=args.device, dtype=dtype, generator=g,
                            requires_grad=True) for _ in range(2))
        v = torch.randn(s, b, heads, d_v, device=args.device, dtype=dtype, generator=g,
                        requires_grad=True)

        def step(attn, ctx=contextlib.nullcontext):
            def run():
                with ctx():
                    attn(q, k, v, None).sum().backward()
            return run

        row = {"shape": name, "b": b, "heads": heads, "seq": s, "d_qk": d_qk, "d_v": d_v,
               "unfused_ms": _time_ms(step(unfused), args.reps, args.device),
               "fused_ms": {"default": _time_ms(step(fused), args.reps, args.device)}}
        for label, backend in forced.items():
            try:
                row["fused_ms"][label] = _time_ms(
                    step(fused, lambda be=backend: sdpa_kernel(be)), args.reps, args.device)
            except RuntimeError:  # "No available kernel": the backend refuses this shape
                row["fused_ms"][label] = None
        results.append(row)
        cells = "  ".join(
            f"{label} {ms:8.3f} ms ({row['unfused_ms'] / ms:4.2f}x)" if ms else f"{label} n/a"
            for label, ms in row["fused_ms"].items())
        print(f"{name:10s} b{b} h{heads} s{s} d_qk {d_qk} d_v {d_v}: "
              f"unfused {row['unfused_ms']:8.3f} ms  {cells}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
