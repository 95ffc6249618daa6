"""Per-iteration router statistics.

Megatron's routers record their aux losses with ``get_moe_metrics_tracker().record(name, ...)``
into one slot per layer, so C routers of a CoE layer would sum into one number.  While a CoE
layer runs iteration t it sets :func:`set_iteration`; :class:`CoEMetricsTracker` then files
the value under ``f"{name}/iter{t}"`` (1-based t), giving one series per iteration.  Outside a
CoE layer (dense or plain MoE layers) names are left as they are.
"""

from __future__ import annotations

from megatron.core.transformer.moe import moe_logging
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

# The CoE iteration (0-based) running now, None outside a CoE layer.  A plain module global, not
# a contextvar: TorchDynamo traces reads and writes of globals, and breaks the graph on
# contextvars (torch 2.11) and on context managers it cannot step through.
_iteration: int | None = None


def set_iteration(t: int | None) -> None:
    """Mark router calls from now on as CoE iteration ``t`` (None: outside a CoE layer)."""
    global _iteration
    _iteration = t


def active_iteration() -> int | None:
    """The CoE iteration (0-based) running now, or None outside a CoE layer."""
    return _iteration


def iteration_metric_name(name: str, t: int) -> str:
    return f"{name}/iter{t + 1}"


class CoEMetricsTracker(MoEMetricsTracker):
    """MoEMetricsTracker that keeps CoE iterations apart."""

    def record(self, name, value, layer_number, num_layers, **kwargs):
        t = active_iteration()
        if t is not None:
            name = iteration_metric_name(name, t)
        super().record(name, value, layer_number, num_layers, **kwargs)


def install_tracker() -> CoEMetricsTracker:
    """Make the global MoE metrics tracker a CoEMetricsTracker (idempotent), with no iteration
    marked: a CoE layer that raised inside its router window (an out-of-memory error the GPU
    check records and goes on from, say) leaves its mark, which a model built next in the same
    process must not inherit."""
    set_iteration(None)
    tracker = moe_logging.get_moe_metrics_tracker()
    if not isinstance(tracker, CoEMetricsTracker):
        tracker = CoEMetricsTracker()
        moe_logging.set_moe_metrics_tracker(tracker)
    return tracker


def iteration_stats(layers, num_microbatches: int) -> dict:
    """Per CoE iteration, over all CoE layers and all ranks: the aux losses (per layer, per
    micro-batch, mean over layers) and the expert load (tokens per expert / mean tokens per
    expert; 1.0 = perfectly balanced) min and max.  Collective: call on every rank."""
    import torch
    import torch.distributed as dist

    if not layers:
        return {}
    tracker = moe_logging.get_moe_metrics_tracker()
    loads = torch.stack([layer.tokens_per_expert for layer in layers]).float()  # [L, C, N]
    names = sorted(tracker.metrics)
    aux = (torch.stack([tracker.metrics[n].values.float() for n in names])
           if names else torch.zeros(0, 1, device=loads.device))
    if dist.is_initialized():
        # ranks of the same pipeline stage (same layers, same metric names): the data-parallel
        # group, which contains the expert-parallel ranks
        from megatron.core import parallel_state

        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(loads, group=group)
        dist.all_reduce(aux, group=group)
        aux /= dist.get_world_size(group)
    loads, aux = loads.cpu(), aux.cpu()
    out = {}
    layer_ids = sorted({layer.layer_number for layer in layers})
    for t in range(loads.shape[1]):
        per_expert = loads[:, t, :]
        mean = per_expert.mean(dim=1, keepdim=True).clamp_min(1e-9)
        ratio = per_expert / mean
        key = f"coe/iter{t + 1}"
        out[f"{key}/load_min"] = ratio.min().item()
        out[f"{key}/load_max"] = ratio.max().item()
        suffix = f"/iter{t + 1}"
        total = 0.0
        for i, name in enumerate(names):
            if name.endswith(suffix):
                value = aux[i, [n - 1 for n in layer_ids]].mean().item() / num_microbatches
                out[f"{key}/{name[: -len(suffix)]}"] = value
                if "load_balancing" in name:
                    total += value
        out[f"{key}/aux_loss"] = total
    return out


def reset(layers) -> None:
    moe_logging.get_moe_metrics_tracker().clear()
    for layer in layers:
        layer.reset_step_stats()
