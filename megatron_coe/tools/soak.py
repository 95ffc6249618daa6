"""Soak run: a long tiny CoE training on 2 CPU ranks, straight and with a resume in the middle.

    python -m megatron_coe.tools.soak --steps 3000 --save-interval 500 --out runs/soak

Runs ``coe-train`` twice with torchrun (2 processes, EP = 2) on the same config: once straight,
once stopped at the midpoint (train.exit_interval) and resumed.  Reports, as JSON on stdout
and in OUT/soak.json: wall time of each run, resident memory per process early and late in
the run (growth would show a leak), the number of steps whose loss differs between the two
runs (exact comparison), and whether every run finished (a hang fails the --timeout).
OUT must be new: a soak never resumes an earlier one (it would train nothing and pass).
Warmup is 10 % of the steps, at most 50.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_coe.config import load_config
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
    if out.exists() and any(out.iterdir()):
        print(f"soak: --out {out} already holds a soak; give a new --out (a rerun into it would "
              "resume the finished runs and train nothing)", file=sys.stderr)
        return 2
    common = [f"train.steps={args.steps}", f"checkpoint.save_interval={args.save_interval}",
              "train.eval_interval=0", "train.log_interval=1",
              f"schedule.warmup_steps={min(50, args.steps // 10)}", "checkpoint.keep_last=2"]
    straight, split = out / "straight", out / "split"
    half = args.steps // 2
    try:  # a bad --steps / --save-interval is refused here, not by two torchruns
        load_config(args.config, [f"run_dir={straight}", *common, f"train.exit_interval={half}"])
    except ValueError as err:
        print(f"soak: {err}", file=sys.stderr)
        return 2
    fresh, resume = "checkpoint.resume=none", "checkpoint.resume=auto"
    times = {"straight": _train(args.config, [f"run_dir={straight}", *common, fresh],
                                args.timeout)}
    times["split_first"] = _train(args.config, [f"run_dir={split}", *common, fresh,
                                                f"train.exit_interval={half}"], args.timeout)
    times["split_second"] = _train(args.config, [f"run_dir={split}", *common, resume],
                                   args.timeout)
    a, b = _records(straight), _records(split)
    for name, records in (("straight", a), ("split", b)):
        if sorted(records) != list(range(1, args.steps + 1)):
            print(f"soak: the {name} run logged {len(records)} of {args.steps} steps",
                  file=sys.stderr)
            return 1
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
