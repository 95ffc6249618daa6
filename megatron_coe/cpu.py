"""The CPU backend: an explicit switch that lets Megatron-Core run on CPU tensors and gloo.

Megatron-Core assumes CUDA in a handful of places (the current device, the CUDA RNG state the
model-parallel RNG tracker forks, side streams and events in the all-to-all dispatcher, a causal
mask built on "cuda", a TE GEMM referenced unguarded in the router).  ``enable("cpu")`` redirects
exactly those names, listed in ``_patches()``, and records the originals so ``disable()`` puts
them back.  It is only turned on when a run asks for ``device: cpu`` and refuses to turn on for
any other device: it must never be active on a GPU run.

What each redirect does on CPU:
  torch.cuda.current_device          -> torch.device("cpu")   (tensors created "on the device")
  torch.cuda.{get,set}_rng_state,
  torch.cuda.manual_seed(_all),
  tensor_parallel.random._{get,set}_cuda_rng_state -> the CPU generator's state, so the
                                        RNG tracker's forks really fork the CPU generator
  torch.cuda.{Stream,Event,current_stream,stream,synchronize} -> inert objects (CPU ops are
                                        synchronous, so ordering is already program order)
  moe_utils.maybe_move_tensor_to_cpu -> also converts CPU tensors to numpy when asked, as
                                        all_to_all_single needs split sizes as Python ints
  transformer.utils.get_default_causal_mask (+ fused_softmax's copy) -> built on CPU
  moe_utils.te_general_gemm = None   -> 0.19.2 references it unguarded when TE is absent
  token_dispatcher.permute           -> finds the (expert, token) pairs with nonzero instead of
                                        the stable argsort Megatron uses to keep shapes static for
                                        CUDA-graph capture: same indices, linear time
  cuda_to_cpu(): a scoped TorchFunctionMode for the optimizer / grad-clip / checkpoint calls
                 that hard-code device="cuda", .cuda() and pin_memory()
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any, Callable

import torch

_ORIGINALS: list[tuple[Any, str, Any]] = []
_ACTIVE = False


def is_active() -> bool:
    return _ACTIVE


class _InertStream:
    """Stands in for torch.cuda.Stream / Event on CPU: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other):
        return isinstance(other, _InertStream)

    def __hash__(self):
        return 0


_CURRENT_STREAM = _InertStream()


@contextlib.contextmanager
def _inert_stream_context(stream=None):
    yield stream


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


def _maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Remaps ``device="cuda"`` arguments, ``.cuda()``, ``.to("cuda")`` and ``pin_memory()`` to
    CPU.  Megatron's optimizer, gradient clipping and checkpoint exchange hard-code them.  Used
    only around those calls (see :func:`cuda_to_cpu`): a TorchFunctionMode costs a Python call
    per torch op, too much for the forward/backward hot path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts grad.type() == 'torch.cuda.FloatTensor': report the CUDA
            # name of the same dtype (the data stays on CPU).
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Inside: hard-coded CUDA placements land on CPU (only while the backend is active)."""
    if not _ACTIVE:
        yield
        return
    with _CudaToCpuMode():
        yield


@contextlib.contextmanager
def outside_cuda_to_cpu():
    """Leave :func:`cuda_to_cpu` for the block: the model's own forward needs no remapping,
    and the mode's per-op Python dispatch would slow it down (see benchmarks/cpu_backend.py)."""
    stack = torch.overrides._get_current_function_mode_stack()
    if not stack or not isinstance(stack[-1], _CudaToCpuMode):
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def _patches() -> list[tuple[str, str, Callable | Any]]:
    """(module path, attribute, replacement) for every CUDA assumption we redirect."""
    return [
        ("torch.cuda", "current_device", lambda: torch.device("cpu")),
        ("torch.cuda", "synchronize", lambda *a, **k: None),
        ("torch.cuda", "Stream", _InertStream),
        ("torch.cuda", "Event", _InertStream),
        ("torch.cuda", "current_stream", lambda *a, **k: _CURRENT_STREAM),
        ("torch.cuda", "default_stream", lambda *a, **k: _CURRENT_STREAM),
        ("torch.cuda", "stream", _inert_stream_context),
        ("torch.cuda", "get_rng_state", _cpu_rng_state),
        ("torch.cuda", "set_rng_state", _set_cpu_rng_state),
        ("torch.cuda", "manual_seed", _cpu_manual_seed),
        ("torch.cuda", "manual_seed_all", lambda seed: None),  # torch.manual_seed calls it
        ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _cpu_rng_state),
        ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_cpu_rng_state),
        ("megatron.core.transformer.moe.moe_utils", "maybe_move_tensor_to_cpu",
         _maybe_move_tensor_to_cpu),
        ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
         _maybe_move_tensor_to_cpu),
        ("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None),
        ("megatron.core.transformer.moe.token_dispatcher", "permute", _cpu_permute),
        ("megatron.core.transformer.utils", "get_default_causal_mask", _cpu_causal_mask),
        ("megatron.core.fusions.fused_softmax", "get_default_causal_mask", _cpu_causal_mask),
        ("megatron.core.models.common.embeddings.rotary_pos_embedding",
         "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank),
        ("megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
         "get_pos_emb_on_this_cp_rank", _cpu_pos_emb_on_this_cp_rank),
    ]


def _cpu_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False,
                 drop_and_pad=False, **kwargs):
    """moe_utils.permute for the dispatcher, without its CUDA-graph device.

    Megatron lists the selected (expert, token) pairs of the [tokens, experts] routing map,
    expert-major, with a stable descending argsort of the whole transposed mask cut to
    ``num_out_tokens``: a fixed-shape op that CUDA graphs can capture.  When the map selects
    exactly ``num_out_tokens`` pairs (dropless, and capacity dropping without padding), those are
    the mask's nonzero positions in the same order, which ``nonzero`` finds in one linear pass
    (64 experts x 2048 tokens: 1.9 -> 0.2 ms on one thread, per MoE layer and CoE iteration).
    Rows, probabilities and indices are then gathered as Megatron gathers them.  Every other
    case (fused, padded to capacity, other counts) runs Megatron's own."""
    from megatron.core.transformer.moe import moe_utils

    def megatron():
        return moe_utils.permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad,
                                 **kwargs)

    if fused or drop_and_pad or num_out_tokens is None or kwargs.get("align_size", 0):
        return megatron()
    flat = routing_map.bool().T.contiguous().reshape(-1).nonzero().squeeze(1)
    if flat.numel() != int(num_out_tokens):
        return megatron()
    sorted_indices = flat % tokens.shape[0]
    permuted_probs = None if probs is None else probs.T.contiguous().reshape(-1)[flat]
    return (tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices, None,
            kwargs.get("tokens_per_expert"))


def _cpu_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Megatron's version pins memory and calls .cuda(): the rotary embedding rows of this
    context-parallel rank's tokens, on CPU."""
    from megatron_coe.model.cp_attention import chunk_positions

    positions = chunk_positions(cp_group.rank(), cp_group.size(), pos_emb.shape[seq_dim],
                                pos_emb.device)
    return pos_emb.index_select(seq_dim, positions)


def enable(device: str) -> None:
    """Turn the CPU backend on for a run whose device is ``device`` (must be "cpu")."""
    global _ACTIVE
    if device != "cpu":
        raise ValueError(
            f"the CPU backend was asked for on device={device!r}; it redirects CUDA calls and "
            "must only be enabled for device='cpu'"
        )
    if _ACTIVE:
        return
    for module_path, attr, replacement in _patches():
        module = importlib.import_module(module_path)
        if not hasattr(module, attr):
            raise RuntimeError(
                f"CPU backend: {module_path}.{attr} does not exist in this Megatron-Core/torch; "
                "the pinned megatron-core version is required"
            )
        _ORIGINALS.append((module, attr, getattr(module, attr)))
        setattr(module, attr, replacement)
    _ACTIVE = True


def disable() -> None:
    """Restore every redirected name."""
    global _ACTIVE
    while _ORIGINALS:
        module, attr, original = _ORIGINALS.pop()
        setattr(module, attr, original)
    _ACTIVE = False


@contextlib.contextmanager
def cpu_backend(device: str = "cpu"):
    enable(device)
    try:
        yield
    finally:
        disable()
