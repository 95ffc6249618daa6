#!/usr/bin/env bash
# A throw-away Slurm cluster on this machine for the tests: munged, slurmctld and one slurmd
# per emulated node (node1..nodeN, all on 127.0.0.1).  Debian's slurm-wlm, run as root.
#   cluster.sh install | start | stop        (stop: SIGTERM to the pids this script started)
# Clients need SLURM_CONF=$SLURM_DIR/slurm.conf.
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/coe-slurm}
NODES=${NODES:-2}
CPUS=${CPUS:-$(nproc)}
HOST=$(hostname -s)
export SLURM_CONF=$SLURM_DIR/slurm.conf

case "${1:-}" in
install)
  command -v slurmctld >/dev/null && command -v munged >/dev/null && exit 0
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  ;;
start)
  mkdir -p "$SLURM_DIR"/{state,log,run}
  for i in $(seq 1 "$NODES"); do mkdir -p "$SLURM_DIR/spool/node$i"; done
  cat > "$SLURM_CONF" <<CONF
ClusterName=coeci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=${CTLD_PORT:-6817}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$SLURM_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0
JobRequeue=1
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=node[1-$NODES] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$((17100 + 1))-$((17100 + NODES))] CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  if ! munge -n >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    cp /run/munge/munged.pid "$SLURM_DIR/run/munged.pid"
  fi
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
  slurmctld
  for i in $(seq 1 "$NODES"); do slurmd -N "node$i"; done
  for _ in $(seq 150); do
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | wc -l)" -eq "$NODES" ] && exit 0
    sleep 0.2
  done
  echo "the Slurm cluster did not become idle" >&2; tail -n 20 "$SLURM_DIR"/log/*.log >&2; exit 1
  ;;
stop)
  pids=()
  for f in "$SLURM_DIR"/run/*.pid; do [ -s "$f" ] && pids+=("$(cat "$f")"); done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  rm -f "$SLURM_DIR"/run/*.pid
  ;;
*) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
