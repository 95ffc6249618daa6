"""Typed run configuration: dataclasses, strict YAML loading, dotted overrides, validation.

Every section is a dataclass.  ``load_config(path, overrides)`` reads YAML with the safe
loader, applies ``a.b.c=value`` overrides (values parsed as YAML scalars, never evaluated),
rejects unknown keys with the list of valid ones, and calls :func:`validate`, the one place
where values are checked.  Every bad value raises ``ValueError`` naming the field and the fix.
Nothing here touches torch.distributed, so a bad config fails before any process group exists.

Naming: CoE-C(k/N) is ``model.coe.iterations = C``, ``model.moe.topk = k``,
``model.moe.num_experts = N``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

RESIDUAL_MODES = ("inner", "outer", "reference")
ROUTER_MODES = ("independent", "shared")
AUX_LOSS_TYPES = ("seq_aux_loss", "aux_loss", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")
ROUTER_GEMMS = ("bf16", "fp32")
ATTENTION_TYPES = ("mha", "mla")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
PRECISIONS = ("fp32", "bf16", "fp16")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise", "rowwise")
FP8_BACKENDS = ("transformer_engine", "torch")
DATA_SOURCES = ("arithmetic", "jsonl", "indexed")
LR_DECAYS = ("cosine", "linear", "constant", "wsd")
RECOMPUTE = ("none", "full", "moe", "experts", "moe_act")
DEVICES = ("cpu", "cuda")
FUSED_KERNELS = ("auto", "compile", "triton")
CUDA_GRAPHS = ("none", "full_iteration")
# model.impl: Megatron's two layer implementations (Megatron-LM's --transformer-impl), or auto:
# Transformer Engine on CUDA when it is importable, else the local spec (always on CPU).
IMPLS = ("auto", "transformer_engine", "local")
# TransformerConfig fields that only Transformer Engine layers implement (truthy = in use).
TE_ONLY_OVERRIDES = {
    "fp8": "FP8 layers", "fp8_recipe": "FP8 recipes", "fp8_param": "FP8 parameters",
    "fp8_dot_product_attention": "FP8 attention", "fp8_multi_head_attention": "FP8 attention",
    "fp4": "FP4 layers", "fp4_recipe": "FP4 recipes", "fp4_param": "FP4 parameters",
    "use_te_activation_func": "TE activation functions", "use_te_rng_tracker": "TE's RNG tracker",
    "tp_comm_overlap": "userbuffer GEMM/communication overlap",
    "moe_permute_fusion": "fused permutation kernels", "moe_router_fusion": "fused router kernels",
    "fused_single_qkv_rope": "fused QKV rotary kernels",
}
DISPATCHERS = ("alltoall",)

# TransformerConfig fields that assume one route/dispatch per MoE layer (see the Megatron-Core
# notes): with more than one CoE iteration they would silently compute something else.
SINGLE_ROUTE_FEATURES = {
    "overlap_moe_expert_parallel_comm": "its fine-grained callables route and dispatch once per "
    "layer and bypass CoELayer.forward (parallel.overlap_expert_comm overlaps every iteration's "
    "all-to-alls instead)",
    "delay_wgrad_compute": "it splits expert weight gradients assuming one expert pass per layer",
    "overlap_dispatch_backward_with_experts_wgrad": "it assumes one dispatch per layer",
    "moe_paged_stash": "it stashes one dispatch per layer",
    "moe_latent_size": "latent projections would be applied once per iteration",
    "moe_router_force_biased": "all iterations' routers would get the same bias",
}


@dataclass
class MoEConfig:
    """Routed experts of an MoE (or CoE) layer; ``topk`` is per CoE iteration."""

    num_experts: int = 8
    topk: int = 2
    expert_hidden_size: int = 64
    # Hidden size of the always-on shared expert(s) in total; None = no shared expert.
    shared_expert_hidden_size: Optional[int] = None
    score_function: str = "softmax"
    # False: softmax over all experts, then top-k, no renormalisation (the CoE paper's router).
    renormalize_topk: bool = False
    aux_loss: str = "seq_aux_loss"
    aux_loss_coeff: float = 0.001
    z_loss_coeff: Optional[float] = None
    # Aux-loss-free balancing: a per-router bias on the top-k choice, updated every step.
    expert_bias: bool = False
    expert_bias_update_rate: float = 0.001
    # None = dropless.  Otherwise capacity = ceil(local_tokens * topk / num_experts * factor)
    # per expert, computed by each rank from its own tokens (Megatron's rule).
    capacity_factor: Optional[float] = None
    pad_to_capacity: bool = False
    drop_policy: str = "probs"
    dispatcher: str = "alltoall"
    # Grouped-GEMM experts: all local experts of each linear in one weight, run as one grouped
    # matrix multiply (Transformer Engine spec: Megatron's TEGroupedMLP; local spec:
    # megatron_coe.model.grouped_experts.GroupedExperts).  false: one GEMM per expert
    # (SequentialMLP / LocalExperts).  null (auto): see grouped_experts().
    grouped_gemm: Optional[bool] = None
    # The routers' logits are fp32 either way.  bf16: on CUDA with bf16 hidden states, their
    # GEMMs take the hidden states in bf16 (fp32 output; model/router_gemm.py); fp32: Megatron's
    # router GEMM, which copies them to fp32 (without Transformer Engine: forward and backward;
    # with it: backward).  CPU runs and other precisions run Megatron's either way.  Set for
    # the whole process by the last model built.
    router_gemm: str = "bf16"


# TransformerConfig fields (model.transformer_overrides) whose feature the local spec's lean
# experts (LocalExperts' forward, GroupedExperts) do not implement; a value other than
# None/False turns them off (model/experts.py: unsupported_setting).
LEAN_EXPERTS_UNSUPPORTED = {
    "fp8": "FP8", "fp4": "FP4", "add_bias_linear": "linear biases",
    "moe_apply_probs_on_input": "probabilities on the input",
    "use_te_activation_func": "Transformer Engine activations",
    "activation_func_clamp_value": "clamped GLU",
    "cpu_offloading": "CPU offloading", "gradient_accumulation_fusion": "gradient-accumulation fusion",
}


# TransformerConfig settings that Megatron's fused SwiGLU cannot run with (truthy = in use;
# gated_linear_unit: false is a plain MLP, no GLU to fuse)
SWIGLU_FUSION_BLOCKERS = ("glu_linear_offset", "activation_func_clamp_value",
                          "use_te_activation_func")


def swiglu_fusion_blocker(m: "ModelConfig") -> str | None:
    """The transformer_overrides setting that rules the fused SwiGLU out, or None."""
    o = m.transformer_overrides
    if o.get("gated_linear_unit", True) is False:
        return "gated_linear_unit=false"
    return next((f"{k}={o[k]}" for k in SWIGLU_FUSION_BLOCKERS if o.get(k)), None)


def swiglu_fusion(config: "Config") -> bool:
    """Whether the SwiGLU activations run as Megatron's fused kernels, as far as the config
    says: model.swiglu_fusion when set (or Megatron's own transformer_overrides
    .bias_activation_fusion, which it must not contradict); auto: on with device=cuda unless a
    transformer_overrides setting rules it out.  A run also tries torch.compile on its device
    before it keeps auto on (model.build.resolve_swiglu_fusion)."""
    m = config.model
    if "bias_activation_fusion" in m.transformer_overrides:
        return bool(m.transformer_overrides["bias_activation_fusion"])
    if m.swiglu_fusion is not None:
        return m.swiglu_fusion
    return config.device == "cuda" and swiglu_fusion_blocker(m) is None


def triton_kernels_available(config: "Config") -> bool:
    """Whether model.fused_kernels=auto may pick this package's Triton kernels: a CUDA run with
    the triton package (torch's CUDA wheels bring it).  A run also tries them on its GPU before
    it keeps them (model.build.resolve_fused_kernels)."""
    return config.device == "cuda" and importlib.util.find_spec("triton") is not None


def loss_fusion(config: "Config") -> bool:
    """Whether the loss runs as the fused kernels of model/loss.py, as far as the config says:
    model.loss_fusion when set; auto: on where the Triton kernels may run (only they are faster
    than Megatron's loss on the H100: docs/performance.md), model.fused_kernels is not compile,
    the vocabulary is whole on each rank and Megatron's own fused loss is not asked for."""
    m = config.model
    if m.loss_fusion is not None:
        return m.loss_fusion
    return (m.fused_kernels != "compile" and triton_kernels_available(config)
            and config.parallel.tensor == 1
            and not m.transformer_overrides.get("cross_entropy_loss_fusion"))


# transformer_overrides that set MLA's RoPE themselves: with any of them the fused kernels'
# YaRN at factor 1 would not be the RoPE the overrides ask for
ROPE_OVERRIDES = ("rope_type", "apply_rope_fusion", "rotary_scaling_factor", "mscale",
                  "mscale_all_dim", "rotary_percent", "rotary_interleaved")


def mla_rope_fusion_blocker(config: "Config") -> str | None:
    """Why Megatron's fused MLA RoPE kernels (model.mla.rope_fusion) cannot run with this
    config's model, or None: they need MLA, whole sequences on each rank (their [s, b] layout
    takes no context-parallel positions), power-of-two head dims (Triton's ranges), the rotary
    one at least 4, and no transformer_overrides of the RoPE (:data:`ROPE_OVERRIDES`)."""
    m = config.model
    if m.attention != "mla":
        return f"model.attention={m.attention} (they are MLA's)"
    if config.parallel.context > 1:
        return f"parallel.context={config.parallel.context}"
    overridden = [key for key in ROPE_OVERRIDES if key in m.transformer_overrides]
    if overridden:
        return "model.transformer_overrides." + ", model.transformer_overrides.".join(overridden)
    least = {"qk_head_dim": 1, "v_head_dim": 1, "qk_pos_emb_head_dim": 4}
    odd = [f"model.mla.{name}={getattr(m.mla, name)}" for name, low in least.items()
           if getattr(m.mla, name) < low or getattr(m.mla, name) & (getattr(m.mla, name) - 1)]
    if odd:
        return "head dims that are not powers of two (the rotary one at least 4): " + (
            ", ".join(odd))
    return None


def mla_rope_fusion(config: "Config") -> bool:
    """Whether MLA's rotary embedding runs as Megatron's fused kernels, as far as the config
    says: model.mla.rope_fusion when set; auto: on CUDA where model.fused_kernels is (or
    resolves to) triton and they apply (:func:`mla_rope_fusion_blocker`).  A run also tries
    them on its GPU before it keeps auto on (model.build.resolved_kernels)."""
    m = config.model
    if m.mla.rope_fusion is not None:
        return m.mla.rope_fusion
    return (config.device == "cuda" and fused_kernels(config) == "triton"
            and mla_rope_fusion_blocker(config) is None)


def fused_kernels(config: "Config") -> str:
    """model.fused_kernels as far as the config says: explicit compile or triton; auto: triton
    where the Triton kernels may run and a fusion is on (the SwiGLU's or the loss's), else
    compile."""
    m = config.model
    if m.fused_kernels != "auto":
        return m.fused_kernels
    if triton_kernels_available(config) and (swiglu_fusion(config) or loss_fusion(config)):
        return "triton"
    return "compile"


def grouped_experts(config: "Config") -> bool:
    """Whether MoE/CoE layers use grouped-GEMM experts (model.moe.grouped_gemm, resolved).

    Explicit true/false is kept.  Auto (null): on CUDA yes (TEGroupedMLP with Transformer
    Engine, GroupedExperts on the local spec).  On CPU yes where the local spec's grouped
    experts apply (expert_tensor = 1, no override they do not implement): there one grouped
    call per linear is not slower than LocalExperts' per-expert loop (docs/performance.md,
    "Grouped-GEMM experts")."""
    moe = config.model.moe
    if moe is None:
        return False
    if moe.grouped_gemm is not None:
        return moe.grouped_gemm
    if config.device == "cuda" and config.model.impl != "local":
        return True  # TEGroupedMLP with Transformer Engine (auto may still resolve to local)
    return _lean_experts_blocker(config) is None


def _lean_experts_blocker(config: "Config") -> str | None:
    """What keeps the local spec's grouped experts from running, named, or None."""
    if config.parallel.expert_tensor > 1:
        return f"parallel.expert_tensor={config.parallel.expert_tensor} (expert tensor parallelism)"
    for key, what in LEAN_EXPERTS_UNSUPPORTED.items():
        if config.model.transformer_overrides.get(key) not in (None, False):
            return f"model.transformer_overrides.{key} ({what})"
    return None


@dataclass
class CoEConfig:
    """Chain-of-Experts: the MoE layer runs ``iterations`` times in sequence."""

    iterations: int = 2
    residual: str = "inner"
    router: str = "independent"
    # Norm the input of iterations 2..C (pre-norm style; see model/layer.py).  Off by default:
    # the outer residual's iterates then shrink towards zero at the default init.
    iteration_norm: bool = False


@dataclass
class MLAConfig:
    """Multi-latent attention sizes (DeepSeek-V2-Lite style)."""

    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 32
    qk_head_dim: int = 16
    qk_pos_emb_head_dim: int = 8
    v_head_dim: int = 16
    # The rotary embedding of the queries and keys, and the assembly of the heads' keys and
    # values, as Megatron-Core's Triton kernels (megatron/core/fusions/fused_mla_yarn_rope_apply
    # .py) instead of torch's split, rotate, concatenate ops.  Megatron runs them for its YaRN
    # RoPE; with a scaling factor of 1 YaRN's frequencies are RoPE's (within one fp32 ulp), so
    # a model built with them is the same model (docs/performance.md).  Needs power-of-two
    # head dims, no context parallelism, no RoPE settings in transformer_overrides, a GPU (the
    # tests run them on CPU under Triton's interpreter) and the triton package.  null (auto):
    # on CUDA where model.fused_kernels resolves to triton, they apply and they run on the GPU
    # (tried once per process); the run's config.yaml keeps the resolved choice.
    rope_fusion: Optional[bool] = None


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    # FFN size of dense layers (all layers when ``moe`` is None, else the dense_layers ones).
    ffn_hidden_size: int = 128
    vocab_size: int = 264  # >= the tokenizer's; 257 for the byte tokenizer, padded to 8
    seq_length: int = 64
    normalization: str = "RMSNorm"
    attention: str = "mha"
    mla: MLAConfig = field(default_factory=MLAConfig)
    init_method_std: float = 0.02
    # Indices (0-based) of layers that stay dense in an MoE/CoE model.
    dense_layers: list[int] = field(default_factory=list)
    moe: Optional[MoEConfig] = None
    coe: Optional[CoEConfig] = None
    # Extra Megatron TransformerConfig fields, passed through after validation.
    transformer_overrides: dict[str, Any] = field(default_factory=dict)
    # Layer implementation: auto (Transformer Engine on CUDA when importable, else local),
    # transformer_engine, or local (Megatron's plain-PyTorch spec; the only one on CPU).  A run
    # writes the resolved choice into its config.yaml.
    impl: str = "auto"
    # SwiGLU as Megatron's fused kernels (Megatron-LM's --bias-swiglu-fusion, TransformerConfig
    # bias_activation_fusion): torch.compile'd forward and backward; experts fold the routing
    # probability in and keep only fc1's output and the probabilities for backward.  null
    # (auto): on with device=cuda where torch.compile runs (tried once per process), off on CPU
    # and with transformer_overrides it cannot run with (SWIGLU_FUSION_BLOCKERS); a run writes
    # the resolved choice into its config.yaml.
    swiglu_fusion: Optional[bool] = None
    # The language-model loss as two fused kernels (megatron_coe/model/loss.py): the logits
    # read once in their dtype, logsumexp kept per token, the gradient written once, instead of
    # Megatron's fp32 steps over [tokens, vocabulary]; keeps 1 GiB less at the paper configs'
    # 16k tokens x 32k vocabulary.  null (auto): on where model.fused_kernels resolves to
    # triton (CUDA with the triton package) and the vocabulary is whole on each rank
    # (parallel.tensor 1); off elsewhere: as torch.compile generates them the kernels made the
    # H100 step slower than Megatron's loss (docs/performance.md).  A run writes the resolved
    # choice into its config.yaml.
    loss_fusion: Optional[bool] = None
    # How the fused kernels above are made: "compile" (torch.compile of the torch math, as
    # Megatron's fused SwiGLU is) or "triton" (this package's hand-written Triton kernels,
    # model/triton_cross_entropy.py, model/triton_swiglu.py, model/triton_gather_sum.py,
    # model/triton_router.py and model/triton_row_index.py: the loss, the SwiGLU of the local
    # spec's grouped experts and shared expert, the sum of each token's expert rows in the
    # dispatcher's unpermutation (with the reference residual's adds), the routers' softmax
    # and top-k, and the rows' index from their map; per-expert GEMM experts and Transformer
    # Engine's layers keep their own).  triton needs device=cuda (the tests run
    # it on CPU under Triton's interpreter, TRITON_INTERPRET=1) and one of the two fusions on.
    # auto: triton on CUDA where the triton package imports, the kernels run on the GPU (tried
    # once per process) and a fusion is on; compile elsewhere.
    fused_kernels: str = "auto"


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: int = 1
    context: int = 1
    sequence_parallel: bool = False
    # Overlap each MoE/CoE layer's expert-parallel all-to-alls with expert compute: every
    # exchange runs in two halves of the local experts, and the shared expert runs while the
    # dispatch is in flight.  Same results, bit for bit; 4*C all-to-alls per layer forward
    # instead of 2*C.  Nothing to hide (and no change) at parallel.expert = 1.
    overlap_expert_comm: bool = False
    # Timeout of every process group, in minutes.
    timeout_minutes: float = 10.0


@dataclass
class DataConfig:
    # arithmetic: the built-in seeded word problems; jsonl: text files preprocessed into the
    # run directory; indexed: existing Megatron .bin/.idx prefixes.
    source: str = "arithmetic"
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # blend weights, one per path
    text_keys: list[str] = field(default_factory=lambda: ["text"])
    # "byte", "bpe" (trained on the training text, saved in the run directory) or the path of a
    # tokenizers JSON file.
    tokenizer: str = "byte"
    bpe_vocab_size: int = 512
    num_documents: int = 4000  # arithmetic source
    split: str = "98,1,1"  # train, valid, test weights
    seed: int = 1234


@dataclass
class OptimizerConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    distributed: bool = False  # Megatron's distributed (ZeRO-1) optimizer
    # torch's fused AdamW kernel (one launch for many tensors), with which the step's update,
    # clipping and non-finite skip run on the device and the step reads the host once
    # (optim_step.py).  null (auto): on CUDA; not on CPU (one update per tensor, the CPU
    # reference's arithmetic).  false on CUDA: torch's foreach AdamW.  TE's and apex's
    # FusedAdam, which Megatron takes where installed, are left alone.
    fused: Optional[bool] = None
    # precision=fp16 only: a fixed loss scale, or None for Megatron's dynamic scaler, which
    # starts at initial_loss_scale, halves after `hysteresis` overflows (the step is skipped)
    # and doubles after loss_scale_window steps without one.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 65536.0
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2


@dataclass
class ScheduleConfig:
    warmup_steps: int = 5
    decay: str = "cosine"  # cosine, linear, constant, wsd
    wsd_decay_steps: int = 0  # wsd: length of the final decay phase


@dataclass
class TrainConfig:
    steps: int = 30
    micro_batch_size: int = 2
    global_batch_size: int = 8
    log_interval: int = 1
    eval_interval: int = 10  # 0: only at the end
    eval_iters: int = 2
    # none; full (every layer); moe (the whole CoE chain of each layer, all-to-alls included);
    # experts (each iteration's expert MLPs, routed and shared: no all-to-all is repeated);
    # moe_act (the routed experts' activation only, Megatron's recompute_modules: [moe_act];
    # grouped experts)
    recompute: str = "none"
    max_nonfinite_steps: int = 5  # skipped non-finite steps allowed before the run stops
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs only
    tensorboard: bool = True
    # Save a checkpoint and exit when step % exit_interval == 0 (0: never), like Megatron-LM's
    # --exit-interval: for jobs split across time-limited allocations.
    exit_interval: int = 0
    # Fault injection, for resilience tests: at these steps (1-based) the loss is made NaN.
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    # none; full_iteration: each training step's forward-backward over all micro-batches is
    # captured once as one CUDA graph after cuda_graph_warmup_steps eager steps, then replayed
    # (Megatron-LM's --cuda-graph-impl full_iteration; the optimizer and validation run
    # eagerly).  See megatron_coe/cuda_graph.py.
    cuda_graph: str = "none"
    cuda_graph_warmup_steps: int = 2
    # [first, last]: torch.profiler traces training steps first..last (1-based, inclusive) on
    # the ranks in profile_ranks, into run_dir/profile/ (megatron_coe/step_profiler.py); []: off.
    profile_steps: list[int] = field(default_factory=list)
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2
    resume: str = "auto"  # auto: latest in run_dir/checkpoints; none; or a checkpoint path
    # Copy the state to host memory at the save step and write it in a background thread while
    # training goes on (finalized at a later step boundary, before the next save, and at exit).
    # Costs one extra host copy of model + optimizer state while the write runs.
    async_save: bool = False
    # false: no checkpoint when the run ends (save_interval, exit_interval and stop requests
    # still save); for measurements and checks whose weights nobody keeps.
    save_final: bool = True
    # resume=none into a run_dir holding checkpoints is refused unless overwrite=true, which
    # moves the previous run (checkpoints, metrics, tensorboard) to run_dir/replaced/<time>/
    overwrite: bool = False


@dataclass
class FP8Config:
    """FP8 GEMMs on top of precision=bf16 (bf16 master weights and gradients)."""

    enabled: bool = False
    # transformer_engine: TE's linears (GPU, TE spec); torch: the local spec's grouped experts
    # through torch's scaled GEMMs (megatron_coe/model/fp8.py)
    backend: str = "transformer_engine"
    format: str = "hybrid"  # hybrid: e4m3 forward, e5m2 gradients; or e4m3 everywhere
    # tensorwise: current (per-tensor, per-call) scaling; rowwise (torch backend): one scale per
    # activation row and per weight output column, per call; delayed: amax-history scaling, one
    # scale per GEMM shared by all calls of a step (refused when a CoE layer calls its experts
    # more than once); mxfp8: block scaling (Blackwell); blockwise: DeepSeek-style 128x128
    recipe: str = "tensorwise"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"


@dataclass
class Config:
    device: str = "cpu"
    precision: str = "fp32"
    fp8: FP8Config = field(default_factory=FP8Config)
    seed: int = 1234
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# --------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses, strict about keys and types.
# --------------------------------------------------------------------------------------------


def _unwrap_optional(tp):
    """Return (inner_type, is_optional) for Optional[X] / X | None annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce int->float) a YAML value against a field's annotation."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where}: null is not allowed; give a value of type {_tname(inner)}")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {inner.__name__} fields, got {value!r}")
        return _from_dict(inner, value, where)
    origin = typing.get_origin(inner)
    if origin is list:
        (item_tp,) = typing.get_args(inner)
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if inner is Any:
        return value
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 or 1e12 as strings: accept plain decimal notation
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return number
    if inner is int and isinstance(value, bool) or not isinstance(value, inner):
        raise ValueError(f"{where}: expected {_tname(inner)}, got {value!r}")
    return value


def _tname(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _from_dict(cls, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; valid keys of "
            f"{where or 'the top level'}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def _set_dotted(data: dict, dotted: str, value: Any, cls) -> None:
    """Apply ``a.b.c=value`` to a raw dict, creating sections that the YAML left out."""
    keys = dotted.split(".")
    node, node_cls = data, cls
    for i, key in enumerate(keys):
        names = {f.name: f for f in dataclasses.fields(node_cls)}
        path = ".".join(keys[: i + 1])
        if key not in names:
            raise ValueError(
                f"override {dotted!r}: unknown key {path}; valid keys here: {', '.join(names)}"
            )
        if i == len(keys) - 1:
            node[key] = value
            return
        sub_tp, _ = _unwrap_optional(typing.get_type_hints(node_cls)[key])
        if not dataclasses.is_dataclass(sub_tp):
            raise ValueError(f"override {dotted!r}: {path} is not a section")
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node, node_cls = node[key], sub_tp


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from a plain dict plus ``key=value`` overrides."""
    data = dict(data or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            reason = str(err).splitlines()[0]
            raise ValueError(f"override {item!r}: the value {raw!r} is not valid YAML ({reason}); "
                             "quote strings, e.g. key='a: b', and close brackets") from None
        _set_dotted(data, key.strip(), value, Config)
    config = _from_dict(Config, data, "")
    validate(config)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (safe loader), apply dotted overrides, validate, return a Config."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path}: top level must be a mapping of sections")
    return config_from_dict(data, overrides)


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Validation: the one place where values are checked.
# --------------------------------------------------------------------------------------------


def _choice(value: str, options: tuple[str, ...], name: str) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(options)}")


def _positive(value: int | float, name: str) -> None:
    if value <= 0:
        raise ValueError(f"{name}={value} must be > 0")


def _check_finite(node: Any, where: str = "") -> None:
    """Every float in the config (fields, lists, nested sections) must be finite: YAML reads
    .inf and .nan as floats, and a non-finite value would pass the range checks below."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_finite(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for key, item in node.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ValueError(f"{where}={node} is not a finite number; give a finite value")


def _validate_profile(t: TrainConfig, world_size: int | None) -> None:
    if t.profile_steps and (len(t.profile_steps) != 2
                            or not 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.steps):
        raise ValueError(f"train.profile_steps={t.profile_steps}: give [first, last] with 1 <= "
                         f"first <= last <= train.steps={t.steps} (e.g. [10, 12]), or [] for none")
    capture = t.cuda_graph_warmup_steps + 1  # the step that captures the graph
    if t.profile_steps and t.cuda_graph != "none" and t.profile_steps[0] <= capture:
        raise ValueError(f"train.profile_steps={t.profile_steps} with train.cuda_graph="
                         f"{t.cuda_graph}: step {capture} captures the graph, which the profiler "
                         f"must not observe; start after it (first >= {capture + 1})")
    if not t.profile_ranks or min(t.profile_ranks) < 0 or len(set(t.profile_ranks)) < len(
            t.profile_ranks):
        raise ValueError(f"train.profile_ranks={t.profile_ranks}: give distinct ranks >= 0, "
                         "e.g. [0]")
    if world_size is not None and max(t.profile_ranks) >= world_size:
        raise ValueError(f"train.profile_ranks={t.profile_ranks}: this run has ranks 0.."
                         f"{world_size - 1}")


def validate(config: Config, world_size: int | None = None) -> None:
    """Check every value; raise ValueError naming the field and the fix.  ``world_size``,
    when given, is checked against the parallel sizes (every factor printed)."""
    _check_finite(config)
    _choice(config.device, DEVICES, "device")
    _choice(config.precision, PRECISIONS, "precision")
    f8 = config.fp8
    _choice(f8.format, FP8_FORMATS, "fp8.format")
    _choice(f8.recipe, FP8_RECIPES, "fp8.recipe")
    _positive(f8.amax_history_len, "fp8.amax_history_len")
    _choice(f8.amax_compute_algo, ("max", "most_recent"), "fp8.amax_compute_algo")
    _choice(f8.backend, FP8_BACKENDS, "fp8.backend")
    if f8.enabled:
        _validate_fp8(config)
    _validate_impl(config)

    if not config.run_dir:
        raise ValueError("run_dir is empty; give a directory for logs and checkpoints")
    _validate_training(config)
    _validate_profile(config.train, world_size)

    m = config.model
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vocab_size", "seq_length"):
        _positive(getattr(m, name), f"model.{name}")
    _positive(m.init_method_std, "model.init_method_std")
    _choice(m.normalization, NORMALIZATIONS, "model.normalization")
    _choice(m.attention, ATTENTION_TYPES, "model.attention")
    if m.hidden_size % m.num_attention_heads:
        raise ValueError(
            f"model.hidden_size={m.hidden_size} must be divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.attention == "mla":
        for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            _positive(getattr(m.mla, name), f"model.mla.{name}")
        if m.mla.q_lora_rank is not None:
            _positive(m.mla.q_lora_rank, "model.mla.q_lora_rank")
    for i in m.dense_layers:
        if not 0 <= i < m.num_layers:
            raise ValueError(
                f"model.dense_layers contains {i}; layer indices are 0..{m.num_layers - 1}"
            )
    if m.dense_layers and m.moe is None:
        raise ValueError("model.dense_layers is set but model.moe is null; remove dense_layers")

    if m.coe is not None and m.moe is None:
        raise ValueError(
            "model.coe is set on a dense model (model.moe is null); add a model.moe section "
            "(num_experts, topk, expert_hidden_size) or remove model.coe"
        )
    if m.moe is not None:
        _validate_moe(m.moe, config.parallel)
        blocker = _lean_experts_blocker(config)
        if m.moe.grouped_gemm and config.device == "cpu" and blocker is not None:
            raise ValueError(
                f"model.moe.grouped_gemm=true: the local spec's grouped experts do not "
                f"implement {blocker}; set model.moe.grouped_gemm=false (per-expert GEMMs) or "
                "null (auto)")
    if m.coe is not None:
        _validate_coe(m.coe)
    _validate_transformer_overrides(m)
    _validate_swiglu_fusion(m)
    _validate_loss_fusion(config)
    _validate_fused_kernels(config)
    _validate_mla_rope_fusion(config)
    _validate_parallel(config, world_size)


def expert_calls_per_microbatch(config: Config) -> int:
    """How many times each MoE/CoE layer calls its routed experts per micro-batch forward:
    C, twice that with parallel.overlap_expert_comm (two halves per iteration)."""
    c = config.model.coe.iterations if config.model.coe is not None else 1
    return c * (2 if config.parallel.overlap_expert_comm else 1)


def _validate_fp8(config: Config) -> None:
    """FP8 prerequisites, and the recipes that assume one call per module and step (the
    reasons and TE source locations: docs/reliability.md, "FP8 with Transformer Engine")."""
    f8 = config.fp8
    if config.precision != "bf16":
        raise ValueError(f"fp8.enabled=true runs on top of bf16; set precision=bf16 "
                         f"(got {config.precision})")
    if f8.backend == "torch":
        moe = config.model.moe
        if config.device == "cpu":
            from megatron_coe.model.fp8 import cpu_problem

            problem = cpu_problem()
            if problem:
                raise ValueError(f"fp8.backend=torch cannot run on device=cpu with this torch: "
                                 f"{problem}; use device=cuda or fp8.enabled=false")
        if config.model.impl == "transformer_engine":
            raise ValueError("fp8.backend=torch quantizes the grouped experts of the local spec; "
                             "model.impl=transformer_engine builds Transformer Engine's: use "
                             "model.impl=local (or auto), or fp8.backend=transformer_engine")
        blocker = _lean_experts_blocker(config) if moe is not None else None
        if blocker is not None:  # grouped_gemm=false would not help: say what does
            raise ValueError(f"fp8.backend=torch quantizes the grouped experts of the local "
                             f"spec, which do not implement {blocker}: remove that setting, or "
                             f"use fp8.backend=transformer_engine (Transformer Engine's experts)")
        if moe is None or not grouped_experts(config):
            raise ValueError("fp8.backend=torch quantizes the grouped experts of the local spec: "
                             "it needs model.moe with model.moe.grouped_gemm=true")
        if f8.format != "e4m3":
            raise ValueError("fp8.backend=torch computes gradients in e4m3 too (torch's grouped "
                             "FP8 kernel takes e4m3 operands only); set fp8.format=e4m3")
        sizes = {"model.hidden_size": config.model.hidden_size,
                 "model.moe.expert_hidden_size": moe.expert_hidden_size}
        for name, size in sizes.items():
            if size % 16:
                raise ValueError(f"fp8.backend=torch needs {name}={size} to be a multiple of 16 "
                                 f"(FP8 GEMM alignment)")
        if f8.recipe not in ("tensorwise", "rowwise"):
            raise ValueError(f"fp8.backend=torch scales every call from its own amax; "
                             f"fp8.recipe={f8.recipe} is a Transformer Engine recipe: use "
                             f"fp8.recipe=rowwise or tensorwise, or fp8.backend=transformer_engine")
        return
    if f8.recipe == "rowwise":
        raise ValueError("fp8.recipe=rowwise is the torch backend's; set fp8.backend=torch, or "
                         "use a Transformer Engine recipe (tensorwise, delayed, mxfp8, blockwise)")
    if config.device == "cpu":
        raise ValueError("fp8.enabled=true needs Transformer Engine on a GPU: FP8 does not run "
                         "on device=cpu; set device=cuda (NGC container) or fp8.enabled=false")
    calls = expert_calls_per_microbatch(config)
    if f8.recipe == "delayed" and calls > 1 and config.model.moe is not None:
        raise ValueError(
            f"fp8.recipe=delayed cannot scale CoE experts: they run {calls} times per "
            f"micro-batch (model.coe.iterations x 2 with parallel.overlap_expert_comm), and "
            f"delayed scaling gives all calls of a step one scale from earlier steps' amax "
            f"history and pools their amaxes into one slot (Transformer Engine's autocast "
            f"documents more than one call per region as unsupported); use "
            f"fp8.recipe=tensorwise (each call scaled from its own amax), blockwise or mxfp8")


def te_only_overrides(model: ModelConfig) -> list[str]:
    """The transformer_overrides in use that only Transformer Engine layers implement."""
    return [key for key in TE_ONLY_OVERRIDES
            if model.transformer_overrides.get(key) not in (None, False, 0, "none")]


def _validate_impl(config: Config) -> None:
    """model.impl against the device and the features that need Transformer Engine.  Whether
    TE is importable is checked at start-up (model.build.resolve_impl), not here."""
    impl = config.model.impl
    _choice(impl, IMPLS, "model.impl")
    if impl == "transformer_engine" and config.device == "cpu":
        raise ValueError("model.impl=transformer_engine needs device=cuda: Transformer Engine "
                         "does not run on CPU; use model.impl=local (or auto) with device=cpu")
    if impl == "transformer_engine" or (impl == "auto" and config.device != "cpu"):
        return  # auto on CUDA: decided at start-up, where a TE-only feature then needs TE
    if config.fp8.enabled and config.fp8.backend == "transformer_engine":
        raise ValueError("fp8.enabled=true with fp8.backend=transformer_engine needs Transformer "
                         "Engine layers; "
                         f"model.impl={impl} uses the local spec, which has none: set "
                         "model.impl=transformer_engine (or auto) on a GPU with TE, "
                         "fp8.backend=torch (grouped experts), or fp8.enabled=false")
    for key in te_only_overrides(config.model):
        value, what = config.model.transformer_overrides[key], TE_ONLY_OVERRIDES[key]
        raise ValueError(f"model.transformer_overrides.{key}={value!r} ({what}) needs "
                             f"Transformer Engine; the local spec (model.impl={impl}"
                             f"{', device=cpu' if config.device == 'cpu' else ''}) has no such "
                             "layers: remove it, or use model.impl=transformer_engine on a GPU "
                             "with TE")


def _validate_training(config: Config) -> None:
    d, o, sch, t, ck = config.data, config.optimizer, config.schedule, config.train, config.checkpoint
    _choice(d.source, DATA_SOURCES, "data.source")
    if d.source == "arithmetic":
        _positive(d.num_documents, "data.num_documents")
        if d.paths:
            raise ValueError("data.paths is set but data.source=arithmetic; use source: jsonl "
                             "or indexed, or remove data.paths")
    elif not d.paths:
        raise ValueError(f"data.source={d.source} needs data.paths (one or more files/prefixes)")
    if d.weights and len(d.weights) != len(d.paths):
        raise ValueError(f"data.weights has {len(d.weights)} entries for {len(d.paths)} "
                         "data.paths; give one weight per path or none")
    if any(w <= 0 for w in d.weights):
        raise ValueError("data.weights must all be > 0")
    if not d.text_keys:
        raise ValueError("data.text_keys is empty; name the JSON field(s) holding the text")
    if d.tokenizer == "bpe":
        if d.bpe_vocab_size < 300:
            raise ValueError(f"data.bpe_vocab_size={d.bpe_vocab_size} must be >= 300 "
                             "(256 byte symbols + merges + end-of-document)")
        if d.source == "indexed":
            raise ValueError("data.tokenizer=bpe trains on text; with source=indexed give the "
                             "tokenizer the data was made with")
    try:
        split = [float(x) for x in d.split.split(",")]
    except ValueError:
        split = []
    if len(split) != 3 or any(x < 0 for x in split) or split[0] <= 0:
        raise ValueError(f"data.split={d.split!r} must be three weights 'train,valid,test' "
                         "with train > 0, e.g. '98,1,1'")
    if split[1] <= 0:  # the run evaluates on the valid part (every eval_interval, and at the end)
        raise ValueError(f"data.split={d.split!r} leaves no validation part, which every run "
                         "evaluates on; give valid a weight > 0, e.g. '99,1,0' (test may be 0)")
    for name in ("lr", "eps", "initial_loss_scale", "min_loss_scale", "loss_scale_window",
                 "hysteresis"):
        _positive(getattr(o, name), f"optimizer.{name}")
    if o.loss_scale is not None:
        _positive(o.loss_scale, "optimizer.loss_scale")
        if config.precision != "fp16":  # Megatron would divide the gradients by it unscaled
            raise ValueError(f"optimizer.loss_scale={o.loss_scale} is fp16's loss scale; "
                             f"precision={config.precision} does not scale the loss: leave "
                             "optimizer.loss_scale unset (null)")
    if o.min_loss_scale > o.initial_loss_scale:
        raise ValueError(f"optimizer.min_loss_scale={o.min_loss_scale} exceeds "
                         f"optimizer.initial_loss_scale={o.initial_loss_scale}")
    if not 0 <= o.min_lr <= o.lr:
        raise ValueError(f"optimizer.min_lr={o.min_lr} must be in [0, optimizer.lr={o.lr}]")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ValueError(f"optimizer.{name}={getattr(o, name)} must be in [0, 1)")
    if o.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    if o.clip_grad < 0:
        raise ValueError(f"optimizer.clip_grad={o.clip_grad} must be >= 0 (0 disables clipping)")
    _choice(sch.decay, LR_DECAYS, "schedule.decay")
    _positive(t.steps, "train.steps")
    # Megatron's scheduler decays over train.steps and asserts lr_warmup_steps < lr_decay_steps
    if not 0 <= sch.warmup_steps < t.steps:
        raise ValueError(f"schedule.warmup_steps={sch.warmup_steps} must be in [0, "
                         f"train.steps={t.steps}): the schedule needs at least one step after "
                         f"warmup; lower warmup_steps or raise train.steps")
    if sch.decay == "wsd" and not 0 < sch.wsd_decay_steps <= t.steps - sch.warmup_steps:
        raise ValueError(f"schedule.wsd_decay_steps={sch.wsd_decay_steps} must be in [1, "
                         f"train.steps - warmup_steps = {t.steps - sch.warmup_steps}] for wsd")
    for name in ("micro_batch_size", "global_batch_size", "log_interval", "eval_iters"):
        _positive(getattr(t, name), f"train.{name}")
    if t.global_batch_size % t.micro_batch_size:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={t.micro_batch_size}")
    if t.eval_interval < 0:
        raise ValueError("train.eval_interval must be >= 0 (0: evaluate only at the end)")
    _choice(t.recompute, RECOMPUTE, "train.recompute")
    if t.recompute in ("experts", "moe_act") and config.model.moe is None:
        raise ValueError(f"train.recompute={t.recompute} needs MoE/CoE layers (model.moe); use "
                         "full for a dense model")
    if t.recompute == "moe_act":
        if not grouped_experts(config):
            raise ValueError("train.recompute=moe_act recomputes the activation of grouped "
                             "experts (as Megatron's recompute_modules: [moe_act]); set "
                             "model.moe.grouped_gemm=true or null, or use train.recompute="
                             "experts")
        if config.fp8.enabled and config.fp8.backend == "torch":
            raise ValueError("train.recompute=moe_act is not implemented with fp8.backend=torch; "
                             "use train.recompute=experts or none")
    if t.exit_interval < 0:
        raise ValueError("train.exit_interval must be >= 0 (0: never)")
    if t.max_nonfinite_steps < 0:
        raise ValueError("train.max_nonfinite_steps must be >= 0")
    if t.peak_tflops is not None:
        _positive(t.peak_tflops, "train.peak_tflops")
    _validate_cuda_graph(config)
    if ck.save_interval < 0:
        raise ValueError("checkpoint.save_interval must be >= 0 (0: only at the end)")
    _positive(ck.keep_last, "checkpoint.keep_last")

    if not ck.resume:
        raise ValueError("checkpoint.resume is empty; use auto, none or a checkpoint path")
    if ck.overwrite and ck.resume != "none":
        raise ValueError(f"checkpoint.overwrite=true starts over and needs "
                         f"checkpoint.resume=none (got {ck.resume!r})")


def _validate_moe(moe: MoEConfig, par: ParallelConfig) -> None:
    _positive(moe.num_experts, "model.moe.num_experts")
    _positive(moe.topk, "model.moe.topk")
    _positive(moe.expert_hidden_size, "model.moe.expert_hidden_size")
    if moe.topk > moe.num_experts:
        raise ValueError(
            f"model.moe.topk={moe.topk} exceeds model.moe.num_experts={moe.num_experts}; "
            f"choose topk <= num_experts"
        )
    if moe.shared_expert_hidden_size is not None:
        _positive(moe.shared_expert_hidden_size, "model.moe.shared_expert_hidden_size")
    _choice(moe.score_function, SCORE_FUNCTIONS, "model.moe.score_function")
    _choice(moe.aux_loss, AUX_LOSS_TYPES, "model.moe.aux_loss")
    _choice(moe.drop_policy, DROP_POLICIES, "model.moe.drop_policy")
    _choice(moe.dispatcher, DISPATCHERS, "model.moe.dispatcher")
    _choice(moe.router_gemm, ROUTER_GEMMS, "model.moe.router_gemm")
    if moe.aux_loss != "none" and moe.aux_loss_coeff <= 0:
        raise ValueError(
            f"model.moe.aux_loss_coeff={moe.aux_loss_coeff} must be > 0 with "
            f"model.moe.aux_loss={moe.aux_loss!r}; set aux_loss: none to disable it"
        )
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise ValueError(
            "model.moe.expert_bias (aux-loss-free balancing) needs "
            "model.moe.score_function=sigmoid (Megatron-Core supports it only there)"
        )
    if moe.z_loss_coeff is not None:
        _positive(moe.z_loss_coeff, "model.moe.z_loss_coeff")
    if moe.capacity_factor is not None:
        _positive(moe.capacity_factor, "model.moe.capacity_factor")
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise ValueError("model.moe.pad_to_capacity needs model.moe.capacity_factor; set one")
    if moe.num_experts % par.expert:
        raise ValueError(
            f"model.moe.num_experts={moe.num_experts} is not divisible by the expert-parallel "
            f"size parallel.expert={par.expert}; use a multiple of {par.expert} experts or a "
            f"divisor of {moe.num_experts} for parallel.expert"
        )


def _validate_coe(coe: CoEConfig) -> None:
    if coe.iterations < 1:
        raise ValueError(f"model.coe.iterations={coe.iterations} must be >= 1 (1 = plain MoE)")
    _choice(coe.residual, RESIDUAL_MODES, "model.coe.residual")
    _choice(coe.router, ROUTER_MODES, "model.coe.router")
    if coe.iteration_norm and coe.iterations < 2:
        raise ValueError("model.coe.iteration_norm=true norms the input of iterations 2..C; "
                         "with model.coe.iterations=1 there is none: remove it")


def _validate_transformer_overrides(m: ModelConfig) -> None:
    from_megatron = _transformer_config_fields()
    for key in m.transformer_overrides:
        if from_megatron is not None and key not in from_megatron:
            raise ValueError(
                f"model.transformer_overrides.{key} is not a Megatron TransformerConfig field"
            )
    if m.transformer_overrides.get("cuda_graph_impl") == "full_iteration":
        raise ValueError("model.transformer_overrides.cuda_graph_impl=full_iteration: set "
                         "train.cuda_graph: full_iteration instead (the training loop captures "
                         "its schedule)")
    if m.moe is not None and m.transformer_overrides.get("moe_shared_expert_overlap"):
        # Megatron hands the shared expert to the layer's first dispatcher, which CoELayer
        # replaces: the shared expert would silently drop out of every MoE/CoE layer
        raise ValueError(
            "model.transformer_overrides.moe_shared_expert_overlap cannot be used: the CoE layer "
            "runs the shared expert itself in every iteration (parallel.overlap_expert_comm "
            "overlaps it with the all-to-alls); remove it")
    if m.coe is not None and m.coe.iterations > 1:
        for key, why in SINGLE_ROUTE_FEATURES.items():
            if m.transformer_overrides.get(key):
                raise ValueError(
                    f"model.transformer_overrides.{key} cannot be used with "
                    f"model.coe.iterations={m.coe.iterations}: {why}; remove it"
                )
        graph = m.transformer_overrides.get("cuda_graph_impl", "none")
        if graph not in (None, "none"):
            raise ValueError(
                f"model.transformer_overrides.cuda_graph_impl={graph!r} cannot capture a CoE "
                f"layer (routing is data-dependent in every iteration); use 'none', or "
                f"train.cuda_graph: full_iteration to capture the whole training step"
            )


def _validate_loss_fusion(config: "Config") -> None:
    if not config.model.loss_fusion:
        return
    if config.parallel.tensor > 1:
        raise ValueError(f"model.loss_fusion=true needs the whole vocabulary on each rank; "
                         f"parallel.tensor={config.parallel.tensor} splits it: set "
                         "model.loss_fusion=false")
    if config.model.transformer_overrides.get("cross_entropy_loss_fusion"):
        raise ValueError("model.loss_fusion=true and model.transformer_overrides."
                         "cross_entropy_loss_fusion (Megatron's own fused loss) are two fused "
                         "losses: keep one")


def _validate_cuda_graph(config: Config) -> None:
    """train.cuda_graph=full_iteration needs a step the GPU can replay without the host: no
    host read of a device value and no tensor the host rebinds between steps."""
    t, p = config.train, config.parallel
    _choice(t.cuda_graph, CUDA_GRAPHS, "train.cuda_graph")
    _positive(t.cuda_graph_warmup_steps, "train.cuda_graph_warmup_steps")
    if t.cuda_graph == "none":
        return
    why = None
    if config.device != "cuda":
        why = f"captures CUDA kernels; device={config.device} has none"
    elif p.expert > 1:
        why = (f"with parallel.expert={p.expert} the all-to-all dispatcher reads each rank's "
               "token counts on the host for the split sizes, which a graph cannot replay")
    elif config.precision == "fp16":
        why = ("with precision=fp16 the dynamic loss scaler replaces its scale tensor when it "
               "changes, and the graph would keep multiplying by the old one")
    elif config.fp8.enabled:
        why = ("with fp8 is not supported: Transformer Engine updates its FP8 scaling state "
               "outside the graph, and the torch backend's grouped experts read their counts "
               "on the host")
    elif p.pipeline > 1 or p.context > 1:
        why = ("is supported on one pipeline stage without context parallelism (parallel."
               f"pipeline={p.pipeline}, parallel.context={p.context})")
    elif _dropout(config.model) and t.recompute != "none":
        why = (f"with dropout and train.recompute={t.recompute} would recompute other masks "
               "(Megatron's checkpoint keeps the graph-safe RNG state by reference)")
    elif config.model.moe is not None:
        why = _graph_blocker_in_moe(config)
    if why:
        raise ValueError(f"train.cuda_graph=full_iteration {why}; use train.cuda_graph=none")


def _dropout(m: ModelConfig) -> bool:
    return any(m.transformer_overrides.get(k, 0.0) for k in ("attention_dropout",
                                                             "hidden_dropout"))


def _graph_blocker_in_moe(config: Config) -> str | None:
    """Why MoE/CoE layers would read token counts on the host in a step, or None: a CUDA graph
    replays only device work.  At EP = 1 the dispatcher keeps the counts on the device, and the
    local spec's grouped experts take them there (torch's grouped GEMM kernel: bf16)."""
    moe = config.model.moe
    if config.precision != "bf16":
        return (f"with MoE layers needs precision=bf16: in {config.precision} torch's grouped "
                "GEMM runs a per-group fallback that reads the expert offsets on the host")
    if config.model.impl == "transformer_engine":
        return ("with MoE layers needs model.impl=local (or auto): Transformer Engine's "
                "grouped MLP reads the expert splits on the host")
    blocker = _lean_experts_blocker(config)
    if blocker is not None or not grouped_experts(config):
        return ("with MoE layers needs the local spec's grouped experts (model.moe.grouped_gemm "
                "true or null" + (f"; they do not implement {blocker}" if blocker else "")
                + "): per-expert GEMMs split the rows by counts read on the host")
    m = config.model
    unaligned = {name: n for name, n in (("model.hidden_size", m.hidden_size),
                                         ("model.moe.expert_hidden_size", moe.expert_hidden_size))
                 if n % 8}
    if unaligned:  # grouped_mm's bf16 operands need rows of a multiple of 16 bytes
        return (f"with MoE layers needs sizes that are multiples of 8 for torch's grouped GEMM "
                f"({', '.join(f'{k}={v}' for k, v in unaligned.items())}); otherwise the "
                "experts loop over counts read on the host")
    if moe.capacity_factor is not None:
        return ("with model.moe.capacity_factor (token dropping): Megatron's dispatcher reads "
                "the kept token counts on the host")
    return None


def _validate_fused_kernels(config: "Config") -> None:
    m = config.model
    _choice(m.fused_kernels, FUSED_KERNELS, "model.fused_kernels")
    if m.fused_kernels != "triton":
        return
    # Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported) runs the kernels
    # on CPU tensors: the tests use it; far too slow for training
    if config.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"model.fused_kernels=triton runs Triton kernels on a GPU; "
                         f"device={config.device}: use model.fused_kernels=compile")
    if not swiglu_fusion(config) and not loss_fusion(config):
        raise ValueError("model.fused_kernels=triton picks the kernels of model.swiglu_fusion "
                         "and model.loss_fusion, and both are off: turn one on or drop "
                         "model.fused_kernels")
    if importlib.util.find_spec("triton") is None:
        raise ValueError("model.fused_kernels=triton needs the triton package (it comes with "
                         "torch's CUDA wheels): install it or use model.fused_kernels=compile")


def _validate_mla_rope_fusion(config: "Config") -> None:
    if not config.model.mla.rope_fusion:
        return
    blocker = mla_rope_fusion_blocker(config)
    if blocker is not None:
        raise ValueError(f"model.mla.rope_fusion=true: Megatron's fused MLA RoPE kernels do not "
                         f"run with {blocker}; set it to false or null (auto)")
    if config.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"model.mla.rope_fusion=true runs Triton kernels on a GPU; "
                         f"device={config.device}: set it to false or null (auto)")
    if importlib.util.find_spec("triton") is None:
        raise ValueError("model.mla.rope_fusion=true needs the triton package (it comes with "
                         "torch's CUDA wheels): install it or set it to false")


def _validate_swiglu_fusion(m: ModelConfig) -> None:
    """An explicit model.swiglu_fusion=true against settings Megatron's fused SwiGLU cannot run
    with (auto turns itself off there), and against a contradicting bias_activation_fusion."""
    override = m.transformer_overrides.get("bias_activation_fusion")
    if m.swiglu_fusion is not None and override is not None and bool(override) != m.swiglu_fusion:
        raise ValueError(f"model.swiglu_fusion={str(m.swiglu_fusion).lower()} contradicts "
                         f"model.transformer_overrides.bias_activation_fusion={override}: "
                         "keep one of them (model.swiglu_fusion is the same setting)")
    blocker = swiglu_fusion_blocker(m)
    if blocker is not None and (m.swiglu_fusion or override):
        raise ValueError(f"model.swiglu_fusion=true (bias_activation_fusion) runs Megatron's "
                         f"fused SwiGLU, which cannot run with model.transformer_overrides."
                         f"{blocker}: remove that or set model.swiglu_fusion=false")


def _transformer_config_fields() -> set[str] | None:
    try:
        from megatron.core.transformer.transformer_config import MLATransformerConfig
    except ImportError:  # validation of everything else still works without megatron-core
        return None
    return {f.name for f in dataclasses.fields(MLATransformerConfig)}


def _validate_parallel(config: Config, world_size: int | None) -> None:
    p = config.parallel
    for name in ("tensor", "pipeline", "expert", "expert_tensor", "context"):
        _positive(getattr(p, name), f"parallel.{name}")
    _positive(p.timeout_minutes, "parallel.timeout_minutes")
    m = config.model
    if p.expert > 1 and m.moe is None:
        raise ValueError(f"parallel.expert={p.expert} needs model.moe; set parallel.expert=1")
    if m.num_attention_heads % p.tensor:
        raise ValueError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={p.tensor}"
        )
    if m.num_layers % p.pipeline:
        raise ValueError(
            f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline={p.pipeline}"
        )
    if p.overlap_expert_comm:
        if m.moe is None:
            raise ValueError("parallel.overlap_expert_comm=true needs model.moe (there is no "
                             "expert all-to-all to overlap); set it to false")
        if p.expert > 1 and m.moe.num_experts // p.expert < 2:
            raise ValueError(
                f"parallel.overlap_expert_comm=true splits each rank's experts in two halves; "
                f"model.moe.num_experts={m.moe.num_experts} / parallel.expert={p.expert} leaves "
                f"{m.moe.num_experts // p.expert} per rank: use at least 2 per rank")
        if p.expert_tensor > 1 or m.moe.pad_to_capacity:
            raise ValueError("parallel.overlap_expert_comm=true does not support "
                             "parallel.expert_tensor > 1 or model.moe.pad_to_capacity=true yet")
    if p.context > 1 and m.seq_length % (2 * p.context):
        raise ValueError(
            f"model.seq_length={m.seq_length} must be divisible by 2 x parallel.context = "
            f"{2 * p.context} (each context-parallel rank holds 2 of the sequence's "
            f"{2 * p.context} chunks)")
    if p.context > 1 and config.device == "cpu" and m.transformer_overrides.get("attention_dropout"):
        raise ValueError("parallel.context > 1 on device=cpu has no attention dropout; "
                         "remove model.transformer_overrides.attention_dropout")
    if p.sequence_parallel and config.device == "cpu":
        raise ValueError(
            "parallel.sequence_parallel=true needs Transformer Engine or apex norms (Megatron's "
            "torch norm fallback refuses it), so it does not run on device=cpu"
        )
    if p.tensor > 1 and m.moe is not None and not p.sequence_parallel:
        raise ValueError(
            "parallel.tensor > 1 with MoE layers needs parallel.sequence_parallel=true "
            "(Megatron-Core refuses MoE + TP without it)"
        )
    if world_size is not None:
        dense = p.tensor * p.pipeline * p.context
        expert = p.expert_tensor * p.expert * p.pipeline
        if world_size % dense:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor ({p.tensor}) x pipeline "
                f"({p.pipeline}) x context ({p.context}) = {dense}"
            )
        if world_size % expert:
            raise ValueError(
                f"world size {world_size} is not divisible by expert_tensor ({p.expert_tensor}) x "
                f"expert ({p.expert}) x pipeline ({p.pipeline}) = {expert}"
            )
        dp = world_size // dense
        t = config.train
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by "
                f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp} = "
                f"world {world_size} / (tensor {p.tensor} x pipeline {p.pipeline} x context "
                f"{p.context}))"
            )
