"""Launch coe-train as users do (torchrun, or plain processes with the env:// variables) and
read what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny" / "coe.yaml")


def torchrun(overrides: list[str], nproc: int = 2, timeout: int = 300, config: str = TINY):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "megatron_coe.train", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def spawn_ranks(overrides: list[str], nproc: int = 2, config: str = TINY):
    """Start the ranks as independent processes (no torchrun supervising them)."""
    from megatron_coe.parallel import free_port

    port = free_port()
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "megatron_coe.train", config, *overrides], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def metrics(run_dir: Path, kind: str = "train") -> dict[int, dict]:
    from megatron_coe.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(run_dir, kind)}


def check(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
