"""benchmarks/kept_memory.py runs from a checkout at toy size, and what it counts holds together:
every token has k rows per iteration, so CoE-2(4/N)'s two iterations keep what MoE(8/N)'s one
keeps in routed experts, half each; the expert recompute keeps less of the MoE/CoE layer and
nothing else changes; the implied GPU peaks are the measured ones less exactly what a mode
takes away, and a ratio of them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    from megatron_coe.gpu_check import toy_overrides

    tmp = tmp_path_factory.mktemp("kept")
    measured = {"date": "2026-11-28", "paper": {"by_micro_batch": {"4": {"variants": {
        "MoE(8/64)": {"peak_mem_gib": 3.0}, "CoE-2(4/48)": {"peak_mem_gib": 2.5}}}}}}
    (tmp / "measured.json").write_text(json.dumps(measured))
    cmd = [sys.executable, "benchmarks/kept_memory.py", "--configs", "MoE(8/64)",
           "CoE-2(4/48)", "--recompute", "none", "experts", "--out", str(tmp / "kept.json"),
           "--measured", str(tmp / "measured.json"), "--set", *toy_overrides(63)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp / "kept.json").read_text())


def test_coe_iterations_keep_moes_routed_rows_between_them(counted):
    moe, coe = (counted["results"][n]["none"]["kib_per_token"] for n in ("MoE(8/64)",
                                                                         "CoE-2(4/48)"))
    assert "routed experts 2" not in moe and moe["routed experts 1"] > 0
    assert coe["routed experts 1"] == coe["routed experts 2"]
    assert coe["routed experts 1"] + coe["routed experts 2"] == moe["routed experts 1"]
    assert coe["shared expert 1"] == coe["shared expert 2"] == moe["shared expert 1"] > 0
    for part in ("attention", "norms", "output layer and loss"):  # the same model around them
        assert coe[part] == moe[part] > 0, part


def test_the_expert_recompute_keeps_less_of_the_layer_only(counted):
    for name, modes in counted["results"].items():
        none, experts = modes["none"], modes["experts"]
        assert experts["layer"] < 0.75 * none["layer"], name
        assert none["total"] - experts["total"] == pytest.approx(
            none["layer"] - experts["layer"]), name


def test_implied_peaks_are_the_measured_less_what_a_mode_takes(counted):
    peaks = counted["implied_peaks"]["4"]
    assert peaks["none"] == {"MoE(8/64)": 3.0, "CoE-2(4/48)": 2.5, "ratio": 2.5 / 3.0}
    for name, measured in (("MoE(8/64)", 3.0), ("CoE-2(4/48)", 2.5)):
        r = counted["results"][name]
        less = 4 * r["none"]["seq_length"] * (r["none"]["layer"] - r["experts"]["layer"])
        assert peaks["experts"][name] == pytest.approx(measured - less / 2**20)
    assert peaks["experts"]["ratio"] == pytest.approx(
        peaks["experts"]["CoE-2(4/48)"] / peaks["experts"]["MoE(8/64)"])


def test_the_freed_logits_gradient_is_what_the_output_layers_backward_does_not_hold():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from kept_memory import implied_peaks, logits_gradient_bytes

    # the paper's micro-batch of 32: 16,384 tokens, vocabulary 32,768, hidden 1024
    assert logits_gradient_bytes(16384, 32768, 1024) == 2 * (16384 * 32768 - 16384 * 1024
                                                             - 32768 * 1024)
    assert logits_gradient_bytes(4, 8, 16) == 0  # a vocabulary narrower than the hidden size
    counts = {"seq_length": 512, "vocab_size": 32768, "hidden_size": 1024, "layer": 10.0}
    results = {"MoE(8/64)": {"none": counts}, "CoE-2(4/48)": {"none": counts}}
    measured = {"paper": {"by_micro_batch": {"32": {"variants": {
        "MoE(8/64)": {"peak_mem_gib": 17.0}, "CoE-2(4/48)": {"peak_mem_gib": 15.0}}}}}}
    freed = logits_gradient_bytes(16384, 32768, 1024) / 2**30
    peaks = implied_peaks(results, measured, logits_freed=True)["32"]["none"]
    assert peaks["MoE(8/64)"] == pytest.approx(17.0 - freed)
    assert peaks["ratio"] == pytest.approx((15.0 - freed) / (17.0 - freed))
    assert implied_peaks(results, measured, logits_freed=False)["32"]["none"]["ratio"] == 15 / 17
