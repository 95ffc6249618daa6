"""The CPU backend turns on only for device=cpu and restores everything it redirected."""

import contextlib

import pytest
import torch

from megatron_coe import cpu


def test_refuses_cuda_device():
    with pytest.raises(ValueError, match="must only be enabled for device='cpu'"):
        cpu.enable("cuda")
    assert not cpu.is_active()


def test_enable_disable_restores_originals():
    import megatron.core.transformer.utils as mutils

    before = (torch.cuda.current_device, torch.cuda.Stream, mutils.get_default_causal_mask)
    was_active = cpu.is_active()
    cpu.disable()
    with cpu.cpu_backend("cpu"):
        assert cpu.is_active()
        assert torch.cuda.current_device() == torch.device("cpu")
        mask = mutils.get_default_causal_mask(3)
        assert mask.device.type == "cpu" and mask.tolist() == [[False, True, True],
                                                               [False, False, True],
                                                               [False, False, False]]
        # the RNG tracker's fork really forks the CPU generator
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

        tracker = CudaRNGStatesTracker()
        tracker.add("other", 99)
        torch.manual_seed(1)
        with tracker.fork("other"):
            a = torch.rand(3)
        b = torch.rand(3)
        torch.manual_seed(1)
        assert torch.equal(torch.rand(3), b)          # main stream unaffected by the fork
        torch.manual_seed(99)
        assert torch.equal(torch.rand(3), a)          # fork used its own seed
    assert not cpu.is_active()
    if not was_active:
        after = (torch.cuda.current_device, torch.cuda.Stream, mutils.get_default_causal_mask)
        assert after == before


def test_setup_device_refuses_cuda_while_cpu_backend_on():
    from megatron_coe import parallel
    from megatron_coe.config import load_config

    config = load_config("configs/tiny/coe.yaml", ["device=cuda"])
    with cpu.cpu_backend("cpu"):
        with pytest.raises(RuntimeError, match="CPU backend is active"):
            parallel.setup_device(config)


def _routing(tokens: int, experts: int, topk: int, drop: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    idx = scores.topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, idx, True)
    routing_map &= torch.rand(tokens, experts, generator=g) >= drop  # capacity-dropped pairs
    probs = torch.softmax(scores, dim=1) * routing_map
    return routing_map, probs


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_dispatcher_permutation_equals_megatron(drop):
    """The dispatcher's permutation under the backend (nonzero) gives Megatron's argsort result
    bit for bit: rows, probabilities, indices, and the gradients of rows and probabilities."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    for seed in range(4):
        routing_map, probs = _routing(37, 6, 2, drop, seed)
        tokens = torch.randn(37, 5)
        selected = int(routing_map.sum())
        results = []
        for on in (False, True):
            x, p = tokens.clone().requires_grad_(True), probs.clone().requires_grad_(True)
            with cpu.cpu_backend("cpu") if on else contextlib.nullcontext():
                permute = token_dispatcher.permute
                assert (permute is not moe_utils.permute) == on
                rows, rows_p, indices, _, _ = permute(x, routing_map, probs=p,
                                                      num_out_tokens=selected)
            (rows.sum(dim=1) * rows_p).sum().backward()
            results.append((rows, rows_p, indices, x.grad, p.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        # a count the map does not select (argsort would take unselected pairs): Megatron's own
        with cpu.cpu_backend("cpu"):
            got = token_dispatcher.permute(tokens, routing_map, probs=probs,
                                           num_out_tokens=selected + 3)
        want = moe_utils.permute(tokens, routing_map, probs=probs, num_out_tokens=selected + 3)
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
