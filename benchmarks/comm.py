"""Time spent in collectives during training steps, on every rank, and what the same all-to-all
bytes cost on an idle transport, for the benchmarks.

    timers = CollectiveTimers().install()    # wraps torch.distributed's collectives, this process
    before = timers.snapshot()
    ... one training step ...
    ms, calls = timers.since(before)         # {collective: ms}, {collective: calls}
    probe = probe_all_to_all(group)          # {"latency_ms": ..., "gb_per_s": ...}

A collective's time is the wall time of its call; for an asynchronous one (``async_op=True``, as
in the overlapped schedule) it is the launch plus the ``wait()`` on its handle, so time in which
other work ran while it was in flight is not counted.  That time includes waiting for the
slowest rank to arrive.  Megatron's DDP reduces its gradient buffers inside torch's coalescing
manager, which runs the collectives when the block exits: that block is timed as one call
("coalesced buffer reductions").  The probe times back-to-back all-to-alls of a few bytes (the
per-call latency) and of 4 MiB to every peer (the bandwidth) while no rank computes, so that

    measured all-to-all time  -  (calls x latency + bytes to peers / bandwidth)

is what the step's all-to-alls cost beyond moving their bytes: waiting for the other rank at
each exchange, and the transport competing with compute for the same cores.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
import torch.distributed as dist
from tally import CallTally

COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "all_reduce",
               "reduce_scatter_tensor", "all_gather", "broadcast")
COALESCED = "coalesced buffer reductions"


def _targets():
    """(module, attribute, name) of every function to wrap: torch.distributed's collectives;
    the copies of two of them that Megatron-Core's tensor_parallel.mappings takes at import (its
    all-gather of the MoE token counts goes through one); and the coalescing manager inside
    which Megatron's DDP reduces its gradient buffers (and the distributed optimizer gathers
    its parameters).  Torch runs the coalesced collectives when that block exits, so the block
    is timed as one call and the collectives launched inside it are not counted apart."""
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.tensor_parallel import mappings

    return [(dist, name, name) for name in COLLECTIVES] + [
        (mappings, "dist_all_gather_func", "all_gather_into_tensor"),
        (mappings, "dist_reduce_scatter_func", "reduce_scatter_tensor"),
        (param_and_grad_buffer, "_coalescing_manager", COALESCED)]


class _TimedWork:
    """A collective's handle (or a coalescing manager) whose ``wait()`` adds to its time."""

    def __init__(self, work, timers, name):
        self._work, self._timers, self._name = work, timers, name

    def wait(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timers.seconds[self._name] += time.perf_counter() - start

    def __getattr__(self, attr):
        return getattr(self._work, attr)


class CollectiveTimers(CallTally):
    def __init__(self):
        super().__init__()
        self._originals: list[tuple[object, str, object]] = []
        self._coalescing = 0  # > 0 inside a timed coalescing block

    def install(self) -> CollectiveTimers:
        """Wrap the functions of :func:`_targets` in this process with this timer; a function
        another CollectiveTimers wrapped is wrapped around its original, not stacked."""
        for module, attr, name in _targets():
            current = getattr(module, attr)
            fn = getattr(current, "_timed_original", current)
            self._originals.append((module, attr, current))
            timed = self._timed_block(name, fn) if name == COALESCED else self._timed(name, fn)
            timed._timed_original = fn
            setattr(module, attr, timed)
        return self

    def uninstall(self) -> None:
        """Put back exactly what :meth:`install` replaced."""
        while self._originals:
            module, attr, fn = self._originals.pop()
            setattr(module, attr, fn)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            if self._coalescing:  # runs (and is timed) when the coalescing block exits
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
            return _TimedWork(out, self, name) if out is not None else out

        return timed

    def _timed_block(self, name, fn):
        @contextlib.contextmanager
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                with fn(*args, **kwargs) as manager:
                    self._coalescing += 1
                    try:
                        yield _TimedWork(manager, self, name)
                    finally:
                        self._coalescing -= 1
            finally:  # the coalesced collectives ran as the block exited
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed


def probe_all_to_all(group=None, repeat: int = 20,
                     big_bytes: int = 4 << 20) -> dict[str, float] | None:
    """Median time of an all-to-all of 4 floats and of ``big_bytes`` to every peer of ``group``
    (every rank calls this together, idle): the per-call latency, and the bandwidth to the
    peers of the bytes beyond it (each rank also copies ``big_bytes`` to itself, as a step's
    all-to-alls do).  None for a group of one rank, which has no peer."""
    world = dist.get_world_size(group)
    if world == 1:
        return None

    def median_ms(per_peer: int) -> float:
        send = torch.ones(world * per_peer)
        recv = torch.empty_like(send)
        times = []
        for _ in range(repeat + 2):
            dist.barrier(group=group)
            start = time.perf_counter()
            dist.all_to_all_single(recv, send, group=group)
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:]) * 1e3

    small = median_ms(4)
    big = median_ms(big_bytes // 4)
    to_peers = big_bytes * (world - 1)
    return {"latency_ms": small, "gb_per_s": to_peers / max(big - small, 1e-6) / 1e6}
