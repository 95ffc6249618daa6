#!/usr/bin/env bash
# One Slurm task per rank: map Slurm's task ids onto torch.distributed's env:// variables
# (MASTER_ADDR / MASTER_PORT come from the batch script), then exec the command unchanged.
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
exec "$@"
