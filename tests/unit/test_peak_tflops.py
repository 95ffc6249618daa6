"""metrics.peak_tflops: MFU's denominator, from train.peak_tflops or the GPU's name."""

import pytest
import torch

from megatron_coe import metrics
from megatron_coe.config import config_from_dict


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),   # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA GB200", 2500.0),           # contains "B200": the longer name wins
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("Some Other GPU", None),
])
def test_peak_of_a_gpu_is_found_by_its_most_specific_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert metrics.peak_tflops(config_from_dict({"device": "cuda"})) == peak


def test_configured_peak_wins_and_a_cpu_has_none():
    assert metrics.peak_tflops(config_from_dict({"train": {"peak_tflops": 100.0}})) == 100.0
    assert metrics.peak_tflops(config_from_dict({})) is None
