"""A 2-layer CoE GPT (Megatron GPTModel, CoE-2(2/8) with a shared expert) runs forward and
backward on 2 CPU ranks with EP = 2, and matches the same model with the same weights on one
rank (EP = 1): per-token losses, and every gradient (replicated ones summed over ranks)."""

import torch

from ranks import global_expert_name as _global_name
from ranks import named_grads, run_ranks

B, SEQ, V, N = 2, 16, 64, 8


def make_config(ep, residual="inner"):
    from megatron_coe.config import config_from_dict

    return config_from_dict({
        "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                  "ffn_hidden_size": 64, "vocab_size": V, "seq_length": SEQ,
                  "moe": {"num_experts": N, "topk": 2, "expert_hidden_size": 16,
                          "shared_expert_hidden_size": 16,
                          # aux losses average over each rank's own sequences, so summing
                          # gradients over ranks would not equal one rank's batch: off here.
                          "aux_loss": "none"},
                  "coe": {"iterations": 2, "residual": residual}},
        "parallel": {"expert": ep},
    })


def _ep1(rank, world, path, residual):
    from megatron_coe.model import build_model

    torch.manual_seed(0)
    model = build_model(make_config(1, residual))
    tokens = torch.randint(0, V, (2 * B, SEQ + 1))
    pos = torch.arange(SEQ).expand(2 * B, SEQ)
    losses = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    losses.sum().backward()
    state = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    torch.save({"state": state, "tokens": tokens, "losses": losses.detach(),
                "grads": named_grads(model)}, path)


def _ep2(rank, world, path, residual):
    import torch.distributed as dist

    from megatron_coe.model import build_model, coe_layers
    from reference import max_rel_err, rel_norm_err

    ref = torch.load(path, weights_only=True)
    model = build_model(make_config(2, residual))
    num_local = N // 2
    local = {}
    for name in model.state_dict():
        src = _global_name(name, rank, num_local)
        if src in ref["state"]:
            local[name] = ref["state"][src]
    model.load_state_dict(local, strict=False)
    tokens = ref["tokens"][rank * B:(rank + 1) * B]
    pos = torch.arange(SEQ).expand(B, SEQ)
    losses = model(tokens[:, :-1], pos, None, labels=tokens[:, 1:])
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert max_rel_err(losses.detach(), ref["losses"][rank * B:(rank + 1) * B]) <= 1e-5
    for name, g in named_grads(model).items():
        assert g is not None and torch.isfinite(g).all(), name
        g = g.clone()
        if "local_experts" not in name:
            dist.all_reduce(g)
        err = rel_norm_err(g, ref["grads"][_global_name(name, rank, num_local)])
        assert err <= 1e-5, (name, err)
    layers = coe_layers(model)
    assert len(layers) == 2
    for layer in layers:
        assert layer.token_dispatcher.counters.total("forward")["calls"] == 4
        assert layer.token_dispatcher.counters.total("backward")["calls"] == 4
        assert all(r.weight.grad.abs().sum() > 0 for r in layer.routers)


def test_gpt_ep2_forward_backward_matches_ep1(tmp_path):
    path = str(tmp_path / "ep1.pt")
    run_ranks(_ep1, 1, path, "inner")
    run_ranks(_ep2, 2, path, "inner")


def test_gpt_ep2_reference_residual(tmp_path):
    path = str(tmp_path / "ep1.pt")
    run_ranks(_ep1, 1, path, "reference")
    run_ranks(_ep2, 2, path, "reference")
