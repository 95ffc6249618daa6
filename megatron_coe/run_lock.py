"""One training per run directory: a lock held for the whole run, and the resume=none guard.

``run_dir/.lock`` is locked with ``fcntl.flock`` by rank 0 before anything is written.  The
kernel drops the lock when its holder exits, however it exits (SIGKILL, node reboot on a
local disk), so a lock left by a dead process never blocks: the file may stay, the lock does
not.  A Slurm requeue therefore works: the requeued job starts after the old processes are
gone and takes the lock.  The holder writes its host, pid, Slurm job id and start time into
the file, only so that a refused second run can say who holds it.

Shared file systems: NFS (v4, or v3 with lockd) and Lustre mounted with ``flock`` lock across
nodes.  Where the file system refuses locks (Lustre ``noflock``), the run goes on with a
warning and without this protection.

``checkpoint.resume=none`` means a fresh run; into a run directory that already holds
checkpoints it is refused, because it would replace them and append to their metrics.
``checkpoint.overwrite=true`` says the user wants exactly that: the previous run's
checkpoints, metrics.jsonl, tensorboard/ and config.yaml are moved to
``run_dir/replaced/<UTC time>/`` (nothing is deleted, nothing is mixed), at the moment the new
run writes its first file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from megatron_coe.checkpoint import list_checkpoints

LOCK = ".lock"
PREVIOUS_RUN = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml")


class RunDirError(ValueError):
    """The run directory cannot be used by this run; the message says why and what to do."""


class RunDirLock:
    """An exclusive lock on ``run_dir/.lock``; :meth:`acquire` raises :class:`RunDirError`
    naming the holder if another live process has it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirError(
                f"run directory {self.path.parent} is in use by another training ({holder}); "
                "wait for it to finish, stop it, or give another run_dir") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: the file system of {self.path.parent} does not support locks "
                  f"({err.strerror}); nothing stops a second training from using this run "
                  "directory at the same time", flush=True)
            return
        job = os.environ.get("SLURM_JOB_ID")
        holder = (f"pid {os.getpid()} on {socket.gethostname()}"
                  + (f", Slurm job {job}" if job else "")
                  + f", since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def claim(lock: RunDirLock, run_dir: Path, resume: str, overwrite: bool, rank: int) -> None:
    """Rank 0 creates the run directory, takes its lock and checks a fresh start; every rank
    learns the outcome (one broadcast, which is also the barrier) and raises the same
    :class:`RunDirError` if it failed."""
    import torch.distributed as dist

    outcome = [None]
    if rank == 0:
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            lock.acquire()
            check_fresh_start(run_dir, resume, overwrite)
        except RunDirError as err:
            outcome = [str(err)]
        except OSError as err:
            outcome = [f"run directory {run_dir} cannot be used: {err}"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise RunDirError(outcome[0])


def check_fresh_start(run_dir: Path, resume: str, overwrite: bool) -> None:
    """Refuse checkpoint.resume=none into a run directory holding checkpoints, unless
    checkpoint.overwrite=true."""
    if resume != "none" or overwrite:
        return
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if found:
        raise RunDirError(
            f"checkpoint.resume=none would start over in {run_dir}, which holds "
            f"{len(found)} checkpoint(s) up to {found[-1].name} and their metrics; use "
            "checkpoint.resume=auto to continue that run, another run_dir for a new one, or "
            "checkpoint.overwrite=true to move the previous run to run_dir/replaced/ and "
            "start over")


def set_previous_run_aside(run_dir: Path) -> Path | None:
    """Move the previous run's files to ``run_dir/replaced/<UTC time>/``; returns that
    folder, or None if there was nothing to move."""
    run_dir = Path(run_dir)
    present = [name for name in PREVIOUS_RUN if (run_dir / name).exists()]
    if not present:
        return None
    target = run_dir / "replaced" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, target / name)
    return target
