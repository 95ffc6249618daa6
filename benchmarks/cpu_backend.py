"""Overhead of the CPU backend on a training step, as a ratio.

    python benchmarks/cpu_backend.py

The backend's name redirects (cpu.py) cost nothing per op; its only per-op cost is the scoped
TorchFunctionMode (`cpu.cuda_to_cpu`) that remaps Megatron's hard-coded CUDA placements.  The
training loop runs Megatron's forward-backward schedule inside that mode.  This times forward +
backward of the tiny CoE GPT (configs/tiny/coe.yaml, one process) inside and outside the mode,
alternately, and prints the median ratio.  A measurement, not a test.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch


def main() -> int:
    warnings.filterwarnings("ignore")
    from megatron_coe import cpu, parallel
    from megatron_coe.config import load_config
    from megatron_coe.model import build_model

    config = load_config("configs/tiny/coe.yaml", ["parallel.expert=1"])
    model = build_model(config)
    tokens = torch.randint(0, 256, (4, 65))
    pos = torch.arange(64).expand(4, 64)

    def forward():
        return model(tokens[:, :-1], pos, None, labels=tokens[:, 1:]).float().mean()

    def step():
        forward().backward()
        model.zero_grad(set_to_none=True)

    def in_mode():
        with cpu.cuda_to_cpu():
            step()

    def as_train_loop():  # the schedule (and backward) in the mode, the model's forward outside
        with cpu.cuda_to_cpu():
            with cpu.outside_cuda_to_cpu():
                loss = forward()
            loss.backward()
        model.zero_grad(set_to_none=True)

    runs = {"plain": step, "whole step in mode": in_mode, "as the training loop": as_train_loop}
    times = {name: [] for name in runs}
    for i in range(23):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    for name in runs:
        t = statistics.median(times[name])
        print(f"tiny CoE GPT forward+backward, {name}: {t * 1e3:.1f} ms, ratio to plain "
              f"{t / plain:.3f} (median of 20)")
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
