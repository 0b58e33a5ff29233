#!/usr/bin/env bash
# Full-data evaluation numbers of issue 4, on one GPU (H100/H200), for the lead to run.
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
# Environment: TASKS (default below), BATCH (rows per batch, default 256), MAX_BATCH_TOKENS
# (rows x (prompt + new tokens), default 524288; a batch that runs out of GPU memory is
# split in two and retried), DTYPE (bf16), DEVICE (cuda), PEAR_DATA (the data folder),
# EXTRA (more pear eval options, e.g. EXTRA="--limit 3" for a smoke test on the CPU).
#
# Estimated time (bf16). Measured on an H200 with pear eval at --batch-size 128
# --max-batch-tokens 400000 (benchmarks/results/gpu_eval, mdqa-10, 2,500 examples): 26-49
# examples/s for SmolLM2-135M and Qwen2.5-0.5B alike (decoding steps, not model size,
# dominate). Examples per model: mdqa-10 8,850, mdqa-20 8,850, hotpotqa 11,022, kv 1,500
# (~5.4k-token prompts, 128 new tokens), closedbook 1,770, mmlu 14,042 (one forward each).
# At ~35 examples/s for QA, ~10/s for kv and ~500/s for mmlu: ~15-20 min per model at
# batch 128, less at the default 256 rows; an H100 is somewhat slower than an H200.
set -euo pipefail
OUT=${1:?usage: gpu_eval.sh OUTDIR SPEC [SPEC ...]}
shift
[ $# -ge 1 ] || { echo "usage: gpu_eval.sh OUTDIR SPEC [SPEC ...]" >&2; exit 2; }
TASKS=${TASKS:-"closedbook mmlu kv mdqa-10 hotpotqa mdqa-20"}
COMMON=(--dtype "${DTYPE:-bf16}" --device "${DEVICE:-cuda}" --batch-size "${BATCH:-256}"
        --max-batch-tokens "${MAX_BATCH_TOKENS:-524288}" --seed 0 --parts-dir "$OUT/parts" --no-progress ${EXTRA:-})
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
