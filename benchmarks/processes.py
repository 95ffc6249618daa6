"""Run a benchmark function on ``world`` local processes (gloo on CPU) and return rank 0's result;
write a benchmark's results.

    result = spawn(fn, world, *args)      # fn(*args) runs on every rank, after the process group
                                          # environment (RANK, WORLD_SIZE, MASTER_*) is set
    write_results(path, args, results)    # JSON: the arguments, the machine, the results

Each rank gets cores // world threads, as torchrun's one-thread default would starve a 1-rank run.
"""

from __future__ import annotations

import os


def _entry(rank, world, port, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    result = fn(*args)
    if rank == 0:
        results.put(result)


def spawn(fn, world: int, *args):
    import torch.multiprocessing as mp

    from megatron_coe.parallel import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(_entry, args=(world, free_port(), fn, args, results),
                               nprocs=world, join=False, start_method="spawn")
    # Read the result before joining: a child that put a large result on the queue exits
    # only once the parent has drained it.  join() raises if a rank failed.
    result = None
    while not procs.join(timeout=1):
        if result is None and not results.empty():
            result = results.get()
    return result if result is not None else results.get(timeout=60)


def write_results(path: str, args, results) -> None:
    import json

    import torch

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({"args": vars(args), "machine": f"{os.cpu_count()} CPU cores, torch "
                   f"{torch.__version__}", "results": results}, f, indent=1)
