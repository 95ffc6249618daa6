"""Every shipped config loads and validates; the numbers in its header (expert passes, FLOPs
and parameters) are right.  CPU-scale configs are built: their parameter count is the built
model's, and their FLOP formula equals the matmul FLOPs torch counts in a real forward pass."""

import re
from pathlib import Path

import pytest
import torch

from megatron_coe.config import load_config
from megatron_coe.metrics import (active_expert_passes, forward_flops_per_token, parameter_count,
                                  train_flops_per_token)

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


def header(path):
    text = path.read_text()
    found = {}
    for key, pattern in [("passes", r"active expert passes per token per layer: ([\d.]+)"),
                         ("gflops", r"training FLOPs per token: ([\d.]+) GFLOP"),
                         ("params", r"parameters: (\d+)")]:
        m = re.search(pattern, text)
        if m:
            found[key] = float(m.group(1))
    return found


def test_the_paper_experiments_are_all_shipped():
    names = {p.stem for p in CONFIGS if p.parent.name == "paper"}
    assert {"moe-8of64", "coe-2-4of64", "coe-2-3of64", "moe-7of64", "coe-2-4of48", "coe-2-8of64",
            "moe-8of64-8layers", "moe-8of64-12layers", "moe-16of64", "moe-24of64",
            "ablation-shared-router", "ablation-outer-residual"} <= names
    tiny = {p.stem for p in CONFIGS if p.parent.name == "tiny"}
    assert names <= tiny  # a CPU version of each


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_config_validates_and_header_is_right(path):
    config = load_config(path)
    h = header(path)
    if path.parent.name == "paper" or path.stem != "coe":
        assert h.keys() == {"passes", "gflops", "params"}, path
    if h:
        assert h["passes"] == active_expert_passes(config)
        assert h["gflops"] == round(train_flops_per_token(config) / 1e9, 4)
        assert h["params"] == parameter_count(config)


TINY = [p for p in CONFIGS if p.parent.name == "tiny"]


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_cpu_config_params_and_flops_match_the_built_model(path):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_coe.model import build_model

    # per-expert GEMMs: torch's flop counter does not count its CPU grouped_mm (the grouped
    # experts' math and parameters are the same: tests/layer/test_grouped_experts.py)
    config = load_config(path, ["parallel.expert=1", "model.seq_length=32"]
                         + (["model.moe.grouped_gemm=false"] if "moe:" in path.read_text() else []))
    model = build_model(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    tokens = torch.randint(0, 200, (1, 32))
    # The math backend: torch's flop counter does not count its CPU flash-attention kernel.
    with (FlopCounterMode(display=False) as counter, torch.no_grad(),
          sdpa_kernel(SDPBackend.MATH)):
        model(tokens, torch.arange(32)[None], None)
    assert counter.get_total_flops() / 32 == forward_flops_per_token(config, causal=False)
