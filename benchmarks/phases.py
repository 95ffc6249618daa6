"""Forward wall time of each phase of the MoE / CoE layer, for the benchmarks.

    timers = PhaseTimers().install()     # before the first forward, in each rank's process
    before = timers.snapshot()
    ... one training step ...
    ms, calls = timers.since(before)     # {phase: ms}, {phase: calls} for that step

The phases are the methods Megatron-Core's MoELayer splits its forward into, which CoELayer
runs once per iteration (see megatron_coe/model/layer.py):

    router      TopKRouter.forward: gate GEMM, softmax, top-k, aux losses
    preprocess  token counts per expert, their all-gather over EP ranks, permutation by expert
    dispatch    the all-to-all that sends each row to its expert's rank
    experts     sort by local expert, the local experts' MLPs, sort back
    combine     the all-to-all that brings the rows back
    postprocess un-permutation: each token's rows weighted and summed
    shared      the shared expert's MLP
    overlapped  (overlapped schedule) dispatch, experts and combine of both halves, with their
                all-to-alls in flight

Times are exclusive: a phase called inside another (the shared expert inside ``overlapped``)
counts only for itself.  Calls made during backward (a recompute re-running the forward) are
not timed.  ``layer`` is the whole forward of the layer, so ``layer`` minus the
phases is the layer's own glue (CoE's residual adds, non-finite checks, load counters).  On CPU
every op runs before the call returns, so a phase's wall time is its compute plus, for a phase
with a collective, the wait for the slowest rank.  Backward runs inside autograd and is not
split.
"""

from __future__ import annotations

import time

import torch
from tally import CallTally


def _targets():
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_coe.model.dispatch import CoEAlltoAllTokenDispatcher
    from megatron_coe.model.layer import CoELayer

    return [("router", TopKRouter, "forward"), ("preprocess", MoELayer, "preprocess"),
            ("dispatch", MoELayer, "dispatch"), ("experts", MoELayer, "routed_experts_compute"),
            ("combine", MoELayer, "combine"), ("postprocess", MoELayer, "postprocess"),
            ("shared", MoELayer, "shared_experts_compute"),
            ("overlapped", CoEAlltoAllTokenDispatcher, "overlapped_experts"),
            ("layer", MoELayer, "forward"), ("layer", CoELayer, "forward")]


class PhaseTimers(CallTally):
    def __init__(self):
        super().__init__()
        self._stack: list[list[float]] = []  # [start, time spent in nested phases]

    def install(self) -> PhaseTimers:
        """Wrap the phase methods of the classes (in this process) with this timer."""
        for phase, cls, name in _targets():
            fn = cls.__dict__[name]
            setattr(cls, name, self._timed(phase, getattr(fn, "__wrapped__", fn)))  # no stacking
        return self

    def _timed(self, phase: str, fn):
        def timed(*args, **kwargs):
            if torch._C._current_graph_task_id() != -1:  # re-run in backward by a recompute
                return fn(*args, **kwargs)
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[0]
                if phase == "layer":  # inclusive: the whole layer forward
                    self.seconds[phase] += total
                else:
                    self.seconds[phase] += total - frame[1]
                    if self._stack:
                        self._stack[-1][1] += total
                self.calls[phase] += 1

        timed.__wrapped__ = fn
        return timed
