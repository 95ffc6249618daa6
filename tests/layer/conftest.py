import pytest


@pytest.fixture(autouse=True)
def fresh_moe_metrics_tracker():
    """Megatron's global MoE metrics tracker sizes each metric by the first model's number of
    layers; tests here build models of different depths in one process."""
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    moe_logging.destroy_moe_metrics_tracker()
    # Megatron's class-wide aux-loss gradient scale: a layer's backward outside the schedules
    # makes it a 0-dim tensor, into which the schedules' [1] scale cannot be copied
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield


@pytest.fixture(scope="module", autouse=True)
def one_rank_process_group():
    """Each test module here shares one single-process gloo group (made on first use by
    build_model), destroyed with the CPU backend when the module ends, so later tests start
    from a clean process."""
    yield
    from megatron_coe import cpu, parallel

    parallel.destroy()
    cpu.disable()
