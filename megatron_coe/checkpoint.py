"""Checkpoints: Megatron's distributed (sharded) format, written atomically, validated on load.

Layout of ``run_dir/checkpoints``::

    step_0000020/            a complete checkpoint
        <Megatron dist_checkpointing files: model + optimizer, sharded>
        rng_rank{r}.pt       each rank's RNG states (tensors and ints only: weights-only load)
        coe_meta.json        written last: step, data position, scheduler, model definition,
                             parallel layout, and the size of every file (a manifest)
    .tmp_step_0000040/       a save in progress; renamed to step_0000040 only when complete

Resume restores model, optimizer, LR scheduler, RNG and the data position (the step: batches
are a pure function of it, see data/dataset.py).  Before reading any tensor, a checkpoint is
checked: the manifest must match the files on disk (a truncated or missing file is named), and
its model definition must equal the config's (a different parallel layout is fine, Megatron
reshards; a different model shape is refused with every differing field).  Nothing in the run
directory is modified by a failed load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_coe import cpu
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
    if config.model.attention != "mla":
        m.pop("mla")
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
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and not cpu.is_active():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
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
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep_last``."""
    from megatron.core import dist_checkpointing

    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over from an interrupted save
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    with cpu.cuda_to_cpu(), _write_results_in_process():
        dist_checkpointing.save(_sharded_state(model, optimizer, config, is_loading=False), str(tmp))
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    adam_steps = _adam_steps(optimizer)
    _barrier()
    files = {k: v for part in _all_gather({name: [size, digest] for name, size, digest
                                            in _my_files(tmp)}) for k, v in part.items()}
    if _rank() == 0:
        meta = {
            "format": FORMAT,
            "step": step,
            "train_state": train_state,
            "scheduler": scheduler.state_dict(),
            "adam_steps": adam_steps,
            "model": model_definition(config),
            "grouped_experts": grouped_experts(config),
            "parallel": asdict(config.parallel),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "files": files,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, default=float))
        if final.exists():  # re-saving the same step (e.g. final == last interval)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[: -config.checkpoint.keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


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
                              "checkpoint.resume=PATH or start fresh with checkpoint.resume=none")
    return meta



def check_compatible(meta: dict, config: Config, path: Path) -> None:
    saved, current = _flatten(meta["model"]), _flatten(model_definition(config))
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was saved from a different model; "
                              + "; ".join(diffs))


def _check_optimizer_layout(meta: dict, config: Config, path: Path) -> None:
    """The distributed optimizer saves its state in the order of Megatron's gradient buffers,
    which differs between per-expert and grouped (stacked) expert weights; the plain optimizer's
    state is keyed by parameter and resumes across the two (weights always do)."""
    saved = meta.get("grouped_experts")  # absent in checkpoints from before the setting
    if config.optimizer.distributed and saved is not None and saved != grouped_experts(config):
        raise CheckpointError(
            f"checkpoint {path} holds distributed-optimizer state laid out for "
            f"{'grouped' if saved else 'per-expert'} experts; resume with "
            f"model.moe.grouped_gemm={str(saved).lower()} (or from a run with "
            "optimizer.distributed=false, whose state moves between the two)")


def set_aside_newer(root: Path, step: int) -> list[Path]:
    """After an explicit roll-back to ``step``: move the abandoned run's later checkpoints to
    ``root/abandoned/`` (kept, not deleted), so neither auto-resume nor pruning mistakes them
    for this run's newest.  Rank 0 only."""
    later = [p for p in list_checkpoints(root) if int(STEP_DIR.match(p.name).group(1)) > step]
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
        found = list_checkpoints(root)
        return found[-1] if found else None
    return Path(resume)


def _torch_optimizers(optimizer):
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
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["step"] = torch.zeros((), dtype=torch.float32)
                    opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def _adam_steps(optimizer) -> list[float | None]:
    """The Adam step count of each torch optimizer (they are equal across its parameters)."""
    out = []
    for opt in _torch_optimizers(optimizer):
        steps = {float(s["step"]) for s in opt.state.values() if "step" in s}
        out.append(max(steps) if steps else None)
    return out


def _restore_adam_steps(optimizer, saved: list[float | None]) -> None:
    """Set every parameter's Adam ``step`` to the saved count, each its own tensor.

    On the CPU path (torch Adam, no TE/apex) the distributed optimizer restores ``step`` stale
    (0, from the load template) and hands every parameter the *same* tensor, which torch's Adam
    then increments once per parameter per step: wrong bias correction, inexact resume."""
    for opt, step in zip(_torch_optimizers(optimizer), saved):
        if step is None:
            continue
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.tensor(step, dtype=torch.float32)


def _read_sharded(path: Path, sharded: dict) -> dict:
    """Megatron's dist-checkpoint load of ``sharded`` from ``path``, unreadable shards reported
    as a CheckpointError."""
    from megatron.core import dist_checkpointing

    try:
        with cpu.cuda_to_cpu():
            return dist_checkpointing.load(sharded, str(path))
    except Exception as err:  # Megatron raises a variety of errors for unreadable shards
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: "
                              f"{err}); it may be corrupt. Resume from another checkpoint with "
                              "checkpoint.resume=PATH") from None


def load_model(path: Path, model, config: Config) -> dict:
    """Restore only the model's weights from checkpoint ``path`` (any parallel layout Megatron
    can reshard; e.g. an EP = 2 run analysed in one process); returns the checkpoint's
    metadata.  Nothing but tensors is read."""
    meta = read_meta(path)
    check_compatible(meta, config, path)
    sharded = {"model": _unwrap(model).sharded_state_dict(metadata=_sharding_metadata(config))}
    _unwrap(model).load_state_dict(_read_sharded(path, sharded)["model"])
    return meta


def load(path: Path, model, optimizer, scheduler, config: Config) -> dict:
    """Restore everything from checkpoint ``path``; returns its train_state."""
    meta = read_meta(path)
    check_compatible(meta, config, path)
    _check_optimizer_layout(meta, config, path)
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
    scheduler.load_state_dict(meta["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if meta["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return meta["train_state"]
