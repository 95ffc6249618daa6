"""Expert parallelism on 2 ranks (EP = 2) against 1 rank (EP = 1): same global tokens, same
weights; outputs and every gradient equal (float32, relative error <= 1e-5).  On gloo/CPU, and
with ``pytest -m gpu`` on 2 GPUs over NCCL (tests/ranks.py DEVICES).

Global tokens X: [S, 2B, H]; rank r holds X[:, rB:(r+1)B].  The EP = 1 result is computed by
the same layer code in one process on all of X and saved; the 2 ranks load it and compare.
With a capacity factor, Megatron computes capacity per rank from its own tokens, so the EP = 1
side processes each rank's half as its own batch (same rule, one process) and the EP = 2 side
is also checked against the plain-PyTorch reference with per-rank groups.

The all-to-all bookkeeping is checked in the same run: per layer and step, 2*C all-to-alls
forward and 2*C backward; every (token, expert) pair is sent exactly once per iteration, to the
rank that owns the expert; bytes = rows x (hidden + prob) bytes.
"""

import pytest
import torch

from ranks import DEVICES, global_expert_name, named_grads, run_ranks

S, B, H, N, K, C = 8, 2, 16, 8, 2, 2


def make_config(ep, capacity_factor=None, pad=False, grouped=None, shared=True, iterations=C,
                device="cpu"):
    from megatron_coe.config import config_from_dict

    moe = {"num_experts": N, "topk": K, "expert_hidden_size": 12, "aux_loss": "none",
           "capacity_factor": capacity_factor, "pad_to_capacity": pad, "grouped_gemm": grouped}
    if shared:
        moe["shared_expert_hidden_size"] = 8
    return config_from_dict({
        "device": device,
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4, "moe": moe,
                  "coe": {"iterations": iterations}},
        "parallel": {"expert": ep},
    })


def global_weights(layer_ep1):
    return {k: v.clone() for k, v in layer_ep1.state_dict().items() if torch.is_tensor(v)}


def load_local(layer, weights, ep_rank, num_local):
    """Load full (EP = 1) weights into an EP layer: local expert j is global expert
    ep_rank * num_local + j."""
    state = {}
    for key in layer.state_dict():
        src = global_expert_name(key, ep_rank, num_local)
        if src in weights:
            state[key] = weights[src]
    missing = [k for k in layer.state_dict() if k not in state and "_extra_state" not in k]
    assert not missing, missing
    layer.load_state_dict(state, strict=False)


def _ep1(rank, world, path, capacity_factor, pad, grouped, device):
    from megatron_coe.model import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(make_config(1, capacity_factor, pad, grouped, device=device))
    x = torch.randn(S, 2 * B, H).to(device)
    gy = torch.randn(S, 2 * B, H).to(device)
    xs = x.clone().requires_grad_(True)
    if capacity_factor is None:
        y, _ = layer(xs)
    else:  # one batch per rank's tokens: the per-rank capacity rule
        y = torch.cat([layer(xs[:, r * B:(r + 1) * B].contiguous())[0] for r in range(2)], dim=1)
    (y * gy).sum().backward()
    torch.save({"weights": global_weights(layer), "x": x, "gy": gy, "y": y.detach(),
                "gx": xs.grad, "grads": named_grads(layer)}, path)


def _ep2(rank, world, path, capacity_factor, pad, grouped, device):
    import torch.distributed as dist

    from megatron_coe.model import build_moe_layer
    from megatron_coe.model.grouped_experts import GroupedExperts
    from reference import coe_forward, max_rel_err

    layer = build_moe_layer(make_config(2, capacity_factor, pad, grouped, device=device))
    assert isinstance(layer.experts, GroupedExperts) == (grouped is not False)
    ref = torch.load(path, weights_only=True, map_location=next(layer.parameters()).device)
    num_local = N // 2
    load_local(layer, ref["weights"], rank, num_local)
    maps = []  # routing map of each iteration, as the router emitted it
    for r in layer.routers:
        r.register_forward_hook(lambda m, a, out: maps.append(out[1].detach()))
    sl = slice(rank * B, (rank + 1) * B)
    x = ref["x"][:, sl].clone().requires_grad_(True)
    y, _ = layer(x)
    (y * ref["gy"][:, sl]).sum().backward()

    assert max_rel_err(y.detach(), ref["y"][:, sl]) <= 1e-5
    assert max_rel_err(x.grad, ref["gx"][:, sl]) <= 1e-5
    for name, g in named_grads(layer).items():
        g = g.clone()
        if not name.startswith("experts."):  # replicated: each rank holds its tokens' share
            dist.all_reduce(g)
        src = global_expert_name(name, rank, num_local)
        assert max_rel_err(g, ref["grads"][src]) <= 1e-5, name

    # The plain-PyTorch formula on all global tokens, with one capacity group per rank.
    full = {}
    for key, value in ref["weights"].items():
        full[key] = value.clone().requires_grad_(True)
    routers = [full["router.weight"]] + [full[f"extra_routers.{i}.weight"] for i in range(C - 1)]
    experts = [(full[f"experts.local_experts.{i}.linear_fc1.weight"],
                full[f"experts.local_experts.{i}.linear_fc2.weight"]) for i in range(N)]
    shared = (full["shared_experts.linear_fc1.weight"], full["shared_experts.linear_fc2.weight"])
    groups = [ref["x"][:, r * B:(r + 1) * B].reshape(-1, H) for r in range(2)]
    yr = coe_forward(torch.cat(groups), routers, experts, shared, K, "inner",
                     capacity_factor=capacity_factor, group_sizes=[S * B, S * B])
    assert max_rel_err(y.detach().reshape(-1, H), yr.detach()[rank * S * B:(rank + 1) * S * B]) <= 1e-5

    # Bookkeeping.
    counters = layer.token_dispatcher.counters
    assert counters.total("forward")["calls"] == 2 * C
    assert counters.total("backward")["calls"] == 2 * C
    assert len(maps) == C
    if capacity_factor is not None and not pad:  # tokens over capacity really were dropped
        assert any(int(m.sum()) < S * B * K for m in maps)
    if pad:  # every expert receives exactly its capacity from every rank
        capacity = -(-S * B * K * capacity_factor // N)
        assert all(int(m.sum()) == capacity * N for m in maps)
    row_bytes = {"dispatch": H * 4 + 4, "combine": H * 4}  # fp32 hidden (+ fp32 prob)
    for t, routing_map in enumerate(maps):
        pairs_to = routing_map.reshape(-1, 2, num_local).sum(dim=(0, 2))  # per destination rank
        got = pairs_to.clone()
        dist.all_reduce(got)
        d = counters.entries[(t, "dispatch", "forward")]
        cmb = counters.entries[(t, "combine", "forward")]
        assert d.calls == 1 and cmb.calls == 1
        assert d.sent_rows == pairs_to.tolist()          # each pair sent once, to its owner
        assert sum(d.sent_rows) == int(routing_map.sum())
        assert sum(d.recv_rows) == int(got[rank])        # all pairs for my experts arrive
        assert d.sent_bytes == [r * row_bytes["dispatch"] for r in d.sent_rows]
        assert cmb.sent_rows == d.recv_rows and cmb.recv_rows == d.sent_rows
        assert cmb.sent_bytes == [r * row_bytes["combine"] for r in cmb.sent_rows]
        back = counters.entries[(t, "dispatch", "backward")]
        assert back.sent_rows == d.recv_rows and back.calls == 1


@pytest.mark.parametrize("capacity_factor,pad,grouped",
                         [(None, False, None), (0.75, False, None), (0.75, True, None),
                          (None, False, False)],
                         ids=["dropless", "capacity0.75", "capacity0.75-padded",
                              "dropless-per-expert-gemms"])
@pytest.mark.parametrize("device", DEVICES)
def test_ep2_matches_ep1(tmp_path, capacity_factor, pad, grouped, device):
    """model.moe.grouped_gemm left to auto: grouped experts; false: LocalExperts."""
    path = str(tmp_path / "ep1.pt")
    run_ranks(_ep1, 1, path, capacity_factor, pad, grouped, device)
    run_ranks(_ep2, 2, path, capacity_factor, pad, grouped, device)
