"""Soak run: a long tiny CoE training on 2 CPU ranks, straight and with a resume in the middle.

    python -m megatron_coe.tools.soak --steps 3000 --save-interval 500 --out runs/soak

Runs ``coe-train`` twice with torchrun (2 processes, EP = 2) on the same config: once straight,
once stopped at the midpoint (train.exit_interval) and resumed.  Reports, as JSON on stdout
and in OUT/soak.json: wall time of each run, resident memory per process early and late in
the run (growth would show a leak), the number of steps whose loss differs between the two
runs (exact comparison), and whether every run finished (a hang fails the --timeout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_coe.metrics import read_metrics


def _train(config: str, overrides: list[str], timeout: int) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_coe.train", config, *overrides]
    start = time.time()
    subprocess.run(cmd, check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    return time.time() - start


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir, "train")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny/coe.yaml")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--save-interval", type=int, default=500)
    parser.add_argument("--out", default="runs/soak")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    common = [f"train.steps={args.steps}", f"checkpoint.save_interval={args.save_interval}",
              "train.eval_interval=0", "train.log_interval=1", "schedule.warmup_steps=50",
              "checkpoint.keep_last=2", "checkpoint.resume=auto"]
    straight, split = out / "straight", out / "split"
    times = {"straight": _train(args.config, [f"run_dir={straight}", *common], args.timeout)}
    half = args.steps // 2
    times["split_first"] = _train(args.config, [f"run_dir={split}", *common,
                                                f"train.exit_interval={half}"], args.timeout)
    times["split_second"] = _train(args.config, [f"run_dir={split}", *common], args.timeout)
    a, b = _records(straight), _records(split)
    differing = [s for s in a if a[s]["loss"] != b.get(s, {}).get("loss")]
    early = min(100, args.steps)
    summary = {
        "steps": args.steps, "save_interval": args.save_interval, "resumed_at": half,
        "wall_s": {k: round(v, 1) for k, v in times.items()},
        "rss_gib_rank0": {"straight_step_%d" % early: a[early]["mem_gib"],
                          "straight_last": a[args.steps]["mem_gib"],
                          "split_last": b[args.steps]["mem_gib"]},
        "steps_with_different_loss": len(differing),
        "first_different_step": differing[0] if differing else None,
        "final_loss": {"straight": a[args.steps]["loss"], "split": b[args.steps]["loss"]},
        "checkpoints_kept": sorted(p.name for p in (split / "checkpoints").glob("step_*")),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if not differing else 1


if __name__ == "__main__":
    sys.exit(main())
