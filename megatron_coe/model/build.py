"""build_model: a Megatron-Core GPTModel from a Config, with CoE layers where configured.

The model is Megatron's own GPTModel (embeddings, rotary or MLA attention, norms, output layer);
the only CoE-specific pieces are the module spec (spec.py) and the layers it points to.
Attention, experts and norms come from Megatron's local spec or its Transformer Engine spec,
as ``model.impl`` says (:func:`resolve_impl`): the local spec on CPU, and on CUDA Transformer
Engine when it is importable (``auto``) or asked for by name.  ``model.swiglu_fusion`` turns on
Megatron's fused SwiGLU kernels in either spec (:func:`resolve_swiglu_fusion`);
``model.loss_fusion`` the fused loss of loss.py, through GPTModel's one subclass there;
``model.fused_kernels`` whether those fused kernels are torch.compile'd or this package's
Triton kernels (:func:`resolve_fused_kernels`; auto: Triton, with the fused loss, on a GPU
where they run).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_coe import cuda_graph, parallel
from megatron_coe.config import (CoEConfig, Config, fused_kernels, grouped_experts, loss_fusion,
                                 mla_rope_fusion, mla_rope_fusion_blocker,
                                 swiglu_fusion, swiglu_fusion_blocker, te_only_overrides)
from megatron_coe.model import aux_topk, mla_rope, probe, router_gemm
from megatron_coe.model.layer import CoELayer
from megatron_coe.model.loss import CoEGPTModel
from megatron_coe.router_stats import install_tracker
from megatron_coe.model.spec import coe_block_spec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(config: Config) -> TransformerConfig:
    """Map our typed Config onto Megatron-Core's TransformerConfig (or MLATransformerConfig)."""
    m, p = config.model, config.parallel
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization=m.normalization,
        init_method_std=m.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
        gated_linear_unit=True,  # SwiGLU experts and MLPs, as in DeepSeek-V2
        activation_func=F.silu,
        bias_activation_fusion=resolve_swiglu_fusion(config)[0],
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        bf16=config.precision == "bf16",
        fp16=config.precision == "fp16",
        params_dtype=_DTYPES[config.precision],
        pipeline_dtype=_DTYPES[config.precision],
        use_cpu_initialization=config.device == "cpu",
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel,
    )
    if m.moe is not None:
        moe = m.moe
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.topk,
            moe_ffn_hidden_size=moe.expert_hidden_size,
            moe_shared_expert_intermediate_size=moe.shared_expert_hidden_size,
            moe_router_score_function=moe.score_function,
            moe_router_pre_softmax=not moe.renormalize_topk,
            moe_router_load_balancing_type=moe.aux_loss,
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.aux_loss != "none" else 0.0,
            moe_z_loss_coeff=moe.z_loss_coeff,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_router_bias_update_rate=moe.expert_bias_update_rate,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
            moe_token_drop_policy=moe.drop_policy,
            moe_token_dispatcher_type=moe.dispatcher,
            moe_grouped_gemm=grouped_experts(config),
            moe_permute_fusion=False,
            moe_router_dtype="fp32",
            moe_layer_freq=[0 if i in m.dense_layers else 1 for i in range(m.num_layers)],
        )
    if config.train.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=1)
    elif config.train.recompute in ("moe", "moe_act"):
        kwargs.update(recompute_granularity="selective",
                      recompute_modules=[config.train.recompute])
    if cuda_graph.enabled(config):  # what Megatron's modules check (megatron_coe/cuda_graph.py)
        kwargs.update(cuda_graph_impl=config.train.cuda_graph,
                      cuda_graph_warmup_steps=config.train.cuda_graph_warmup_steps)
    if config.fp8.enabled and config.fp8.backend == "transformer_engine":
        f8 = config.fp8
        kwargs.update(fp8=f8.format, fp8_recipe=f8.recipe,
                      fp8_amax_history_len=f8.amax_history_len,
                      fp8_amax_compute_algo=f8.amax_compute_algo)
    kwargs.update(m.transformer_overrides)
    if m.attention == "mla":
        mla = m.mla
        if mla_rope_fusion(config):
            # Megatron fuses MLA's RoPE only for YaRN, whose frequencies and attention scale
            # are RoPE's at a scaling factor of 1
            kwargs.update(apply_rope_fusion=True)
            rope = dict(rope_type="yarn", rotary_scaling_factor=1.0)
        else:
            rope = dict(rope_type="rope")
        return MLATransformerConfig(
            **kwargs,
            q_lora_rank=mla.q_lora_rank,
            kv_lora_rank=mla.kv_lora_rank,
            qk_head_dim=mla.qk_head_dim,
            qk_pos_emb_head_dim=mla.qk_pos_emb_head_dim,
            v_head_dim=mla.v_head_dim,
            **rope,
        )
    return TransformerConfig(**kwargs)


def _te_import_error() -> str | None:
    """None when Transformer Engine's PyTorch layers import here, else why not."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:  # absent, or a build that does not match this torch/CUDA
        return str(err)
    return None


def resolve_impl(config: Config) -> tuple[str, str]:
    """(model.impl as this run uses it: "transformer_engine" or "local", and why).

    CPU is always local.  On CUDA, ``auto`` takes Transformer Engine when it is importable,
    else the local spec; ``transformer_engine`` without TE, or ``auto`` falling back to local
    while a feature needs TE, stops here with a ValueError naming TE (before any work)."""
    impl = config.model.impl
    if config.device == "cpu":
        return "local", "device=cpu runs the local spec"
    if impl == "local":
        return "local", "model.impl=local"
    if impl == "auto" and expert_fp8_recipe(config):
        return "local", "auto: fp8.backend=torch runs on the local spec's grouped experts"
    if impl == "auto" and cuda_graph.enabled(config) and config.model.moe is not None:
        return "local", ("auto: train.cuda_graph captures the local spec's grouped experts "
                         "(Transformer Engine's read the expert splits on the host)")
    error = _te_import_error()
    if impl == "transformer_engine":
        if error is not None:
            raise ValueError(
                f"model.impl=transformer_engine but Transformer Engine is not importable here "
                f"({error}): run inside the NGC PyTorch container (it ships TE and apex), "
                "install transformer-engine[pytorch], or set model.impl=local (or auto)")
        return "transformer_engine", "model.impl=transformer_engine"
    if error is None:
        return "transformer_engine", "auto: device=cuda and Transformer Engine is importable"
    te_fp8 = config.fp8.enabled and config.fp8.backend == "transformer_engine"
    needs_te = (["fp8.enabled=true"] if te_fp8 else []) + [
        f"model.transformer_overrides.{key}" for key in te_only_overrides(config.model)]
    if needs_te:
        raise ValueError(
            f"{', '.join(needs_te)} needs Transformer Engine, which is not importable here "
            f"({error}); model.impl=auto would fall back to the local spec, which has no such "
            "layers: run where TE is installed (NGC PyTorch container) or turn it off")
    return "local", f"auto: Transformer Engine is not importable ({error})"


def resolve_swiglu_fusion(config: Config) -> tuple[bool, str]:
    """(model.swiglu_fusion as this process runs it, and why).  What the config says
    (config.swiglu_fusion: explicit, Megatron's bias_activation_fusion override, or auto: on
    for CUDA unless an override rules it out); auto on CUDA is then kept only if Megatron's
    fused SwiGLU (torch.compile) runs a forward and backward on the device in the run's dtype,
    tried once per process, so a machine without a working compiler (Triton) runs the unfused
    ops instead of failing in the first step."""
    m = config.model
    fusion = swiglu_fusion(config)
    if "bias_activation_fusion" in m.transformer_overrides:
        return fusion, "model.transformer_overrides.bias_activation_fusion"
    if m.swiglu_fusion is not None:
        return fusion, f"model.swiglu_fusion={str(fusion).lower()}"
    if not fusion:
        return False, ("auto: off on CPU" if config.device != "cuda" else
                       f"auto: off with transformer_overrides.{swiglu_fusion_blocker(m)}")
    error = fused_swiglu_error("cuda", _DTYPES[config.precision])
    if error is None:
        return True, "auto: device=cuda and torch.compile runs the fused kernels"
    return False, f"auto: torch.compile failed on this GPU ({error}); unfused SwiGLU"


_FUSED_SWIGLU_ERRORS: dict[tuple[str, torch.dtype], str | None] = {}


def fused_swiglu_error(device_type: str, dtype: torch.dtype) -> str | None:
    """None when Megatron's fused weighted SwiGLU runs forward and backward on this device type
    in ``dtype``, else the error in one line (model/probe.py)."""
    def run(device):
        from megatron.core.fusions.fused_bias_swiglu import weighted_bias_swiglu_impl

        z = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
        p = torch.rand(8, 1, device=device, requires_grad=True)
        weighted_bias_swiglu_impl(z, None, p).float().sum().backward()

    return probe.error(_FUSED_SWIGLU_ERRORS, (device_type, dtype), device_type, run)


def resolve_fused_kernels(config: Config) -> tuple[str, bool, str]:
    """(model.fused_kernels, model.loss_fusion) as this process runs them, and why, for a
    ``config`` whose model.swiglu_fusion is resolved (or explicit).  What the config says
    (config.fused_kernels and config.loss_fusion: explicit, or auto: the Triton kernels and the
    fused loss on CUDA with the triton package); auto's Triton is then kept only if the kernels
    run a forward and backward on the device in the run's dtype and block sizes, tried once per
    process, so a GPU Triton cannot compile for runs Megatron's loss and the compiled SwiGLU
    instead of failing in the first step."""
    m = config.model
    kernels, fused_loss = fused_kernels(config), loss_fusion(config)
    if m.fused_kernels != "auto":
        return kernels, fused_loss, f"model.fused_kernels={kernels}"
    if kernels == "compile":
        return kernels, fused_loss, ("auto: compile on CPU" if config.device != "cuda" else
                                     "auto: compile (no triton package, or no fusion on)")
    width = m.moe.expert_hidden_size if m.moe is not None else m.ffn_hidden_size
    experts, topk = (m.moe.num_experts, m.moe.topk) if m.moe is not None else (4, 2)
    error = triton_kernels_error(_DTYPES[config.precision], m.vocab_size, width, experts, topk)
    if error is None:
        return kernels, fused_loss, "auto: device=cuda and the Triton kernels run here"
    return (*_compile_fallback(m),
            f"auto: the Triton kernels failed on this GPU ({error}); compile")


def _compile_fallback(m) -> tuple[str, bool]:
    """(model.fused_kernels, model.loss_fusion) where auto's Triton kernels do not run, here or
    on another rank: the compiled kernels, and the fused loss only where it was asked for."""
    return "compile", bool(m.loss_fusion)


_TRITON_ERRORS: dict[tuple[torch.dtype, int, int, int, int], str | None] = {}


def triton_kernels_error(dtype: torch.dtype, vocab: int = 40, width: int = 8,
                         experts: int = 4, topk: int = 2) -> str | None:
    """None when this package's Triton kernels run forward and backward on the current GPU in
    ``dtype``, with the block sizes the run's widths choose, on two rows, else the error in one
    line (model/probe.py): the SwiGLU (``width`` columns), the loss (``vocab`` logits per
    token), the rows' sums (``width`` columns, with addends and without a gather), and the
    router (top-``topk`` of ``experts`` logits per token, where it takes them) with the row
    index from its map."""
    def run(device):
        from megatron_coe.model import triton_gather_sum, triton_router, triton_row_index
        from megatron_coe.model.loss import fused_cross_entropy
        from megatron_coe.model.triton_swiglu import weighted_swiglu

        z = torch.randn(2, 2 * width, device=device, dtype=dtype, requires_grad=True)
        p = torch.rand(2, device=device, requires_grad=True)
        logits = torch.randn(1, 2, vocab, device=device, dtype=dtype, requires_grad=True)
        target = torch.randint(0, vocab, (1, 2), device=device)
        (weighted_swiglu(z, p).float().sum()
         + fused_cross_entropy(logits, target, "triton").float().sum()).backward()
        routing = torch.randn(2, experts, device=device, requires_grad=True)
        if triton_router.runs(routing, topk):  # else Megatron's ops route
            probs, routing_map, scores = triton_router.topk_softmax(routing, topk)
            (probs.sum() + scores[:, 0].sum()).backward()
            triton_row_index.rows_of(routing_map, 2 * topk)
        if dtype in triton_gather_sum.DTYPES:  # others are summed by torch
            rows = z.detach()
            order = torch.tensor([1, 0], device=device)
            triton_gather_sum.gather_sum(rows, order, 2)
            triton_gather_sum.gather_sum(rows, order, 2, (rows[:1], rows[1:]))
            triton_gather_sum.sum_in_order(rows, rows, rows, rows)

    return probe.error(_TRITON_ERRORS, (dtype, vocab, width, experts, topk), "cuda", run)


def _on_every_rank(config: Config, ok: bool) -> bool:
    """``ok`` and-ed over the ranks (one all-reduce), so that every rank runs the same kernels.
    Callers ask under conditions that depend on the config and the installed packages alone
    (the same on every rank of a job), so every rank makes the same collectives."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return ok
    on = torch.tensor([int(ok)], device="cuda" if config.device == "cuda" else "cpu")
    dist.all_reduce(on, op=dist.ReduceOp.MIN)
    return bool(on.item())


def resolved_kernels(config: Config, announce: bool = False) -> Config:
    """``config`` with model.swiglu_fusion, model.fused_kernels, model.loss_fusion and
    model.mla.rope_fusion resolved (see :func:`resolve_swiglu_fusion`,
    :func:`resolve_fused_kernels`; rope_fusion's auto follows the resolved kernels), the same on
    every rank; with ``announce`` prints each choice and the reason once, on rank 0."""
    import torch.distributed as dist

    m = config.model
    fusion, fusion_why = resolve_swiglu_fusion(config)
    # auto: every rank runs the same kernels, fused only where all of them can
    if m.swiglu_fusion is None and not _on_every_rank(config, fusion) and fusion:
        fusion, fusion_why = False, "auto: torch.compile failed on another rank"
    config = dataclasses.replace(config, model=dataclasses.replace(m, swiglu_fusion=fusion))
    kernels, fused_loss, kernels_why = resolve_fused_kernels(config)
    if (m.fused_kernels == "auto" and fused_kernels(config) == "triton"
            and not _on_every_rank(config, kernels == "triton") and kernels == "triton"):
        kernels, fused_loss = _compile_fallback(m)
        kernels_why = "auto: the Triton kernels failed on another rank; compile"
    config = dataclasses.replace(config, model=dataclasses.replace(
        config.model, fused_kernels=kernels, loss_fusion=fused_loss))
    rope, rope_why = resolve_rope_fusion(config)  # auto follows the resolved kernels
    if (config.model.mla.rope_fusion is None and mla_rope_fusion(config)
            and not _on_every_rank(config, rope) and rope):
        rope, rope_why = False, "auto: the fused kernels failed on another rank"
    if announce and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"model.swiglu_fusion: {str(fusion).lower()} ({fusion_why})", flush=True)
        print(f"model.fused_kernels: {kernels}, model.loss_fusion: {str(fused_loss).lower()} "
              f"({kernels_why})", flush=True)
        if config.model.attention == "mla":
            print(f"model.mla.rope_fusion: {str(rope).lower()} ({rope_why})", flush=True)
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, mla=dataclasses.replace(config.model.mla, rope_fusion=rope)))


def resolve_rope_fusion(config: Config) -> tuple[bool, str]:
    """(model.mla.rope_fusion as this process runs it, and why), for a ``config`` whose
    model.fused_kernels is resolved: what the config says (:func:`mla_rope_fusion`); auto's on
    is kept only if Megatron's fused kernels run forward and backward on this GPU at the
    model's head dims (tried once per process)."""
    m = config.model
    on = mla_rope_fusion(config)
    if m.mla.rope_fusion is not None:
        return on, "model.mla.rope_fusion is set"
    if not on:
        blocker = mla_rope_fusion_blocker(config)
        return False, ("auto: on CUDA with model.fused_kernels=triton" if blocker is None
                       else f"auto: not with {blocker}")
    error = mla_rope.kernels_error(_DTYPES[config.precision], m.num_attention_heads,
                                   m.mla.qk_head_dim, m.mla.qk_pos_emb_head_dim,
                                   m.mla.v_head_dim)
    if error is not None:
        return False, f"auto: the fused kernels failed on this GPU ({error})"
    return True, "auto: device=cuda, model.fused_kernels=triton and the kernels run here"


def with_resolved_impl(config: Config) -> Config:
    """``config`` with model.impl (:func:`resolve_impl`) and its kernels
    (:func:`resolved_kernels`) resolved; prints each choice and the reason once, on rank 0."""
    import torch.distributed as dist

    impl, why = resolve_impl(config)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"model.impl: {impl} ({why})", flush=True)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, impl=impl))
    return resolved_kernels(config, announce=True)


def use_transformer_engine(config: Config) -> bool:
    """Whether this run builds the Transformer Engine spec (model.impl, resolved if ``auto``).
    Fails early, by name, for an FP8 recipe that the installed TE or the GPU cannot run."""
    impl, _ = resolve_impl(config)
    if impl == "local":
        if (expert_fp8_recipe(config) and config.device == "cuda"
                and torch.cuda.get_device_capability() < (9, 0)):
            raise ValueError("fp8.backend=torch runs torch's grouped FP8 GEMM "
                             "(torch._scaled_grouped_mm), which needs a Hopper GPU (compute "
                             f"capability 9.0+; this one has "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability()))}): "
                             "use fp8.enabled=false")
        return False
    if config.fp8.enabled:
        import transformer_engine
        from megatron.core.utils import is_te_min_version

        recipe = config.fp8.recipe
        if recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
            raise ValueError("fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability 10+); "
                               "use fp8.recipe=delayed or tensorwise on Hopper")
        need = {"tensorwise": "2.2.0", "mxfp8": "2.1.0", "blockwise": "2.3.0"}.get(recipe)
        if need and not is_te_min_version(need):
            raise ValueError(f"fp8.recipe={recipe} needs Transformer Engine >= {need}; "
                               f"installed: {transformer_engine.__version__}")
    return True


def build_model(config: Config) -> GPTModel:
    """Initialise process groups if needed and return this rank's GPTModel (fp32 params unless
    the config's precision says otherwise).  Every CoE layer in it is a :class:`CoELayer`."""
    device = parallel.initialize(config)
    config = resolved_kernels(config)  # as coe-train resolved them, or here for other callers
    te = use_transformer_engine(config)
    tf_config = transformer_config(config)
    _install_router_functions(config)
    if tf_config.apply_rope_fusion:
        mla_rope.pin_head_block()  # the same sums in every process (model/mla_rope.py)
    model = CoEGPTModel(
        loss_fusion=config.model.loss_fusion,
        fused_kernels=config.model.fused_kernels,
        config=tf_config,
        transformer_layer_spec=coe_block_spec(tf_config, _coe(config, te), te,
                                              config.parallel.overlap_expert_comm,
                                              config.train.recompute == "experts",
                                              expert_fp8_recipe=expert_fp8_recipe(config),
                                              fused_kernels=config.model.fused_kernels),
        vocab_size=config.model.vocab_size,
        max_sequence_length=config.model.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    return model.to(device)


def build_moe_layer(config: Config, layer_number: int = 1, stock_megatron: bool = False):
    """Initialise process groups if needed and return one MoE/CoE layer (the MLP sub-layer of
    the model's first MoE layer), for tests and layer benchmarks.  ``stock_megatron=True``
    returns Megatron-Core's own MoELayer from the unmodified spec instead."""
    if config.model.moe is None:
        raise ValueError("build_moe_layer needs a config with a model.moe section")
    device = parallel.initialize(config)
    config = resolved_kernels(config)
    te = use_transformer_engine(config)
    tf_config = transformer_config(config)
    _install_router_functions(config)
    coe = None if stock_megatron else (config.model.coe or CoEConfig(iterations=1))
    block = coe_block_spec(tf_config, coe, te, config.parallel.overlap_expert_comm,
                           config.train.recompute == "experts" and not stock_megatron,
                           expert_fp8_recipe=None if stock_megatron else expert_fp8_recipe(config),
                           fused_kernels=config.model.fused_kernels)
    moe_index = next(i for i in range(config.model.num_layers) if i not in config.model.dense_layers)
    layer = block.layer_specs[moe_index].submodules.mlp(
        config=tf_config, pg_collection=None, is_mtp_layer=False
    )
    layer.set_layer_number(layer_number)
    return layer.to(device)


def _install_router_functions(config: Config) -> None:
    """Megatron's global MoE metrics tracker made CoE's, and its routers' aux-loss top-k and
    gating GEMM made this package's (process-wide, idempotent: aux_topk.py, router_gemm.py;
    the gating GEMM Megatron's again with model.moe.router_gemm: fp32)."""
    install_tracker()
    aux_topk.install()
    moe = config.model.moe
    router_gemm.install(moe is None or moe.router_gemm == "bf16")


def expert_fp8_recipe(config: Config) -> str | None:
    """fp8.recipe for the grouped experts' torch FP8 GEMMs (fp8.backend: torch), else None.
    Megatron's own fp8 settings stay off then: they mean Transformer Engine layers."""
    f8 = config.fp8
    return f8.recipe if f8.enabled and f8.backend == "torch" else None


def _coe(config: Config, te: bool) -> CoEConfig | None:
    """The CoE section; an MoE model asking for the overlapped schedule, for expert recompute
    or (on the local spec, ``te`` False) for grouped experts gets CoE layers with C = 1 (the
    same layer as Megatron's MoELayer, with this package's dispatcher and experts)."""
    if config.model.coe is None and (config.parallel.overlap_expert_comm
                                     or config.train.recompute == "experts"
                                     or not te and grouped_experts(config)):
        return CoEConfig(iterations=1)
    return config.model.coe


def coe_layers(model: torch.nn.Module) -> list[CoELayer]:
    return [m for m in model.modules() if isinstance(m, CoELayer)]
