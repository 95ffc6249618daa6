"""GPU time per line of code: a profiler trace's kernels attributed to the source that launched
them.

    python benchmarks/host_work.py --device cuda --full-size --profile --trace traces/ ...
    python benchmarks/trace_sites.py traces/moe-8of64.json.gz --top 30 --out sites.json

Each kernel in a torch.profiler trace (``benchmarks/host_work.py --trace``: with shapes and
Python stacks) is matched, through its correlation id, to the runtime call that launched it, and
that call to the spans open around it on its thread: the ATen ops and the Python frames.  The
site is the innermost frame in this project or Megatron-Core (``--frames``).  Kernels launched
by autograd's backward thread, where no such frame is open, take the site of the forward op
with the same sequence number (the op whose backward they are: of the ops recording that
number, the last to start).  Per site and phase (forward,
backward, optimizer) it reports the kernels' time per step (over ``--steps`` profiled steps),
their number, and the split by kernel class (benchmarks/host_work.py's classes) and ATen op.
Nothing here passes or fails; it reads a trace and prints.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import re
import sys
from pathlib import Path

KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
DEFAULT_FRAMES = r"(megatron_coe/|megatron/core/|benchmarks/)"


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


class Spans:
    """The CPU ops and Python frames of one thread, to find those open at a time."""

    def __init__(self, events: list[dict]):
        # by start, and of spans starting together the longer (outer) one first
        self.spans = sorted(((e["ts"], e["ts"] + e.get("dur", 0), e) for e in events),
                            key=lambda s: (s[0], -s[1]))
        self.starts = [s[0] for s in self.spans]
        self.longest = max((s[1] - s[0] for s in self.spans), default=0)

    def open_at(self, ts: float) -> list[dict]:
        """Spans containing ``ts``, outermost first."""
        hi = bisect.bisect_right(self.starts, ts)
        lo = bisect.bisect_left(self.starts, ts - self.longest)
        return [e for start, end, e in self.spans[lo:hi] if start <= ts <= end]


def attribute(events: list[dict], frames: str = DEFAULT_FRAMES) -> list[dict]:
    """One record per kernel: its duration (us), name, phase, site, innermost ATen op."""
    from host_work import kernel_class

    project = re.compile(frames)
    by_thread = collections.defaultdict(list)
    launches, kernels = {}, []
    for e in events:
        cat = e.get("cat")
        if cat in ("cpu_op", "python_function"):
            by_thread[e["tid"]].append(e)
        elif cat in LAUNCH_CATEGORIES and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = e
        elif cat in KERNEL_CATEGORIES:
            kernels.append(e)
    threads = {tid: Spans(evts) for tid, evts in by_thread.items()}
    # autograd sequence number -> (thread, start) of the forward op that made the node: ops
    # record the counter's current value and the one that makes a node moves it on, so of the
    # ops carrying a number the last to start is that op (or one nested in it)
    forward_ops = {}
    for tid, evts in by_thread.items():
        for e in evts:
            seq = e.get("args", {}).get("Sequence number")
            if (e.get("cat") == "cpu_op" and seq is not None
                    and not e["name"].startswith("autograd::") and "Backward" not in e["name"]
                    and (seq not in forward_ops or e["ts"] > forward_ops[seq][1])):
                forward_ops[seq] = (tid, e["ts"])

    def project_frames(tid, ts):
        spans = threads[tid].open_at(ts) if tid in threads else []
        return ([s["name"] for s in spans if s.get("cat") == "python_function"
                 and project.search(s["name"])], [s for s in spans if s.get("cat") == "cpu_op"])

    records = []
    for k in kernels:
        launch = launches.get(k.get("args", {}).get("correlation"))
        site, phase, op = "(no launch recorded)", "?", "?"
        if launch is not None:
            found, ops = project_frames(launch["tid"], launch["ts"])
            phase = "forward"
            if ops and ops[0]["name"].startswith("autograd::engine"):
                phase = "backward"
                seq = ops[0].get("args", {}).get("Sequence number")
                if not found and seq in forward_ops:
                    found, _ = project_frames(*forward_ops[seq])
            if any("optimizer" in f.lower() for f in found):
                phase = "optimizer"
            site = re.sub(r"^.*?(?=" + frames + ")", "", found[-1]) if found else "(no frame)"
            op = ops[-1]["name"].removeprefix("aten::") if ops else "?"
        records.append({"us": k.get("dur", 0.0), "name": k["name"], "class": kernel_class(
            k["name"]), "phase": phase, "site": site, "op": op})
    return records


def by_site(records: list[dict], steps: int) -> list[dict]:
    """Per (phase, site): ms per step, kernels per step, and the split by (class, op)."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[(r["phase"], r["site"])].append(r)
    rows = []
    for (phase, site), rs in groups.items():
        split = collections.Counter()
        for r in rs:
            split[f"{r['class']}: {r['op']}"] += r["us"]
        rows.append({"phase": phase, "site": site,
                     "ms_per_step": sum(r["us"] for r in rs) / 1e3 / steps,
                     "kernels_per_step": len(rs) / steps,
                     "split_ms": {k: v / 1e3 / steps for k, v in split.most_common(4)}})
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, help="a torch.profiler chrome trace (.json or .json.gz)")
    p.add_argument("--steps", type=int, default=2,
                   help="steps the trace covers (host_work.py profiles 2)")
    p.add_argument("--top", type=int, default=30, help="sites printed")
    p.add_argument("--frames", default=DEFAULT_FRAMES,
                   help="regular expression of the source paths that name a site")
    p.add_argument("--out", type=Path, help="also write every site as JSON")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if not args.trace.exists():
        p.error(f"{args.trace}: no such file")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    records = attribute(load_trace(args.trace), args.frames)
    rows = by_site(records, args.steps)
    total = sum(r["us"] for r in records) / 1e3 / args.steps
    print(f"{args.trace}: {len(records) / args.steps:.0f} kernels, {total:.1f} ms of kernel "
          f"time per step")
    for row in rows[:args.top]:
        split = ", ".join(f"{k} {v:.2f}" for k, v in row["split_ms"].items())
        print(f"{row['ms_per_step']:7.2f} ms {row['kernels_per_step']:6.0f} {row['phase']:9s} "
              f"{row['site'][:60]:60s} | {split}")
    classes = collections.Counter()
    for r in records:
        classes[r["class"]] += r["us"] / 1e3 / args.steps
    print("per class: " + ", ".join(f"{k} {v:.1f} ms" for k, v in classes.most_common()))
    if args.out:
        args.out.write_text(json.dumps({"trace": str(args.trace), "steps": args.steps,
                                        "kernel_ms_per_step": total,
                                        "classes_ms_per_step": dict(classes.most_common()),
                                        "sites": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
