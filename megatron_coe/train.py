"""coe-train: pretrain a CoE (or MoE, or dense) GPT on Megatron-Core from one YAML config.

    torchrun --nproc-per-node 2 -m megatron_coe.train configs/tiny/coe.yaml [key=value ...]
    coe-train CONFIG.yaml run_dir=/some/path train.steps=100

The loop, top to bottom:
  1. config: strict YAML + overrides; any bad value stops here, before process groups.
  2. process groups (Megatron-Core), run directory (locked: one training at a time; see
     run_lock.py).
  3. data: tokenizer and indexed dataset prepared in the run directory; Megatron GPT datasets.
  4. model (CoE layers via our module spec), Float16Module for bf16, Megatron DDP, optimizer,
     LR scheduler; resume from the latest checkpoint if there is one; the resolved config is
     written into the run directory.
  5. steps: Megatron's forward-backward schedule over the micro-batches (the next step's are
     read meanwhile), then - only if the loss and every gradient are finite - the optimizer
     step; else the step is skipped and counted.
     Log line / metrics.jsonl / TensorBoard every log_interval; validation every eval_interval;
     checkpoint every save_interval; SIGTERM/SIGINT -> checkpoint and exit.
  6. final validation and checkpoint (unless checkpoint.save_final is false).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="coe-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_args(argv)


class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop checkpoints and exits at the next step boundary
    (all ranks agree through an all-reduce, so they stop at the same step)."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def forward_step(data_iterator, model, inject_nan=False):
    """One micro-batch: returns the per-token losses and the function reducing them."""
    from megatron_coe import cpu

    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    device = next(model.parameters()).device
    # from page-locked memory (a CUDA run's batches) the copy is queued, no stream sync
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    cp_group = parallel_state.get_context_parallel_group()
    if cp_group.size() > 1:  # this rank's 2 of the sequence's 2*CP chunks (load-balanced)
        batch = get_batch_on_this_cp_rank({**batch, "cu_seqlens": None}, False, cp_group)
    with cpu.outside_cuda_to_cpu():  # the schedule needs the CUDA remapping, the model does not
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()

    def loss_func(per_token):
        loss_sum = (per_token.float() * loss_mask).sum()
        count = loss_mask.sum()
        loss = loss_sum / _sum_over(count.detach().clone(), cp_group)  # the sequence's mean
        if inject_nan:
            loss = loss * float("nan")
        # report (sum, count) so the mean over micro-batches and ranks is exact
        return loss, {"lm loss": torch.stack([loss_sum.detach().clone(), count])}

    return output, loss_func


def _sum_over(x: torch.Tensor, group) -> torch.Tensor:
    """``x`` summed over ``group``.  With context parallelism every rank's loss is its tokens'
    loss sum over the whole sequence's count; Megatron's schedule multiplies it by the CP size
    and DDP averages over data x context parallel ranks, which makes it the sequence mean."""
    import torch.distributed as dist

    if group.size() > 1:
        dist.all_reduce(x, group=group)
    return x


def run_schedule(model, batches, config, forward_only, inject_nan=False, captured=None):
    """Megatron's forward-backward schedule; returns the (sum, count) of the loss over this
    rank's micro-batches, on the device.  ``captured`` (a cuda_graph.CapturedSchedule) runs a
    training step as a CUDA graph; forward-only and fault-injection calls run eagerly."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_coe import cpu

    t = config.train
    schedule = get_forward_backward_func()
    if captured is not None and not forward_only and not inject_nan:
        schedule = captured
    with cpu.cuda_to_cpu():
        reports = schedule(
            forward_step_func=partial(forward_step, inject_nan=inject_nan),
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=len(batches),
            seq_length=config.model.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )
    total = None
    for report in reports:  # empty on pipeline stages without the loss
        loss = report["lm loss"].float()
        total = loss if total is None else total + loss
    # summed where the losses are, in micro-batch order; not read here (the caller reads it
    # once, after its all-reduce)
    return torch.zeros(2) if total is None else total


def first_nonfinite_layer(layers) -> str | None:
    """The first CoE layer and iteration (forward order) with non-finite values this step."""
    for layer in layers:
        where = layer.first_nonfinite()
        if where:
            return where
    return None


def train(config, lock) -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_coe import checkpoint, cuda_graph, parallel, router_stats, run_lock
    from megatron_coe.config import dump_config
    from megatron_coe.data import dataset
    from megatron_coe.metrics import (GPUTelemetry, MetricsWriter, format_line, memory_gib,
                                      peak_tflops, train_flops_per_token)
    from megatron_coe.model import build_model, coe_layers, with_resolved_impl
    from megatron_coe.optim import build_optimizer, wrap_model
    from megatron_coe.optim_step import mean_loss_over_dp, runs_on_device, take_step
    from megatron_coe.step_profiler import StepProfiler

    stop = StopRequest()  # now: a stop signal during start-up stops at the first step

    # 2. process groups, layer implementation (before any work: config.yaml records it), run
    # directory
    device = parallel.initialize(config)
    cuda_graph.use_stream(config)  # with train.cuda_graph: the capture stream, from the start
    config = with_resolved_impl(config)
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(config.run_dir)
    # one training per run directory; resume=none never silently replaces a run
    run_lock.claim(lock, run_dir, config.checkpoint.resume, config.checkpoint.overwrite, rank)
    checkpoint.check_writable(run_dir / "checkpoints")  # now, not at the first save

    # 3. data
    tokenizer, prefixes = dataset.prepare(config, run_dir)
    train_ds, valid_ds, _ = dataset.build_datasets(config, run_dir, tokenizer, prefixes)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    t = config.train
    num_micro = t.global_batch_size // (t.micro_batch_size * dp_size)

    def batches_at(ds, first_sample):
        batches = dataset.micro_batches(ds, first_sample, t.global_batch_size,
                                        t.micro_batch_size, dp_rank, dp_size)
        if device.type == "cuda":  # page-locked: their copies to the GPU do not wait for it
            return [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return list(batches)

    # 4. model, optimizer, scheduler, resume
    gpt = build_model(config)
    layers = coe_layers(gpt)
    model = wrap_model(config, gpt)
    optimizer, scheduler = build_optimizer(config, model)
    ckpt_root = run_dir / "checkpoints"
    data_record = dataset.prepared_record(run_dir)  # saved with every checkpoint's state
    state = {"step": 0, "skipped_steps": 0, "consumed_samples": 0, "data": data_record}
    resume_from = checkpoint.find_resume(config, ckpt_root)
    if resume_from is not None:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, config)
        dataset.check_resume(state.get("data"), data_record, resume_from)
        state["data"] = data_record
        if rank == 0:
            print(f"resumed from {resume_from} at step {state['step']}", flush=True)
            if config.checkpoint.resume not in ("auto", "none"):
                for moved in checkpoint.set_aside_newer(ckpt_root, state["step"]):
                    print(f"rolled back: later checkpoint kept aside as {moved}", flush=True)
        dist.barrier()
    if rank == 0:  # only now: a run that fails to start leaves the run directory as it was
        if config.checkpoint.overwrite:
            moved = run_lock.set_previous_run_aside(run_dir)
            if moved:
                print(f"checkpoint.overwrite: previous run moved to {moved}", flush=True)
        (run_dir / "config.yaml").write_text(dump_config(config))

    step_on_device = runs_on_device(optimizer, config, device)  # all ranks agree, once
    if rank == 0:
        print("optimizer step: " + ("on the device (torch's fused AdamW clips and skips a "
                                    "non-finite step itself; one host read per step)"
                                    if step_on_device else "Megatron's optimizer.step(), "
                                    "after the loss and the gradient check are read"),
              flush=True)
    saved_step = state["step"] if resume_from is not None else None
    saver = checkpoint.Saver(ckpt_root, config, device)

    def save():
        # never rewrite a checkpoint of the same step (e.g. the resumed one, or a stop that
        # lands on a save_interval step): replacing it would briefly leave none
        nonlocal saved_step
        if saved_step != state["step"]:
            began = time.time()
            path = saver.save(state["step"], model, optimizer, scheduler, state)
            saved_step = state["step"]
            if rank == 0:
                print(f"checkpoint {path.name} saved in {time.time() - began:.2f}s" if path else
                      f"checkpoint step {state['step']}: state copied in "
                      f"{time.time() - began:.2f}s, writing in the background", flush=True)

    def evaluate():
        model.eval()
        total = torch.zeros(2)
        with torch.no_grad():
            for i in range(t.eval_iters):
                total += run_schedule(model, batches_at(valid_ds, i * t.global_batch_size),
                                      config, forward_only=True).cpu()
        model.train()
        router_stats.reset(layers)
        loss = mean_loss_over_dp(total, device)
        if rank == 0:
            print(f"validation at step {state['step']}: loss {loss:.4f} "
                  f"ppl {math.exp(min(loss, 50)):.2f}", flush=True)
            writer.write({"kind": "valid", "step": state["step"], "loss": loss})
        return loss

    writer = MetricsWriter(run_dir, t.tensorboard) if rank == 0 else None
    telemetry = GPUTelemetry(device)
    flops_per_token, peak = train_flops_per_token(config), peak_tflops(config)
    fp16 = config.precision == "fp16"
    tokens_per_step = t.global_batch_size * config.model.seq_length
    started, start_step = time.time(), state["step"]
    if rank == 0:
        params = sum(p.numel() for p in gpt.parameters())
        print(f"run_dir {run_dir} | world {world} (dp {dp_size}, ep {config.parallel.expert}) | "
              f"params on rank 0: {params / 1e6:.2f}M | {flops_per_token / 1e6:.2f} MFLOP/token "
              f"| steps {state['step']}->{t.steps}", flush=True)

    # 5. steps (with train.cuda_graph, the forward-backward is a CUDA graph after the warm-up)
    captured = (cuda_graph.CapturedSchedule(t.cuda_graph_warmup_steps)
                if cuda_graph.enabled(config) else None)
    batches = batches_at(train_ds, state["step"] * t.global_batch_size)
    profiler = StepProfiler(config, rank, run_dir, device)  # train.profile_steps
    while state["step"] < t.steps:
        step_start = time.time()
        step = state["step"] + 1
        profiler.before(step, ready=captured is None or captured.captured())
        router_stats.reset(layers)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        total = run_schedule(model, batches, config, forward_only=False,
                             inject_nan=step in t.inject_nonfinite_steps, captured=captured)
        # the next step's micro-batches (a pure function of the step), built on the host while
        # a GPU still runs this one, instead of while it waits for them
        batches = batches_at(train_ds, step * t.global_batch_size) if step < t.steps else None
        # A non-finite loss or gradient never reaches the weights (optim_step.py).  Under fp16
        # an overflowed gradient is the loss scaler's to handle: the optimizer skips the step,
        # lowers the scale, and the run goes on (counted apart, unless the scale is at its
        # minimum).
        lr = optimizer.param_groups[0]["lr"]  # the LR this step uses (the scheduler moves after)
        result = take_step(model, optimizer, scheduler, total, config, device)
        loss, grad_norm, finite = result.loss, result.grad_norm, result.finite
        if result.overflow:  # skipped, but not a non-finite step
            state["overflow_steps"] = state.get("overflow_steps", 0) + 1
            if rank == 0:
                print(f"step {step}: fp16 gradient overflow at loss scale "
                      f"{result.loss_scale:g}; optimizer step skipped, scale lowered", flush=True)
        state["step"] = step
        state["consumed_samples"] += t.global_batch_size
        if not finite:
            state["skipped_steps"] += 1
            where = first_nonfinite_layer(layers)
            if rank == 0 or where:
                print(f"[rank {rank}] step {step}: non-finite loss or gradient (loss {loss}"
                      + (f"; first non-finite values in {where}" if where else "")
                      + f"); optimizer step skipped ({state['skipped_steps']} so far)", flush=True)
            if state["skipped_steps"] > t.max_nonfinite_steps:
                saver.finish()  # every rank stops here: a background save completes first
                raise RuntimeError(
                    f"{state['skipped_steps']} non-finite steps exceed "
                    f"train.max_nonfinite_steps={t.max_nonfinite_steps}; stopping. Lower the "
                    "learning rate or check the data; the last checkpoint is intact.")

        if step % t.log_interval == 0 or step == t.steps:
            stats = router_stats.iteration_stats(layers, num_micro)
            elapsed = time.time() - step_start
            done = step - start_step
            record = {
                "kind": "train", "step": step, "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_step / elapsed,
                "tflops_per_device": flops_per_token * tokens_per_step / elapsed / world / 1e12,
                "skipped_steps": state["skipped_steps"],
                **({"loss_scale": optimizer.get_loss_scale().item(),
                    "overflow_steps": state.get("overflow_steps", 0)} if fp16 else {}),
                "eta_s": (time.time() - started) / done * (t.steps - step),
                **memory_gib(device), **telemetry.read(), **stats,
            }
            record["mfu"] = record["tflops_per_device"] / peak if peak else None
            if rank == 0:
                print(format_line(record, t.steps), flush=True)
                writer.write(record)
        profiler.after(step)
        if t.eval_interval and step % t.eval_interval == 0 and step < t.steps:
            evaluate()
        ck = config.checkpoint
        if ck.save_interval and step % ck.save_interval == 0 and step < t.steps:
            save()
        saver.poll()  # finalizes a background save once every rank has written it
        exit_now = t.exit_interval and step % t.exit_interval == 0 and step < t.steps
        if stop.agreed(device) or exit_now:
            profiler.close()
            save()
            saver.finish()
            if rank == 0:
                why = "exit_interval reached" if exit_now else "stop requested"
                print(f"{why}: checkpoint saved at step {step}, exiting", flush=True)
            return 0

    # 6. the end
    evaluate()
    if config.checkpoint.save_final:
        save()
    saver.finish()
    if rank == 0:
        writer.close()
        print(f"done: {t.steps} steps in {time.time() - started:.1f}s, "
              + (f"checkpoint {ckpt_root / f'step_{t.steps:07d}'}" if config.checkpoint.save_final
                 else "no final checkpoint (checkpoint.save_final=false)"), flush=True)
    return 0


def clean_error(message: str) -> int:
    """Report an error that needs no traceback; returns coe-train's exit code for it, 2.
    Under torchrun the message also goes to torchelastic's error file (the format its
    ErrorHandler writes), so the launcher's one-line report and torchrun's summary show it."""
    print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": message, "extraInfo": {
            "py_callstack": message, "timestamp": str(int(time.time()))}}}
        try:
            Path(error_file).write_text(json.dumps(record))
        except OSError:  # the message is on stderr anyway
            pass
    return 2


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Megatron-Core warns at import about TE/apex fallbacks that a CPU run uses on purpose.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_coe.checkpoint import CheckpointError, join_writers
    from megatron_coe.step_profiler import close_open
    from megatron_coe.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except ValueError as err:
        return clean_error(f"coe-train: bad config: {err}")
    from megatron_coe import parallel
    from megatron_coe.run_lock import RunDirLock

    lock = RunDirLock(Path(config.run_dir))
    try:
        return train(config, lock)
    except (CheckpointError, ValueError) as err:
        return clean_error(f"coe-train: {err}")
    finally:
        close_open()  # a run that failed while profiling still writes its trace
        join_writers()  # a background save ends before the run directory is free
        lock.release()
        parallel.destroy()


if __name__ == "__main__":
    sys.exit(main())
