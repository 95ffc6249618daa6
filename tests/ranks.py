"""Run a function on N ranks (gloo on CPU, NCCL on CUDA), each in its own spawned process.

``run_ranks(fn, world_size, *args)`` starts the ranks with the torchrun environment variables
set, so ``megatron_coe.parallel.initialize`` takes the env:// path exactly as under torchrun.
A failure on any rank re-raises here with that rank's traceback.  ``fn`` must be importable
(module level in a test module).
"""

from __future__ import annotations

import os
import re

import pytest
import torch.multiprocessing as mp

from megatron_coe.parallel import free_port


# The device switch of the expert-parallel tests: "cpu" runs the ranks on gloo as always;
# "cuda" (marked gpu, ``pytest -m gpu``) runs them on NCCL, one GPU per rank (LOCAL_RANK), with
# the same assertions, and skips (saying why) with fewer than 2 GPUs (tests/conftest.py).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(gpus=2))]


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """State-dict name of a local expert parameter -> its name in the EP = 1 model:
    local expert j on expert-parallel rank r is global expert r * num_local + j."""
    return re.sub(r"local_experts\.(\d+)\.",
                  lambda m: f"local_experts.{ep_rank * num_local + int(m.group(1))}.", name)


def named_grads(module) -> dict:
    """Each parameter's gradient by name; grouped experts' stacks ``fc1_weight`` [E, ...] are
    split into SequentialMLP's per-expert names (``local_experts.{e}.linear_fc1.weight``, as in
    their state dict), so both expert implementations compare under the same names."""
    out = {}
    for name, p in module.named_parameters():
        m = re.fullmatch(r"(.*)fc([12])_weight", name)
        if m is None:
            out[name] = p.grad
            continue
        for e in range(p.shape[0]):
            out[f"{m.group(1)}local_experts.{e}.linear_fc{m.group(2)}.weight"] = (
                None if p.grad is None else p.grad[e])
    return out


def _entry(rank, world_size, port, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron_coe import parallel

        parallel.destroy()


def run_ranks(fn, world_size: int, *args) -> None:
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
