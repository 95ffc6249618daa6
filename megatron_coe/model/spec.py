"""Module specs: Megatron-Core's GPT decoder block spec with every MoE layer made a CoE layer.

Megatron's local spec (CPU) and Transformer Engine spec (GPU) both put
``partial(MoELayer, submodules=MoESubmodules(...))`` in each MoE layer's ``submodules.mlp``.
We swap in ``partial(CoELayer, <same submodules>, iterations=C, residual=..., router_mode=...)``
and make the layer a :class:`CoETransformerLayer` (which only differs in "reference" residual
mode).  Attention (standard or MLA), norms and experts are Megatron's own, whichever backend, except
in the local spec: core attentions it lacks (MLA's head dims, context parallelism), the fused
core attention (:class:`~megatron_coe.model.fused_attention.FusedDotProductAttention`, torch's
scaled_dot_product_attention) where it applies, and the experts: with ``moe_grouped_gemm``
(model.moe.grouped_gemm, resolved by ``config.grouped_experts``)
:class:`~megatron_coe.model.grouped_experts.GroupedExperts` (stacked weights, grouped GEMMs; the
Transformer Engine spec picks Megatron's TEGroupedMLP for the same flag), otherwise
SequentialMLP's lean subclass :class:`~megatron_coe.model.experts.LocalExperts` (same parameters
and results, less per-expert framework overhead).  Both give SequentialMLP's results and read and
write its checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_coe.model.attention import MLADotProductAttention
from megatron_coe.config import CoEConfig
from megatron_coe.model.cp_attention import ContextParallelAttention
from megatron_coe.model.experts import LocalExperts
from megatron_coe.model.fused_attention import FusedDotProductAttention, fused_attention_applies
from megatron_coe.model.grouped_experts import GroupedExperts
from megatron_coe.model.layer import CoELayer
from megatron_coe.model.shared_expert import SharedExpert
from megatron_coe.model.transformer_layer import CoETransformerLayer


def coe_block_spec(transformer_config, coe: CoEConfig | None, use_transformer_engine: bool,
                   overlap: bool = False, recompute_experts: bool = False,
                   fused_attention: bool = True, expert_fp8_recipe: str | None = None,
                   fused_kernels: str = "compile"):
    """Decoder block spec for ``transformer_config``; MoE layers become CoE layers when
    ``coe`` is given (C = 1 included: then it equals Megatron's MoE layer).  ``overlap``
    selects the overlapped expert-parallel schedule (``parallel.overlap_expert_comm``);
    ``recompute_experts`` recomputes each iteration's expert MLPs in backward
    (``train.recompute: experts``); the local spec's core attention is the fused one where
    it applies (not with context parallelism, which keeps its own) unless ``fused_attention``
    is False: on CPU too, where torch's kernels measured faster than the unfused attention
    and a run's losses equal the unfused ones within float rounding (docs/performance.md).
    ``expert_fp8_recipe`` (fp8.backend: torch) runs the grouped experts' GEMMs in FP8;
    ``fused_kernels`` (model.fused_kernels) picks the fused SwiGLU's kernel of the grouped
    experts and of the shared expert (:class:`~megatron_coe.model.shared_expert.SharedExpert`,
    Megatron's SharedExpertMLP otherwise) and, with "triton", the Triton kernel of the
    dispatcher's sums over each token's rows (model/permutation.py)."""
    block = get_gpt_decoder_block_spec(
        transformer_config,
        use_transformer_engine=use_transformer_engine,
        normalization=transformer_config.normalization,
    )
    if not use_transformer_engine and transformer_config.context_parallel_size > 1:
        block.layer_specs = [_with_core_attention(s, ContextParallelAttention)
                             for s in block.layer_specs]
    elif (fused_attention and not use_transformer_engine
          and fused_attention_applies(transformer_config)):
        block.layer_specs = [_with_core_attention(s, FusedDotProductAttention)
                             for s in block.layer_specs]
    elif transformer_config.multi_latent_attention and not use_transformer_engine:
        block.layer_specs = [_with_core_attention(s, MLADotProductAttention)
                             for s in block.layer_specs]
    if coe is None:
        return block
    layer_specs = []
    for spec in block.layer_specs:  # one spec object is shared by all MoE layers: copy it
        mlp = spec.submodules.mlp
        if isinstance(mlp, functools.partial) and mlp.func is MoELayer:
            keywords = dict(mlp.keywords)
            experts = keywords["submodules"].experts
            if (not use_transformer_engine and isinstance(experts, functools.partial)
                    and experts.func is SequentialMLP):
                # Megatron's local spec ignores moe_grouped_gemm (SequentialMLP either way)
                local = GroupedExperts if transformer_config.moe_grouped_gemm else LocalExperts
                extra = {"fp8_recipe": expert_fp8_recipe} if expert_fp8_recipe else {}
                if extra and local is not GroupedExperts:
                    raise ValueError("fp8.backend=torch runs the grouped experts' GEMMs in FP8: "
                                     "set model.moe.grouped_gemm=true (or leave it null)")
                if local is GroupedExperts and fused_kernels != "compile":
                    extra["fused_kernels"] = fused_kernels
                keywords["submodules"] = dataclasses.replace(
                    keywords["submodules"],
                    experts=functools.partial(local, *experts.args, **experts.keywords, **extra))
                shared = keywords["submodules"].shared_experts
                if fused_kernels != "compile" and isinstance(shared, functools.partial) and not (
                        getattr(transformer_config, "use_grouped_gemm_for_shared_expert", False)):
                    keywords["submodules"] = dataclasses.replace(
                        keywords["submodules"], shared_experts=functools.partial(
                            SharedExpert, *shared.args, **shared.keywords,
                            fused_kernels=fused_kernels))
            coe_mlp = functools.partial(
                CoELayer,
                *mlp.args,
                **keywords,
                iterations=coe.iterations,
                residual=coe.residual,
                router_mode=coe.router,
                overlap=overlap,
                recompute_experts=recompute_experts,
                iteration_norm=spec.submodules.pre_mlp_layernorm if coe.iteration_norm else None,
                fused_kernels=fused_kernels,
            )
            spec = dataclasses.replace(
                spec,
                module=CoETransformerLayer,
                submodules=dataclasses.replace(spec.submodules, mlp=coe_mlp),
            )
        layer_specs.append(spec)
    block.layer_specs = layer_specs
    return block


def _with_core_attention(spec, core_attention):
    """The local spec's core attention takes neither MLA's head dims nor context parallelism,
    and is unfused: use ours (attention.py, cp_attention.py, fused_attention.py)."""
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(
        attn, submodules=dataclasses.replace(attn.submodules, core_attention=core_attention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    self_attention=attn))
