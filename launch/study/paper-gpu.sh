#!/usr/bin/env bash
#SBATCH --job-name=coe-paper-study
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
# The GPU-scale version of the CPU study (docs/study-cpu-gsm8k.md) over the paper configs
# (configs/paper/: hidden 1024, 4 layers, MLA, 63 routed + 1 shared experts; batch 64 x 512,
# 1000 steps, lr 3e-4, bf16), 3 seeds each, one node, each run on all of its GPUs (data parallel).
# Inside the NGC container with megatron-coe installed, from the repository root:
#
#   launch/study/paper-gpu.sh path/to/metamathqa/train.jsonl        # on a GPU node
#   sbatch launch/study/paper-gpu.sh path/to/metamathqa/train.jsonl # under Slurm
#
# The data file is jsonl with fields query and response (MetaMathQA, as the paper); other text:
# KEYS="[text]" launch/study/paper-gpu.sh file.jsonl.  Results: $OUT/results.md, valid_loss.png.
# Re-running (or a requeue) resumes unfinished runs and skips finished ones.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/../..}"
DATA=${1:-data/metamathqa/train.jsonl}
KEYS=${KEYS:-[query,response]}
OUT=${OUT:-runs/study-paper}
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[[ -f "$DATA" ]] || { echo "paper-gpu.sh: no data file at $DATA" >&2; exit 2; }
(( NPROC >= 1 )) || { echo "paper-gpu.sh: no GPU found (set NPROC)" >&2; exit 2; }
COMMON=("data.paths=[$DATA]" "data.text_keys=$KEYS")
MAIN=(configs/paper/moe-8of64.yaml configs/paper/coe-2-4of64.yaml
      configs/paper/moe-8of64-inner.yaml configs/paper/coe-2-4of64-inner.yaml)
REST=(configs/paper/moe-7of64.yaml configs/paper/coe-2-3of64.yaml configs/paper/coe-2-4of48.yaml
      configs/paper/ablation-shared-router.yaml configs/paper/ablation-outer-residual.yaml)
PY=${PYTHON:-python}
"$PY" -m megatron_coe.tools.compare --configs "${MAIN[@]}" --seeds 1 2 3 --nproc "$NPROC" \
    --out "$OUT" "${COMMON[@]}"
"$PY" -m megatron_coe.tools.compare --configs "${MAIN[@]}" "${REST[@]}" --seeds 1 2 3 \
    --nproc "$NPROC" --out "$OUT" "${COMMON[@]}"
