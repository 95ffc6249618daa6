"""The overlapped expert-parallel schedule (parallel.overlap_expert_comm) against the plain one
on 2 ranks (EP = 2; gloo on CPU, and NCCL on 2 GPUs with ``pytest -m gpu``): same weights, same tokens; the output, the input gradient and every
parameter gradient are bit-identical (torch.equal), over two forward+backward passes (so a
second use of the layer starts from clean dispatcher state).

The all-to-all bookkeeping is checked too: twice the calls (two halves of the local experts
per exchange), and per iteration, phase and direction exactly the same rows and bytes to and
from every peer as the plain schedule.
"""

import pytest
import torch

from ranks import DEVICES, run_ranks

S, B, H = 8, 2, 16


def make_config(overlap, iterations, num_experts, shared, capacity_factor, recompute="none",
                device="cpu", grouped=None):
    from megatron_coe.config import config_from_dict

    moe = {"num_experts": num_experts, "topk": 2, "expert_hidden_size": 12,
           "aux_loss": "seq_aux_loss", "z_loss_coeff": 1e-3, "capacity_factor": capacity_factor,
           "grouped_gemm": grouped}
    if shared:
        moe["shared_expert_hidden_size"] = 8
    return config_from_dict({
        "device": device,
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4, "moe": moe,
                  "coe": {"iterations": iterations}},
        "parallel": {"expert": 2, "overlap_expert_comm": overlap},
        "train": {"recompute": recompute},
    })


def _compare(rank, world, device, iterations, num_experts, shared, capacity_factor, overlap=True,
             recompute="none", grouped=None):
    """The plain schedule against ``overlap`` / ``recompute`` (the overlapped schedule, and
    train.recompute=experts: each iteration's expert MLPs recomputed in backward), both with
    the experts ``grouped`` selects (auto: grouped GEMMs on CPU; false: LocalExperts)."""
    import torch.distributed as dist

    from megatron_coe.model import build_moe_layer
    from megatron_coe.model.grouped_experts import GroupedExperts

    args = (iterations, num_experts, shared, capacity_factor)
    torch.manual_seed(0)
    plain = build_moe_layer(make_config(False, *args, device=device, grouped=grouped))
    overlapped = build_moe_layer(make_config(overlap, *args, recompute=recompute, device=device,
                                             grouped=grouped))
    assert isinstance(overlapped.experts, GroupedExperts) == (grouped is not False)
    overlapped.load_state_dict(plain.state_dict())
    assert overlapped.overlap == overlap and not plain.overlap
    assert overlapped.recompute_experts == (recompute == "experts")

    torch.manual_seed(100 + rank)  # each rank its own tokens
    for _ in range(2):
        x = torch.randn(S, B, H).to(device)
        gy = torch.randn(S, B, H).to(device)
        results = []
        for layer in (plain, overlapped):
            layer.zero_grad()
            xs = x.clone().requires_grad_(True)
            y, _ = layer(xs)
            (y * gy).sum().backward()
            results.append((y.detach(), xs.grad, {n: p.grad for n, p in layer.named_parameters()}))
        (y0, gx0, g0), (y1, gx1, g1) = results
        assert torch.equal(y0, y1), (y0 - y1).abs().max()
        assert torch.equal(gx0, gx1), (gx0 - gx1).abs().max()
        assert g0.keys() == g1.keys()
        for name in g0:
            assert torch.equal(g0[name], g1[name]), (name, (g0[name] - g1[name]).abs().max())

    a, b = plain.token_dispatcher.counters, overlapped.token_dispatcher.counters
    assert a.entries.keys() == b.entries.keys()
    assert len(a.entries) == iterations * 2 * 2  # (iteration, phase, direction)
    for key, ea in a.entries.items():
        eb = b.entries[key]
        # 2 passes; 1 vs 2 all-to-alls per pass (recompute repeats none)
        assert (ea.calls, eb.calls) == (2, 4 if overlap else 2), key
        assert (ea.sent_rows, ea.recv_rows) == (eb.sent_rows, eb.recv_rows), key
        assert (ea.sent_bytes, ea.recv_bytes) == (eb.sent_bytes, eb.recv_bytes), key
    # something really crossed between the ranks
    crossed = torch.tensor(sum(e.sent_rows[1 - rank] for e in a.entries.values()), device=device)
    dist.all_reduce(crossed)
    assert crossed > 0


@pytest.mark.parametrize(
    "iterations,num_experts,shared,capacity_factor,grouped",
    [(2, 8, True, None, None), (3, 4, False, 0.75, None), (1, 8, True, None, None),
     (2, 8, True, None, False)],
    ids=["coe2-shared-dropless", "coe3-2local-capacity0.75", "moe-shared",
         "coe2-shared-dropless-per-expert-gemms"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_overlapped_schedule_is_bit_identical(iterations, num_experts, shared, capacity_factor,
                                              grouped, device):
    run_ranks(_compare, 2, device, iterations, num_experts, shared, capacity_factor, True,
              "none", grouped)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "plain"])
@pytest.mark.parametrize("device", DEVICES)
def test_expert_recompute_is_bit_identical(overlap, device):
    """train.recompute=experts recomputes only expert MLPs: same bits, no extra all-to-all."""
    run_ranks(_compare, 2, device, 2, 8, True, None, overlap, "experts")
