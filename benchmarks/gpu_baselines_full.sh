#!/usr/bin/env bash
# PEAR against the inference-time baselines on the full development data, on a GPU machine
# (the figures of benchmarks/results/gpu_eval_full were made on 1 x H200 and 4 x H200).
#
#   bash benchmarks/gpu_baselines_full.sh STEP OUT MODEL [MODEL ...]
#
# MODEL: a .gguf file, a model folder or a preset; OUT: the results folder. The evaluation data
# come from $PEAR_DATA. Steps, in order:
#   pear        `pear run` on each MODEL with each coefficient range (BOUNDS, default
#               "nonneg none unit"): OUT/runs/<model>-<bounds>/ (the folded checkpoint in model/)
#   queue       base and PEAR (the nonneg run) on every task, full data; then base, PEAR, Ms-PoE
#               and Attention Buckets on the first LIMIT items (LIMIT=all: all of them); then a
#               Ms-PoE diagnostic (one uniform ratio 1.2). QUEUE="full baselines diagnostic"
#               picks the parts.
#   workers     on a machine of several GPUs: every baseline (VARIANTS) on the full data, one
#               `torchrun` of WORKERS (2) processes per GPU (data parallel, sharing OUT/parts)
#   moice       MoICE: train its routers on each MODEL (`pear baseline train moice`,
#               OUT/runs/<model>-moice; MOICE_MICRO sequences per forward pass, default 8; a
#               training cut short continues from its .resume.pt when run again; ROUTERS_FROM=DIR
#               uses DIR/routers-<model> instead, e.g. the committed ones), then base and MoICE on
#               the first LIMIT items of BTASKS, one `torchrun` of PROCS (1) processes per task,
#               batches of MOICE_ROWS (64) rows / MOICE_TOKENS (60000) tokens, MOICE_DECODE
#               (eager; continuous: finished rows replaced): the full-data tables of BENCHMARKS.md
#               §3b ran with PROCS=8 on 1 x H200 (each process gets 1/PROCS of the GPU's memory: on
#               an 80 GB card 8 processes run out of memory at these batches, 4 do not)
#   assemble    once the workers are done: one results JSON per model from the parts alone
#               (`--parts only`; nothing is computed)
# Each `pear eval` call keeps per-example parts in OUT/parts (or PARTS), so a run cut short
# continues where it stopped when the same step is run again. Decoding is Python-bound: two processes per GPU
# nearly double throughput; two Attention Buckets processes at 64 rows / 200,000 tokens hold
# ~120-134 GB of an H200, so two per GPU is the limit there.
set -uo pipefail
STEP=${1:?usage: gpu_baselines_full.sh pear|queue|workers|moice|assemble OUT MODEL [MODEL ...]}
OUT=${2:?usage: gpu_baselines_full.sh STEP OUT MODEL [MODEL ...]}
shift 2
[ $# -ge 1 ] || { echo "usage: gpu_baselines_full.sh STEP OUT MODEL [MODEL ...]" >&2; exit 2; }
MODELS=("$@")
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # several processes share a GPU: less fragmentation
LIMIT=${LIMIT:-200}  # items per task for the baselines; LIMIT=all: the full development data
LIM=(--limit $LIMIT); [ "$LIMIT" = all ] && LIM=()
PARTS=${PARTS:-$OUT/parts}  # per-example parts (PARTS=benchmarks/results/gpu_eval_full/moice/parts continues those)
EVAL=(--dtype bf16 --device cuda --seed 0 --no-progress --parts-dir "$PARTS")
BIG=(--batch-size ${BATCH:-auto} --max-batch-tokens ${MAX_TOKENS:-auto})  # auto: from free GPU memory
BUCKETS=(--batch-size ${BUCKET_BATCH:-64} --max-batch-tokens ${BUCKET_TOKENS:-200000})
BTASKS=${BTASKS:-kv,mdqa-20,hotpotqa,mdqa-10,mmlu}  # longest part first: kv, 1,500 long prompts in one part
UNIFORM=(--variant ms-poe --variant-option min_ratio=1.2 --variant-option max_ratio=1.2 --label ms-poe-uniform-1.2)
name() { basename "${1%.gguf}"; }
folded() { echo "$OUT/runs/$(name "$1")-nonneg/model"; }
mkdir -p "$OUT/res"
ev() {  # ev NAME ARGS...: one pear eval call, its log and results JSON in OUT/res
  local n=$1 rc; shift; echo "== $(date +%T) start $n"
  ( time pear eval "$@" "${EVAL[@]}" --out "$OUT/res/$n.json" ) > "$OUT/res/$n.log" 2>&1; rc=$?
  echo "== $(date +%T) done $n rc=$rc"; grep -A12 "^task" "$OUT/res/$n.log" | tail -8
}

case "$STEP" in
pear)
  for m in "${MODELS[@]}"; do
    for b in ${BOUNDS:-nonneg none unit}; do
      pear run --model "$m" --device cuda --bounds $b --out "$OUT/runs/$(name "$m")-$b" --force --no-progress
    done
  done ;;
queue)
  parts=${QUEUE:-full baselines diagnostic}
  if [[ " $parts " == *" full "* ]]; then
    for t in ${FULL_TASKS:-closedbook mmlu kv mdqa-10 hotpotqa mdqa-20}; do
      for m in "${MODELS[@]}"; do
        ev "full-$(name "$m")-$t" --model "$m" --label base --model "$(folded "$m")" --label pear --task $t "${BIG[@]}"
      done
    done
  fi
  if [[ " $parts " == *" baselines "* ]]; then
    for m in "${MODELS[@]}"; do
      ev "baselines-$(name "$m")" --model "$m" --label base --model "$(folded "$m")" --label pear \
         --model "$m" --variant ms-poe --label ms-poe --task $BTASKS "${LIM[@]}" "${BIG[@]}"
      ev "buckets-$(name "$m")" --model "$m" --label base \
         --model "$m" --variant attention-buckets --label attention-buckets --task $BTASKS "${LIM[@]}" "${BUCKETS[@]}"
    done
  fi
  if [[ " $parts " == *" diagnostic "* ]]; then
    for m in "${MODELS[@]}"; do
      ev "ms-poe-uniform-$(name "$m")" --model "$m" --label base --model "$m" --variant ms-poe --label ms-poe \
         --model "$m" "${UNIFORM[@]}" --task mdqa-10 "${LIM[@]}" "${BIG[@]}"
    done
  fi ;;
workers)  # every baseline (VARIANTS) on the full data, data parallel over the GPUs: one torchrun per call
  n=$(( $(echo ${GPUS:-$(seq 0 $(($(nvidia-smi -L | wc -l) - 1)))} | wc -w) * ${WORKERS:-2} ))
  for v in ${VARIANTS:-ms-poe attention-buckets}; do
    lim=("${BIG[@]}"); [ $v = attention-buckets ] && lim=("${BUCKETS[@]}")
    for m in "${MODELS[@]}"; do
      torchrun --nproc-per-node $n -m pear eval --model "$m" --variant $v --label $v --task $BTASKS "${LIM[@]}" \
        "${EVAL[@]}" "${lim[@]}" --out "$OUT/res/$v-$(name "$m").json" > "$OUT/res/$v-$(name "$m").log" 2>&1
    done
  done ;;
moice)  # MoICE: routers (reference recipe, SQuAD 2.0 long instructions), then base and MoICE
  for m in "${MODELS[@]}"; do
    r="$OUT/runs/$(name "$m")-moice"
    [ -n "${ROUTERS_FROM:-}" ] && r="$ROUTERS_FROM/routers-$(name "$m")"
    # bf16 as the reference trains (flash attention); the routers themselves run in fp32
    [ -f "$r/routers.safetensors" ] || pear baseline train moice --model "$m" --device cuda --dtype bf16 --out "$r" --force \
      --micro-batch ${MOICE_MICRO:-8} \
      >> "$OUT/res/moice-train-$(name "$m").log" 2>&1
    for t in ${BTASKS//,/ }; do  # one launch per task: its table is complete once the launch ends
      n="moice-$(name "$m")-$t"; echo "== $(date +%T) start $n"
      torchrun --nproc-per-node ${PROCS:-1} -m pear eval --model "$m" --label base --model "$m" --variant moice \
        --variant-option routers="$r" --label moice --task $t "${LIM[@]}" "${EVAL[@]}" \
        --batch-size ${MOICE_ROWS:-64} --max-batch-tokens ${MOICE_TOKENS:-60000} --decode ${MOICE_DECODE:-eager} \
        --out "$OUT/res/$n.json" \
        > "$OUT/res/$n.log" 2>&1
      echo "== $(date +%T) done $n rc=$?"
    done
  done ;;
assemble)  # one results JSON per model (base, pear, ms-poe, attention-buckets) from the parts only
  for m in "${MODELS[@]}"; do
    ev "baselines-full-$(name "$m")" --model "$m" --label base --model "$(folded "$m")" --label pear \
       --model "$m" --variant ms-poe --label ms-poe --model "$m" --variant attention-buckets --label attention-buckets \
       --task $BTASKS "${LIM[@]}" "${BIG[@]}" --parts only
  done ;;
*) echo "usage: gpu_baselines_full.sh pear|queue|workers|moice|assemble OUT MODEL [MODEL ...]" >&2; exit 2 ;;
esac
