"""launch/torchrun.sh as users run it: from any directory with relative paths, a SIGTERM that
stops cleanly (checkpoint, exit 0, no traceback), one training per run directory, and a
failure reported in one line."""

import os
import re
import signal
import subprocess
import sys
import time

from runner import ROOT, TINY, metrics

LAUNCHER = str(ROOT / "launch" / "torchrun.sh")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "NPROC": "2",
       "PYTHON": sys.executable}


def test_sigterm_stops_cleanly_and_a_second_run_is_locked_out(tmp_path):
    # run from another directory, with a relative config path and a relative run_dir
    config = os.path.relpath(TINY, tmp_path)
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([LAUNCHER, config, "run_dir=run", "train.steps=100000",
                              "train.eval_interval=0", "checkpoint.save_interval=0"],
                             cwd=tmp_path, env=ENV,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while len(metrics(run_dir)) < 2 and time.time() < deadline and first.poll() is None:
            time.sleep(0.5)
        assert len(metrics(run_dir)) >= 2, (tmp_path / "first.log").read_text()[-3000:]

        second = subprocess.run([sys.executable, "-m", "megatron_coe.train", TINY,
                                 f"run_dir={run_dir}", "parallel.expert=1", "train.steps=2",
                                 "schedule.warmup_steps=1"],
                                cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert (f"run directory {run_dir} is in use by another training (pid "
                in second.stderr), second.stderr[-2000:]
        # the second run wrote nothing (the first made checkpoints/ at start-up, empty)
        assert not list((run_dir / "checkpoints").glob("*step_*"))

        steps = len(metrics(run_dir))
        deadline = time.time() + 120
        while len(metrics(run_dir)) <= steps + 1 and time.time() < deadline:
            time.sleep(0.5)
        assert len(metrics(run_dir)) > steps + 1  # the first run trains on, unaffected

        first.send_signal(signal.SIGTERM)  # to the launcher only, as Slurm or `kill` would
        assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        # a failed assertion must not leave 100000-step workers training on: they run in
        # sessions of their own, out of reach of a kill of the launcher; its stop signal
        # reaches them (a second one kills them)
        for _ in range(2):
            if first.poll() is None:
                first.send_signal(signal.SIGTERM)
                try:
                    first.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    pass
        if first.poll() is None:
            from megatron_coe.launch import children

            for agent in children(first.pid):
                for pid in [*children(agent), agent]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            first.kill()
    out = (tmp_path / "first.log").read_text()
    assert "stop requested: checkpoint saved at step" in out
    assert "Traceback" not in out and "SignalException" not in out
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) == max(metrics(run_dir))


def test_a_clean_error_is_the_last_line(tmp_path):
    result = subprocess.run([LAUNCHER, TINY, f"run_dir={tmp_path / 'run'}",
                             "optimizer.lr=.inf"], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"coe-launch: rank [01] exited with code 2: coe-train: bad config: "
                    r"optimizer.lr=inf is not a finite number", last), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
