"""The model: Megatron-Core's GPTModel with Chain-of-Experts layers.

    build.py              Config -> TransformerConfig, model.impl (TE or local), build_model
    spec.py               decoder block spec: every MoE layer made a CoE layer
    transformer_layer.py  CoETransformerLayer (the reference residual mode)
    layer.py              CoELayer: C iterations of route -> dispatch -> experts -> combine
    dispatch.py           the CoE token dispatcher (expert-parallel all-to-alls per iteration)
    experts.py            LocalExperts: SequentialMLP with a lean forward (local spec)
    router_gemm.py        the routers' gating GEMM on bf16 hidden states (CUDA)
    attention.py          MLA core attention for the local spec
    cp_attention.py       context-parallel core attention for the local spec
"""

from megatron_coe.model.build import (build_model, build_moe_layer, coe_layers, resolve_impl,
                                      transformer_config, use_transformer_engine,
                                      with_resolved_impl)

__all__ = ["build_model", "build_moe_layer", "coe_layers", "resolve_impl", "transformer_config",
           "use_transformer_engine", "with_resolved_impl"]
