"""The model: Megatron-Core's GPTModel with Chain-of-Experts layers.

    build.py                Config -> TransformerConfig, model.impl (TE or local), build_model
    probe.py                a kernel tried once per process on the device before auto keeps it
    spec.py                 decoder block spec: every MoE layer made a CoE layer
    transformer_layer.py    CoETransformerLayer (the reference residual mode)
    loss.py                 CoEGPTModel: the language-model loss as two fused kernels

  the CoE layer
    layer.py                CoELayer: C iterations of route -> dispatch -> experts -> combine
    router_gemm.py          the routers' gating GEMM on bf16 hidden states (CUDA)
    aux_topk.py             the routers' aux losses reuse the routing's top-k (and scores)
    dispatch.py             the CoE token dispatcher (expert-parallel all-to-alls per iteration)
    permutation.py          dropless permutation and its inverse as gathers
    experts.py              LocalExperts: SequentialMLP with a lean forward (local spec)
    grouped_experts.py      GroupedExperts: all experts as grouped GEMMs (local spec)
    fp8.py                  FP8 grouped GEMMs through torch's scaled matmuls (fp8.backend: torch)
    shared_expert.py        the shared expert with the Triton SwiGLU
    repeated_calls.py       TE modules called more than once per micro-batch
    tensor_memo.py          one value remembered for one tensor while it is unchanged

  attention (local spec)
    attention.py            MLA core attention
    mla_rope.py             MLA's RoPE as Megatron's fused kernels (model.mla.rope_fusion)
    fused_attention.py      torch's scaled_dot_product_attention as the core attention
    cp_attention.py         context-parallel core attention

  Triton kernels (model.fused_kernels: triton)
    triton_cross_entropy.py the language-model loss
    triton_swiglu.py        the experts' SwiGLU
    triton_gather_sum.py    each token's k expert rows gathered and summed (permutation.py)
    triton_router.py        a router's softmax, top-k and dense outputs (aux_topk.py)
    triton_row_index.py     the dispatcher's rows from the router kernel's map, without a sort
    triton_sum_into.py      two gradients summed into an fp32 buffer (wgrad_sum.py)
    triton_rounding.py      fp32 -> bf16 rounded as torch rounds, for the kernels above
"""

from megatron_coe.model.build import (build_model, build_moe_layer, coe_layers, resolve_impl,
                                      transformer_config, use_transformer_engine,
                                      with_resolved_impl)

__all__ = ["build_model", "build_moe_layer", "coe_layers", "resolve_impl", "transformer_config",
           "use_transformer_engine", "with_resolved_impl"]
