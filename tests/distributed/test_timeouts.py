"""Every process group carries the configured timeout, and a rank that stalls inside a CoE
all-to-all makes the other fail with an error naming the collective within that timeout,
instead of hanging."""

import time

import pytest
import torch
import torch.multiprocessing as mp

from ranks import run_ranks

TIMEOUT_S = 6.0


def _config(timeout_minutes):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
                  "moe": {"num_experts": 4, "topk": 1, "expert_hidden_size": 8},
                  "coe": {"iterations": 2}},
        "parallel": {"expert": 2, "timeout_minutes": timeout_minutes},
    })


def _group_timeouts(rank, world):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from megatron_coe.model import build_moe_layer

    build_moe_layer(_config(0.75))
    groups = list(c10d._world.pg_map)
    assert len(groups) > 5  # the default group plus Megatron's tp/pp/dp/ep/expert-dp/... groups
    bad = []
    for group in groups:
        backend = group._get_backend(torch.device("cpu"))
        if backend.options._timeout.total_seconds() != 45:
            bad.append((c10d._world.pg_names.get(group), c10d._world.pg_group_ranks.get(group),
                        getattr(group, "group_desc", None), backend.options._timeout))
    assert not bad, bad
    dist.barrier()


def test_every_process_group_has_the_configured_timeout():
    run_ranks(_group_timeouts, 2)


def _stall(rank, world, result):
    import torch.distributed as dist

    from megatron_coe.model import build_moe_layer

    layer = build_moe_layer(_config(TIMEOUT_S / 60))
    if rank == 1:  # stuck inside the CoE dispatch all-to-all (e.g. a hung kernel)
        real = dist.all_to_all_single

        def stuck(*args, **kwargs):
            time.sleep(10 * TIMEOUT_S)
            return real(*args, **kwargs)

        dist.all_to_all_single = stuck
    x = torch.randn(4, 2, 16)
    start = time.time()
    try:
        layer(x)
    except RuntimeError as err:
        result.put((rank, time.time() - start, str(err)))
        raise SystemExit(3)


def test_stalled_rank_in_coe_all_to_all_fails_the_other_within_timeout():
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    start = time.time()
    with pytest.raises(Exception):
        run_ranks(_stall, 2, result)
    rank, elapsed, message = result.get(timeout=5)
    assert rank == 0
    assert elapsed < TIMEOUT_S + 10, elapsed
    assert "CoE all-to-all failed (layer 1, CoE iteration 1, dispatch forward" in message
    assert time.time() - start < 120
