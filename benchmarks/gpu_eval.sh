#!/usr/bin/env bash
# Full-data evaluation on a GPU machine (1 x H100 or H200): every model on every task, every example.
#
#   bash benchmarks/gpu_eval.sh OUTDIR SPEC [SPEC ...]
#   e.g. bash benchmarks/gpu_eval.sh results/eval-full /models/smollm2-135m /models/qwen2.5-coder-0.5b
#
# SPECs: model folders, .gguf files, or presets where their packages are installed. Tasks: mdqa
# with 10 and 20 documents at 5 gold positions, kv (75 keys; first/middle/last), hotpotqa
# (start/middle/end), closedbook, mmlu (0-shot), every example of the development data.
#
# Each (model, task) is one `pear eval` call writing parts (2,048 examples each) into
# OUTDIR/parts; a call cut short (time limit, preemption) resumes where it stopped when the
# script is run again. The last call assembles every model and task from those parts
# (nothing is recomputed) into OUTDIR/eval.json with the paired tests, the table
# (OUTDIR/eval.txt), the U-curve plot (OUTDIR/eval.png) and all samples
# (OUTDIR/eval.samples.jsonl.gz). Per-call logs: OUTDIR/logs/.
#
# Environment: TASKS (default below), BATCH (rows per batch, default 512), MAX_BATCH_TOKENS
# (rows x (prompt + new tokens), default 1500000; a batch that runs out of GPU memory is
# split in two and retried), DTYPE (bf16), DEVICE (cuda), PEAR_DATA (the data folder),
# EXTRA (more pear eval options, e.g. EXTRA="--limit 3" for a smoke test on the CPU).
#
# Estimated time (bf16), from benchmarks/results/gpu_eval_full (one H200, one process,
# --batch-size 512 --max-batch-tokens 1500000, base and PEAR columns): examples/s for SmolLM2-135M /
# Qwen2.5-Coder-0.5B: mdqa-10 107 / 90, hotpotqa 71 / -, mdqa-20 ~29 (two processes sharing the
# GPU), kv 16 / 19 (~5.4k-token prompts, 128 new tokens), closedbook >= 40, mmlu 1,000-1,700.
# Per model and column: ~11 min for mdqa-10 + hotpotqa + mdqa-20 + kv + closedbook + mmlu at
# these rates (the mdqa-20 share is the largest). Decoding is Python-bound: a second process on
# the same GPU nearly doubles throughput (keep the two under the GPU's memory: BATCH=384,
# MAX_BATCH_TOKENS=1100000 each on an H200).
set -euo pipefail
OUT=${1:?usage: gpu_eval.sh OUTDIR SPEC [SPEC ...]}
shift
[ $# -ge 1 ] || { echo "usage: gpu_eval.sh OUTDIR SPEC [SPEC ...]" >&2; exit 2; }
TASKS=${TASKS:-"closedbook mmlu kv mdqa-10 hotpotqa mdqa-20"}
COMMON=(--dtype "${DTYPE:-bf16}" --device "${DEVICE:-cuda}" --batch-size "${BATCH:-512}"
        --max-batch-tokens "${MAX_BATCH_TOKENS:-1500000}" --seed 0 --parts-dir "$OUT/parts" --no-progress ${EXTRA:-})
mkdir -p "$OUT/logs" "$OUT/runs"
MODELS=()
for spec in "$@"; do MODELS+=(--model "$spec"); done

# Gold positions are each task's defaults: mdqa 0%,25%,50%,75%,100% (10 docs: 1,3,5,8,10;
# 20 docs: 1,6,10,15,20), kv first/middle/last (1,38,75), hotpotqa first/middle/last (1,5,9).
run_task() {  # run_task SPEC TASK
  local name; name=$(basename "$1")-$2
  echo "== $(date +%T) $1 $2"
  ( time pear eval --model "$1" --task "$2" "${COMMON[@]}" --out "$OUT/runs/$name.json" ) \
    > "$OUT/logs/$name.log" 2>&1 || { echo "failed: see $OUT/logs/$name.log" >&2; tail -5 "$OUT/logs/$name.log" >&2; exit 1; }
  grep -E "^real" "$OUT/logs/$name.log" || true
}

for spec in "$@"; do
  for t in $TASKS; do run_task "$spec" "$t"; done
done

# Assemble: same specs, tasks and settings, so every part is found; only stats and files.
ALL=()
for t in $TASKS; do ALL+=(--task "$t"); done
pear eval "${MODELS[@]}" "${ALL[@]}" "${COMMON[@]}" --log-samples --out "$OUT/eval.json" \
  | tee "$OUT/eval.txt"
