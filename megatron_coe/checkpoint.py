"""Checkpoints: Megatron's distributed (sharded) format, written atomically, validated on load.

Layout of ``run_dir/checkpoints``::

    step_0000020/            a complete checkpoint
        <Megatron dist_checkpointing files: model + optimizer, sharded>
        rng_rank{r}.pt       each rank's RNG states (tensors and ints only: weights-only load)
        coe_meta.json        written last: step, data position, scheduler, model definition,
                             parallel layout, optimizer lr/min_lr, and the size and SHA-256 of
                             every file (a manifest)
    .tmp_step_0000040/       a save in progress; renamed to step_0000040 only when complete
    abandoned/               checkpoints set aside by a roll-back (never deleted)

Saving (:class:`Saver`): synchronous, or with ``checkpoint.async_save`` the state is copied to
host memory at the save step, written by a background thread while training goes on, and
finalized (Megatron's ``.metadata``, the manifest, the rename) at the first step boundary after
every rank's writer is done, before the next save, and at exit.  Either way a checkpoint is
complete or absent: a run killed mid-save leaves only a ``.tmp_step_*`` directory, which resume
ignores and the next save removes.  A failed save (e.g. a full disk) removes its partial files,
says why, and leaves the earlier checkpoints intact.

Resume restores model, optimizer, LR scheduler, RNG and the data position (the step: batches
are a pure function of it, see data/dataset.py).  Before reading any tensor, a checkpoint is
checked: the manifest must match the files on disk (a truncated or missing file is named), its
model definition must equal the config's (a different parallel layout is fine, Megatron
reshards; a different model shape is refused with every differing field), and so must
``optimizer.lr`` / ``min_lr`` (Megatron matches optimizer state to parameter groups by them).
The LR schedule's length and warmup follow the config, as with Megatron-LM's
``--override-opt_param-scheduler``: a resume with a larger ``train.steps`` stretches the decay
over the new length (announced at start-up).  Nothing in the run directory is modified by a
failed load.

Loading reads pickles only through :mod:`megatron_coe.safe_reader` (an allow-list for the
format's metadata, weights-only for its non-tensor items), so a crafted checkpoint's code does
not run; it is refused with the reason.  The manifest is no protection against a deliberately
edited checkpoint (it can be rewritten too): load only checkpoints you trust.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_coe import cpu, safe_reader
from megatron_coe.config import Config, grouped_experts

META = "coe_meta.json"
FORMAT = 1  # of coe_meta.json
STEP_DIR = re.compile(r"^step_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def model_definition(config: Config) -> dict:
    """Everything that fixes parameter shapes and the layer's math (not the parallel layout)."""
    m = asdict(config.model)
    m.pop("transformer_overrides")
    m.pop("seq_length")
    # the spec is not the model: Megatron maps the local spec's keys onto Transformer Engine's
    # (gpt_layer_specs' sharded_state_dict_keys_map), and both expert layouts write
    # SequentialMLP's checkpoint format
    m.pop("impl")
    m.pop("swiglu_fusion")  # the same math as fused kernels or as separate ops
    m.pop("loss_fusion")  # likewise
    m.pop("fused_kernels")  # which kernels compute that math
    if config.model.attention != "mla":
        m.pop("mla")
    else:
        m["mla"].pop("rope_fusion")  # which kernels compute RoPE
    if m["coe"] is not None and not m["coe"]["iteration_norm"]:
        m["coe"].pop("iteration_norm")  # off: the same model as checkpoints made before it
    for section in ("moe",):
        if m[section] is not None:
            for key in ("capacity_factor", "pad_to_capacity", "drop_policy", "aux_loss",
                        "aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate",
                        "dispatcher", "grouped_gemm"):
                m[section].pop(key)
    return m


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    return [p for p in _step_dirs(root) if (p / META).is_file()]


def _step_dirs(root: Path) -> list[Path]:
    """Every ``step_N`` directory under ``root``, complete or not, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()),
                  key=lambda p: p.name)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    # the tracker's graph-safe form (train.cuda_graph) holds generators: their state tensors are
    # saved, the same bytes as the plain form's, so either form resumes the other
    tracker = {name: tensor_parallel.random.convert_cuda_rng_state(s)
               for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "tracker": tracker}
    if torch.cuda.is_available() and not cpu.is_active():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    for name, saved in state["tracker"].items():
        if isinstance(states.get(name), torch.Generator):  # graph-safe: set in place (the
            states[name].set_state(saved)                  # generator a graph registers)
        elif getattr(tracker, "use_cudagraphable_rng", False):
            states[name] = tensor_parallel.random.convert_cuda_rng_state(saved, to_graphable=True)
        else:
            states[name] = saved
    tracker.set_states(states)
    if "cuda" in state and torch.cuda.is_available() and not cpu.is_active():
        torch.cuda.set_rng_state(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharding_metadata(config: Config) -> dict:
    """chained_optim_avoid_prefix: the plain optimizer's state keys do not depend on how many
    sub-optimizers (dense / expert) the layout makes, so its checkpoints resume in another
    parallel layout.  The distributed optimizer uses dp_reshardable, the format whose load
    works on the CPU path too (fully_reshardable trips over torch Adam's "step" state without
    TE/apex); Megatron then keys its state by sub-optimizer, so resume keeps the expert-parallel
    structure (EP > 1 or not) of the run that saved it."""
    meta = {"chained_optim_avoid_prefix": True}
    if config.optimizer.distributed:
        meta["distrib_optim_sharding_type"] = "dp_reshardable"
    return meta


def _sharded_state(model, optimizer, config: Config, is_loading: bool) -> dict:
    model_sd = _unwrap(model).sharded_state_dict(metadata=_sharding_metadata(config))
    with cpu.cuda_to_cpu():
        opt_sd = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                              metadata=_sharding_metadata(config))
    return {"model": model_sd, "optimizer": opt_sd}


def save(root: Path, step: int, model, optimizer, scheduler, config: Config,
         train_state: dict) -> Path:
    """Write checkpoint ``step`` under ``root`` synchronously and atomically; keep the newest
    ``keep_last``.  (:class:`Saver` is the run's entry point; this is its synchronous case.)"""
    return _start_save(root, step, model, optimizer, scheduler, config, train_state,
                       background=False).finish()


WRITER_THREAD = "checkpoint writer "  # + the checkpoint's name

class Saver:
    """The run's checkpoint saves, one at a time: synchronous, or with
    ``checkpoint.async_save`` snapshot now, write in a background thread, finalize later.

    Every method is called by all ranks at the same step (finalizing gathers across ranks)."""

    def __init__(self, root: Path, config: Config, device=None):
        self.root, self.config, self.device = root, config, device
        self.pending: _PendingSave | None = None

    def save(self, step: int, model, optimizer, scheduler, train_state: dict) -> Path | None:
        """Checkpoint ``step``: the path once written (synchronous), or None while a background
        save of it is under way (:meth:`poll` / :meth:`finish` complete it)."""
        self.finish()
        pending = _start_save(self.root, step, model, optimizer, scheduler, self.config,
                              train_state, background=self.config.checkpoint.async_save)
        if not self.config.checkpoint.async_save:
            return pending.finish()
        self.pending = pending
        return None

    def poll(self) -> Path | None:
        """Finalize the background save if every rank's writer is done (one all-reduce while a
        save is pending, nothing otherwise); its path if it was finalized now."""
        if self.pending is None:
            return None
        done = torch.tensor([0.0 if self.pending.writing() else 1.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.finish() if done.item() == 1.0 else None

    def finish(self) -> Path | None:
        """Wait for the background save, if any, and finalize it; its path."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        path = pending.finish()
        if _rank() == 0:
            print(f"checkpoint {path.name} written in the background in "
                  f"{time.time() - pending.began:.2f}s", flush=True)
        return path


def join_writers() -> None:
    """Wait for background checkpoint writers of this process (an async save still writing
    when the run ends on an error): the run directory's lock must outlive them."""
    for thread in threading.enumerate():
        if thread.name.startswith(WRITER_THREAD) and thread is not threading.current_thread():
            thread.join()


def _start_save(root: Path, step: int, model, optimizer, scheduler, config: Config,
                train_state: dict, background: bool) -> "_PendingSave":
    """Plan the save of ``step`` into ``root/.tmp_step_N`` (collectives), take everything it
    writes into host memory (copies, if ``background``: training goes on changing the
    originals) and write the shard files, in a thread if ``background``."""
    from megatron.core import dist_checkpointing

    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    began = time.time()
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left over from an interrupted save
            shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()
    with cpu.cuda_to_cpu(), _write_results_in_process():
        request = dist_checkpointing.save(
            _sharded_state(model, optimizer, config, is_loading=False), str(tmp),
            async_sharded_save=True, async_strategy="mcore")
    o = config.optimizer
    meta = {
        "format": FORMAT,
        "step": step,
        "train_state": json.loads(json.dumps(train_state, default=float)),  # a copy
        "scheduler": scheduler.state_dict(),
        "adam_steps": _adam_steps(optimizer),
        "model": model_definition(config),
        "grouped_experts": grouped_experts(config),
        "parallel": asdict(config.parallel),
        "optimizer": {"lr": o.lr, "min_lr": o.min_lr},
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }
    pending = _PendingSave(root, final, tmp, request, meta, _rng_state(), config, began)
    if request.async_fn is not None:
        rank, buckets, results_queue = request.async_fn_args
        pending.shards = (_snapshot(buckets, copy=background), results_queue)
    if background:
        pending.thread = threading.Thread(target=pending.write, name=f"{WRITER_THREAD}{final.name}")
        pending.thread.start()
    else:
        pending.write()
    return pending


def _snapshot(buckets: list, copy: bool) -> list:
    """Megatron's write buckets ``(file, key, (byte items, tensor items))`` with every tensor in
    host memory: copied from the device, and also copied on CPU when ``copy`` (their non-tensor
    items are already serialized)."""
    return [(file, key, (byte_items, [(item, t.detach().to("cpu", copy=copy))
                                      for item, t in tensor_items]))
            for file, key, (byte_items, tensor_items) in buckets]


class _PendingSave:
    """A save whose files are being written; :meth:`finish` makes it a checkpoint."""

    def __init__(self, root, final, tmp, request, meta, rng, config, began):
        self.root, self.final, self.tmp, self.request = root, final, tmp, request
        self.meta, self.rng, self.config, self.began = meta, rng, config, began
        self.shards = None
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def writing(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def write(self) -> None:
        """This rank's files: its shards (the file writes of Megatron's writer, one bucket at a
        time, so that an OSError reaches us whole instead of as "Worker failure") and RNG."""
        try:
            if self.shards is not None:
                from megatron.core.dist_checkpointing.strategies.filesystem_async import (
                    FileSystemWriterAsync)

                buckets, results_queue = self.shards
                # async_fn is partial(write_preloaded_data_multithread, transforms, use_msc)
                transforms = self.request.async_fn.args[0]
                results = {}
                for i, bucket in enumerate(buckets):
                    idx, out = FileSystemWriterAsync.write_preloaded_data(
                        transforms, i, bucket, None, None, True)
                    if isinstance(out, BaseException):
                        raise out
                    results[idx] = out
                self.shards = None  # the host copies can go
                results_queue.put(results)
            torch.save(self.rng, self.tmp / f"rng_rank{_rank()}.pt")
        except BaseException as err:  # reported by finish(), on the training thread
            self.error = err
            if self.shards is not None:
                self.shards[1].put(err)
                self.shards = None

    def finish(self) -> Path:
        """Wait for the writes, then (all ranks) Megatron's finalization (.metadata), the
        manifest, the rename to ``step_N`` and the pruning.  A failure removes the partial
        directory and raises CheckpointError saying why."""
        from torch.distributed.checkpoint.api import CheckpointException

        if self.thread is not None:
            self.thread.join()
        try:
            with cpu.cuda_to_cpu():
                for finalize in self.request.finalize_fns:
                    finalize()  # raises on every rank if any rank's writes failed
            if self.error is not None:  # e.g. the RNG file
                raise self.error
            _barrier()
            files = {k: v for part in _all_gather({name: [size, digest] for name, size, digest
                                                    in _my_files(self.tmp)})
                     for k, v in part.items()}
            if _rank() == 0:
                (self.tmp / META).write_text(json.dumps({**self.meta, "files": files},
                                                        indent=1, default=float))
                if self.final.exists():  # re-saving the same step (e.g. final == last interval)
                    shutil.rmtree(self.final)
                os.replace(self.tmp, self.final)
                for old in list_checkpoints(self.root)[: -self.config.checkpoint.keep_last]:
                    shutil.rmtree(old)
            _barrier()
        except (Exception, CheckpointException) as err:  # torch's is a BaseException
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise CheckpointError(self._failure(self.error or err)) from err
        return self.final

    def _failure(self, err: BaseException) -> str:
        done = [p.name for p in list_checkpoints(self.root)]
        kept = (f"the last complete checkpoint, {self.root / done[-1]}, is intact" if done
                else "no earlier checkpoint exists")
        if _is_disk_full(err):
            return (f"no space left on device while saving checkpoint step {self.meta['step']} "
                    f"to {self.tmp} ({_describe(err)}); its partial files were removed and "
                    f"{kept}. Free space on that file system (or lower checkpoint.keep_last) "
                    "and resume")
        return (f"saving checkpoint step {self.meta['step']} to {self.tmp} failed "
                f"({_describe(err)}); its partial files were removed and {kept}")


def _causes(err: BaseException):
    """``err`` and what it wraps: the exception chain, and the per-rank failures of torch's
    CheckpointException."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [v[0] if isinstance(v, tuple) else v for v in failures.values()]


def _is_disk_full(err: BaseException) -> bool:
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or "No space left on device" in str(e) for e in _causes(err))


def _describe(err: BaseException) -> str:
    """The most specific error behind ``err``: an OSError names the file."""
    for e in _causes(err):
        if isinstance(e, OSError):
            return f"{type(e).__name__}: {e}"
    return f"{type(err).__name__}: {err}"
@contextlib.contextmanager
def _write_results_in_process():
    """Megatron's torch_dist writer hands each rank's write results back through a queue that,
    on first use, it creates with a ``multiprocessing`` Manager: a spawned server process
    (about 3 s per training process here, at its first save).  That queue exists for Megatron's
    asynchronous save, where a forked process writes.  Our saves are synchronous: the writer
    threads and the reader are in this process, so for the duration of the save an in-process
    queue carries the results; Megatron's own (None, or a Manager queue) is put back after, so
    an asynchronous save elsewhere in the process still gets a cross-process one."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # another Megatron: leave it alone
        yield
        return
    before = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = before


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mine(name: str, rank: int, world: int) -> bool:
    """Which rank hashes/verifies a file: the one that wrote it (Megatron names shard files
    ``__{rank}_{i}.distcp``), else a rank chosen by name, so the work is spread."""
    m = re.match(r"^__(\d+)_", name) or re.match(r"^rng_rank(\d+)\.pt$", name)
    owner = int(m.group(1)) if m else sum(name.encode()) % world
    return owner % world == rank


def _my_files(directory: Path):
    world = dist.get_world_size() if dist.is_initialized() else 1
    for p in sorted(directory.rglob("*")):
        name = str(p.relative_to(directory))
        if p.is_file() and name != META and _mine(name, _rank(), world):
            yield name, p.stat().st_size, _sha256(p)


def _all_gather(mine) -> list:
    """Every rank's ``mine`` (just ours without a process group)."""
    if not dist.is_initialized():
        return [mine]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return parts


def read_meta(path: Path) -> dict:
    """The checked metadata of checkpoint ``path``; CheckpointError if it is unusable.
    Every file is checked against the manifest (size, SHA-256), the hashing spread over the
    ranks; all ranks raise the same error."""
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {META} is missing (the save "
                              "did not finish); resume from an earlier checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        for key in ("step", "train_state", "scheduler", "model", "adam_steps", "world_size"):
            meta[key]
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path} has metadata format "
                                  f"{meta.get('format')}, this megatron-coe reads {FORMAT}")
        for value in files.values():
            size, digest = value
            if not isinstance(size, int) or not isinstance(digest, str):
                raise TypeError(f"bad manifest entry {value!r}")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {path}: {META} is corrupt ({err})") from None
    world = dist.get_world_size() if dist.is_initialized() else 1
    problems = []
    for name, (size, digest) in sorted(files.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"checkpoint {path} is incomplete: file {name} is missing")
        elif f.stat().st_size != size:
            problems.append(f"checkpoint {path} is truncated: file {name} has "
                            f"{f.stat().st_size} bytes, the manifest says {size}")
        elif _mine(name, _rank(), world) and _sha256(f) != digest:
            problems.append(f"checkpoint {path} is corrupt: file {name} does not match its "
                            "SHA-256 in the manifest")
    problems = sorted({p for part in _all_gather(problems) for p in part})
    if problems:
        raise CheckpointError(problems[0] + "; resume from another checkpoint with "
                              "checkpoint.resume=PATH, or start fresh with checkpoint.resume=none "
                              "checkpoint.overwrite=true (the old run is moved aside)")
    return meta



def check_compatible(meta: dict, config: Config, path: Path) -> None:
    saved, current = _flatten(meta["model"]), _flatten(model_definition(config))
    saved.pop("impl", None)  # recorded by some checkpoints; not part of the model (above)
    # A key that a checkpoint predates: its default is what that checkpoint was built with.
    defaults = _flatten(model_definition(_definition_defaults(config)))
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)
             and not (k not in saved and current.get(k) == defaults.get(k))]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved from a different model; "
                              + "; ".join(diffs))


def _definition_defaults(config: Config) -> Config:
    """``config`` with every model field at its default (sub-sections present where
    ``config`` has them), for the keys an older checkpoint does not record."""
    from dataclasses import replace

    from megatron_coe.config import CoEConfig, MLAConfig, ModelConfig, MoEConfig

    m = config.model
    model = ModelConfig(mla=MLAConfig(), moe=MoEConfig() if m.moe is not None else None,
                        coe=CoEConfig() if m.coe is not None else None, attention=m.attention)
    return replace(config, model=model)


def check_optimizer(meta: dict, config: Config, path: Path) -> None:
    """Refuse, before any optimizer state is read, a resume whose ``optimizer.lr`` or
    ``min_lr`` differs from the checkpoint's: Megatron matches the saved optimizer state to
    parameter groups by their max/min learning rates, and would fail only after loading, with
    a message about parameter-group keys."""
    o = config.optimizer
    saved = meta.get("optimizer")
    if saved is None:  # older checkpoints: the scheduler's max_lr is optimizer.lr
        saved = {"lr": meta["scheduler"]["max_lr"]}
    current = {"lr": o.lr, "min_lr": o.min_lr}
    diffs = [f"optimizer.{k}: checkpoint {saved[k]!r} vs config {current[k]!r}"
             for k in sorted(saved) if saved[k] != current[k]]
    if diffs:
        fix = " ".join(f"optimizer.{k}={saved[k]!r}" for k in sorted(saved))
        raise CheckpointError(
            f"checkpoint {path} was saved with other learning rates; " + "; ".join(diffs)
            + ". Megatron keys the saved optimizer state by the parameter groups' max/min "
            f"learning rate, so a resume must keep them: resume with {fix} (train.steps and "
            "schedule.* may change), or start a new run in another run_dir")


def schedule_changes(saved: dict, scheduler) -> list[str]:
    """How the config's LR schedule differs from the one a checkpoint was saved with
    (Megatron's scheduler state keys), e.g. ``decay steps 40 -> 60``."""
    names = {"lr_decay_steps": "decay steps (train.steps)",
             "lr_warmup_steps": "warmup steps (schedule.warmup_steps)",
             "lr_decay_style": "decay style (schedule.decay)"}
    return [f"{label} {saved[key]} -> {getattr(scheduler, key)}"
            for key, label in names.items()
            if key in saved and saved[key] != getattr(scheduler, key)]


def check_optimizer_layout(meta: dict, config: Config, path: Path) -> None:
    """The distributed optimizer saves its state in the order of Megatron's gradient buffers,
    which differs between per-expert and grouped (stacked) expert weights; the plain optimizer's
    state is keyed by parameter and resumes across the two (weights always do)."""
    # absent in checkpoints from before the setting: their experts were per-expert
    saved = meta.get("grouped_experts", False)
    if config.optimizer.distributed and saved is not None and saved != grouped_experts(config):
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state laid out for "
            f"{'grouped' if saved else 'per-expert'} experts; resume with "
            f"model.moe.grouped_gemm={str(saved).lower()} (or from a run with "
            "optimizer.distributed=false, whose state moves between the two)")


def set_aside_newer(root: Path, step: int) -> list[Path]:
    """After an explicit roll-back to ``step``: move the abandoned run's later checkpoints to
    ``root/abandoned/`` (kept, not deleted), so neither auto-resume nor pruning mistakes them
    for this run's newest, and no later save replaces them (incomplete ones included).  Rank 0
    only."""
    later = [p for p in _step_dirs(root) if int(STEP_DIR.match(p.name).group(1)) > step]
    if not later:
        return []
    target = root / "abandoned" / f"after_rollback_to_step_{step:07d}"
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for p in later:
        dest = target / p.name
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(p, dest)
        moved.append(dest)
    return moved


def find_resume(config: Config, root: Path) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start."""
    resume = config.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        found = _step_dirs(root)
        if found and not (found[-1] / META).is_file():
            complete = list_checkpoints(root)
            fix = (f"resume from {complete[-1]} with checkpoint.resume={complete[-1]} (later "
                   "checkpoints, this one included, are then kept aside under "
                   f"{root / 'abandoned'})" if complete else
                   f"move {found[-1]} away, or start fresh with checkpoint.resume=none "
                   "checkpoint.overwrite=true")
            raise CheckpointError(f"the newest checkpoint, {found[-1]}, is incomplete: {META} is "
                                  f"missing (it was deleted or damaged; a save writes it before "
                                  f"the directory gets its name). Nothing was changed; {fix}")
        return found[-1] if found else None
    return Path(resume)


def check_writable(root: Path) -> None:
    """Refuse, at start-up, a checkpoint directory that cannot be written: a file in its place,
    or no write permission (every rank writes its shards there, so every rank checks; all
    raise the same error)."""
    problem = []
    try:
        if root.exists() and not root.is_dir():
            problem.append(f"{root} is a file, not a directory, so no checkpoint can be saved; "
                           "move it away or choose another run_dir")
        else:
            root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=root)
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        problem.append(f"checkpoint directory {root} is not writable ({err.strerror or err}), "
                       "so no checkpoint can be saved; make it writable or choose another "
                       "run_dir")
    problems = sorted({p for part in _all_gather(problem) for p in part})
    if problems:
        raise CheckpointError(problems[0])


def torch_optimizers(optimizer):
    """The inner torch.optim Adam/AdamW optimizers (the CPU path).  TE's and apex's FusedAdam
    keep ``step`` per param group and need none of the fixes below."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    inner = [getattr(sub, "optimizer", None) for sub in subs]
    return [opt for opt in inner if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))]


def _prime_adam_state(optimizer) -> None:
    """Give every parameter an Adam state (step 0, zero moments) before loading.

    Without TE/apex (the CPU path) the distributed optimizer reads one shared ``step`` from the
    torch optimizer's per-parameter states while building its load-time state dict, and fails
    when a fresh optimizer has none yet."""
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _adam_steps(optimizer) -> list[float | None]:
    """The Adam step count of each torch optimizer (they are equal across its parameters), read
    with one host read per optimizer (the fused AdamW keeps each count on the GPU)."""
    out = []
    for opt in torch_optimizers(optimizer):
        steps = [torch.as_tensor(s["step"]).reshape(()) for s in opt.state.values()
                 if "step" in s]
        out.append(float(torch.stack([t.to(steps[0].device, torch.float64) for t in steps])
                         .max()) if steps else None)
    return out


def _restore_adam_steps(optimizer, saved: list[float | None]) -> None:
    """Set every parameter's Adam ``step`` to the saved count, each its own tensor.

    On the CPU path (torch Adam, no TE/apex) the distributed optimizer restores ``step`` stale
    (0, from the load template) and hands every parameter the *same* tensor, which torch's Adam
    then increments once per parameter per step: wrong bias correction, inexact resume."""
    for opt, step in zip(torch_optimizers(optimizer), saved):
        if step is None:
            continue
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def _read_sharded(path: Path, sharded: dict) -> dict:
    """Megatron's dist-checkpoint load of ``sharded`` from ``path``, unreadable shards reported
    as a CheckpointError."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    refusals = []
    try:
        with cpu.cuda_to_cpu(), safe_reader.reading() as refusals:
            return dist_checkpointing.load(sharded, str(path))
    except (Exception, CheckpointException) as err:  # Megatron and torch raise many kinds
        if refusals:
            raise CheckpointError(
                f"checkpoint {path} refused: {refusals[0]}. A checkpoint written by megatron-coe "
                "never holds that; this one may have been crafted to run code when loaded, "
                "and nothing from it was used. Load only checkpoints you trust") from None
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: "
                              f"{err}); it may be corrupt. Resume from another checkpoint with "
                              "checkpoint.resume=PATH") from None


def load_model(path: Path, model, config: Config) -> dict:
    """Restore only the model's weights from checkpoint ``path`` (any parallel layout Megatron
    can reshard; e.g. an EP = 2 run analysed in one process); returns the checkpoint's
    metadata.  Pickled parts are read restricted (see :mod:`megatron_coe.safe_reader`)."""
    meta = read_meta(path)
    check_compatible(meta, config, path)
    sharded = {"model": _unwrap(model).sharded_state_dict(metadata=_sharding_metadata(config))}
    _unwrap(model).load_state_dict(_read_sharded(path, sharded)["model"])
    return meta


def load(path: Path, model, optimizer, scheduler, config: Config) -> dict:
    """Restore everything from checkpoint ``path``; returns its train_state."""
    meta = read_meta(path)
    check_compatible(meta, config, path)
    check_optimizer(meta, config, path)
    check_optimizer_layout(meta, config, path)
    _prime_adam_state(optimizer)
    state = _read_sharded(path, _sharded_state(model, optimizer, config, is_loading=True))
    try:
        _unwrap(model).load_state_dict(state["model"])
        with torch.no_grad(), cpu.cuda_to_cpu():  # in-place copies into leaf parameters
            optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path} (saved with parallel layout {meta['parallel']}) cannot be "
            f"loaded into this one ({asdict(config.parallel)}): {err}. Megatron reshards "
            "model and optimizer across data, pipeline and expert-parallel sizes as long as the "
            "run keeps expert parallelism on (EP > 1) or off (EP = 1) as the saving run did"
        ) from None
    _restore_adam_steps(optimizer, meta["adam_steps"])
    from megatron_coe.optim import use_adam_implementation  # optim imports this module

    # this run's AdamW kernel, not the saving run's
    use_adam_implementation(optimizer, fused=config.optimizer.fused, device_type=config.device)
    changes = schedule_changes(meta["scheduler"], scheduler)
    scheduler.load_state_dict(meta["scheduler"])  # the config's schedule at the saved step
    if changes and _rank() == 0:
        print(f"LR schedule changed since {path.name}: {'; '.join(changes)}. The schedule "
              f"follows the config from step {meta['step'] + 1} (lr "
              f"{optimizer.param_groups[0]['lr']:.6g}), as Megatron-LM's "
              "--override-opt_param-scheduler does", flush=True)
    rng_file = path / f"rng_rank{_rank()}.pt"
    if meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta["train_state"]
