"""model.coe.iteration_norm: iterations 2..C read Norm_t(x(t-1)); off, the layer and its
checkpoint definition are unchanged.  One process, EP = 1, float32."""

import pytest
import torch

from megatron_coe.config import config_from_dict

S, B, H = 6, 3, 32


def make_config(residual, iteration_norm, iterations=3):
    return config_from_dict({
        "model": {"num_layers": 1, "hidden_size": H, "num_attention_heads": 4,
                  "moe": {"num_experts": 8, "topk": 2, "expert_hidden_size": 24,
                          "aux_loss": "none"},
                  "coe": {"iterations": iterations, "residual": residual,
                          "iteration_norm": iteration_norm}}})


def router_inputs_and_iterates(layer, x):
    """Each router's input and each iteration's x(t) (outer residual: x(t) = F_t)."""
    inputs, outputs = [], []
    hooks = [r.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
             for r in layer.routers]
    step = layer._iteration

    def recorded(t, x, padding_mask):
        f = step(t, x, padding_mask)
        outputs.append(f.detach())
        return f

    layer._iteration = recorded
    with torch.no_grad():
        layer(x)
    for h in hooks:
        h.remove()
    return inputs, outputs


@pytest.mark.parametrize("iteration_norm", [False, True])
def test_iterations_after_the_first_read_the_normed_iterate(iteration_norm):
    from megatron_coe.model import build_moe_layer

    layer = build_moe_layer(make_config("outer", iteration_norm))
    assert len(layer.iteration_norms) == (2 if iteration_norm else 0)
    torch.manual_seed(0)
    x = torch.randn(S, B, H)
    inputs, iterates = router_inputs_and_iterates(layer, x)
    assert torch.equal(inputs[0], x)  # x(0) is already the pre-MLP norm's output
    for t in (1, 2):
        prev = iterates[t - 1]
        expect = (torch.nn.functional.rms_norm(prev, (H,), eps=1e-5) if iteration_norm
                  else prev)
        torch.testing.assert_close(inputs[t], expect, rtol=1e-5, atol=1e-6)
    if iteration_norm:  # at init it lifts the shrunken iterate back towards unit RMS
        rms = inputs[2].pow(2).mean(-1).sqrt().mean().item()
        assert rms > 100 * iterates[1].pow(2).mean(-1).sqrt().mean().item()


def test_off_by_default_keeps_parameters_and_checkpoint_definition():
    from megatron_coe.checkpoint import model_definition
    from megatron_coe.model import build_moe_layer

    off = make_config("outer", False)
    assert "iteration_norm" not in model_definition(off)["coe"]  # old checkpoints still match
    assert model_definition(make_config("outer", True))["coe"]["iteration_norm"] is True
    keys = list(build_moe_layer(off).state_dict())
    assert not any("iteration_norms" in k for k in keys)
    on = list(build_moe_layer(make_config("outer", True)).state_dict())
    assert [k for k in on if "iteration_norms" not in k] == keys
    assert sum("iteration_norms" in k for k in on) == 2
