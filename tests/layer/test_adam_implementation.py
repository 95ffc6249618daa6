"""AdamW's implementation: torch's fused kernel on CUDA (foreach where fused cannot run), torch's
defaults on CPU; the flags reach every torch AdamW inside Megatron's optimizer and take effect
(checked on CPU, where torch also has a fused AdamW kernel), also after a checkpoint brought
back another run's flags."""

import types

import pytest
import torch

from megatron_coe.config import config_from_dict

FUSED = {"fused": True, "foreach": False}


def test_choice_per_device():
    from megatron_coe.optim import adam_implementation

    assert adam_implementation("cuda") == FUSED
    assert adam_implementation("cuda", all_floating=False) == {"fused": False, "foreach": True}
    assert adam_implementation("cpu") == {"fused": None, "foreach": None}
    # optimizer.fused: true on CPU takes torch's CPU fused kernel; false on CUDA, foreach
    assert adam_implementation("cpu", fused=True) == FUSED
    assert adam_implementation("cuda", fused=False) == {"fused": False, "foreach": True}
    assert adam_implementation("cpu", fused=False) == {"fused": None, "foreach": None}


def _adamw(params, **kwargs):
    return torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, **kwargs)


def test_flags_select_the_fused_kernel(monkeypatch):
    """An AdamW built as Megatron builds it (no flags), given the fused flags afterwards, runs
    torch's fused AdamW kernel and steps bit for bit like one built with fused=True."""
    from megatron_coe.optim import use_adam_implementation

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    flagged, reference = _adamw(a), _adamw(b, fused=True)
    _adamw_step(flagged, a, grads[0])  # state made by the default implementation first
    _adamw_step(reference, b, grads[0])
    use_adam_implementation(types.SimpleNamespace(optimizer=flagged), FUSED)
    assert all(flagged.state[p]["step"].dtype == torch.float32 for p in a)
    kernel, calls = torch._fused_adamw_, []
    monkeypatch.setattr(torch, "_fused_adamw_",
                        lambda *args, **kw: calls.append(1) or kernel(*args, **kw))
    for step_grads in grads[1:]:
        _adamw_step(flagged, a, step_grads)
    assert len(calls) == 2
    monkeypatch.setattr(torch, "_fused_adamw_", kernel)
    for step_grads in grads[1:]:
        _adamw_step(reference, b, step_grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def _adamw_step(opt, params, grads):
    for p, grad in zip(params, grads):
        p.grad = grad.clone()
    opt.step()


def _megatron_optimizer(seed=0):
    from megatron_coe.model import build_model
    from megatron_coe.optim import build_optimizer, wrap_model

    config = config_from_dict({"model": {
        "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 64,
        "seq_length": 12, "moe": {"num_experts": 4, "topk": 1, "expert_hidden_size": 16},
        "coe": {"iterations": 2}}})
    torch.manual_seed(seed)
    model = wrap_model(config, build_model(config))
    optimizer, _ = build_optimizer(config, model)
    return model, optimizer


def _train_step(model, optimizer):
    from megatron_coe import cpu

    tokens = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model(tokens[:, :-1], torch.arange(12).expand(2, 12), None,
                 labels=tokens[:, 1:]).mean()
    loss.backward()
    model.finish_grad_sync()
    with torch.no_grad(), cpu.cuda_to_cpu():  # as train.py steps on CPU
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def test_megatron_optimizer_on_cpu_keeps_torch_defaults_and_takes_flags():
    """Without TE/apex Megatron falls back to torch's AdamW: on CPU the build leaves its flags
    at torch's defaults (the CPU reference); given the fused flags, every inner AdamW
    (dense and expert) takes them and a training step stays within float tolerance."""
    from megatron_coe.checkpoint import torch_optimizers
    from megatron_coe.optim import use_adam_implementation

    model, optimizer = _megatron_optimizer()
    inner = torch_optimizers(optimizer)
    assert inner and all(type(opt) is torch.optim.AdamW for opt in inner)
    assert all(g["fused"] is None and g["foreach"] is None
               for opt in inner for g in opt.param_groups)
    reference = _train_step(model, optimizer)

    model, optimizer = _megatron_optimizer()
    use_adam_implementation(optimizer, FUSED)
    assert all(g["fused"] is True and g["foreach"] is False
               for opt in torch_optimizers(optimizer) for g in opt.param_groups)
    for got, ref in zip(_train_step(model, optimizer), reference):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_reapplying_after_load_restores_this_devices_implementation():
    """A checkpoint from a fused (CUDA) run brings back fused flags; re-applying on CPU puts
    torch's defaults back and the steps on the host."""
    from megatron_coe.checkpoint import torch_optimizers
    from megatron_coe.optim import use_adam_implementation

    model, optimizer = _megatron_optimizer()
    use_adam_implementation(optimizer, FUSED)
    _train_step(model, optimizer)
    assert all(opt._step_supports_amp_scaling and opt.param_groups[0]["fused"]
               for opt in torch_optimizers(optimizer))
    use_adam_implementation(optimizer)
    for opt in torch_optimizers(optimizer):
        assert all(g["fused"] is None and g["foreach"] is None for g in opt.param_groups)
        assert opt.state and all(s["step"].device.type == "cpu" for s in opt.state.values())
        assert opt._step_supports_amp_scaling is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_parameters_get_the_fused_kernel():
    from megatron_coe.optim import use_adam_implementation

    params = [torch.nn.Parameter(torch.randn(4, 3, device="cuda"))]
    opt = _adamw(params)
    use_adam_implementation(types.SimpleNamespace(optimizer=opt))
    assert opt.param_groups[0]["fused"] is True
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert opt.state[params[0]]["step"].device.type == "cuda"


def test_the_run_device_decides_also_for_an_optimizer_without_parameters():
    """A distributed-optimizer rank whose shard holds no parameter keeps an AdamW with empty
    groups: its flags follow the run's device like every other rank's, so all ranks take the
    same optimizer step (optim_step.runs_on_device)."""
    from megatron_coe.optim import use_adam_implementation

    empty = torch.optim.AdamW([{"params": []}], lr=0.01)
    use_adam_implementation(types.SimpleNamespace(optimizer=empty), device_type="cuda")
    assert {k: empty.param_groups[0][k] for k in FUSED} == FUSED
    use_adam_implementation(types.SimpleNamespace(optimizer=empty), device_type="cpu")
    assert empty.param_groups[0]["fused"] is None

