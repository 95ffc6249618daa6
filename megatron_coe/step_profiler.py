"""torch.profiler over a range of a run's training steps (``train.profile_steps``).

    train:
      profile_steps: [10, 12]   # first, last (1-based, inclusive); []: off
      profile_ranks: [0]        # which ranks trace

As Megatron-LM's ``--profile --use-pytorch-profiler --profile-step-start/end --profile-ranks``
and torchtitan's ``[profiling]``: each chosen rank records its host ops and, on CUDA, its
kernels from the start of step ``first`` to the end of step ``last``, with input shapes and
Python stacks, and writes

    run_dir/profile/rank<r>_steps<a>-<b>.json.gz   Chrome trace (Perfetto, chrome://tracing;
                                                   benchmarks/trace_sites.py attributes its
                                                   kernels to source lines)
    run_dir/profile/rank<r>_steps<a>-<b>.txt       the ops' and kernels' time, largest first

A step is everything the loop does for it: the forward-backward, the next micro-batches, the
optimizer step and the log line, a span named ``train step <n>`` in the trace; a validation or
checkpoint between two profiled steps is recorded outside the spans.  A run that stops inside
the range (exit_interval, a stop request) writes the steps it profiled, and so does one that
fails there (coe-train's exit calls :func:`close_open`); a resumed run profiles what is left of
the range.  With ``train.cuda_graph: full_iteration`` the range starts after the step that
captures the graph (config.py refuses it otherwise; a resumed run captures again and starts its
trace at the first replay in the range); that the replayed kernels are in the trace is a GPU
test's to show (tests/training/test_cuda_graph.py), not yet run.  Profiling changes no result
(the same kernels run); it slows the profiled steps, whose times in metrics.jsonl are then not
the run's.
"""

from __future__ import annotations

import gzip
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def write_trace(prof, path: Path) -> Path:
    """``prof``'s Chrome trace, gzipped, at ``path`` (…json.gz); written beside it first, so a
    reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        partial = Path(tmp) / path.name
        with open(raw, "rb") as f, gzip.open(partial, "wb") as g:
            shutil.copyfileobj(f, g)
        partial.replace(path)
    return path


_OPEN: list["StepProfiler"] = []  # the profiler recording now, if any


def close_open() -> None:
    """Write and stop a profiler still recording (a run that failed inside its range); a
    failure to do so is printed, not raised, so that it never hides the run's own error."""
    for prof in list(_OPEN):
        try:
            prof.close()
        except Exception as err:  # e.g. the device's own failure, again
            print(f"[rank {prof.rank}] the profiled steps' trace was not written: "
                  f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)


class StepProfiler:
    """Starts torch.profiler before step ``first`` and writes its trace after step ``last``
    (:meth:`before` / :meth:`after` around each step; :meth:`close` when the loop ends early)."""

    def __init__(self, config, rank: int, run_dir: Path, device: torch.device):
        steps = config.train.profile_steps
        self.first, self.last = (steps[0], steps[1]) if steps else (None, None)
        self.on = bool(steps) and rank in config.train.profile_ranks
        self.rank, self.dir, self.device = rank, Path(run_dir) / "profile", device
        self.prof, self.began, self.span, self.stepped = None, None, None, None
        self.waited = False

    def before(self, step: int, ready: bool = True) -> None:
        """Step ``step`` begins; ``ready`` False while a step to profile would be captured as
        a CUDA graph (the trace then starts at the first replayed step in the range)."""
        starts = self.on and self.prof is None and self.first <= step <= self.last
        if starts and not ready:
            self.waited = True  # a graph capture's step: not observed
        elif starts:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities, record_shapes=True, with_stack=True)
            self.prof.start()
            self.began = step
            _OPEN.append(self)
        if self.prof is not None:  # the step's span in the trace
            self.span = torch.profiler.record_function(f"train step {step}")
            self.span.__enter__()
            self.stepped = step

    def after(self, step: int) -> None:
        if self.prof is not None:
            self.span.__exit__(None, None, None)
            self.span = None
            if step >= self.last:
                self._write(step)
        elif self.on and step >= self.last:  # the range is over (or was before this run)
            if self.waited:  # its steps here were all before the graph's capture
                print(f"[rank {self.rank}] train.profile_steps=[{self.first}, {self.last}]: no "
                      "step profiled (the CUDA graph was captured in the range)", flush=True)
            self.on = False

    def close(self) -> None:
        """The loop ends inside the range (an exit, a stop request, a failure): write the
        steps profiled so far, if any."""
        if self.prof is not None:
            if self.span is not None:  # a failure within the step
                self.span.__exit__(None, None, None)
                self.span = None
            self._write(self.stepped)

    def _write(self, step: int) -> None:
        _OPEN.remove(self)  # first: a failure below leaves nothing open to write again
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.prof.stop()
        name = f"rank{self.rank}_steps{self.began}-{step}"
        trace = write_trace(self.prof, self.dir / f"{name}.json.gz")
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = self.prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=80)
        (self.dir / f"{name}.txt").write_text(table + "\n")
        print(f"[rank {self.rank}] steps {self.began}-{step} profiled: {trace}", flush=True)
        self.prof, self.on = None, False
