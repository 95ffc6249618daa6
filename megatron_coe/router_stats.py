"""Per-iteration router statistics.

Megatron's routers record their aux losses with ``get_moe_metrics_tracker().record(name, ...)``
into one slot per layer, so C routers of a CoE layer would sum into one number.  While a CoE
layer runs iteration t it sets :func:`current_iteration`; :class:`CoEMetricsTracker` then files
the value under ``f"{name}/iter{t}"`` (1-based t), giving one series per iteration.  Outside a
CoE layer (dense or plain MoE layers) names are left as they are.
"""

from __future__ import annotations

import contextlib
import contextvars

from megatron.core.transformer.moe import moe_logging
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

_ITERATION: contextvars.ContextVar[int | None] = contextvars.ContextVar("coe_iter", default=None)


@contextlib.contextmanager
def current_iteration(t: int):
    """Mark router calls inside the block as CoE iteration ``t`` (0-based)."""
    token = _ITERATION.set(t)
    try:
        yield
    finally:
        _ITERATION.reset(token)


def iteration_metric_name(name: str, t: int) -> str:
    return f"{name}/iter{t + 1}"


class CoEMetricsTracker(MoEMetricsTracker):
    """MoEMetricsTracker that keeps CoE iterations apart."""

    def record(self, name, value, layer_number, num_layers, **kwargs):
        t = _ITERATION.get()
        if t is not None:
            name = iteration_metric_name(name, t)
        super().record(name, value, layer_number, num_layers, **kwargs)


def install_tracker() -> CoEMetricsTracker:
    """Make the global MoE metrics tracker a CoEMetricsTracker (idempotent)."""
    tracker = moe_logging.get_moe_metrics_tracker()
    if not isinstance(tracker, CoEMetricsTracker):
        tracker = CoEMetricsTracker()
        moe_logging.set_moe_metrics_tracker(tracker)
    return tracker
