"""The sbatch launcher against a real Slurm (slurmctld + 2 slurmd on this machine).

Jobs: 2 nodes x 1 rank (one Slurm task per rank) and 1 node x 2 ranks (torchrun); the
pre-timeout signal makes the ranks checkpoint, the job requeue itself and finish from where it
stopped; a killed rank fails the whole job within a minute.  The cluster is started once for
the module and stopped by the pids it started, whatever the outcome."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
TINY = "configs/tiny/coe.yaml"

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None or os.geteuid() != 0,
    reason="needs Slurm (Debian slurmctld/slurmd/munge; .ci/run installs them) and root")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    slurm_dir = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_DIR": str(slurm_dir), "NODES": "2",
           "SLURM_CONF": str(slurm_dir / "slurm.conf"), "COE_LOG_ROOT": str(slurm_dir / "logs")}
    (slurm_dir / "logs").mkdir()
    started = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True,
                             text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], env=env, timeout=120)


def sbatch(slurm, args, overrides, extra_env=None):
    env = {**slurm, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    logs = Path(slurm["COE_LOG_ROOT"])
    out = subprocess.run(["sbatch", "--parsable", f"--output={logs}/slurm-%j.out", *args,
                          "launch/slurm/coe.sbatch", TINY,
                          *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(slurm, job):
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=slurm,
                         capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(slurm, job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(slurm, job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job} not in {states} after {timeout}s: {job_info(slurm, job)}")


def train_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if '"train"' in l]


def log_dir(slurm, job):
    return Path(slurm["COE_LOG_ROOT"]) / f"coe-{job}"


@pytest.mark.parametrize("nodes,mode", [(2, "srun"), (1, "torchrun")],
                         ids=["2nodes-x1-srun", "1node-x2-torchrun"])
def test_job_completes_with_falling_loss_and_checkpoint(slurm, tmp_path, nodes, mode):
    run_dir = tmp_path / "run"
    job = sbatch(slurm, [f"--nodes={nodes}"],
                 [f"run_dir={run_dir}", "train.steps=16", "train.eval_interval=0",
                  "checkpoint.save_interval=0"],
                 {"COE_LAUNCH": mode, "COE_NPROC_PER_NODE": str(2 // nodes)})
    info = wait_for(slurm, job)
    print(f"job {job}: {nodes} node(s), {mode}: {info['JobState']}")
    job_log = (log_dir(slurm, job) / "job.log").read_text()
    assert info["JobState"] == "COMPLETED", job_log + (log_dir(slurm, job) / "train.log").read_text()[-3000:]
    assert "git commit:" in job_log and f"mode {mode}" in job_log
    losses = [r["loss"] for r in train_metrics(run_dir)]
    assert len(losses) == 16 and losses[-1] < losses[0] - 1.0
    assert (run_dir / "checkpoints" / "step_0000016" / "coe_meta.json").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_pre_timeout_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    run_dir = tmp_path / "run"
    steps = 40
    job = sbatch(slurm, ["--nodes=2"], [f"run_dir={run_dir}", f"train.steps={steps}",
                                        "train.eval_interval=0", "checkpoint.save_interval=0"])
    deadline = time.time() + 180
    while len(train_metrics(run_dir)) < 5 and time.time() < deadline:
        time.sleep(0.5)
    assert train_metrics(run_dir), "training did not start"
    # what Slurm does 120 s before the time limit (--signal=B:USR2@120)
    subprocess.run(["scancel", "--signal=USR2", "--batch", job], env=slurm, check=True)
    # Slurm holds a requeued job ~2 minutes (Reason=BeginTime); release it sooner, as an
    # operator could, to keep CI short.  Not at once: the requeue revoked the job's credential
    # on the nodes, with one-second resolution, and a relaunch within that second is refused
    # ("Job credential revoked"), which fails the job (seen once in CI).
    deadline = time.time() + 120
    while time.time() < deadline:
        info = job_info(slurm, job)
        if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) == 1:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"],
                           env=slurm)
            break
        time.sleep(0.5)
    info = wait_for(slurm, job, timeout=400)
    print(f"job {job}: pre-timeout signal: {info['JobState']}, restarts {info.get('Restarts')}")
    job_log = (log_dir(slurm, job) / "job.log").read_text()
    assert info["JobState"] == "COMPLETED", job_log
    assert int(info.get("Restarts", 0)) == 1, info
    assert "requeueing job" in job_log
    train_log = (log_dir(slurm, job) / "train.log").read_text()
    stopped = int(re.search(r"stop requested: checkpoint saved at step (\d+)", train_log).group(1))
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:07d} at step {stopped}" in train_log
    steps_seen = [r["step"] for r in train_metrics(run_dir)]
    assert steps_seen == list(range(1, steps + 1))  # nothing lost, nothing repeated


def test_killed_rank_fails_the_job_within_a_minute(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(slurm, ["--nodes=2"], [f"run_dir={run_dir}", "train.steps=100000",
                                        "train.eval_interval=0", "parallel.timeout_minutes=0.5"])
    deadline = time.time() + 180
    while len(train_metrics(run_dir)) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert train_metrics(run_dir), "training did not start"
    pids = subprocess.run(["pgrep", "-f", rf"^\S*python\S* -m megatron_coe.train .*run_dir={run_dir}"],
                          capture_output=True, text=True).stdout.split()
    assert len(pids) == 2, pids
    os.kill(int(pids[-1]), signal.SIGKILL)
    killed = time.time()
    info = wait_for(slurm, job, timeout=120)
    print(f"job {job}: rank killed: {info['JobState']} after {time.time() - killed:.1f}s")
    assert info["JobState"] == "FAILED", info
    assert time.time() - killed < 60
