"""A kernel tried once per process on the device a run will use, before ``auto`` keeps it.

    error(cache, key, device_type, run)  ->  None when run(device) worked, else
                                              "ExceptionType: first line of its message"

``run`` builds its own small inputs on ``device`` and runs the kernel forward and backward; it
runs under a forked random number generator (the run's random state is untouched), and a GPU's
queue is drained so that an asynchronous launch failure shows here.  The answer is kept in
``cache`` under ``key`` (the dtype and the shapes that pick the kernel's compiled variant)."""

from __future__ import annotations

from typing import Callable

import torch


def error(cache: dict, key, device_type: str,
          run: Callable[[torch.device], None]) -> str | None:
    if key not in cache:
        message = None
        try:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if device_type == "cuda" else torch.device(device_type))
            with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []):
                run(device)
                if device_type == "cuda":
                    torch.cuda.synchronize(device)
        except Exception as e:  # no usable device, or a compiler's error (no common base class)
            lines = str(e).strip().splitlines()
            message = f"{type(e).__name__}: {lines[0] if lines else ''}"
        cache[key] = message
    return cache[key]
