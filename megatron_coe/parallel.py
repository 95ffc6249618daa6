"""Process groups: torch.distributed, then Megatron-Core's model-parallel groups, from a Config.

Under torchrun/srun the usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT variables are read
(env://).  Without them (a plain ``python`` call) a one-process group is made on loopback, so
``build_model`` also works in a notebook.  Backend: gloo on CPU, NCCL on CUDA.  Every group gets
``parallel.timeout_minutes``.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_coe import cpu, cuda_graph
from megatron_coe.config import Config, validate


def free_port() -> int:
    """A free TCP port on loopback (for one-process groups and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_device(config: Config) -> torch.device:
    """Turn the CPU backend on for device=cpu; pick the local GPU for device=cuda."""
    if config.device == "cpu":
        cpu.enable("cpu")
        return torch.device("cpu")
    if cpu.is_active():
        raise RuntimeError("the CPU backend is active but this run asks for device=cuda")
    if not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def initialize(config: Config) -> torch.device:
    """Create (if needed) the default process group and Megatron's parallel groups."""
    device = setup_device(config)
    timeout = timedelta(minutes=config.parallel.timeout_minutes)
    if not dist.is_initialized():
        backend = "gloo" if config.device == "cpu" else "nccl"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                timeout=timeout,
            )
    validate(config, world_size=dist.get_world_size())
    p = config.parallel
    if parallel_state.model_parallel_is_initialized():
        _check_same_layout(p)
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor,
            pipeline_model_parallel_size=p.pipeline,
            context_parallel_size=p.context,
            expert_model_parallel_size=p.expert,
            expert_tensor_parallel_size=p.expert_tensor,
            distributed_timeout_minutes=p.timeout_minutes,
        )
        # Megatron-Core 0.19.2 creates the expert-data-parallel gloo group without the timeout
        # (it would wait the 30-minute default; cf. NVIDIA/Megatron-LM issue 2238): set it on
        # every group it created.
        parallel_state.update_pg_timeout(timeout)
    # Megatron-LM offsets the seed per pipeline stage (the RNG tracker only offsets by TP/EP
    # rank), so stages do not initialise their layers from the same random stream.
    seed = config.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    # The CPU generator too, on every device: Megatron initialises routers (and, with
    # use_cpu_initialization, every weight) from it.  On CPU the backend's seeding already does
    # this; on CUDA it would otherwise be left unseeded, so the same seed gives the same weights
    # on both.
    torch.manual_seed(seed)
    # with train.cuda_graph the tracker's generators are the graph-safe kind a CUDA graph can
    # register (cuda_graph.py); a tracker left by an earlier run in this process is replaced
    graphs = config.device == "cuda" and cuda_graph.enabled(config)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, use_cudagraphable_rng=graphs,
                                                    force_reset_rng=True)
    return device


def _check_same_layout(p) -> None:
    """Megatron's parallel groups are process-global: a second build in this process with
    another layout would silently keep the first one's (e.g. 4 local experts under EP = 1)."""
    ps = parallel_state
    current = {"tensor": ps.get_tensor_model_parallel_world_size(),
               "pipeline": ps.get_pipeline_model_parallel_world_size(),
               "context": ps.get_context_parallel_world_size(),
               "expert": ps.get_expert_model_parallel_world_size(),
               "expert_tensor": ps.get_expert_tensor_parallel_world_size()}
    differ = [f"parallel.{k}: groups {v} vs config {getattr(p, k)}"
              for k, v in current.items() if v != getattr(p, k)]
    if differ:
        raise ValueError(
            f"this process already has Megatron parallel groups of another layout "
            f"({'; '.join(differ)}); call megatron_coe.parallel.destroy() before building "
            f"with a new layout, or use the same parallel settings")


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
