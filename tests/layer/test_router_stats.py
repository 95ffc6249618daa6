"""Each CoE iteration's router keeps its own statistics: aux loss logged under its own name,
its own expert-bias token counts, and the layer's per-iteration expert load."""

import pytest
import torch

from megatron_coe.config import config_from_dict

S, B, H, N = 5, 2, 16, 8


def _layer(iterations, router, **moe):
    from megatron_coe.model import build_moe_layer

    config = config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": N, "topk": 2, "expert_hidden_size": 8, **moe},
                  "coe": {"iterations": iterations, "router": router}},
    })
    return build_moe_layer(config)


@pytest.mark.parametrize("router", ["independent", "shared"])
def test_aux_and_z_loss_logged_per_iteration(router):
    from megatron.core.transformer.moe import moe_logging

    from megatron_coe.router_stats import install_tracker

    moe_logging.destroy_moe_metrics_tracker()  # drop what earlier tests recorded
    tracker = install_tracker()
    torch.manual_seed(0)
    layer = _layer(3, router, aux_loss="aux_loss", aux_loss_coeff=0.01, z_loss_coeff=0.001)
    maps = []
    for r in {id(r): r for r in layer.routers}.values():
        r.register_forward_hook(lambda m, a, out: maps.append(out[1]))
    y, _ = layer(torch.randn(S, B, H, requires_grad=True))
    y.sum().backward()
    names = set(tracker.metrics)
    for t in (1, 2, 3):
        assert f"load_balancing_loss/iter{t}" in names
        assert f"z_loss/iter{t}" in names
    assert "load_balancing_loss" not in names  # nothing summed across iterations
    values = [tracker.metrics[f"load_balancing_loss/iter{t}"].values[0].item() for t in (1, 2, 3)]
    # one router's balance loss each (about 1 when balanced), not a running sum over the
    # iterations (which would read about 2 and 3 in iterations 2 and 3)
    assert all(0.5 < v < 1.5 for v in values), values
    # the layer's per-iteration expert load equals each iteration's routing map
    assert len(maps) == 3
    for t, m in enumerate(maps):
        assert torch.equal(layer.tokens_per_expert[t], m.sum(0).float())


def test_expert_bias_counts_are_per_router():
    torch.manual_seed(1)
    layer = _layer(2, "independent", expert_bias=True, score_function="sigmoid", aux_loss="none")
    y, _ = layer(torch.randn(S, B, H))
    routers = layer.routers
    assert routers[0] is not routers[1]
    for t, r in enumerate(routers):
        assert r.expert_bias is not None
        assert torch.equal(r.local_tokens_per_expert, layer.tokens_per_expert[t])
        assert r.local_tokens_per_expert.sum() == S * B * 2


def test_nonfinite_values_are_located_by_layer_and_iteration():
    torch.manual_seed(2)
    layer = _layer(3, "independent", aux_loss="none")
    x = torch.randn(S, B, H)
    layer(x)
    assert layer.first_nonfinite() is None
    with torch.no_grad():
        layer.routers[1].weight[0, 0] = float("nan")  # iteration 2's router
    layer(x)
    assert layer.first_nonfinite() == "layer 1, CoE iteration 2: router probabilities"
    layer.reset_step_stats()
    with torch.no_grad():
        layer.routers[1].weight[0, 0] = 0.0
        for name, w in layer.experts.state_dict(keep_vars=True).items():
            if name.endswith("linear_fc2.weight"):  # an expert blows up: seen in iteration 1
                w[0, 0] = float("inf")
    layer(x)
    assert layer.first_nonfinite() == "layer 1, CoE iteration 1: expert output"


@pytest.mark.parametrize("recompute", ["moe", "full"])
def test_expert_load_counted_once_under_recompute(recompute):
    """Recompute runs a training forward twice (without grad, then again in backward): the
    layer's expert load counts each routed token once, as the routers' own counts do."""
    from megatron_coe.model import build_moe_layer

    config = config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": N, "topk": 2, "expert_hidden_size": 8,
                          "expert_bias": True, "score_function": "sigmoid", "aux_loss": "none"},
                  "coe": {"iterations": 2}},
        "train": {"recompute": recompute},
    })
    torch.manual_seed(3)
    layer = build_moe_layer(config)
    x = torch.randn(S, B, H, requires_grad=True)
    if recompute == "full":  # the transformer block checkpoints whole layers
        from megatron.core import tensor_parallel

        y, _ = tensor_parallel.checkpoint(layer, False, x)
    else:
        assert layer.moe_layer_recompute
        y, _ = layer(x)
    y.sum().backward()
    for t, r in enumerate(layer.routers):
        assert layer.tokens_per_expert[t].sum() == S * B * 2
        assert torch.equal(r.local_tokens_per_expert, layer.tokens_per_expert[t])


def test_a_layer_that_raised_leaves_no_iteration_mark_to_the_next_model():
    """A CoE layer marks its routers' statistics with the iteration from before its shared
    expert until after its router; an error in between (an out-of-memory error that the GPU
    check records and goes on from) leaves the mark, and the next model built in the process
    clears it, so a stock MoE layer's aux loss keeps its plain name."""
    from megatron.core.transformer.moe import moe_logging

    from megatron_coe import router_stats
    from megatron_coe.config import config_from_dict
    from megatron_coe.model import build_moe_layer

    torch.manual_seed(0)
    layer = _layer(2, "independent", aux_loss="aux_loss", aux_loss_coeff=0.01)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    layer.routers[1].forward = out_of_memory
    with pytest.raises(RuntimeError, match="out of memory"):
        layer(torch.randn(S, B, H))
    assert router_stats.active_iteration() == 1  # left behind by the error
    moe_logging.destroy_moe_metrics_tracker()
    config = config_from_dict({"model": {
        "num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
        "moe": {"num_experts": N, "topk": 2, "expert_hidden_size": 8, "aux_loss": "aux_loss",
                "aux_loss_coeff": 0.01, "grouped_gemm": False}}})
    stock = build_moe_layer(config, stock_megatron=True)
    assert router_stats.active_iteration() is None
    stock(torch.randn(S, B, H))
    assert set(moe_logging.get_moe_metrics_tracker().metrics) == {"load_balancing_loss"}
