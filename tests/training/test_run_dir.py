"""checkpoint.resume=none never silently replaces a run: refused into a run directory with
checkpoints, and with checkpoint.overwrite=true the previous run is moved aside whole."""

import subprocess
import sys

from runner import ROOT, TINY, check, metrics

ONE = ["parallel.expert=1", "train.steps=2", "train.eval_interval=0", "train.eval_iters=1",
       "schedule.warmup_steps=1", "train.tensorboard=false"]


def _train(run_dir, *extra):
    return subprocess.run([sys.executable, "-m", "megatron_coe.train", TINY,
                           f"run_dir={run_dir}", *ONE, *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_fresh_start_into_a_used_run_dir_needs_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    check(_train(run_dir))
    old_metrics = (run_dir / "metrics.jsonl").read_text()

    refused = _train(run_dir, "checkpoint.resume=none")
    assert refused.returncode == 2
    assert ("checkpoint.resume=none would start over in" in refused.stderr
            and "holds 1 checkpoint(s) up to step_0000002" in refused.stderr), refused.stderr
    assert (run_dir / "metrics.jsonl").read_text() == old_metrics  # nothing appended

    replaced = _train(run_dir, "checkpoint.resume=none", "checkpoint.overwrite=true")
    check(replaced)
    assert "previous run moved to" in replaced.stdout
    (previous,) = (run_dir / "replaced").iterdir()
    assert (previous / "metrics.jsonl").read_text() == old_metrics
    assert [p.name for p in (previous / "checkpoints").glob("step_*")] == ["step_0000002"]
    assert sorted(metrics(run_dir)) == [1, 2]  # the new run's own, once each
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # 2 train + valid
