"""Seconds and calls per name, accumulated by the benchmarks' timers (phases.py, comm.py), and
read back per training step.

    before = tally.snapshot()
    ... one training step ...
    ms, calls = tally.since(before)      # {name: ms}, {name: calls} of what was called since
"""

from __future__ import annotations

from collections import defaultdict


class CallTally:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.seconds), dict(self.calls)

    def since(self, snapshot) -> tuple[dict[str, float], dict[str, int]]:
        """(ms, calls) of each name called (or timed) since ``snapshot``."""
        seconds, calls = snapshot
        called = [k for k in self.seconds
                  if self.calls[k] > calls.get(k, 0) or self.seconds[k] > seconds.get(k, 0.0)]
        return ({k: (self.seconds[k] - seconds.get(k, 0.0)) * 1e3 for k in called},
                {k: self.calls[k] - calls.get(k, 0) for k in called})
