"""The optimizer step on the device (megatron_coe/optim_step.py) against Megatron's step, on CPU
with torch's CPU fused AdamW kernel (the kernel a CUDA run uses, compiled for the CPU): the same
weights, moments and gradient norm within fp32 rounding, clipping included; a non-finite step
changes no weight, moment, step count or LR and leaves nothing behind for the next step.  The
checks take the device: tests/layer/test_gpu_step.py runs them on a GPU."""

import math

import pytest
import torch

from step_harness import built as _built, megatron_step, step_batches as _batches, step_config

FUSED = {"fused": True, "foreach": False}


def _config(precision="fp32", clip_grad=0.05, fused=True, device="cpu"):
    return step_config(precision=precision, device=device,
                       optimizer={"clip_grad": clip_grad, "fused": fused, "lr": 1e-2})


def _train(config, built, steps, megatron=False, nan_at=(), first=0):
    """Steps ``first`` .. ``first + steps - 1`` on fixed batches; returns their StepResults."""
    from megatron_coe import optim_step
    from megatron_coe.train import run_schedule

    model, optimizer, scheduler = built
    device = torch.device(config.device)
    results = []
    for i in range(first, first + steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        total = run_schedule(model, _batches(config, i), config, forward_only=False,
                             inject_nan=i in nan_at)
        step = megatron_step if megatron else optim_step.take_step  # same (fused) AdamW
        result = step(model, optimizer, scheduler, total, config, device)
        results.append(result)
    return results


def _skip_without_torch_adamw(optimizer):
    from megatron_coe.checkpoint import torch_optimizers

    if not torch_optimizers(optimizer):  # Megatron takes TE's or apex's FusedAdam where installed
        pytest.skip("Megatron built Transformer Engine's or apex's FusedAdam: Megatron's step runs")


def _state(built):
    from megatron_coe.checkpoint import torch_optimizers

    model, optimizer, scheduler = built
    # the fp32 main weights the optimizer updates (bf16: the model's are their rounding)
    weights = [p.detach().clone() for opt in torch_optimizers(optimizer)
               for g in opt.param_groups for p in g["params"]]
    weights += [p.detach().clone() for p in model.parameters()]
    moments = [(s["step"].clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
               for opt in torch_optimizers(optimizer) for s in opt.state.values()]
    return weights, moments, optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("clip_grad", [0.05, 0.0], ids=["clipped", "no-clip"])
def test_the_step_on_the_device_matches_megatrons(precision, clip_grad):
    check_step_matches_megatrons(precision, clip_grad, "cpu")


def check_step_matches_megatrons(precision, clip_grad, device):
    from megatron_coe.optim_step import runs_on_device

    config = _config(precision, clip_grad, device=device)
    ours, theirs = _built(config), _built(config)
    _skip_without_torch_adamw(ours[1])
    assert runs_on_device(ours[1], config, torch.device(device))
    # bf16: after one step a bf16 weight may round the other way, and later steps differ by
    # more than the rounding of the update; fp32 holds over several steps
    steps = 4 if precision == "fp32" else 1
    got = _train(config, ours, steps)
    expected = _train(config, theirs, steps, megatron=True)
    assert all(r.applied and r.finite for r in got + expected)
    if clip_grad:  # every step clips: the scale is in use
        assert all(r.grad_norm > 2 * clip_grad for r in expected)
    for a, b in zip(got, expected):
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
        assert a.loss == pytest.approx(b.loss, rel=1e-5, abs=1e-6)
    (w_a, m_a, lr_a), (w_b, m_b, lr_b) = _state(ours), _state(theirs)
    assert lr_a == lr_b
    moved = 0.0
    main = len(w_a) - len(list(ours[0].parameters()))
    for a, b, start in zip(w_a[:main], w_b[:main], _state(_built(config))[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-3  # the weights did move
    for (s_a, *ma), (s_b, *mb) in zip(m_a, m_b):
        assert torch.equal(s_a, s_b)
        for x, y in zip(ma, mb):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-9)


def test_a_nonfinite_step_changes_nothing_and_the_next_step_is_as_without_it():
    check_nonfinite_step("cpu")


def check_nonfinite_step(device):
    from megatron_coe.checkpoint import torch_optimizers

    config = _config(device=device)
    skipped, clean = _built(config), _built(config)
    _skip_without_torch_adamw(skipped[1])
    _train(config, skipped, 2)
    _train(config, clean, 2)
    before = _state(skipped)
    result, = _train(config, skipped, 1, nan_at=(2,), first=2)
    assert not result.applied and not result.finite and math.isnan(result.grad_norm)
    after = _state(skipped)
    assert after[2] == before[2]  # the LR schedule did not move
    for x, y in zip(after[0], before[0]):
        assert torch.equal(x, y)
    for a, b in zip(after[1], before[1]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for opt in torch_optimizers(skipped[1]):  # nothing left for a later step to read
        assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    # the next step is bit for bit the one a run that never saw the bad step takes
    _train(config, skipped, 1, first=3)
    _train(config, clean, 1, first=3)
    for x, y in zip(_state(skipped)[0], _state(clean)[0]):
        assert torch.equal(x, y)


def test_megatrons_step_where_the_update_cannot_run_on_the_device():
    from megatron_coe.optim import use_adam_implementation
    from megatron_coe.optim_step import runs_on_device

    config = _config(fused=None)  # CPU default: one update per tensor
    _, optimizer, _ = _built(config)
    assert not runs_on_device(optimizer, config, torch.device("cpu"))
    use_adam_implementation(optimizer, FUSED)  # decided again
    assert runs_on_device(optimizer, config, torch.device("cpu"))
    _, fp16, _ = _built(_config("fp16"))  # the loss scaler reads its own verdict
    use_adam_implementation(fp16, FUSED)
    assert not runs_on_device(fp16, _config("fp16"), torch.device("cpu"))
