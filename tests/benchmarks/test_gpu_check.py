"""python -m megatron_coe.gpu_check, the one-GPU check, run end to end on CPU at toy sizes (the
same script a GPU runs): its JSON names the machine and versions, part (a) matches the
checked-in one-process reference and fails against a perturbed one, parts (b), (c) and (d)
report every paper config (at each micro-batch size), layer pair and host-work count; a config
out of memory is recorded and the check goes on; bad sizes are refused.  No timing is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"MoE(8/64)", "CoE-2(4/64)", "MoE(7/64)", "CoE-2(3/64)", "CoE-2(4/48)"}


def gpu_check(*args):
    cmd = [sys.executable, "-m", "megatron_coe.gpu_check", "--device", "cpu", "--toy", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": "1"})


def fake_training(monkeypatch, check, before=lambda config: None,
                  tokens_per_s=lambda config: 100.0, loss=lambda config: 1.0):
    """Part (b) without training: every run calls ``before(config)`` (which may record or
    raise) and reports two steps at ``tokens_per_s(config)`` with ``loss(config)``; the
    written choices are the CPU's defaults."""
    def train_run(config, log):
        before(config)
        step = {"kind": "train", "loss": loss(config), "tokens_per_s": tokens_per_s(config),
                "tflops_per_device": 1.0, "mfu": None, "mem_gib": 1.0}
        return [{**step, "step": 1}, {**step, "step": 2}]

    monkeypatch.setattr(check, "train_run", train_run)
    monkeypatch.setattr(check, "written_choices",
                        lambda run_dir: {"model_impl": "local", "swiglu_fusion": False,
                                         "loss_fusion": False, "fused_kernels": "compile",
                                         "rope_fusion": False, "cuda_graph": "none"})


def test_gpu_check_runs_on_cpu_and_reports_every_part(tmp_path):
    out = tmp_path / "check.json"
    done = gpu_check("--warmup", "0", "--steps", "1", "--reference-steps", "4", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"].startswith("python -m megatron_coe.gpu_check --device cpu --toy")
    assert res["device"] == "cpu" and res["gpu"] is None and res["toy"] is True
    assert res["torch"] and res["megatron_core"] == "0.19.2"
    assert "transformer_engine" in res and res["passed"] is True

    a = res["reference"]
    assert a["passed"] and a["model_impl"] == "local" and sorted(a["steps"]) == ["1", "2", "3", "4"]
    assert a["max_abs_diff"] <= 1e-3  # same machine kind as the reference: (near) exact
    assert "(a) tiny CoE, fp32, cpu, local" in done.stdout and ": PASS" in done.stdout

    # part b once per micro-batch size (toy default: 4 and 2 of a 4-sequence step)
    assert res["paper"]["global_batch"] == 4
    settings = res["paper"]["by_micro_batch"]
    assert list(settings) == ["4", "2"]
    for m, b in settings.items():
        assert b["micro_batch_size"] == int(m) and set(b["variants"]) == NAMES
        for name, v in b["variants"].items():
            assert v["model_impl"] == "local" and v["mfu"] is None  # no peak known for a CPU
            # swiglu auto: off on CPU; the loss fusion is off unless asked for
            assert v["swiglu_fusion"] is False and v["loss_fusion"] is False
            assert v["fused_kernels"] == "compile" and v["cuda_graph"] == "none"
            assert v["rope_fusion"] is False  # the paper configs are MLA: resolved on CPU
            assert v["tokens_per_s"] > 0 and v["tflops"] > 0 and v["peak_mem_gib"] > 0, name
            assert len(v["step_s"]) == 1 and len(v["losses"]) == 1
            assert v["tokens_per_step"] == 4 * 64
        assert set(b["ratios"]) == {"CoE-2(4/64) / MoE(8/64)", "CoE-2(3/64) / MoE(7/64)",
                                    "CoE-2(4/48) / MoE(8/64)"}
        # toy sizes keep the configs' structure: CoE-2(4/64) runs 10 expert passes to 9, the
        # 48-expert CoE has fewer parameters, CoE-2(3/64) and MoE(7/64) nearly equal FLOPs
        assert b["ratios"]["CoE-2(4/64) / MoE(8/64)"]["flops_per_token"] > 1
        assert b["ratios"]["CoE-2(4/48) / MoE(8/64)"]["parameters"] < 0.9
        assert abs(b["ratios"]["CoE-2(3/64) / MoE(7/64)"]["flops_per_token"] - 1) < 0.05
        memory = b["ratios"]["CoE-2(4/48) / MoE(8/64)"]["peak_memory"]
        assert memory == (b["variants"]["CoE-2(4/48)"]["peak_mem_gib"]
                          / b["variants"]["MoE(8/64)"]["peak_mem_gib"])
        assert all(r["step_time"] > 0 for r in b["ratios"].values())
    # the same data and weights: a step's loss does not depend on how it is split (fp32)
    for name in NAMES:
        one, two = (settings[m]["variants"][name]["losses"][0] for m in ("4", "2"))
        assert abs(one - two) < 1e-4, (name, one, two)

    c = res["layer"]
    assert [p["pair"] for p in c["pairs"]] == ["CoE-2(4/64) vs MoE(8/64)",
                                               "CoE-4(2/64) vs MoE(8/64)",
                                               "CoE-2(8/64) vs MoE(16/64)"]
    assert all(p["ratio"] > 0 for p in c["pairs"])

    d = res["host"]
    assert d["command"].startswith("python benchmarks/host_work.py --device cpu")
    assert d["command"].endswith("train.global_batch_size=4 train.micro_batch_size=4")
    assert set(d["configs"]) == {"MoE(8/64)", "CoE-2(4/64)"}
    for name, r in d["configs"].items():
        # one device read per step (loss, norm and verdict at once), whatever the size
        assert sum(r["syncs"].values()) == 1, (name, r["sync_sites"])
        assert r["profile"]["ms_per_step"]["GEMM"] > 0 and r["profile"]["busy_fraction"] is None
    # CoE-2(4/64) calls the router, dispatch and experts twice per layer: more launches
    assert d["ratios"]["CoE-2(4/64) / MoE(8/64)"]["launches"] > 1

    # every one-GPU target read back from this run's numbers; MFU needs a GPU's peak, and toy
    # sizes on a CPU are reported, not judged; the loss agreement is judged everywhere.  Five
    # speed and memory targets per micro-batch size, and the loss
    t = {x["measure"]: x for x in res["targets"]}
    assert len(t) == 11
    for m, b in settings.items():
        mfu = t[f"MoE(8/64) MFU, micro-batch {m}"]
        assert mfu["value"] is None and mfu["met"] is None
        ratio = t[f"CoE-2(4/64) / MoE(8/64) step time, micro-batch {m}"]
        assert ratio["value"] == b["ratios"]["CoE-2(4/64) / MoE(8/64)"]["step_time"]
        assert ratio["met"] is None and ratio["target"] == "<= 1.12"
        memory = t[f"CoE-2(4/48) peak memory / MoE(8/64), micro-batch {m}"]["value"]
        assert memory == (b["variants"]["CoE-2(4/48)"]["peak_mem_gib"]
                          / b["variants"]["MoE(8/64)"]["peak_mem_gib"])
    loss = t["tiny fp32 losses vs CPU reference, max |difference|"]
    assert loss["value"] == a["max_abs_diff"] and loss["met"] is True
    assert loss["target"] == "<= 0.005"  # --tolerance
    assert "target: MoE(8/64) MFU" in done.stdout and "not measured" in done.stdout
    assert "not judged" in done.stdout


def test_gpu_check_fails_against_a_perturbed_reference(tmp_path):
    reference = json.loads((ROOT / "tests" / "training" / "reference_losses.json").read_text())
    reference["one_process"]["train_loss"]["2"] += 0.01  # twice the tolerance
    path = tmp_path / "perturbed.json"
    path.write_text(json.dumps(reference))
    out = tmp_path / "check.json"
    done = gpu_check("--parts", "a", "--reference", str(path), "--reference-steps", "3",
                     "--out", str(out))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["passed"] is False and res["reference"]["worst_step"] == 2
    loss = [t for t in res["targets"] if t["measure"].startswith("tiny fp32")][0]
    assert loss["met"] is False
    assert all(t["value"] is None for t in res["targets"] if t is not loss)  # only part a ran
    assert 0.009 < res["reference"]["max_abs_diff"] < 0.011
    assert ": FAIL" in done.stdout and "coe-gpu-check: FAIL" in done.stdout


def test_gpu_check_records_a_config_out_of_memory_and_goes_on(tmp_path, monkeypatch):
    """A config that runs out of device memory at one micro-batch size is recorded with its
    error; the other sizes and configs still run, and its targets read "not measured"."""
    import torch

    from megatron_coe import gpu_check as check

    ran = []

    def before(config):
        ran.append((config.train.micro_batch_size, Path(config.run_dir).name))
        if config.train.micro_batch_size == 4 and Path(config.run_dir).name == "coe-2-4of48":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fake_training(monkeypatch, check, before)
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--toy", "--parts", "b", "--warmup", "1",
                       "--steps", "1", "--out", str(out)]) == 0
    assert len(ran) == 10  # every config at both sizes
    res = json.loads(out.read_text())
    small, large = (res["paper"]["by_micro_batch"][m] for m in ("2", "4"))
    assert set(small["variants"]) == set(large["variants"]) == NAMES
    assert large["variants"]["CoE-2(4/48)"]["error"].startswith("OutOfMemoryError: CUDA out of")
    assert set(large["ratios"]) == {"CoE-2(4/64) / MoE(8/64)", "CoE-2(3/64) / MoE(7/64)"}
    assert len(small["ratios"]) == 3
    t = {x["measure"]: x["value"] for x in res["targets"]}
    assert t["CoE-2(4/48) peak memory / MoE(8/64), micro-batch 4"] is None
    assert t["CoE-2(4/48) peak memory / MoE(8/64), micro-batch 2"] == 1.0
    assert t["CoE-2(4/64) / MoE(8/64) step time, micro-batch 4"] == 1.0


def test_gpu_check_refuses_bad_batch_sizes(capsys):
    from megatron_coe import gpu_check as check

    with pytest.raises(SystemExit):
        check.parse_args(["--micro-batches", "32", "12"])
    assert "each must divide --global-batch 32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        check.parse_args(["--global-batch", "0"])
    assert "--global-batch must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the sizes are the check's own arguments
        check.parse_args(["--set", "train.micro_batch_size=16"])
    assert "use --micro-batches and --global-batch" in capsys.readouterr().err


def test_gpu_check_keeps_the_other_parts_when_one_fails(tmp_path, monkeypatch):
    """A part that raises (part d here) is recorded with its error; the JSON holds the other
    parts' results and the exit status says something failed."""
    from megatron_coe import gpu_check as check

    def host_profile(args, work):
        raise RuntimeError("benchmarks/host_work.py failed (1):\nCUDA out of memory")

    monkeypatch.setattr(check, "host_profile", host_profile)
    monkeypatch.setattr(check, "layer_pairs", lambda args, work: {"pairs": []})
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--toy", "--parts", "c", "d", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert res["layer"] == {"pairs": []} and res["passed"] is False
    assert res["host"]["error"] == "RuntimeError: benchmarks/host_work.py failed (1):"
    assert res["host"]["detail"].endswith("CUDA out of memory")  # the cause, kept


def test_part_d_profiles_with_the_set_overrides_but_no_cuda_graph(tmp_path, monkeypatch):
    """Part (d) profiles the configs part (b) times (--set reaches host_work), except a
    train.cuda_graph setting, which host_work refuses (it times eager steps) and the result
    names as left out."""
    from megatron_coe import gpu_check as check

    seen = []

    def run_benchmark(name, options, work):
        seen.append(options)
        return {"configs": {}}, f"python benchmarks/{name}.py"

    monkeypatch.setattr(check, "run_benchmark", run_benchmark)
    args = check.parse_args(["--parts", "d", "--micro-batches", "16", "--set",
                             "model.loss_fusion=true", "train.cuda_graph=full_iteration"])
    result = check.host_profile(args, tmp_path)
    options = seen[0][seen[0].index("--set") + 1:]
    assert options == ["model.loss_fusion=true", "train.global_batch_size=32",
                       "train.micro_batch_size=16"]
    assert result["left_out"] == ["train.cuda_graph=full_iteration"]
    assert "left_out" not in check.host_profile(check.parse_args(["--parts", "d"]), tmp_path)


def test_gpu_check_writes_as_it_goes_and_keeps_part_b_up_to_a_failure(tmp_path, monkeypatch):
    """The JSON is on disk (complete: false) while configs still run; a failure that ends part
    (b) early keeps the configs already measured next to the error."""
    from megatron_coe import gpu_check as check

    out = tmp_path / "check.json"
    seen = []

    def before(config):
        if out.exists():
            seen.append(json.loads(out.read_text()))
        if len(seen) == 3:
            raise KeyboardInterrupt  # not a config's failure: ends the part

    def measure_setting(args, work, micro_batch, progress):
        try:
            return real(args, work, micro_batch, progress)
        except KeyboardInterrupt:
            raise RuntimeError("interrupted") from None

    real = check.measure_setting
    fake_training(monkeypatch, check, before)
    monkeypatch.setattr(check, "measure_setting", measure_setting)
    assert check.main(["--device", "cpu", "--toy", "--parts", "b", "--warmup", "1",
                       "--steps", "1", "--out", str(out)]) == 1
    assert [s["complete"] for s in seen] == [False, False, False]
    first_three = ["MoE(8/64)", "CoE-2(4/64)", "MoE(7/64)"]  # the 4th config was interrupted
    assert list(seen[-1]["paper"]["by_micro_batch"]["4"]["variants"]) == first_three
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["paper"]["error"] == "RuntimeError: interrupted"
    kept = res["paper"]["by_micro_batch"]["4"]["variants"]
    assert list(kept) == first_three and "error" not in kept["MoE(8/64)"]


def test_gpu_check_compares_settings_in_the_same_run(tmp_path, monkeypatch, capsys):
    """Each --compare runs every config again at the first micro-batch size with its overrides
    and reports each one's step time against the default run's; bad values are refused
    first."""
    from megatron_coe import gpu_check as check

    runs = []
    fake_training(
        monkeypatch, check,
        lambda config: runs.append((config.train.micro_batch_size,
                                    not config.model.moe.grouped_gemm, config.train.log_interval)),
        # the first compared setting (per-expert GEMMs) runs at half the speed, loss 0.25 off;
        # the second diverges
        lambda config: 100.0 if config.model.moe.grouped_gemm else 50.0,
        lambda config: (1.0 if config.model.moe.grouped_gemm else 1.25)
        * (float("nan") if config.train.log_interval == 2 else 1.0))
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--toy", "--parts", "b", "--warmup", "1", "--steps",
                       "1", "--compare", "model.moe.grouped_gemm=false", "--compare",
                       "train.log_interval=2", "--out", str(out)]) == 0
    assert runs == ([(4, False, 1)] * 5 + [(2, False, 1)] * 5 + [(4, True, 1)] * 5
                    + [(4, False, 2)] * 5)
    compare = json.loads(out.read_text())["paper"]["compare"]
    assert [c["set"] for c in compare] == [["model.moe.grouped_gemm=false"],
                                           ["train.log_interval=2"]]
    for c, ratio in zip(compare, (2.0, 1.0)):
        assert c["micro_batch_size"] == 4 and set(c["variants"]) == NAMES
        assert c["step_time_vs_default"] == {name: ratio for name in NAMES}
    assert compare[0]["max_abs_loss_diff_vs_default"] == {name: 0.25 for name in NAMES}
    assert all(math.isnan(d) for d in compare[1]["max_abs_loss_diff_vs_default"].values())
    for bad in (["--compare", "model.swiglu_fusion"], ["--compare", "train.micro_batch_size=2"],
                ["--compare", "a=1", "--compare", "b"]):
        with pytest.raises(SystemExit):
            check.parse_args(bad)
    err = capsys.readouterr().err
    assert "--compare model.swiglu_fusion: give KEY=VALUE" in err
    assert "use --micro-batches and --global-batch" in err and "--compare b: give" in err


def test_gpu_check_runs_part_a_with_other_kernels(tmp_path, monkeypatch, capsys):
    """--reference-set reaches part (a)'s tiny run (and its JSON); bad values are refused."""
    from megatron_coe import gpu_check as check

    seen = []

    def train_run(config, log):
        seen.append(config.model)
        return [{"kind": "train", "step": s, "loss": 5.0} for s in (1, 2)]

    monkeypatch.setattr(check, "train_run", train_run)
    out = tmp_path / "check.json"
    check.main(["--device", "cpu", "--toy", "--parts", "a", "--reference-steps", "2",
                "--reference-set", "model.loss_fusion=true", "model.swiglu_fusion=true",
                "--out", str(out)])
    assert len(seen) == 1 and seen[0].loss_fusion and seen[0].swiglu_fusion
    assert json.loads(out.read_text())["reference"]["set"] == [
        "model.loss_fusion=true", "model.swiglu_fusion=true"]
    with pytest.raises(SystemExit):
        check.parse_args(["--reference-set", "model.loss_fusion"])
    assert "--reference-set model.loss_fusion: give KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("setting", [
    ["--parts", "a", "b", "--compare", "train.cuda_graph=full_iteration"],
    ["--parts", "a", "--reference-set", "model.moe.topk=99"],
    ["--parts", "b", "--set", "model.coe.iterations=0"]])
def test_gpu_check_refuses_a_setting_a_config_refuses_before_any_run(setting, tmp_path,
                                                                     monkeypatch, capsys):
    """Every config the asked-for parts would train is built first: one that this device or
    config refuses (a CUDA graph on CPU, say) stops the check with the reason, exit status 2,
    before any part runs and before any JSON is written."""
    from megatron_coe import gpu_check as check

    runs = []
    fake_training(monkeypatch, check, runs.append)
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--toy", "--warmup", "0", "--steps", "1", *setting,
                       "--out", str(out)]) == 2
    assert runs == [] and not out.exists()
    assert "invalid here, before any run" in capsys.readouterr().err


def test_gpu_check_pools_rounds_and_gives_each_rounds_ratios(tmp_path, monkeypatch, capsys):
    """--rounds 2: every config runs twice, in turn; medians pool both rounds' timed steps and
    each pair's step-time ratio is also given per round."""
    from megatron_coe import gpu_check as check

    runs = []
    # CoE-2(4/64) runs at half the speed in its second round; every other config at 100
    fake_training(monkeypatch, check, lambda config: runs.append(Path(config.run_dir).name),
                  lambda config: 50.0 if Path(config.run_dir).name == "coe-2-4of64-round2"
                  else 100.0)
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--toy", "--parts", "b", "--micro-batches", "4",
                       "--warmup", "1", "--steps", "1", "--rounds", "2", "--out", str(out)]) == 0
    stems = [file.removesuffix(".yaml") for _, file in check.PAPER]
    assert runs == [f"{stem}-round{r}" for r in (1, 2) for stem in stems]
    setting = json.loads(out.read_text())["paper"]["by_micro_batch"]["4"]
    assert setting["rounds"] == 2
    coe, moe = setting["variants"]["CoE-2(4/64)"], setting["variants"]["MoE(8/64)"]
    step = 64 * 4 / 100.0  # seconds at 100 tokens/s: 4 sequences of 64 tokens per step
    assert coe["round_median_step_s"] == pytest.approx([step, 2 * step])
    assert coe["step_s"] == pytest.approx([step, 2 * step])  # the timed step of each round
    assert moe["round_median_step_s"] == pytest.approx([step, step])
    ratio = setting["ratios"]["CoE-2(4/64) / MoE(8/64)"]
    assert ratio["step_time_by_round"] == pytest.approx([1.0, 2.0])
    # pooled: tokens per step over the median tokens/s of both rounds' steps, (100 + 50) / 2
    assert ratio["step_time"] == pytest.approx(100 / 75)
    assert "(rounds: 1.000, 2.000)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        check.parse_args(["--rounds", "0"])
