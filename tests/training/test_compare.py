"""coe-compare end to end on a tiny budget: two configs, identical data, a results table and a
plot; unfinished runs resume instead of starting over; unfair comparisons are refused."""

import json

import yaml

from runner import ROOT

BASE = yaml.safe_load((ROOT / "configs" / "tiny" / "coe.yaml").read_text())


def write(path, iterations):
    cfg = json.loads(json.dumps(BASE))
    cfg["model"]["coe"]["iterations"] = iterations
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


COMMON = ["parallel.expert=1", "train.steps=6", "train.eval_interval=3", "train.eval_iters=1",
          "checkpoint.save_interval=0", "schedule.warmup_steps=2"]


def test_compare_runs_resumes_and_reports(tmp_path, monkeypatch):
    from megatron_coe.tools import compare

    monkeypatch.chdir(ROOT)
    a, b = write(tmp_path / "moe.yaml", 1), write(tmp_path / "coe2.yaml", 2)
    out = tmp_path / "cmp"
    args = ["--configs", a, b, "--seeds", "1", "--out", str(out)]
    # first call stops every run half way (as a time limit would)
    assert compare.main([*args, *COMMON, "train.exit_interval=3"]) == 0
    for name in ("moe", "coe2"):
        steps = [json.loads(l)["step"] for l in
                 (out / "runs" / name / "seed1" / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in l]
        assert steps == [1, 2, 3]
    assert compare.main([*args, *COMMON]) == 0
    for name in ("moe", "coe2"):
        run = out / "runs" / name / "seed1"
        assert "resumed from" in (run / "train.log").read_text()
        steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
                 if '"train"' in l]
        assert steps == [1, 2, 3, 4, 5, 6]  # nothing trained twice
    table = {r["config"]: r for r in json.loads((out / "results.json").read_text())}
    assert table["moe"]["active_expert_passes"] == 3 and table["coe2"]["active_expert_passes"] == 6
    assert table["coe2"]["train_gflops_per_token"] > table["moe"]["train_gflops_per_token"]
    assert all(r["final_valid_loss_mean"] < 6 for r in table.values())
    assert "| coe2 | 1 |" in (out / "results.md").read_text()
    assert (out / "valid_loss.png").stat().st_size > 10_000
    # a third call finds everything finished
    assert compare.main([*args, *COMMON]) == 0


def test_unfair_comparison_is_refused(tmp_path, capsys):
    from megatron_coe.tools import compare

    a = write(tmp_path / "a.yaml", 1)
    cfg = json.loads(json.dumps(BASE))
    cfg["train"]["steps"] = 99
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
    assert compare.main(["--configs", a, str(tmp_path / "b.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "differ in train.steps" in capsys.readouterr().err


def test_study_scripts_name_comparable_configs():
    """The committed study commands (CPU and GPU) list existing configs that coe-compare accepts
    together: a config that drifts in data, schedule or budget would stop the study."""
    import re

    from megatron_coe.config import load_config
    from megatron_coe.tools.compare import check_comparable

    for script, expected in (("cpu-gsm8k.sh", "tiny"), ("paper-gpu.sh", "paper")):
        text = (ROOT / "launch" / "study" / script).read_text()
        paths = re.findall(r"configs/(\w+)/([\w-]+)\.yaml", text)
        assert len(paths) == 9 and {d for d, _ in paths} == {expected}, script
        check_comparable({name: load_config(ROOT / "configs" / d / f"{name}.yaml")
                          for d, name in paths})


def test_no_new_run_starts_after_a_failure(tmp_path, monkeypatch, capsys):
    from megatron_coe.tools import compare

    monkeypatch.chdir(ROOT)
    a, b = write(tmp_path / "first.yaml", 1), write(tmp_path / "second.yaml", 2)
    out = tmp_path / "cmp"
    bad_data = ["data.source=jsonl", f"data.paths=[{tmp_path / 'missing.jsonl'}]"]
    assert compare.main(["--configs", a, b, "--seeds", "1", "--out", str(out), *COMMON,
                         *bad_data]) == 1
    assert "first seed 1: failed" in capsys.readouterr().err
    assert (out / "runs" / "first" / "seed1" / "train.log").is_file()
    assert not (out / "runs" / "second").exists()
    assert not (out / "results.md").exists()
