"""StepProfiler's range logic without a training run (the loop's use of it, and that profiling
changes no result: tests/training/test_train_resume.py): which steps it records, when it
writes, and what it says when the range's steps were CUDA graph captures."""

import gzip
import json
from types import SimpleNamespace

import torch

from megatron_coe.step_profiler import StepProfiler


def steps(tmp_path, first_step, last_step, ready=lambda step: True, rank=0):
    config = SimpleNamespace(train=SimpleNamespace(profile_steps=[2, 3], profile_ranks=[0]))
    profiler = StepProfiler(config, rank, tmp_path, torch.device("cpu"))
    for step in range(first_step, last_step + 1):
        profiler.before(step, ready=ready(step))
        torch.ones(4) @ torch.ones(4)
        profiler.after(step)
    return sorted(p.name for p in (tmp_path / "profile").glob("*")) if (
        tmp_path / "profile").exists() else []


def spans(path):
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    return {e["name"] for e in events if e.get("name", "").startswith("train step")}


def test_the_range_is_recorded_once_and_written_at_its_last_step(tmp_path, capsys):
    assert steps(tmp_path, 1, 5) == ["rank0_steps2-3.json.gz", "rank0_steps2-3.txt"]
    assert spans(tmp_path / "profile/rank0_steps2-3.json.gz") == {"train step 2", "train step 3"}
    assert "steps 2-3 profiled" in capsys.readouterr().out


def test_other_ranks_and_a_run_past_the_range_record_nothing(tmp_path, capsys):
    assert steps(tmp_path / "rank1", 1, 5, rank=1) == []
    assert steps(tmp_path / "resumed", 4, 6) == []
    assert capsys.readouterr().out == ""


def test_a_capturing_step_is_not_recorded(tmp_path, capsys):
    assert steps(tmp_path / "late", 1, 4, ready=lambda step: step > 2) == [
        "rank0_steps3-3.json.gz", "rank0_steps3-3.txt"]
    assert spans(tmp_path / "late/profile/rank0_steps3-3.json.gz") == {"train step 3"}
    assert steps(tmp_path / "never", 1, 4, ready=lambda step: step > 3) == []
    assert "[2, 3]: no step profiled (the CUDA graph was captured" in capsys.readouterr().out
