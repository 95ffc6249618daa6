"""coe-routing: the statistics against hand-counted routing maps, and end to end on a checkpoint
trained at EP = 2 on 2 ranks, analysed in one process (the weights must be resharded right for
the run's own validation loss to come back)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from runner import ROOT, check, metrics, torchrun


def _maps(rows, n):
    m = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, experts in enumerate(rows):
        m[i, list(experts)] = True
    return m


def test_statistics_match_hand_counts():
    from megatron_coe.tools.routing import layer_statistics

    # 4 tokens, N = 4 experts, k = 2, C = 2
    it1 = _maps([{0, 1}, {0, 1}, {0, 2}, {0, 1}], 4)
    it2 = _maps([{0, 1}, {2, 3}, {0, 2}, {1, 3}], 4)
    s = layer_statistics([it1, it2], topk=2)
    assert s["tokens"] == 4
    first, second = s["iterations"]
    assert first["tokens_per_expert"] == [4, 3, 1, 0]
    assert first["unused_experts"] == 1
    assert first["max_over_uniform"] == pytest.approx(4 / 8 * 4)
    assert second["tokens_per_expert"] == [2, 2, 2, 2]
    assert second["entropy_ratio"] == pytest.approx(1.0)
    # overlaps with the previous iteration: 2, 0, 2, 1 of k = 2
    assert second["repeat_rate"] == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    assert second["repeat_rate_if_independent"] == pytest.approx(0.5)
    # combinations: tokens 0..3 all differ; unions {0,1}, {0,1,2,3}, {0,2}, {0,1,3}
    assert s["distinct_combinations"] == 4 and s["distinct_unions"] == 4
    # the same union reached by different per-iteration choices is one union, two combinations
    s = layer_statistics([_maps([{0, 1}, {2, 3}], 4), _maps([{2, 3}, {0, 1}], 4)], topk=2)
    assert s["distinct_combinations"] == 2 and s["distinct_unions"] == 1
    assert s["possible_combinations"] == {"coe": 36, "moe_same_work": 1}


def test_routing_of_an_ep2_checkpoint(tmp_path):
    run = tmp_path / "run"
    check(torchrun([f"run_dir={run}", "train.steps=8", "train.eval_interval=0",
                    "train.eval_iters=2", "checkpoint.save_interval=0",
                    "schedule.warmup_steps=2"]))
    out = tmp_path / "analysis"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "megatron_coe.tools.routing", str(run),
                             "--batches", "2", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    check(result)
    r = json.loads((out / "routing.json").read_text())
    # the model restored in one process (EP = 1) reproduces the 2-rank run's validation loss
    assert r["valid_loss"] == pytest.approx(metrics(run, "valid")[8]["loss"], abs=1e-4)
    config = r["routed_experts"], r["topk"], r["iterations"]
    assert config == (8, 2, 2)
    tokens = 2 * 8 * 64  # batches x global batch x sequence length of configs/tiny/coe.yaml
    assert set(r["layers"]) == {"1", "2"}
    for layer in r["layers"].values():
        assert layer["tokens"] == tokens
        for it in layer["iterations"]:
            # every token sent to exactly k experts in every iteration
            assert sum(it["tokens_per_expert"]) == tokens * 2
        assert 1 <= layer["distinct_combinations"] <= min(tokens, 28 ** 2)
    assert "| 1 | 2 |" in (out / "routing.md").read_text()
    assert (out / "routing.png").stat().st_size > 5_000
    # a run directory without checkpoints is refused, naming it; its config.yaml as a GPU run
    # writes it (the Triton kernels, the fused loss) is read for one CPU process all the same
    bare = tmp_path / "bare"
    bare.mkdir()
    written = (run / "config.yaml").read_text()
    assert "  loss_fusion: false\n  fused_kernels: compile\n" in written
    (bare / "config.yaml").write_text(written.replace(
        "  loss_fusion: false\n  fused_kernels: compile\n",
        "  loss_fusion: true\n  fused_kernels: triton\n"))
    cpu_only = {k: v for k, v in env.items() if k != "TRITON_INTERPRET"}  # as outside pytest
    refused = subprocess.run([sys.executable, "-m", "megatron_coe.tools.routing", str(bare)],
                             cwd=ROOT, env=cpu_only, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "holds no checkpoint" in refused.stderr
