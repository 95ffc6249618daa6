"""A weight's gradients from a CoE layer's several uses summed into its fp32 buffer in one pass
(megatron_coe/wgrad_sum.py) against autograd's sum and the DDP hook's write: the same buffers
and weights bit for bit, over steps of one and of several micro-batches, C = 1, 2 and 3, every
recompute mode, fp32 and bf16; the last use writes the fused sum; micro-batches whose forwards
run before their backwards, and a forward never backpropagated, change nothing; the Triton
kernel equals torch's two ops."""

import pytest
import torch

from step_harness import built, step_batches, step_config


def _grads(model):
    return [b.grad_data.clone() for b in model.buffers + model.expert_parallel_buffers]


def _writes(monkeypatch):
    """Record each buffer write of wgrad_sum: whether it summed two gradients."""
    from megatron_coe import wgrad_sum

    writes = []
    write = wgrad_sum._write
    monkeypatch.setattr(wgrad_sum, "_write", lambda w, partial, grad: (
        writes.append(partial is not None), write(w, partial, grad))[1])
    return writes


def _steps(config, summed: bool, monkeypatch, steps=2):
    """Buffers after each step's backward, and the weights after the last step, with the
    summed writes on or with autograd's sum and the hook (``use`` returning the weight)."""
    from megatron_coe import wgrad_sum
    from megatron_coe.optim_step import take_step
    from megatron_coe.train import run_schedule

    model, optimizer, scheduler = built(config)
    grads = []
    with monkeypatch.context() as m:
        if not summed:
            m.setattr(wgrad_sum, "use", lambda weight: weight)
        for step in range(steps):
            model.zero_grad_buffer()
            optimizer.zero_grad()
            total = run_schedule(model, step_batches(config, step), config, forward_only=False)
            grads.append(_grads(model))
            take_step(model, optimizer, scheduler, total, config, torch.device("cpu"))
    return grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("iterations,micro_batches,recompute,precision", [
    (2, 1, "none", "fp32"), (2, 3, "none", "bf16"), (3, 2, "none", "bf16"),
    (1, 2, "none", "fp32"), (2, 2, "experts", "fp32"), (2, 2, "moe", "bf16"),
    (2, 2, "moe_act", "bf16")])
def test_buffers_and_weights_equal_autograds_sum(iterations, micro_batches, recompute, precision,
                                                  monkeypatch):
    config = step_config(iterations, topk=2, micro_batches=micro_batches, precision=precision,
                         train={"recompute": recompute})
    writes = _writes(monkeypatch)
    ours, ours_w = _steps(config, True, monkeypatch)
    theirs, theirs_w = _steps(config, False, monkeypatch)
    for a, b in zip(ours, theirs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for x, y in zip(ours_w, theirs_w):
        assert torch.equal(x, y)
    # 2 layers x 2 expert weights per micro-batch and step
    per_step = 2 * 2 * micro_batches
    if iterations == 1 or recompute == "experts":  # one gradient per backward pass: no sum
        assert writes and not any(writes)
    else:
        assert writes.count(True) == 2 * per_step and len(writes) == 2 * per_step


def _micro_batch_losses(model, config, batches):
    from megatron_coe.train import run_schedule  # noqa: F401  (the model's forward as trained)

    losses = []
    for b in batches:
        out = model(b["tokens"], b["position_ids"], None, labels=b["labels"])
        losses.append((out * b["loss_mask"]).sum())
    return losses


@pytest.mark.parametrize("summed", [True, False])
def test_forwards_before_backwards_and_a_forward_left_alone(summed, monkeypatch):
    """Two micro-batches' forwards, then their backwards (as pipeline schedules run them), after
    a forward that is never backpropagated: the buffers equal one micro-batch at a time."""
    from megatron_coe import wgrad_sum

    config = step_config(2, topk=2, micro_batches=2, precision="bf16")
    batches = step_batches(config, 0)
    results = []
    for interleaved in (False, True):
        model, _, _ = built(config)
        model.zero_grad_buffer()
        for buffer in model.buffers + model.expert_parallel_buffers:
            buffer.grad_data.fill_(float("nan"))  # written buffers are not zeroed: copy first
        with monkeypatch.context() as m:
            if not summed:
                m.setattr(wgrad_sum, "use", lambda weight: weight)
            if interleaved:
                _micro_batch_losses(model, config, batches[:1])  # never backpropagated
                losses = _micro_batch_losses(model, config, batches)
                for loss in losses:
                    loss.backward()
            else:
                for b in batches:
                    _micro_batch_losses(model, config, [b])[0].backward()
        results.append(_grads(model))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)  # padding: NaN


def _grouped_experts(model):
    return next(m for m in model.modules() if type(m).__name__ == "GroupedExperts")


def _expert_inputs():
    """Rows, counts (one expert without rows) and probabilities for step_config's experts."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(20, 32, generator=g).bfloat16(), torch.tensor([3, 0, 5, 2, 4, 1, 5]),
            torch.rand(20, generator=g))


def test_a_graph_backpropagated_twice(monkeypatch):
    """retain_graph: the second pass's gradients outnumber the counted uses; they are summed
    and written at the pass's end, as autograd's sum and the hook write them.  (One expert
    module used twice, as by two CoE iterations: Megatron's loss does not backpropagate twice.)"""
    from megatron_coe import wgrad_sum

    config = step_config(2, topk=2, micro_batches=1, precision="bf16")
    rows, counts, probs = _expert_inputs()
    results = []
    for summed in (True, False):
        model, _, _ = built(config)
        model.zero_grad_buffer()
        experts = _grouped_experts(model)
        with monkeypatch.context() as m:
            if not summed:
                m.setattr(wgrad_sum, "use", lambda weight: weight)
            y1, _ = experts(rows, counts, probs)
            y2, _ = experts(y1 * 0.5, counts, probs)
            loss = (y2.float() * torch.linspace(-1, 1, y2.numel()).view_as(y2)).sum()
            loss.backward(retain_graph=True)
            (loss * 0.5).backward()
        results.append([experts.fc1_weight.main_grad.clone(),
                        experts.fc2_weight.main_grad.clone()])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_a_failed_backward_leaves_nothing_behind(monkeypatch):
    """A backward pass that raises between two uses' gradients (out of memory, say): the next
    step's buffers are those of a process that never saw it."""
    config = step_config(2, topk=2, micro_batches=1, precision="bf16")
    rows, counts, probs = _expert_inputs()

    def step(experts, fail):
        y1, _ = experts(rows, counts, probs)
        if fail:
            y1.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("injected")))
        y2, _ = experts(y1 * 0.5, counts, probs)
        (y2.float() * torch.linspace(-1, 1, y2.numel()).view_as(y2)).sum().backward()

    results = []
    for fail_first in (True, False):
        model, _, _ = built(config)
        experts = _grouped_experts(model)
        if fail_first:
            model.zero_grad_buffer()
            with pytest.raises(RuntimeError, match="injected"):
                step(experts, True)
            assert experts.fc2_weight.wgrad_partial is not None  # use 2's gradient, kept
        model.zero_grad_buffer()
        step(experts, False)
        results.append([experts.fc1_weight.main_grad.clone(),
                        experts.fc2_weight.main_grad.clone()])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_outside_a_write_first_ddp_the_weight_itself():
    from megatron_coe import wgrad_sum

    w = torch.nn.Parameter(torch.ones(3))
    assert wgrad_sum.use(w) is w
    config = step_config(2, topk=2, micro_batches=1)
    model, _, _ = built(config)
    experts = _grouped_experts(model)
    assert wgrad_sum.use(experts.fc1_weight) is not experts.fc1_weight
    model.write_first = False  # Megatron's zeroed buffers: the hook adds, autograd sums
    assert wgrad_sum.use(experts.fc1_weight) is experts.fc1_weight
    with torch.no_grad():
        model.write_first = True
        assert wgrad_sum.use(experts.fc1_weight) is experts.fc1_weight


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def kernel_device(request):
    """The kernel on CPU tensors through Triton's interpreter, and compiled on a GPU."""
    if request.param == "cpu":
        request.getfixturevalue("triton_interpreter")
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_triton_kernel_equals_torchs_two_ops(dtype, accumulate, kernel_device):
    """Bit for bit torch's ops but for NaN's payload (NaN either way)."""
    from megatron_coe.model.triton_sum_into import BLOCK, sum_into

    g = torch.Generator().manual_seed(0)
    n = 2 * BLOCK + 37  # a last block only partly full
    a = (torch.randn(n, generator=g) * 3).to(dtype)
    b = (torch.randn(n, generator=g) * 1e-3).to(dtype)  # sums that round in bf16
    # ties (to even, both ways), overflow to inf, inf, NaN, inf - inf (not subnormals: Triton
    # 3.8's interpreter converts bf16 subnormals to fp32 wrongly, 1.01e-39 -> 4.41e-39)
    inf, nan = float("inf"), float("nan")
    a[:6] = torch.tensor([1.0, 1.0 + 2 ** -7, 3.3895e38, inf, nan, inf])
    b[:6] = torch.tensor([2 ** -8, 2 ** -8, 3.3895e38, 1.0, 1.0, -inf])
    dest = torch.randn(n, generator=g)
    a, b, dest = a.to(kernel_device), b.to(kernel_device), dest.to(kernel_device)
    expected = dest + (a + b) if accumulate else (a + b).float()
    sum_into(dest, a, b, accumulate)
    torch.testing.assert_close(dest, expected, rtol=0, atol=0, equal_nan=True)
