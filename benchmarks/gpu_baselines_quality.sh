#!/usr/bin/env bash
# Quality of PEAR vs the inference-time baselines, on one GPU.
#
#   benchmarks/gpu_baselines_quality.sh MODEL PEAR_DIR [OUT_DIR] [LIMIT]
#   benchmarks/gpu_baselines_quality.sh smollm2-135m runs/smollm2/model benchmarks/results
#   benchmarks/gpu_baselines_quality.sh qwen2.5-coder-0.5b runs/qwen05/model benchmarks/results
#
# One `pear eval` run, four columns on the same examples: the base model, the PEAR-folded
# checkpoint, the base model under Ms-PoE and under Attention Buckets; tasks mdqa-10, mdqa-20
# (gold at every position), kv, hotpotqa, mmlu. Paired differences to the first column come
# with bootstrap intervals. Needs $PEAR_DATA (the evaluation data folder). LIMIT (default: all)
# caps the items per task. Attention Buckets runs 6 copies of each row: its batches are 6x
# larger in memory, so --batch-size is kept moderate.
set -euo pipefail
MODEL=${1:?model spec}
PEAR_DIR=${2:?PEAR-folded checkpoint folder}
OUT_DIR=${3:-benchmarks/results}
LIMIT=${4:-}
name=$(basename "$MODEL")
mkdir -p "$OUT_DIR"
limit_arg=()
[ -n "$LIMIT" ] && limit_arg=(--limit "$LIMIT")
pear eval \
  --model "$MODEL" --label base \
  --model "$PEAR_DIR" --label pear \
  --model "$MODEL" --variant ms-poe --label ms-poe \
  --model "$MODEL" --variant attention-buckets --label attention-buckets \
  --task mdqa-10,mdqa-20,kv,hotpotqa,mmlu "${limit_arg[@]}" \
  --dtype bf16 --device cuda --batch-size 16 --max-batch-tokens 65536 \
  --log-samples --resume --out "$OUT_DIR/baselines_${name}.json"
