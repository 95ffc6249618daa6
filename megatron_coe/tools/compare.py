"""coe-compare: train a list of configs x seeds on identical data, token budget and schedule,
then tabulate and plot the validation losses.

    coe-compare --configs configs/tiny/moe-8of64.yaml configs/tiny/coe-2-4of64.yaml \\
                --seeds 1 2 3 --out runs/compare [--nproc 1] [--jobs 2] [-- key=value ...]

Each run is ``coe-train CONFIG run_dir=OUT/runs/<config>/seed<S> seed=S [overrides]``: the seed
changes the model's initialisation, never the data (``data.seed`` stays the config's, so every
config of a seed sees the same batches in the same order).  The configs must agree on data,
token budget and schedule; the runner refuses them otherwise.  A finished run (validation
record at its last step) is skipped; an unfinished one resumes from its latest checkpoint.
``--jobs J`` trains J runs at once, each with its share of the CPU cores as torch threads (on a
small machine several single-threaded runs use the cores better than one run's threads do).

Writes OUT/results.json and OUT/results.md (per config: final and best validation loss, mean
and spread over seeds, parameters, active expert passes and training FLOPs per token, peak
memory, tokens/s), OUT/raw.json (every run's metrics), and OUT/valid_loss.png (validation loss
against training tokens, one line per config, the band spanning the seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from megatron_coe.metrics import read_metrics

SAME = ("data", "schedule", "optimizer")
SAME_TRAIN = ("steps", "global_batch_size", "eval_interval", "eval_iters")


def _finished(run_dir: Path, steps: int) -> bool:
    return any(r["step"] == steps for r in read_metrics(run_dir, "valid"))


def check_comparable(configs: dict) -> None:
    """Refuse configs that differ in data, token budget or schedule (the comparison would not
    be fair), naming the field."""
    names = list(configs)
    ref = configs[names[0]]
    for name in names[1:]:
        c = configs[name]
        for section in SAME:
            if asdict(getattr(c, section)) != asdict(getattr(ref, section)):
                raise ValueError(f"{name} and {names[0]} differ in section {section!r}; "
                                 "a comparison needs identical data, optimizer and schedule")
        for key in SAME_TRAIN:
            if getattr(c.train, key) != getattr(ref.train, key):
                raise ValueError(f"{name} and {names[0]} differ in train.{key}")
        if c.model.seq_length != ref.model.seq_length:
            raise ValueError(f"{name} and {names[0]} differ in model.seq_length")


def summarize(configs: dict, seeds: list[int], out: Path) -> dict:
    from megatron_coe.metrics import active_expert_passes, parameter_count, train_flops_per_token

    table, raw = [], {}
    for name, config in configs.items():
        finals, bests, mems, speeds = [], [], [], []
        for seed in seeds:
            recs = read_metrics(out / "runs" / name / f"seed{seed}")
            raw[f"{name}/seed{seed}"] = recs
            valid = {r["step"]: r["loss"] for r in recs if r["kind"] == "valid"}
            train = [r for r in recs if r["kind"] == "train"]
            if not valid:
                continue
            finals.append(valid[max(valid)])
            bests.append(min(valid.values()))
            mems.append(max(r["mem_gib"] for r in train))
            speeds.append(statistics.median(r["tokens_per_s"] for r in train))
        table.append({
            "config": name, "seeds": len(finals),
            "final_valid_loss_mean": statistics.fmean(finals) if finals else None,
            "final_valid_loss_std": statistics.pstdev(finals) if len(finals) > 1 else 0.0,
            "final_valid_loss_per_seed": finals,
            "best_valid_loss_mean": statistics.fmean(bests) if bests else None,
            "parameters": parameter_count(config),
            "active_expert_passes": active_expert_passes(config),
            "train_gflops_per_token": train_flops_per_token(config) / 1e9,
            "peak_mem_gib": max(mems) if mems else None,
            "tokens_per_s": statistics.fmean(speeds) if speeds else None,
        })
    return {"table": table, "raw": raw}


def write_outputs(result: dict, configs: dict, seeds: list[int], out: Path, command: str) -> None:
    (out / "results.json").write_text(json.dumps(result["table"], indent=1))
    (out / "raw.json").write_text(json.dumps(result["raw"]))
    lines = [f"Command: `{command}`", "",
             "| config | seeds | final valid loss (mean ± sd) | best valid loss | parameters | "
             "expert passes/token/layer | train GFLOP/token | peak mem GiB | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in result["table"]:
        lines.append(
            f"| {r['config']} | {r['seeds']} | {fmt(r['final_valid_loss_mean'], '.4f')} ± "
            f"{r['final_valid_loss_std']:.4f} | {fmt(r['best_valid_loss_mean'], '.4f')} | "
            f"{r['parameters']:,} | {r['active_expert_passes']:g} | "
            f"{r['train_gflops_per_token']:.4f} | {fmt(r['peak_mem_gib'], '.2f')} | "
            f"{fmt(r['tokens_per_s'], '.0f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(result, configs, seeds, out)


def _plot(result: dict, configs: dict, seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, config in configs.items():
        tokens_per_step = config.train.global_batch_size * config.model.seq_length
        curves = []
        for seed in seeds:
            recs = result["raw"].get(f"{name}/seed{seed}", [])
            curves.append({r["step"]: r["loss"] for r in recs if r["kind"] == "valid"})
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        x = [s * tokens_per_step for s in steps]
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        line, = ax.plot(x, mean, label=f"{name} ({len(curves)} seeds)")
        ax.fill_between(x, [min(c[s] for c in curves) for s in steps],
                        [max(c[s] for c in curves) for s in steps], alpha=0.2,
                        color=line.get_color())
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "valid_loss.png", dpi=120)
    plt.close(fig)


def _train(seed: int, path: str, configs: dict, out: Path, args, threads: int,
           failed: threading.Event) -> int:
    """Train (or finish) one config at one seed; 0 when its run is complete.  After any run
    has failed no new run starts (the runs already going finish)."""
    if failed.is_set():
        return 1
    name = Path(path).stem
    run_dir = out / "runs" / name / f"seed{seed}"
    if _finished(run_dir, configs[name].train.steps):
        print(f"{name} seed {seed}: finished, skipped", flush=True)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "megatron_coe.train", path,
           *args.overrides, f"run_dir={run_dir}", f"seed={seed}"]
    print(f"{name} seed {seed}: training in {run_dir}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.setdefault("OMP_NUM_THREADS", str(threads))
    with (run_dir / "train.log").open("a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        failed.set()
        print(f"{name} seed {seed}: failed (exit {rc}); see {run_dir}/train.log",
              file=sys.stderr, flush=True)
    else:
        print(f"{name} seed {seed}: done", flush=True)
    return rc


def main(argv=None) -> int:
    from megatron_coe.config import load_config

    parser = argparse.ArgumentParser(prog="coe-compare", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", required=True)
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        configs = {Path(p).stem: load_config(p, args.overrides) for p in args.configs}
        if len(configs) != len(args.configs):
            raise ValueError("two configs have the same file name; rename one")
        check_comparable(configs)
        if args.jobs < 1 or args.nproc < 1:
            raise ValueError("--jobs and --nproc must be at least 1")
    except ValueError as err:
        print(f"coe-compare: {err}", file=sys.stderr)
        return 2
    runs = [(seed, path) for seed in args.seeds for path in args.configs]
    threads = max(1, (os.cpu_count() or 1) // (args.jobs * args.nproc))
    failed = threading.Event()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(lambda run: _train(*run, configs, out, args, threads, failed),
                              runs))
    if any(codes):
        return 1
    result = summarize(configs, args.seeds, out)
    command = " ".join(["coe-compare", *(sys.argv[1:] if argv is None else argv)])
    write_outputs(result, configs, args.seeds, out, command)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
