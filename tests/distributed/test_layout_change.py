"""Megatron's parallel groups belong to the process: building again with another
parallel.expert is refused (it used to keep the first layout's local experts silently)."""

import pytest

from ranks import run_ranks


def _config(ep):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 4,
                  "moe": {"num_experts": 8, "topk": 2, "expert_hidden_size": 8},
                  "coe": {"iterations": 2}},
        "parallel": {"expert": ep}})


def _rebuild_with_other_ep(rank, world_size):
    from megatron.core import parallel_state

    from megatron_coe.model import build_moe_layer

    assert build_moe_layer(_config(2)).num_local_experts == 4
    with pytest.raises(ValueError, match=r"parallel.expert: groups 2 vs config 1\); call "
                                         r"megatron_coe.parallel.destroy\(\)"):
        build_moe_layer(_config(1))
    # parallel.destroy() also ends the default group; Megatron's groups are what matter here
    parallel_state.destroy_model_parallel()
    assert build_moe_layer(_config(1)).num_local_experts == 8


def test_rebuild_with_another_expert_parallel_size_is_refused():
    run_ranks(_rebuild_with_other_ep, 2)
