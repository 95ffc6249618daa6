"""Run a function on N CPU ranks (gloo), each in its own spawned process.

``run_ranks(fn, world_size, *args)`` starts the ranks with the torchrun environment variables
set, so ``megatron_coe.parallel.initialize`` takes the env:// path exactly as under torchrun.
A failure on any rank re-raises here with that rank's traceback.  ``fn`` must be importable
(module level in a test module).
"""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    mp.start_processes(_entry, args=(world_size, _free_port(), fn, args), nprocs=world_size,
                       join=True, start_method="spawn")
