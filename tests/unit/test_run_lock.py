"""The run-directory lock and the resume=none guard (megatron_coe/run_lock.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_coe.run_lock import (RunDirError, RunDirLock, check_fresh_start,
                                   set_previous_run_aside)

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time; from pathlib import Path; from megatron_coe.run_lock import RunDirLock; "
        "RunDirLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_is_refused_naming_the_first(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirError, match=rf"run directory {tmp_path} is in use by another "
                                              rf"training \(pid {proc.pid} on "):
            RunDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_dead_process_does_not_block(tmp_path):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind
    proc.wait()
    assert f"pid {proc.pid} on" in (tmp_path / ".lock").read_text()
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert f"pid {os.getpid()} on" in (tmp_path / ".lock").read_text()
    lock.release()
    RunDirLock(tmp_path).acquire()  # released: the next run (a Slurm requeue) takes it


def _fake_checkpoint(run_dir, step):
    ck = run_dir / "checkpoints" / f"step_{step:07d}"
    ck.mkdir(parents=True)
    (ck / "coe_meta.json").write_text("{}")


def test_fresh_start_into_a_run_with_checkpoints_needs_overwrite(tmp_path):
    check_fresh_start(tmp_path, "none", False)  # empty: fine
    _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 40)
    with pytest.raises(RunDirError, match=r"holds 2 checkpoint\(s\) up to step_0000040 .* "
                                          r"checkpoint.overwrite=true"):
        check_fresh_start(tmp_path, "none", False)
    check_fresh_start(tmp_path, "none", True)
    check_fresh_start(tmp_path, "auto", False)


def test_overwrite_moves_the_previous_run_aside(tmp_path):
    _fake_checkpoint(tmp_path, 40)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "data").mkdir()  # prepared data stays where it is
    moved = set_previous_run_aside(tmp_path)
    assert moved.parent == tmp_path / "replaced"
    assert (moved / "checkpoints" / "step_0000040" / "coe_meta.json").is_file()
    assert (moved / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "data").is_dir()
    assert set_previous_run_aside(tmp_path) is None  # nothing left to move
