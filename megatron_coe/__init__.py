"""megatron-coe: Chain-of-Experts language models on Megatron-Core.

Public API:
    load_config(path, overrides=[...]) -> Config
    build_model(config)                -> Megatron-Core GPTModel
    CoELayer                           -> the CoE layer class (routers, experts, iterations)
"""

from megatron_coe.config import Config, load_config

__all__ = ["Config", "CoELayer", "build_model", "load_config"]


def __getattr__(name):
    # Megatron-Core is imported on first use, so config validation stays cheap.
    if name == "build_model":
        from megatron_coe.model import build_model

        return build_model
    if name == "CoELayer":
        from megatron_coe.model.layer import CoELayer

        return CoELayer
    raise AttributeError(name)
