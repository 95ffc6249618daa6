"""The documented benchmark commands run from a checkout, at toy sizes, and what they count is
right: all-to-all calls and bytes equal their closed form (and CoE's bytes equal MoE's), the
layer recompute and the fused SwiGLU keep less for backward, and in whole training steps the overlapped schedule
reproduces the plain schedule's losses exactly.  No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, f"benchmarks/{script}", "--ep", "2", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_layer_benchmark_counts_the_closed_form_all_to_all(tmp_path):
    res = run_benchmark("coe_layer.py", tmp_path / "layer.json", "--hidden", "32",
                        "--expert-hidden", "16", "--tokens", "64", "--repeat", "1",
                        "--warmup", "0", "--overlap-repeat", "1", "--tokens-sweep")
    (ep2,) = res["results"]
    assert len(ep2["pairs"]) == 3
    for pair in ep2["pairs"]:
        coe, moe = pair["a2a"]
        assert pair["a2a"] == pair["a2a_expected"], pair["pair"]
        assert coe["sent_bytes"] == moe["sent_bytes"] > 0, pair["pair"]
    (overlap,) = ep2["overlap"]
    assert overlap["a2a"] == overlap["a2a_expected"]
    assert [a["calls"] for a in overlap["a2a"]] == [8, 16, 4, 8]  # two halves per exchange
    (experts,) = ep2["experts"]  # LocalExperts and SequentialMLP both timed
    assert set(experts["median_s"]) == {"coe_local", "coe_megatron", "moe_local", "moe_megatron"}
    (grouped,) = ep2["grouped"]  # per-expert GEMMs and grouped GEMMs both timed
    assert set(grouped["median_s"]) == {"coe_loop", "coe_grouped", "moe_loop", "moe_grouped"}
    kept = {r["layer"]: r["kept"] for r in ep2["recompute"]}
    assert kept["CoE-2(4/64) + recompute"] < kept["CoE-2(4/64)"] / 4
    assert kept["CoE-2(4/64) + recompute"] < kept["CoE-2(4/64) + expert recompute"]
    assert kept["CoE-2(4/64) + expert recompute"] < kept["CoE-2(4/64)"] * 0.75
    assert kept["CoE-2(4/64)"] > kept["MoE(8/64)"]
    for layer in ("CoE-2(4/64)", "MoE(8/64)"):  # moe_act and the fused SwiGLU keep less
        assert kept[f"{layer}, grouped + activation recompute"] < kept[f"{layer}, grouped"]
        assert kept[f"{layer}, grouped + fused SwiGLU"] < kept[f"{layer}, grouped"]


def test_train_step_benchmark_overlapped_trains_like_plain(tmp_path):
    res = run_benchmark("train_step.py", tmp_path / "step.json", "--rounds", "2",
                        "--warmup", "0", "--set", "model.seq_length=64", "model.num_layers=2",
                        "train.steps=10", "schedule.warmup_steps=1", "--phases", "--comm")
    (ep2,) = res["results"]
    assert ep2["overlapped_losses_equal_plain"] == {"CoE-2(4/64)": True, "MoE(8/64)": True}
    assert len(ep2["losses"]["CoE-2(4/64) plain"]) == 2
    assert ep2["losses"]["CoE-2(4/64) plain"] != ep2["losses"]["MoE(8/64) plain"]
    # 2 x (4 + 1) expert passes against 9: the FLOP ratio is above 1 but below 10/9
    assert 1.0 < ep2["flops_coe_over_moe"] < 10 / 9
    assert set(ep2["median_step_s"]) == {"CoE-2(4/64) plain", "CoE-2(4/64) overlapped",
                                         "MoE(8/64) plain", "MoE(8/64) overlapped"}
    # the phase timers see the layer's structure: per step, 2 layers x C iterations of routing,
    # permutation and un-permutation; the plain schedule's two all-to-alls and experts call, or
    # the overlapped schedule's one call that holds them
    calls = ep2["phase_calls"]
    for name, c in (("CoE-2(4/64)", 2), ("MoE(8/64)", 1)):
        per_layer = {"router": 2 * c, "preprocess": 2 * c, "postprocess": 2 * c, "shared": 2 * c,
                     "layer": 2}
        assert calls[f"{name} plain"] == {**per_layer, "dispatch": 2 * c, "experts": 2 * c,
                                          "combine": 2 * c}, name
        assert calls[f"{name} overlapped"] == {**per_layer, "overlapped": 2 * c}, name
    for label, ms in ep2["phase_ms"].items():
        assert 0 < ms["router"] < ms["layer"] < ep2["median_step_s"][label] * 1e3 * 1.5, label
    # every rank's collectives: per step, 2 layers x C x (dispatch, combine) x (forward,
    # backward) all-to-alls (twice that in halves when overlapped), one token-count all-gather
    # per layer and iteration, and DDP's coalesced gradient reductions; the overlapped schedule
    # moves the same bytes
    comm = ep2["comm"]
    assert len(comm["probe"]) == 2 and all(p["latency_ms"] > 0 < p["gb_per_s"]
                                           for p in comm["probe"])
    for name, c in (("CoE-2(4/64)", 2), ("MoE(8/64)", 1)):
        for mode, halves in (("plain", 1), ("overlapped", 2)):
            for rank in comm["variants"][f"{name} {mode}"]:
                assert rank["calls"]["all_to_all_single"] == 2 * c * 2 * 2 * halves, (name, mode)
                assert rank["calls"]["all_gather_into_tensor"] == 2 * c, (name, mode)
                assert rank["calls"]["coalesced buffer reductions"] >= 1  # DDP's gradients
                assert rank["ms"]["all_to_all_single"] > 0 < rank["a2a_bytes_to_peers"]
        assert ([r["a2a_bytes_to_peers"] for r in comm["variants"][f"{name} plain"]]
                == [r["a2a_bytes_to_peers"] for r in comm["variants"][f"{name} overlapped"]])
