"""The CPU backend turns on only for device=cpu and restores everything it redirected."""

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
