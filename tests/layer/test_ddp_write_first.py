"""Gradient buffers written by each step's first gradient (megatron_coe/ddp.py) against Megatron
DDP's zero-then-accumulate: bit-identical gradients and weights over steps of several
micro-batches (a parameter's later gradients are added), with the expert weights used by two
CoE iterations and, under expert recompute, reaching the hook twice per micro-batch; a
parameter that gets no gradient is zeroed before the reduction; where another writer of
main_grad exists, Megatron's zeroing stays."""

import types

import pytest
import torch

from step_harness import built, step_batches as _batches, step_config


def _config(recompute="none", precision="fp32", device="cpu"):
    return step_config(micro_batches=3, precision=precision, train={"recompute": recompute},
                       device=device)


def _built(config, write_first):
    model, optimizer, scheduler = built(config)
    assert model.write_first  # the local spec on CPU: the hook is the only writer
    model.write_first = write_first
    return model, optimizer, scheduler


def _grads(model):
    return [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]


@pytest.mark.parametrize("recompute,precision", [("none", "fp32"), ("experts", "fp32"),
                                                 ("none", "bf16")])
def test_written_buffers_equal_zeroed_and_accumulated_ones(recompute, precision):
    check_written_buffers(recompute, precision, "cpu")


def check_written_buffers(recompute, precision, device):
    """(tests/layer/test_gpu_step.py runs it on a GPU.)"""
    from megatron_coe.optim_step import take_step
    from megatron_coe.train import run_schedule

    config = _config(recompute, precision, device)
    ours, theirs = _built(config, True), _built(config, False)
    for step in range(3):
        grads = []
        for model, optimizer, scheduler in (ours, theirs):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            if model.write_first and step:  # the buffers were not zeroed: last step's values
                assert any(g.abs().sum() > 0 for g in _grads(model))
            total = run_schedule(model, _batches(config, step), config, forward_only=False)
            grads.append(_grads(model))
            take_step(model, optimizer, scheduler, total, config, torch.device(device))
        for a, b in zip(*grads):
            assert torch.equal(a, b)
    for p, q in zip(ours[0].parameters(), theirs[0].parameters()):
        assert torch.equal(p, q)


def test_a_parameter_without_a_gradient_is_zeroed_before_the_reduction():
    from megatron_coe.ddp import finalize_model_grads

    config = _config()
    model, _, _ = _built(config, True)
    params = list(model.module.parameters())
    for p in params:  # last step's gradients: everything written
        (p * 1.0).sum().backward()
    assert all(p.main_grad.abs().sum() > 0 for p in params)
    model.zero_grad_buffer()
    used = params[3]
    (used * 2.0).sum().backward()  # this step only one parameter gets a gradient
    assert all(p.main_grad.abs().sum() > 0 for p in params)  # stale ones still there
    finalize_model_grads([model], num_tokens=None)
    assert torch.equal(used.main_grad, torch.full_like(used.main_grad, 2.0))
    assert all(torch.count_nonzero(p.main_grad) == 0 for p in params if p is not used)


def test_megatrons_zeroing_stays_where_another_writer_exists():
    from megatron_coe.ddp import applies

    ddp = types.SimpleNamespace(overlap_grad_reduce=False)
    tf = types.SimpleNamespace(gradient_accumulation_fusion=False)
    plain = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert applies(plain, tf, ddp)
    te_linear = type("Linear", (torch.nn.Module,), {"__module__": "transformer_engine.pytorch"})
    assert not applies(torch.nn.Sequential(te_linear()), tf, ddp)
    assert not applies(plain, types.SimpleNamespace(gradient_accumulation_fusion=True), ddp)
    assert not applies(plain, tf, types.SimpleNamespace(overlap_grad_reduce=True))
    for impl, ok in (("none", True), ("full_iteration", True), ("local", False),
                     ("transformer_engine", False)):  # per-layer graphs add to main_grad
        graphs = types.SimpleNamespace(gradient_accumulation_fusion=False, cuda_graph_impl=impl)
        assert applies(plain, graphs, ddp) == ok, impl
