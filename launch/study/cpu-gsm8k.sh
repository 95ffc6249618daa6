#!/usr/bin/env bash
# The CPU-scale CoE-vs-MoE study written up in docs/study-cpu-gsm8k.md, one command from a clean
# checkout (after launch/venv.sh):
#
#   launch/study/cpu-gsm8k.sh [path/to/gsm8k/train.jsonl]
#
# Tiny DeepSeek-V2-Lite-style models (configs/tiny/, ~9M parameters, MLA, 63 routed + 1 shared
# expert) trained for 240 steps of 16 x 256 tokens on GSM8K's training split. The last 5% of the
# documents in file order are the validation set (Megatron's ordered split 95,5,0); the BPE
# tokenizer (512 tokens) is trained on the first 95% only. Every config of a seed sees the same
# batches in the same order (data.seed is fixed; `seed` changes only the initialisation).
# 9 configs x 3 seeds, two runs at a time with one thread each: about 95 minutes on 2 cores.
# Re-running resumes unfinished runs and skips finished ones. Results: $OUT/results.md,
# $OUT/valid_loss.png, $OUT/raw.json, and per run $OUT/runs/<config>/seed<S>/.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-../shared/data/gsm8k/train.jsonl}
OUT=${OUT:-runs/study-cpu-gsm8k}
JOBS=${JOBS:-2}
[[ -f "$DATA" ]] || { echo "cpu-gsm8k.sh: no GSM8K file at $DATA" >&2; exit 2; }
COMMON=(data.source=jsonl "data.paths=[$DATA]" "data.text_keys=[question,answer]"
        data.split=95,5,0 train.steps=240 train.micro_batch_size=16 train.global_batch_size=16
        schedule.warmup_steps=24 train.eval_interval=40 train.eval_iters=8
        train.log_interval=20 checkpoint.save_interval=80 checkpoint.keep_last=1)
# the main comparison first, so that it has all its seeds even if the run is cut short
MAIN=(configs/tiny/moe-8of64.yaml configs/tiny/coe-2-4of64.yaml configs/tiny/moe-8of64-inner.yaml
      configs/tiny/coe-2-4of64-inner.yaml)
REST=(configs/tiny/moe-7of64.yaml configs/tiny/coe-2-3of64.yaml configs/tiny/coe-2-4of48.yaml
      configs/tiny/ablation-shared-router.yaml configs/tiny/ablation-outer-residual.yaml)
PY=${PYTHON:-.venv/bin/python}
"$PY" -m megatron_coe.tools.compare --configs "${MAIN[@]}" --seeds 1 2 3 --jobs "$JOBS" \
    --out "$OUT" "${COMMON[@]}"
"$PY" -m megatron_coe.tools.compare --configs "${MAIN[@]}" "${REST[@]}" --seeds 1 2 3 \
    --jobs "$JOBS" --out "$OUT" "${COMMON[@]}"
