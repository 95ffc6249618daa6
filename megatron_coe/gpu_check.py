"""coe-gpu-check: one command that checks and measures this package on one GPU.

    python -m megatron_coe.gpu_check                          # one GPU: a few minutes on an H100
    python -m megatron_coe.gpu_check --device cpu --toy       # the same script at toy sizes
    python -m megatron_coe.gpu_check --data my.jsonl --out benchmarks/results/mine.json

Offline: megatron-core may come from a local wheel folder
(``pip install --no-index --find-links DIR megatron-core``); the data is the built-in arithmetic
source unless ``--data`` gives a jsonl file.  Parts (``--parts``, default all):

  a  correctness: the tiny CoE config (configs/tiny/coe.yaml) in fp32 on the device, one process,
     EP = 1, weights initialised on the CPU generator (as on CPU), trained with coe-train's loop;
     its loss at every logged step against the checked-in CPU reference
     (tests/training/reference_losses.json, "one_process"): pass when every |difference| <=
     ``--tolerance`` (5e-3).  The exit status is 1 when it fails.  ``--reference-set
     KEY=VALUE ...`` runs it with other kernels (model.fused_kernels=compile, ...).
  b  speed: the paper-scale configs MoE(8/64), CoE-2(4/64), MoE(7/64), CoE-2(3/64) and
     CoE-2(4/48) (configs/paper/) in bf16, each trained for ``--warmup`` + ``--steps`` steps by
     coe-train's loop on 32 x 512 tokens per step, without evaluation or final checkpoint,
     once per micro-batch size of ``--micro-batches`` (default 32 and 8: the whole step in one
     micro-batch, as a user with one 80 GB GPU would run these models, and the paper's 8 x
     512); reported from its own metrics: median tokens/s, TFLOP/s and MFU over the timed
     steps, peak memory, and the CoE/MoE step-time ratios of the pairs that match expert
     passes or parameters, all measured in this one run.  ``--compare KEY=VALUE ...`` also
     runs every config at the first size with those overrides (an A/B of one setting, e.g.
     ``model.swiglu_fusion=false``, in the same process); repeated, once per setting.
     ``--rounds N`` trains every config N times in turn and pools their timed steps; each
     CoE/MoE step-time ratio is then also given per round, whose spread says how far one
     round's ratio can be trusted.
  c  one layer: benchmarks/coe_layer.py's CoE/MoE pairs (EP = 1, hidden 1024, experts of hidden
     704, 4096 tokens, bf16; fp32 on CPU), run from the checkout.
  d  host work and profile: benchmarks/host_work.py on MoE(8/64) and CoE-2(4/64) at the paper's
     sizes with ``--set`` (but a CUDA graph: it profiles the eager step, whose kernels a graph
     replays), part b's step in micro-batches of the first ``--micro-batches`` size: ops launched
     and device reads per training step, and over two profiled steps the
     GPU time per kernel class (GEMM, attention, element-wise, ...) and the fraction of the
     time some kernel ran (the rest: the GPU waiting for the host), run from the checkout.

``--toy`` shrinks the paper configs keeping their structure (MLA, 63 or 47 routed + 1 shared
expert become 15 or 11 + 1, same top-k and C; 2 layers, hidden 64, 64 tokens, 4 x 64 tokens
per step in micro-batches of 4 and 2) and the layer and host-work benchmarks, so that CI runs
this script end to end on CPU.  The JSON (``--out``, under benchmarks/results/ by default)
names the device, GPU, torch, CUDA, megatron-core and Transformer Engine versions, the layer
implementation and SwiGLU fusion used, and the command; ``targets`` holds each one-GPU target
(MFU, CoE/MoE step time, memory, loss agreement) with its value from this run and whether it
is met (printed at the end too).  A part that fails (or a config of part b) is recorded with
its ``error`` and the others still run; the JSON is written either way, and after each part
and each config of part (b) (``complete`` false until the end), so a run stopped at a time
limit keeps what it measured.  Targets are
measurements: the exit status is 1 only when part (a) fails its tolerance or a part fails.
Every config the asked-for parts would train is built first: one that this device or its
config refuses (``--compare train.cuda_graph=full_iteration`` on CPU, say) stops the check with
the reason and exit status 2 before any run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "coe.yaml"
REFERENCE = ROOT / "tests" / "training" / "reference_losses.json"
PAPER = [("MoE(8/64)", "moe-8of64.yaml"), ("CoE-2(4/64)", "coe-2-4of64.yaml"),
         ("MoE(7/64)", "moe-7of64.yaml"), ("CoE-2(3/64)", "coe-2-3of64.yaml"),
         ("CoE-2(4/48)", "coe-2-4of48.yaml")]
# (CoE, MoE): equal expert passes (10 vs 9 with the shared expert, 8 vs 8), and the
# smaller-CoE comparison (CoE-2(4/48) has 22 % fewer parameters than MoE(8/64))
PAIRS = [("CoE-2(4/64)", "MoE(8/64)"), ("CoE-2(3/64)", "MoE(7/64)"), ("CoE-2(4/48)", "MoE(8/64)")]


def reference_overrides(device: str, steps: int, stop_at: int) -> list[str]:
    """Part (a)'s run, as the reference was made (see reference_losses.json's command) plus
    what a GPU needs to start from the same weights and to skip the checkpoint.  ``stop_at`` <
    ``steps`` ends it early without changing the LR schedule (train.exit_interval)."""
    return [f"device={device}", "parallel.expert=1", f"train.steps={steps}",
            *([f"train.exit_interval={stop_at}"] if stop_at < steps else []),
            "train.eval_interval=12", "checkpoint.save_interval=0",
            "checkpoint.save_final=false", "train.tensorboard=false",
            # the CPU run initialises every weight from the CPU generator; so does this one,
            # with the CPU run's layers (Transformer Engine's initialise differently)
            "model.transformer_overrides={use_cpu_initialization: true}", "model.impl=local"]


def toy_overrides(num_experts: int) -> list[str]:
    """A paper config at CPU size, same structure: MLA, routed experts (N + 1) / 4 - 1 plus the
    shared one, same top-k and iterations, 2 layers."""
    return ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
            "model.ffn_hidden_size=128", "model.seq_length=64", "model.vocab_size=264",
            "model.mla.kv_lora_rank=32", "model.mla.qk_head_dim=16",
            "model.mla.qk_pos_emb_head_dim=8", "model.mla.v_head_dim=16",
            f"model.moe.num_experts={(num_experts + 1) // 4 - 1}",
            "model.moe.expert_hidden_size=32", "model.moe.shared_expert_hidden_size=32"]


def speed_overrides(args, run_dir: Path, micro_batch: int) -> list[str]:
    data = (["data.source=jsonl", f"data.paths=[{json.dumps(str(args.data))}]",
             f"data.text_keys=[{','.join(json.dumps(k) for k in args.text_keys)}]"]
            if args.data else ["data.source=arithmetic", "data.paths=[]"])
    return [f"device={args.device}", "precision=bf16", f"run_dir={run_dir}", *data,
            "data.tokenizer=byte", "data.split=98,1,1",
            f"train.steps={args.warmup + args.steps}", "train.log_interval=1",
            "train.eval_interval=0", "train.eval_iters=1", "train.tensorboard=false",
            f"train.micro_batch_size={micro_batch}",
            f"train.global_batch_size={args.global_batch}",
            "schedule.warmup_steps=0", "checkpoint.save_interval=0",
            "checkpoint.save_final=false", "checkpoint.resume=none"]


def train_run(config, log: Path) -> list[dict]:
    """coe-train's loop on ``config`` in this process (one rank), its output kept in ``log``;
    returns its train and valid records.  Everything it held is released afterwards."""
    import torch
    from megatron.core.transformer.moe import moe_logging

    from megatron_coe import cuda_graph, parallel, train
    from megatron_coe.metrics import read_metrics

    if config.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Megatron's MoE metrics tracker is sized by the first model's layers
    moe_logging.destroy_moe_metrics_tracker()
    from megatron_coe.run_lock import RunDirLock

    lock = RunDirLock(Path(config.run_dir))
    try:
        with open(log, "w") as out, contextlib.redirect_stdout(out):
            train.train(config, lock)
    finally:
        lock.release()
        cuda_graph.release()  # train.cuda_graph's graph and inputs, if any
        parallel.destroy()
        gc.collect()
        if config.device == "cuda":
            torch.cuda.empty_cache()
    return read_metrics(Path(config.run_dir))


def written_choices(run_dir: Path) -> dict:
    """The layer implementation, the SwiGLU, loss and RoPE fusions and their kernels, and the
    CUDA graph a run used, from the config.yaml it wrote (resolved there from auto):
    {"model_impl", "swiglu_fusion", "loss_fusion", "fused_kernels", "rope_fusion",
    "cuda_graph"}, None where absent."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    written = yaml.safe_load(path.read_text()) if path.exists() else {}
    model = written.get("model", {})
    return {"model_impl": model.get("impl"), "swiglu_fusion": model.get("swiglu_fusion"),
            "loss_fusion": model.get("loss_fusion"), "fused_kernels": model.get("fused_kernels"),
            "rope_fusion": (model.get("mla") or {}).get("rope_fusion"),
            "cuda_graph": written.get("train", {}).get("cuda_graph")}


def check_reference(args, work: Path) -> dict:
    """Part (a): the tiny config's losses against the checked-in one-process CPU reference."""
    run_dir = work / "reference"
    config, reference, expected, stop_at = reference_run(args, run_dir)
    records = train_run(config, work / "reference.log")
    got = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    compared = {step: {"loss": got.get(step), "reference": loss,
                       "diff": None if step not in got else got[step] - loss}
                for step, loss in sorted(expected.items()) if step <= stop_at}
    diffs = [abs(c["diff"]) if c["diff"] is not None else float("inf")
             for c in compared.values()]
    worst = max(compared, key=lambda s: diffs[list(compared).index(s)])
    passed = bool(compared) and max(diffs) <= args.tolerance  # a NaN loss fails too
    return {"passed": passed, "tolerance": args.tolerance, "max_abs_diff": max(diffs),
            "set": args.reference_set,
            "worst_step": worst, "steps": compared, **written_choices(run_dir),
            "reference_command": reference["command"],
            "valid_loss": {r["step"]: r["loss"] for r in records if r["kind"] == "valid"}}


def reference_run(args, run_dir: Path):
    """Part (a)'s config (the tiny CoE config as the reference was made, with
    --reference-set), the reference record, its losses by step, and the last step compared."""
    from megatron_coe.config import load_config

    reference = json.loads(Path(args.reference).read_text())["one_process"]
    expected = {int(step): loss for step, loss in reference["train_loss"].items()}
    steps = max(expected)
    stop_at = min(steps, args.reference_steps or steps)
    config = load_config(TINY, [*reference_overrides(args.device, steps, stop_at),
                                *args.reference_set, f"run_dir={run_dir}"])
    return config, reference, expected, stop_at


def paper_config(args, file: str, run_dir: Path, micro_batch: int):
    """Part (b)'s config of one paper config file, at ``micro_batch``, with --set (which
    holds a --compare setting's overrides too when measure_paper runs it)."""
    from megatron_coe.config import load_config

    path = ROOT / "configs" / "paper" / file
    overrides = speed_overrides(args, run_dir, micro_batch)
    if args.toy:
        overrides += toy_overrides(load_config(path, overrides).model.moe.num_experts)
    return load_config(path, overrides + args.set)


def with_overrides(args, overrides: list[str]):
    """``args`` for one --compare setting: its overrides after --set."""
    return argparse.Namespace(**{**vars(args), "set": args.set + overrides})


def settings_error(args) -> str | None:
    """What makes a config that a part would run invalid, or None: every config of the parts
    asked for is built (not run) before any part runs, so a setting this device or config
    refuses stops the check at once instead of after the measurements before it."""
    run_dir = Path(tempfile.gettempdir()) / "coe-gpu-check-settings"  # named, never written
    try:
        if "a" in args.parts:
            try:
                reference_run(args, run_dir)
            except (OSError, KeyError, json.JSONDecodeError):
                pass  # a missing or unreadable reference file: part (a) records it
        if "b" in args.parts:
            m = args.micro_batches[0]
            compared = [with_overrides(args, overrides) for overrides in args.compare]
            for setting, sizes in [(args, args.micro_batches), *((c, [m]) for c in compared)]:
                for size in sizes:
                    for _, file in PAPER:
                        paper_config(setting, file, run_dir, size)
    except ValueError as e:
        return str(e)
    return None


def measure_paper(args, work: Path, progress=None) -> dict:
    """Part (b): every paper config at every micro-batch size; ``by_micro_batch`` maps each
    size (as a string) to its configs' numbers and CoE/MoE ratios.  ``progress`` (if given)
    is called with the results so far after each config."""
    paper = {"warmup_steps": args.warmup, "timed_steps": args.steps,
             "global_batch": args.global_batch, "by_micro_batch": {}}
    for m in args.micro_batches:
        def done_so_far(setting, m=m):
            paper["by_micro_batch"][str(m)] = setting
            if progress:
                progress(paper)
        measure_setting(args, work / f"paper-mb{m}", m, done_so_far)
    m = args.micro_batches[0]
    for i, overrides in enumerate(args.compare):
        other = with_overrides(args, overrides)
        label = " ".join(overrides)

        def compared_so_far(setting, i=i, overrides=overrides):
            default = paper["by_micro_batch"][str(m)]
            paper.setdefault("compare", [])[i:] = [{
                "set": overrides, **setting,
                "step_time_vs_default": step_time_ratios(setting, default),
                "max_abs_loss_diff_vs_default": loss_differences(setting, default)}]
            if progress:
                progress(paper)
        print(f"(b) mb {m:<3d} again with {label}:", flush=True)
        measure_setting(other, work / f"paper-mb{m}-compare{i + 1}", m, compared_so_far)
        diffs = paper["compare"][i]["max_abs_loss_diff_vs_default"]
        for name, r in paper["compare"][i]["step_time_vs_default"].items():
            print(f"(b) mb {m:<3d} {name:12s} with {label}: step time x{r:.3f}, max |loss "
                  f"difference| {diffs[name]:.2e}", flush=True)
    return paper


def step_time_ratios(setting: dict, default: dict) -> dict:
    """Per config measured in both: its median step time in ``setting`` over ``default``."""
    a, b = setting["variants"], default["variants"]
    return {name: a[name]["median_step_s"] / b[name]["median_step_s"] for name in a
            if name in b and "error" not in a[name] and "error" not in b[name]}


def loss_differences(setting: dict, default: dict) -> dict:
    """Per config measured in both: the largest |loss difference| over the steps both logged
    (the same seed and data: near 0 where a setting changes no arithmetic, a CUDA graph say);
    NaN when a loss on either side is not finite."""
    a, b = setting["variants"], default["variants"]
    out = {}
    for name in a:
        if name not in b or "error" in a[name] or "error" in b[name]:
            continue
        x, y = (dict(zip(v["loss_steps"], v["losses"])) for v in (a[name], b[name]))
        diffs = [abs(x[step] - y[step]) for step in sorted(x.keys() & y.keys())]
        out[name] = (max(diffs) if diffs and all(math.isfinite(d) for d in diffs)
                     else float("nan"))
    return out


def measure_setting(args, work: Path, micro_batch: int, progress) -> dict:
    """Each paper config trained for warmup + steps steps in micro-batches of ``micro_batch``
    sequences, one config after the other.  A config that fails (runs out of device memory,
    mostly) is recorded with its ``error`` and left out of the ratios; the others still run.
    ``progress`` is called with the setting's results after each config and at the end."""
    import torch

    from megatron_coe.metrics import parameter_count, train_flops_per_token

    variants, ratios = {}, {}
    setting = {"micro_batch_size": micro_batch, "rounds": args.rounds, "variants": variants,
               "ratios": ratios}
    work.mkdir()
    rounds: dict[str, list[list[dict]]] = {name: [] for name, _ in PAPER}  # train records
    for turn in range(args.rounds):
        for name, file in PAPER:
            if "error" in variants.get(name, {}):
                continue  # failed in an earlier round
            run_dir = work / (file.removesuffix(".yaml")
                              + (f"-round{turn + 1}" if args.rounds > 1 else ""))
            config = paper_config(args, file, run_dir, micro_batch)
            began = time.perf_counter()
            try:
                rounds[name].append([r for r in train_run(config, run_dir.with_suffix(".log"))
                                     if r["kind"] == "train"])
            except Exception as e:  # out of memory, mostly: the other configs still run
                variants[name] = {"config": f"configs/paper/{file}", "error": one_line(e)}
                print(f"(b) mb {micro_batch:<3d} {name:12s} {variants[name]['error']}",
                      flush=True)
            if "error" in variants.get(name, {}):
                # train_run freed what it could while the exception held the run's frames;
                # the rest goes now that the exception is gone
                gc.collect()
                if config.device == "cuda":
                    torch.cuda.empty_cache()
                progress(setting)
                continue
            wall = time.perf_counter() - began + variants.get(name, {}).get("wall_s", 0.0)
            variants[name] = {"config": f"configs/paper/{file}", **written_choices(run_dir),
                              "parameters": parameter_count(config),
                              "flops_per_token": train_flops_per_token(config),
                              **_pooled(rounds[name], args.warmup,
                                        config.train.global_batch_size
                                        * config.model.seq_length),
                              "wall_s": wall}
            v = variants[name]
            print(f"(b) mb {micro_batch:<3d} {name:12s} "
                  + (f"round {turn + 1}/{args.rounds}: " if args.rounds > 1 else "")
                  + f"{v['tokens_per_s']:10,.0f} tokens/s  {v['tflops']:7.2f} TFLOP/s  MFU "
                  + (f"{v['mfu'] * 100:5.2f} %" if v["mfu"] is not None else "  n/a  ")
                  + f"  peak {v['peak_mem_gib']:.2f} GiB  step {v['median_step_s'] * 1e3:.0f} "
                  f"ms ({v['model_impl']}, SwiGLU fusion {v['swiglu_fusion']}, loss fusion "
                  f"{v['loss_fusion']}, kernels {v['fused_kernels']}, RoPE fusion "
                  f"{v['rope_fusion']}, CUDA graph {v['cuda_graph']})", flush=True)
            progress(setting)
    for coe, moe in PAIRS:
        if "error" in variants[coe] or "error" in variants[moe]:
            continue
        c, m = variants[coe], variants[moe]
        ratios[f"{coe} / {moe}"] = r = {
            "step_time": c["median_step_s"] / m["median_step_s"],
            "flops_per_token": c["flops_per_token"] / m["flops_per_token"],
            "parameters": c["parameters"] / m["parameters"],
            "peak_memory": c["peak_mem_gib"] / m["peak_mem_gib"]}
        if args.rounds > 1:
            r["step_time_by_round"] = [a / b for a, b in zip(c["round_median_step_s"],
                                                             m["round_median_step_s"])]
        print(f"(b) mb {micro_batch:<3d} {coe} / {moe}: step time {r['step_time']:.3f}"
              + (" (rounds: " + ", ".join(f"{x:.3f}" for x in r["step_time_by_round"]) + ")"
                 if args.rounds > 1 else "")
              + f", FLOPs per token {r['flops_per_token']:.3f}, parameters "
              f"{r['parameters']:.3f}, peak memory {r['peak_memory']:.3f}", flush=True)
    progress(setting)
    return setting


def _pooled(runs: list[list[dict]], warmup: int, tokens_per_step: int) -> dict:
    """One config's numbers over its runs (rounds) of the same steps: medians over every timed
    step (after ``warmup``) of every run, each run's median step time, the peak memory of any,
    and the first run's losses (every run trains the same steps on the same data)."""
    timed = [r for records in runs for r in records if r["step"] > warmup]
    median = {k: statistics.median(r[k] for r in timed) if timed and timed[0].get(k)
              is not None else None for k in ("tokens_per_s", "tflops_per_device", "mfu")}
    return {
        "tokens_per_step": tokens_per_step,
        "median_step_s": tokens_per_step / median["tokens_per_s"],
        "tokens_per_s": median["tokens_per_s"], "tflops": median["tflops_per_device"],
        "mfu": median["mfu"], "peak_mem_gib": max(r["mem_gib"] for rs in runs for r in rs),
        "step_s": [tokens_per_step / r["tokens_per_s"] for r in timed],
        "round_median_step_s": [
            statistics.median(tokens_per_step / r["tokens_per_s"] for r in records
                              if r["step"] > warmup) for records in runs],
        "losses": [r["loss"] for r in runs[0]], "loss_steps": [r["step"] for r in runs[0]],
        **{k: statistics.median(r[k] for r in timed) for k in timed[0]
           if k.startswith("gpu_") and isinstance(timed[0][k], (int, float))}}


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def run_benchmark(name: str, options: list[str], work: Path) -> tuple[dict, str]:
    """benchmarks/<name>.py with ``options`` in a process of its own, from the checkout; returns
    (its JSON's first result, its command as a user would type it)."""
    script = ROOT / "benchmarks" / f"{name}.py"
    out = work / f"{name}.json"
    cmd = [sys.executable, str(script), *options, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / f"{name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks/{name}.py failed ({done.returncode}):\n"
                           + (done.stdout + done.stderr)[-3000:])
    (result,) = json.loads(out.read_text())["results"]
    return result, " ".join(shlex.quote(c) for c in ["python", f"benchmarks/{name}.py",
                                                      *options])


def layer_pairs(args, work: Path) -> dict:
    """Part (c): benchmarks/coe_layer.py's pairs, in a process of its own."""
    if not (ROOT / "benchmarks" / "coe_layer.py").exists():
        return {"skipped": "benchmarks/ not found: run from a checkout of the repository"}
    sizes = (["--hidden", "32", "--expert-hidden", "16", "--tokens", "64", "--repeat", "1",
              "--warmup", "0"] if args.toy else
             ["--hidden", "1024", "--expert-hidden", "704", "--tokens", "4096", "--repeat", "10",
              "--warmup", "3"])
    # bf16 on the GPU; fp32 on CPU, whose bf16 matmuls would only slow the dry run down
    precision = "bf16" if args.device == "cuda" else "fp32"
    result, command = run_benchmark("coe_layer", [
        "--ep", "1", "--device", args.device, "--precision", precision, "--sections", "pairs",
        *sizes], work)
    pairs = [{k: p[k] for k in ("pair", "median_s", "ratio", "activation_bytes")}
             for p in result["pairs"]]
    for p in pairs:
        print(f"(c) {p['pair']:28s} CoE/MoE {p['ratio']:.3f} ({p['median_s'][0] * 1e3:.2f} / "
              f"{p['median_s'][1] * 1e3:.2f} ms)", flush=True)
    return {"command": command, "pairs": pairs}


def host_profile(args, work: Path) -> dict:
    """Part (d): benchmarks/host_work.py on MoE(8/64) and CoE-2(4/64) with --set: launches and
    device reads per step, time per kernel class, the fraction of the time the GPU is busy.
    A train.cuda_graph setting is left out (its kernels are the eager step's, and host_work
    times eager steps only); the result names what was left out."""
    if not (ROOT / "benchmarks" / "host_work.py").exists():
        return {"skipped": "benchmarks/ not found: run from a checkout of the repository"}
    options = ["--device", args.device, "--configs", "MoE(8/64)", "CoE-2(4/64)", "--profile"]
    options += ["--warmup", "0", "--steps", "1"] if args.toy else ["--full-size"]
    if args.trace:
        options += ["--trace", str(args.trace.resolve())]
    graph = [kv for kv in args.set if kv.split("=", 1)[0] == "train.cuda_graph"]
    options += ["--set", *(["model.num_layers=2"] if args.toy else []),
                *(kv for kv in args.set if kv not in graph),
                f"train.global_batch_size={args.global_batch}",
                f"train.micro_batch_size={args.micro_batches[0]}"]
    result, command = run_benchmark("host_work", options, work)
    if graph:
        result["left_out"] = graph
    for name, r in result["configs"].items():
        p = r["profile"]
        busy = p["busy_fraction"]
        print(f"(d) {name:12s} {sum(r['launches'].values())} launches and "
              f"{sum(r['syncs'].values())} device reads per step; "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in list(p["ms_per_step"].items())[:5])
              + (f"; GPU busy {busy * 100:.0f} % of the time" if busy is not None else ""),
              flush=True)
    return {"command": command, **result}


# (name, how to read it from part b's numbers at one micro-batch size, comparison, target)
SPEED_TARGETS = [
    ("MoE(8/64) MFU", lambda s: s["variants"]["MoE(8/64)"]["mfu"], ">=", 0.25),
    ("CoE-2(4/64) MFU", lambda s: s["variants"]["CoE-2(4/64)"]["mfu"], ">=", 0.23),
    ("CoE-2(4/64) / MoE(8/64) step time",
     lambda s: s["ratios"]["CoE-2(4/64) / MoE(8/64)"]["step_time"], "<=", 1.12),
    ("CoE-2(3/64) / MoE(7/64) step time (equal FLOPs)",
     lambda s: s["ratios"]["CoE-2(3/64) / MoE(7/64)"]["step_time"], "<=", 1.05),
    ("CoE-2(4/48) peak memory / MoE(8/64)",
     lambda s: s["variants"]["CoE-2(4/48)"]["peak_mem_gib"]
     / s["variants"]["MoE(8/64)"]["peak_mem_gib"], "<=", 0.85),
]
LOSS_TARGET = "tiny fp32 losses vs CPU reference, max |difference|"


def targets(result: dict, args) -> list[dict]:
    """Issue 17's targets for one GPU, each read from this run's own numbers: value, target and
    whether it is met.  ``met`` is None where the run has no value (a part not run, MFU without
    a known peak) and for part (b) unless it ran the paper's sizes on a GPU (``--toy`` or CPU
    numbers are printed, not judged)."""
    def entry(measure, value, op, target, judged):
        met = None
        if value is not None and judged:
            met = value >= target if op == ">=" else value <= target
        return {"measure": measure, "value": value, "target": f"{op} {target:g}", "met": met}

    def speed(read, setting):
        try:  # None where the run has no value (a config out of memory)
            return read(setting) if setting else None
        except KeyError:
            return None

    out = []
    for m in args.micro_batches:
        setting = result.get("paper", {}).get("by_micro_batch", {}).get(str(m))
        for name, read, op, target in SPEED_TARGETS:
            out.append(entry(f"{name}, micro-batch {m}", speed(read, setting), op, target,
                             args.device == "cuda" and not args.toy))
    value = result.get("reference", {}).get("max_abs_diff")
    out.append(entry(LOSS_TARGET, value, "<=", args.tolerance, True))
    return out


def environment(device: str) -> dict:
    import torch

    def version(dist: str, module: str) -> str | None:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
        try:
            return __import__(module, fromlist=["__version__"]).__version__
        except Exception:  # absent, or broken for this torch: report it as absent
            return None

    return {
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "megatron_core": version("megatron-core", "megatron.core"),
        "transformer_engine": version("transformer-engine", "transformer_engine"),
    }


def default_out(args) -> Path:
    return ROOT / "benchmarks" / "results" / f"gpu_check_{args.device}{'_toy' if args.toy else ''}.json"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="coe-gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--toy", action="store_true",
                   help="shrink part b and c to CPU sizes, keeping the configs' structure")
    p.add_argument("--parts", nargs="+", choices=("a", "b", "c", "d"),
                   default=["a", "b", "c", "d"])
    p.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/"
                   "gpu_check_<device>[_toy].json)")
    p.add_argument("--data", type=Path, help="a jsonl file for part b (default: the built-in "
                   "arithmetic source)")
    p.add_argument("--text-keys", nargs="+", default=["text"], help="--data's text field(s)")
    p.add_argument("--reference", type=Path, default=REFERENCE,
                   help="reference losses (JSON with a one_process.train_loss table)")
    p.add_argument("--reference-steps", type=int,
                   help="stop part a after this many of the reference's steps (default: all)")
    p.add_argument("--reference-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="part a: overrides for the tiny run, e.g. model.fused_kernels=compile "
                   "model.loss_fusion=true model.swiglu_fusion=true to check those kernels "
                   "against the CPU reference")
    p.add_argument("--tolerance", type=float, default=5e-3)
    p.add_argument("--warmup", type=int, default=3, help="part b: untimed steps per config")
    p.add_argument("--steps", type=int, default=10, help="part b: timed steps per config")
    p.add_argument("--rounds", type=int, default=1, help="part b: train every config this many "
                   "times in turn (each config once, then each again, ...), pooling their timed "
                   "steps; the CoE/MoE step-time ratios are also given per round")
    p.add_argument("--global-batch", type=int,
                   help="part b and d: sequences per step (default 32; 4 with --toy)")
    p.add_argument("--micro-batches", type=int, nargs="+", metavar="N",
                   help="part b: sequences per micro-batch, one run of every config per size; "
                   "part d uses the first (default 32 8; 4 2 with --toy)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more overrides for part b's configs")
    p.add_argument("--compare", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="part b: also run every config at the first micro-batch size with these "
                   "overrides (e.g. model.swiglu_fusion=false) and report each config's step "
                   "time against the default's (paper.compare, one entry per --compare; give "
                   "--compare again for another setting)")
    p.add_argument("--trace", type=Path, metavar="DIR", help="part d: also write each "
                   "config's profiler trace to DIR/<config>.json.gz (Perfetto, chrome://tracing)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (run logs)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or (args.reference_steps or 1) < 1:
        p.error("--steps, --rounds and --reference-steps must be >= 1, --warmup >= 0")
    if args.tolerance <= 0:
        p.error("--tolerance must be > 0")
    if args.global_batch is None:
        args.global_batch = 4 if args.toy else 32
    if args.global_batch < 1:
        p.error("--global-batch must be >= 1")
    for option, given in (("set", args.set), ("compare", sum(args.compare, []))):
        fixed = [kv for kv in given if kv.split("=", 1)[0] in (
            "train.micro_batch_size", "train.global_batch_size")]
        if fixed:
            p.error(f"--{option} {' '.join(fixed)}: use --micro-batches and --global-batch")
    for option, given in (("compare", sum(args.compare, [])),
                          ("reference_set", args.reference_set)):
        bare = [kv for kv in given if "=" not in kv]
        if bare:
            p.error(f"--{option.replace('_', '-')} {' '.join(bare)}: give KEY=VALUE")
    if args.micro_batches is None:
        args.micro_batches = [4, 2] if args.toy else [32, 8]
    bad = [m for m in args.micro_batches if m < 1 or args.global_batch % m]
    if bad or len(set(args.micro_batches)) < len(args.micro_batches):
        p.error(f"--micro-batches {args.micro_batches}: each must divide --global-batch "
                f"{args.global_batch}, once")
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    return args


def save(result: dict, args, out: Path, began: float, parts: dict, complete: bool) -> None:
    """The verdict, the targets and the time so far into ``result``, written to ``out``
    (``complete`` False while parts remain to run)."""
    failed = [key for key, _ in parts.values() if "error" in result.get(key, {})]
    result["passed"] = result.get("reference", {}).get("passed", True) and not failed
    result["targets"] = targets(result, args)
    result["complete"] = complete
    result["wall_s"] = time.perf_counter() - began
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("coe-gpu-check: --device cuda but no CUDA GPU is visible; use --device cpu "
              "--toy for the CPU dry run", file=sys.stderr)
        return 2
    error = settings_error(args)
    if error is not None:
        print(f"coe-gpu-check: a config of the parts asked for is invalid here, before any "
              f"run: {error}", file=sys.stderr)
        return 2
    out = args.out or default_out(args)
    began = time.perf_counter()
    result = {"command": " ".join(["python -m megatron_coe.gpu_check",
                                   *map(shlex.quote, argv)]).strip(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **environment(args.device), "toy": args.toy}
    print(f"coe-gpu-check: {result['gpu'] or 'CPU'}, torch {result['torch']}, megatron-core "
          f"{result['megatron_core']}, Transformer Engine {result['transformer_engine']}",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="coe-gpu-check-"))
    progress = {}  # part (b)'s results so far, kept if the part then fails

    def paper_so_far(paper):
        progress["paper"] = paper
        save({**result, "paper": paper}, args, out, began, parts, complete=False)

    parts = {"a": ("reference", check_reference),
             "b": ("paper", lambda args, work: measure_paper(args, work, paper_so_far)),
             "c": ("layer", layer_pairs), "d": ("host", host_profile)}
    try:
        for part in args.parts:
            key, measure = parts[part]
            try:
                result[key] = measure(args, work)
            except Exception as e:  # a part that fails leaves the others' results intact
                # the message's end holds the cause (a benchmark's own traceback, say)
                result[key] = {**progress.get(key, {}), "error": one_line(e),
                               "detail": str(e)[-3000:]}
                print(f"({part}) failed: {result[key]['detail']}", flush=True)
                save(result, args, out, began, parts, complete=False)
                continue
            if part == "a":
                a = result["reference"]
                print(f"(a) tiny CoE, fp32, {args.device}, {a['model_impl']}: max |loss - "
                      f"reference| {a['max_abs_diff']:.2e} at step {a['worst_step']} over "
                      f"{len(a['steps'])} steps (tolerance {a['tolerance']:g}): "
                      f"{'PASS' if a['passed'] else 'FAIL'}", flush=True)
            # written after each part, so that a run stopped at a time limit keeps what it has
            save(result, args, out, began, parts, complete=False)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    save(result, args, out, began, parts, complete=True)
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        verdict = {True: "met", False: "MISSED",
                   None: "not judged" if t["value"] is not None else "not measured"}[t["met"]]
        print(f"target: {t['measure']:64s} {value:>9s} (target {t['target']}): {verdict}",
              flush=True)
    print(f"coe-gpu-check: {'PASS' if result['passed'] else 'FAIL'} in {result['wall_s']:.0f} s; "
          f"results in {out}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
