"""torchrun with a clean stop and a one-line failure report (used by launch/torchrun.sh).

    python -m megatron_coe.launch --standalone --nproc-per-node 2 -m megatron_coe.train CONFIG [k=v ...]

Takes torchrun's arguments (``torch.distributed.run``) and runs its elastic agent unchanged,
with two differences in what the user sees:

* Stop signals (SIGTERM, SIGINT, SIGUSR2, SIGHUP, SIGQUIT) are forwarded to the workers, which
  checkpoint at the next step boundary and exit 0 (``train.StopRequest``); the launcher then
  exits 0.  Plain torchrun turns the signal into a ``SignalException`` in its agent, forwards
  it, and exits 1 with a traceback even when every worker stopped cleanly.  A second stop
  signal kills the workers (SIGKILL).  To get this, the agent runs in a thread (torchrun
  installs its own signal handlers only in the main thread) and the main thread forwards the
  signals to the agent's children.
* A failed worker is reported in one line: the rank, its exit code and the message the
  worker recorded in torchelastic's error file (``TORCHELASTIC_ERROR_FILE``; coe-train writes
  its clean errors there), instead of the ``ChildFailedError`` traceback.  The exit code is
  the first failed worker's (2: bad config or input, see coe-train).

Linux only (the agent's children are found through /proc).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)
WORKER_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the agent's workers: they run in their own sessions,
    so a signal to this process group does not reach them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def report_failure(err) -> int:
    """One line for torchrun's ChildFailedError; returns the exit code to use."""
    rank, first = err.get_first_failure()
    failed = ", ".join(str(r) for r in sorted(err.failures))
    if first.exitcode < 0:
        code, how = 128 - first.exitcode, f"was killed by {first.signal_name()}"
    else:
        code, how = first.exitcode or 1, f"exited with code {first.exitcode}"
    # a dict when the worker wrote the error file ({"message": ..., "extraInfo": ...})
    recorded = first.message.get("message") if isinstance(first.message, dict) else None
    detail = f": {recorded}" if recorded else " (its output is above)"
    print(f"coe-launch: rank {rank} {how}{detail}"
          + (f" [failed ranks: {failed}]" if len(err.failures) > 1 else ""),
          file=sys.stderr, flush=True)
    return code


class _OurSignalHandlers(logging.Filter):
    """torchrun warns that without its handlers a stop signal could orphan the workers; here
    the main thread forwards every stop signal to them, so the warning is wrong."""

    def filter(self, record):
        return "Failed to register signal handlers" not in record.getMessage()


def main(argv=None) -> int:
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        _OurSignalHandlers())
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    outcome: dict = {}

    def agent():
        try:
            run(args)
        except ChildFailedError as err:
            outcome["failed"] = err
        except BaseException as err:  # rendezvous or launch errors: reported below
            outcome["error"] = err

    received: list[int] = []
    signalled: dict[int, int] = {}  # worker pid -> how many signals it got

    def on_signal(signum, frame):
        received.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=agent, name="torchrun-agent", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        if received:  # also reaches workers started after the signal came
            for pid in children(os.getpid()):
                if signalled.get(pid, 0) < min(len(received), 2):
                    # the workers catch TERM, INT and USR2 (train.StopRequest); HUP and QUIT
                    # reach them as TERM, so a closed terminal also stops them cleanly
                    first = received[0] if received[0] in WORKER_STOP_SIGNALS else signal.SIGTERM
                    sig = first if len(received) == 1 else signal.SIGKILL
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                    signalled[pid] = min(len(received), 2)
    if "failed" in outcome:
        return report_failure(outcome["failed"])
    if "error" in outcome:
        err = outcome["error"]
        print(f"coe-launch: torchrun failed: {type(err).__name__}: {err}", file=sys.stderr,
              flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
