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
slowest rank to arrive.  The probe times back-to-back all-to-alls of a few bytes (the per-call
latency) and of 4 MiB to every peer (the bandwidth) while no rank computes, so that

    measured all-to-all time  -  (calls x latency + bytes to peers / bandwidth)

is what the step's all-to-alls cost beyond moving their bytes: waiting for the other rank at
each exchange, and the transport competing with compute for the same cores.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist
from tally import CallTally

COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "all_reduce",
               "reduce_scatter_tensor", "all_gather", "broadcast")


def _targets():
    """(module, attribute, collective) of every name to wrap: torch.distributed's functions,
    and the copies of two of them that Megatron-Core's tensor_parallel.mappings takes at import
    (its all-gather of the MoE token counts goes through one)."""
    from megatron.core.tensor_parallel import mappings

    return [(dist, name, name) for name in COLLECTIVES] + [
        (mappings, "dist_all_gather_func", "all_gather_into_tensor"),
        (mappings, "dist_reduce_scatter_func", "reduce_scatter_tensor")]


class _TimedWork:
    """A collective's handle whose ``wait()`` adds to the collective's time."""

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

    def install(self) -> CollectiveTimers:
        """Wrap the collectives of :func:`_targets` in this process with this timer."""
        for module, attr, name in _targets():
            fn = getattr(module, attr)
            fn = getattr(fn, "__wrapped__", fn)  # no stacking
            self._originals.append((module, attr, fn))
            setattr(module, attr, self._timed(name, fn))
        return self

    def uninstall(self) -> None:
        while self._originals:
            module, attr, fn = self._originals.pop()
            setattr(module, attr, fn)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
            return _TimedWork(out, self, name) if out is not None else out

        timed.__wrapped__ = fn
        return timed


def probe_all_to_all(group=None, repeat: int = 20, big_bytes: int = 4 << 20) -> dict[str, float]:
    """Median time of an all-to-all of 4 floats and of ``big_bytes`` to every peer of ``group``
    (every rank calls this together, idle): the per-call latency, and the bandwidth to the
    peers of the bytes beyond it."""
    world = dist.get_world_size(group)

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
