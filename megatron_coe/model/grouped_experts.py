"""GroupedExperts: the local spec's routed experts as grouped matrix multiplies over stacked weights.

Shapes: T rows (token-expert pairs) sorted by local expert, n_e rows for expert e (sum n_e = T,
n_e = 0 allowed), E local experts, H hidden, F expert hidden (2F with a gated linear unit).

    W1 [E, 2F, H]   (fc1_weight: expert e's W1_e in nn.Linear layout, [out, in])
    W2 [E, H, F]    (fc2_weight)
    offs [E] int32  = cumsum(n_e): expert e owns rows offs[e-1]..offs[e]

    Z_e = X_e W1_e^T                                   [n_e, 2F]  one grouped GEMM for all e
    A_e = act(Z_e[:, :F]) * (Z_e[:, F:] + offset)      [n_e, F]   (act(Z_e) if not gated)
    Y_e = (A_e * p_e) W2_e^T                           [n_e, H]   one grouped GEMM for all e

Backward of each grouped linear Y = X W^T (custom autograd, _GroupedLinear):

    dX_e = dY_e W_e          grouped GEMM of dY [T, N] with W [E, N, K]          -> [T, K]
    dW_e = dY_e^T X_e        grouped GEMM of dY^T [N, T] and X [T, K], groups split
                             along T by the same offsets (torch's 2D x 2D form)  -> [E, N, K]

The math is LocalExperts' (experts.py) and Megatron's SequentialMLP's, op for op; the weight
layout makes every operand a plain view (X row-major, W^T column-major, dY^T column-major) so
nothing is copied per call, and dW comes out in the parameter's own layout.  Each linear is ONE
parameter (one gradient, one optimizer state) instead of E.

Backends.  ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on torches without it).
On CPU torch runs it as a loop of ``mm`` over the groups inside one operator (the kernels of the
per-expert loop: fp32 and bf16 results are bit-identical to SequentialMLP's).  On CUDA it is one
CUTLASS/cuBLAS kernel for bf16 on sm90+ (torch's documented target; other dtypes or GPUs may
use torch's own per-group fallback, which reads the offsets on the host).  Operand rows must be
multiples of 16 bytes (H, N1 and F multiples of 4 in fp32, of 8 in bf16) and, on CUDA, base
pointers 16-byte aligned (``_ready`` copies a gradient that is not).  Where grouped_mm is
missing, fails on this device and dtype (tried once), or the sizes are not aligned, the same
autograd function runs a per-expert ``mm`` loop over the same stacked weights: bit-identical to
SequentialMLP for aligned sizes; for unaligned ones the experts' row slices start off 16-byte
boundaries, where CPU GEMM kernels may round differently (within 1e-6 relative in fp32).
Offsets are computed on the rows' device from ``tokens_per_expert`` (no host sync when it is a
device tensor); only the loop reads the counts on the host.  The overlapped schedule's halves
call the module with zero rows for the other half's experts (their gradients are zeros).

Parameters are created exactly as SequentialMLP creates its experts (Megatron's MLP per
expert, in order, then moved into the stack), so a model built with either has the same
initial weights for the same seed.

Checkpoints.  ``sharded_state_dict`` emits SequentialMLP's sharded keys, shapes and chunks:
``{prefix}experts.linear_fc1.weight`` with global shape [..., E_global, 2F, H] written as one
chunk per (expert, GLU half), ``{prefix}experts.linear_fc2.weight`` one chunk per expert, and each
expert's ``_extra_state`` objects; a ShardedTensorFactory per stacked parameter builds the
per-expert pieces (for the optimizer states too) and stacks them back on load.  A distributed
checkpoint saved with SequentialMLP / LocalExperts therefore loads into GroupedExperts and the
reverse (tests/layer/test_grouped_experts.py, tests/training/test_train_resume.py).  The plain
``state_dict`` is SequentialMLP's too (per-expert keys ``local_experts.{e}.linear_fcN.weight``
holding views of the stacks, and the linears' empty ``_extra_state``), and ``load_state_dict``
reads it, so tools and tests that address experts by those names work with either module; the
parameters themselves (``named_parameters``, the optimizer) are the two stacks.  Megatron's
distributed optimizer stores its state in gradient-buffer order, which differs between the two
modules: checkpoint.py refuses that switch by name.  Transformer Engine's TEGroupedMLP writes the same
format: its ``sharded_state_dict`` (megatron/core/transformer/moe/experts.py,
``TEGroupedMLP.sharded_state_dict``, docstring "interchangable with SequentialMLP's") takes
each GroupedLinear ``weight{i}`` from ``TEGroupedLinear._sharded_state_dict_grouped``
(megatron/core/extensions/transformer_engine.py) with the offset
``(ep_axis, global_expert_idx, num_global_experts)`` under the key
``{prefix}experts.linear_fc1.weight`` and applies the same ``apply_swiglu_sharded_factory`` to
fc1, so its weights load here (by reasoning from that code; TE is not installed here).  Its
per-expert ``_extra_state`` (FP8 metadata) is read and ignored, as SequentialMLP does.

Activation recompute (``train.recompute: moe_act``, Megatron's ``recompute_modules: [moe_act]``).
fc1's output Z and the probabilities p are all that is kept for the activation and fc2; backward
recomputes A * p (element-wise, no GEMM) by the same ops before fc2's backward:

    kept per row  (plain)   X (H) + Z (2F) + act(Z1), Z2 + offset, A, A * p (F each) + p
                  (moe_act) X (H) + Z (2F) + p

Gradients are bit-identical (tests/layer/test_activation_recompute.py); backward pays the
activation's element-wise ops once more.

Fused SwiGLU (``model.swiglu_fusion``, Megatron's ``bias_activation_fusion``; on by default on
CUDA).  A * p is a fused weighted SwiGLU (experts.scaled_activation: Megatron's compiled one,
or with ``model.fused_kernels: triton`` this package's Triton kernels): one kernel forward, one
backward, which keeps Z and p only, so the activation's kept tensors shrink
as under ``moe_act`` without recomputing anything:

    kept per row  (fused)   X (H) + Z (2F) + p + A * p (F)

FP8.  With ``fp8.backend: torch`` both linears run as FP8 grouped GEMMs (``model/fp8.py``:
each call quantizes its activations and the weights from their own amax; dW in the activations'
precision), on bf16 master weights.  Megatron's (Transformer Engine's) FP8 settings are off then.

Not implemented (construction raises; config.validate() names them first): expert tensor
parallelism, Transformer Engine FP8/FP4, linear biases, probabilities on the input, TE activations,
clamped GLU, CPU offloading, gradient-accumulation fusion.  LocalExperts covers those.
"""

from __future__ import annotations

import re
from copy import deepcopy

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from megatron.core.transformer.mlp import MLP, apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_coe import wgrad_sum
from megatron_coe.model.experts import host_counts, scaled_activation, unsupported_setting

_LINEARS = (("linear_fc1", "fc1_weight"), ("linear_fc2", "fc2_weight"))
_PER_EXPERT_KEY = re.compile(r"local_experts\.(\d+)\.(linear_fc[12])\.(weight|_extra_state)$")


def grouped_mm_op():
    """torch's grouped GEMM: the public F.grouped_mm where it exists, else torch._grouped_mm,
    else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_RUNS: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether grouped_mm runs on this device type and dtype (both forms used here, empty
    groups included), tried once on tiny aligned operands and remembered."""
    key = (device.type, dtype)
    if key not in _RUNS:
        op = grouped_mm_op()
        ok = op is not None
        if ok:
            try:
                x = torch.ones(8, 16, device=device, dtype=dtype)
                w = torch.ones(2, 16, 16, device=device, dtype=dtype)
                offs = torch.tensor([0, 8], device=device, dtype=torch.int32)
                op(x, w.transpose(-2, -1), offs=offs)
                op(x.t(), x, offs=offs)
            except (RuntimeError, NotImplementedError):
                ok = False
        _RUNS[key] = ok
    return _RUNS[key]


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, and on CUDA 16-byte aligned (a fresh copy if a view starts mid-line).  Under
    torch.compile the check reads storage_offset(), which TorchDynamo traces (data_ptr() breaks
    the graph): exact where the storage itself is aligned, as the caching allocator's are (512
    bytes); eagerly it reads the address."""
    t = t.contiguous()
    if t.device.type == "cpu":
        return t
    if torch.compiler.is_compiling():
        misaligned = t.storage_offset() * t.element_size() % 16
    else:
        misaligned = t.data_ptr() % 16
    return t.clone() if misaligned else t


def _loop_rows(a: torch.Tensor, mats, counts: list[int]) -> torch.Tensor:
    """cat_e(a_e @ mats[e]) for row groups a_e of ``counts`` rows."""
    out = a.new_empty(a.shape[0], mats.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[start:start + n], mats[e], out=out[start:start + n])
        start += n
    return out


def _loop_wgrad(g: torch.Tensor, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """stack_e(g_e^T @ x_e): [E, N, K]; zero for an expert without rows."""
    out = g.new_zeros(len(counts), g.shape[1], x.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(g[start:start + n].t(), x[start:start + n], out=out[e])
        start += n
    return out


def _linear_forward(x, weight, offs, counts):
    """Y_e = X_e W_e^T over the row groups: grouped GEMM (``offs``) or the per-expert loop."""
    if counts is not None:
        return _loop_rows(x, weight.transpose(-2, -1), counts)
    return grouped_mm_op()(x, weight.transpose(-2, -1), offs=offs)


def _linear_backward(grad_out, x, weight, offs, counts, need_x: bool, need_w: bool):
    """(dX, dW) of :func:`_linear_forward`: dX_e = dY_e W_e, dW_e = dY_e^T X_e."""
    g = _ready(grad_out)  # autograd may hand over an expanded or strided gradient
    grad_x = grad_w = None
    if counts is not None:
        if need_x:
            grad_x = _loop_rows(g, weight, counts)
        if need_w:
            grad_w = _loop_wgrad(g, x, counts)
    else:
        op = grouped_mm_op()
        if need_x:
            grad_x = op(g, weight, offs=offs)
        if need_w:
            grad_w = op(g.t(), x, offs=offs)
    return grad_x, grad_w


class _GroupedLinear(torch.autograd.Function):
    """Y_e = X_e W_e^T for row groups of X; grouped GEMMs (``offs``) or, when ``counts`` is
    given, the exact per-expert loop.  Backward: dX_e = dY_e W_e, dW_e = dY_e^T X_e."""

    @staticmethod
    def forward(ctx, x, weight, offs, counts):
        ctx.save_for_backward(x, weight)
        ctx.offs, ctx.counts = offs, counts
        return _linear_forward(x, weight, offs, counts)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _linear_backward(grad_out, x, weight, ctx.offs, ctx.counts,
                                          *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None


class _RecomputedActivationLinear(torch.autograd.Function):
    """Y = (A * p) W2^T with A * p = scaled_activation(Z, p), keeping only Z and p for backward
    (``train.recompute: moe_act``, Megatron's output-discarding activation recompute): backward
    recomputes A * p by the same ops, then runs fc2's backward and the activation's own, so
    gradients are bit-identical to the kept-activation path."""

    @staticmethod
    def forward(ctx, z, probs, weight, offs, counts, activation):
        ctx.save_for_backward(z, probs, weight)
        ctx.offs, ctx.counts, ctx.activation = offs, counts, activation
        return _linear_forward(activation(z, probs), weight, offs, counts)

    @staticmethod
    def backward(ctx, grad_out):
        z, probs, weight = ctx.saved_tensors
        with torch.enable_grad():
            z_ = z.detach().requires_grad_(ctx.needs_input_grad[0])
            p_ = probs.detach().requires_grad_(ctx.needs_input_grad[1])
            a = ctx.activation(z_, p_)
        grad_a, grad_w = _linear_backward(grad_out, a.detach(), weight, ctx.offs, ctx.counts,
                                          True, ctx.needs_input_grad[2])
        inputs = [t for t in (z_, p_) if t.requires_grad]
        grads = iter(torch.autograd.grad(a, inputs, grad_a) if inputs else ())
        grad_z = next(grads) if z_.requires_grad else None
        grad_p = next(grads) if p_.requires_grad else None
        return grad_z, grad_p, grad_w, None, None, None


class GroupedExperts(MegatronModule):
    """Drop-in for SequentialMLP in the local spec's MoE layer (same constructor, same
    ``forward(rows, tokens_per_expert, probs) -> (output, None)``); see the module docstring."""

    def __init__(self, num_local_experts: int, config, submodules, pg_collection=None,
                 name: str | None = None, fp8_recipe: str | None = None,
                 fused_kernels: str = "compile"):
        if config.moe_ffn_hidden_size != config.ffn_hidden_size:
            # as SequentialMLP: Megatron's MLP sizes fc2's input by config.ffn_hidden_size
            config = deepcopy(config)
            config.ffn_hidden_size = config.moe_ffn_hidden_size
        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        self.num_local_experts = num_local_experts
        # fp8.backend: torch: both linears' GEMMs in FP8 with this recipe (model/fp8.py)
        self.fp8_recipe = fp8_recipe
        # model.fused_kernels: which fused SwiGLU kernel (experts.scaled_activation)
        self.fused_kernels = fused_kernels
        # train.recompute: moe_act (Megatron's recompute_modules "moe_act"): keep Z and p only
        self.recompute_activation = (config.recompute_granularity == "selective"
                                     and "moe_act" in (config.recompute_modules or ()))
        if self.recompute_activation and fp8_recipe is not None:
            raise ValueError("moe_act recompute is not implemented for fp8.backend=torch")
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        why = unsupported_setting(config, self.tp_group.size())
        if why is not None:
            raise ValueError(f"grouped experts do not implement {why}; set "
                             "model.moe.grouped_gemm=false (LocalExperts)")
        stacks = {}
        for e in range(num_local_experts):
            # Megatron's expert MLP, built as SequentialMLP builds it (same random init).
            mlp = MLP(config, submodules, ffn_hidden_size=config.moe_ffn_hidden_size,
                      is_expert=True, tp_group=self.tp_group,
                      name=f"{name}.local_experts.{e}" if name is not None else None)
            for linear, attr in _LINEARS:
                w = getattr(mlp, linear).weight
                if attr not in stacks:
                    stacks[attr] = (w.new_empty(num_local_experts, *w.shape), w)
                stacks[attr][0][e].copy_(w.detach())
        for attr, (stack, first) in stacks.items():
            param = torch.nn.Parameter(stack)
            for k, v in vars(first).items():  # allreduce, tensor_model_parallel, partition_*
                setattr(param, k, v + 1 if k == "partition_dim" else v)
            setattr(self, attr, param)
        self._register_load_state_dict_pre_hook(self._from_per_expert_keys)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        shape = permuted_local_hidden_states.shape
        x = _ready(permuted_local_hidden_states.reshape(-1, shape[-1]))
        # a CoE layer's C calls: their weight gradients summed into main_grad in one pass
        w1, w2 = wgrad_sum.use(self.fc1_weight), wgrad_sum.use(self.fc2_weight)
        if self.fp8_recipe is not None:
            return self._fp8_forward(x, w1, w2, tokens_per_expert, permuted_probs, shape), None
        offs = counts = None
        if self._grouped(x):
            if not torch.is_tensor(tokens_per_expert):
                tokens_per_expert = torch.tensor(tokens_per_expert)
            offs = torch.cumsum(tokens_per_expert.to(x.device, non_blocking=True), 0,
                                dtype=torch.int32)
        else:
            counts = host_counts(tokens_per_expert)
        z = _GroupedLinear.apply(x, w1, offs, counts)
        probs = permuted_probs.reshape(-1)
        if self.recompute_activation:
            y = _RecomputedActivationLinear.apply(z, probs, w2, offs, counts, self._activation)
        else:
            y = _GroupedLinear.apply(self._activation(z, probs), w2, offs, counts)
        return y.reshape(*shape[:-1], y.shape[-1]), None

    def _fp8_forward(self, x, w1, w2, tokens_per_expert, permuted_probs, shape):
        """The same math with both linears as FP8 grouped GEMMs (fp8.backend: torch): each
        call quantizes its own activations and the weights from their amax (no state carried
        between calls, so a CoE layer's C calls need no care); dW in the activations'
        precision, master weights and gradients in bf16 (model/fp8.py)."""
        from megatron_coe.model.fp8 import fp8_grouped_linear

        counts = host_counts(tokens_per_expert)  # the FP8 kernels take host counts: read once
        z = fp8_grouped_linear(x, w1, counts, self.fp8_recipe)
        a = self._activation(z, permuted_probs.reshape(-1))
        y = fp8_grouped_linear(a, w2, counts, self.fp8_recipe)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _activation(self, z: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return scaled_activation(self.config, z, probs, self.fused_kernels)

    def _grouped(self, x: torch.Tensor) -> bool:
        """grouped_mm for these operands, else the per-expert loop (see the docstring).  Every
        operand is contiguous in its last dim (W^T and dY^T in their first) with rows of H, N1
        (fc1's outputs: 2F gated, F plain) or F elements: each must be a multiple of 16 bytes."""
        w1, w2 = self.fc1_weight, self.fc2_weight
        rows = (x.shape[-1], w1.shape[1], w2.shape[2])
        # no rows (an overlapped half, a rank sent nothing): the loop gives the empty output
        # and zero weight gradients without a grouped GEMM over an empty operand
        return (x.shape[0] > 0 and w1.dtype == w2.dtype == x.dtype
                and grouped_mm_runs(x.device, x.dtype)
                and all(n * x.element_size() % 16 == 0 for n in rows))

    # ---- checkpoints: SequentialMLP's format -------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        """SequentialMLP's sharded state dict (keys, global shapes, chunks), from the stacks."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        if metadata.get("singleton_local_shards", False):
            raise NotImplementedError("grouped experts write Megatron's default checkpoint "
                                      "layout only (singleton_local_shards=False)")
        n_local = self.num_local_experts
        n_global = self.ep_group.size() * n_local
        first = self.ep_group.rank() * n_local

        def expert_entries(e: int, linear: str, tensor):
            """What SequentialMLP writes for local expert e's ``linear`` (weight ``tensor``):
            (list of the weight's ShardedTensors, the linear's _extra_state ShardedObject)."""
            key = f"{prefix}experts.{linear}."
            offsets = (*sharded_offsets, (len(sharded_offsets), first + e, n_global))
            sub = make_sharded_tensors_for_checkpoint(
                {"weight": tensor, "_extra_state": None}, key,
                {"weight": 0 if linear == "linear_fc1" else 1}, offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
            for sh in sub.values():  # replicated along the expert-data-parallel group
                sh.replica_id = (*sh.replica_id[:2], self.dp_group.rank())
            weight = sub[f"{key}weight"]
            if linear == "linear_fc1" and self.config.gated_linear_unit:  # [W; V] halves
                weight = apply_swiglu_sharded_factory(
                    weight, offsets, tp_group=self.tp_group,
                    dp_group=metadata["dp_cp_group"]).build()
            else:
                weight = [weight]
            return weight, sub[f"{key}_extra_state"]

        def merge(loaded):  # [expert][piece] tensors -> the stack
            return torch.stack([torch.cat(pieces, dim=0) for pieces in loaded])

        out = {}
        for linear, attr in _LINEARS:
            def build(key, t, replica_id, flattened_range, linear=linear):
                # also called for optimizer states (t: exp_avg, key: optimizer.state...)
                if flattened_range is not None:
                    raise NotImplementedError("grouped experts: flattened (fully sharded) "
                                              "optimizer-state formats are not supported")
                pieces = [expert_entries(e, linear, t[e])[0] for e in range(n_local)]
                for sh in (sh for expert in pieces for sh in expert):
                    sh.key, sh.replica_id = key, replica_id
                return pieces

            param = getattr(self, attr)
            replica = (0, 0, self.dp_group.rank())
            out[f"{prefix}{attr}"] = ShardedTensorFactory(
                f"{prefix}experts.{linear}.weight", param, build, merge, replica)
            for e in range(n_local):
                out[f"{prefix}local_experts.{e}.{linear}._extra_state"] = \
                    expert_entries(e, linear, param[e])[1]
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """SequentialMLP's state dict: each expert's weights (views of the stacks) under
        ``local_experts.{e}.linear_fcN.weight``, and the linears' empty ``_extra_state``."""
        for e in range(self.num_local_experts):
            for linear, attr in _LINEARS:
                w = getattr(self, attr)[e]
                destination[f"{prefix}local_experts.{e}.{linear}.weight"] = (
                    w if keep_vars else w.detach())
                destination[f"{prefix}local_experts.{e}.{linear}._extra_state"] = None

    def _from_per_expert_keys(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Load SequentialMLP's per-expert state dict (what ``state_dict`` writes, and the
        ``_extra_state`` entries of a distributed load): stack ``local_experts.{e}.linear_fcN
        .weight`` into the stacked parameter; drop ``_extra_state`` (None for Megatron's
        linears, FP8 metadata for TE's)."""
        per_expert: dict[str, dict[int, torch.Tensor]] = {}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            m = _PER_EXPERT_KEY.fullmatch(key[len(prefix):])
            if m is None:
                continue
            value = state_dict.pop(key)
            if m.group(3) == "weight":
                per_expert.setdefault(m.group(2), {})[int(m.group(1))] = value
        for linear, attr in _LINEARS:
            got = per_expert.get(linear)
            if got is None:
                continue
            if sorted(got) != list(range(self.num_local_experts)):
                error_msgs.append(f"{prefix}local_experts: experts {sorted(got)} for {linear}, "
                                  f"expected 0..{self.num_local_experts - 1}")
                continue
            state_dict[f"{prefix}{attr}"] = torch.stack([got[e] for e in sorted(got)])
