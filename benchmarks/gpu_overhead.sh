#!/usr/bin/env bash
# Inference overhead of PEAR vs Ms-PoE vs Attention Buckets on one GPU at 4k context.
#
#   benchmarks/gpu_overhead.sh [MODEL] [PEAR_DIR] [OUT_DIR]
#   benchmarks/gpu_overhead.sh smollm2-135m runs/smollm2/model benchmarks/results
#   benchmarks/gpu_overhead.sh qwen2.5-coder-0.5b "" benchmarks/results
#
# Runs `pear bench overhead` (base, PEAR-folded, Ms-PoE, Attention Buckets, MoICE with its experts
# stacked in one call and one after another, interleaved in one process; VARIANTS picks) in bf16
# on cuda at 4096 prompt tokens + 64 greedy steps, batch 1 and batch 8, and
# saves one JSON per setting next to the printed table. Without PEAR_DIR a folded checkpoint is
# made with `pear fold` from a fixed set of coefficients: speed and memory do not depend on the
# coefficient values (same architecture, same parameter count; the benchmark checks both).
set -euo pipefail
MODEL=${1:-smollm2-135m}
PEAR_DIR=${2:-}
OUT_DIR=${3:-benchmarks/results}
TRIALS=${TRIALS:-7}
mkdir -p "$OUT_DIR"
name=$(basename "$MODEL")

if [ -z "$PEAR_DIR" ]; then
  PEAR_DIR="$OUT_DIR/.pear-folded-$name"
  if [ ! -f "$PEAR_DIR/config.json" ]; then
    coefs="$OUT_DIR/.coefficients-$name.json"
    echo '{"heads": [{"layer": 1, "head": 0, "coefficient": 0.6}, {"layer": 2, "head": 1, "coefficient": 0.8}, {"layer": 3, "head": 0, "coefficient": 1.2}]}' > "$coefs"
    pear fold --model "$MODEL" --dtype bf16 --device cuda --coefficients "$coefs" --out "$PEAR_DIR" --force
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/overhead_${name}_gpu.txt"
for batch in 1 8; do
  pear bench overhead --model "$MODEL" --pear "$PEAR_DIR" --context 4096 --new-tokens 64 \
    --trials "$TRIALS" --warmup 2 --batch "$batch" --dtype bf16 --device cuda \
    --variants "${VARIANTS:-base,pear,ms-poe,attention-buckets,moice,moice-one-by-one}" \
    --out "$OUT_DIR/overhead_${name}_4k_b${batch}.json" | tee "$OUT_DIR/overhead_${name}_4k_b${batch}.txt"
done
