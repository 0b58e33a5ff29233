#!/usr/bin/env bash
# pear eval vs lm-evaluation-harness on every exported task, N examples per task and gold position.
#
#   bash benchmarks/lm_eval_agreement.sh OUTDIR MODEL_FOLDER [N]     # N defaults to 200
#
# MODEL_FOLDER: a Hugging Face folder (for the default model: the converted GGUF folder that
# `pear.load_model("smollm2-135m")` leaves in ~/.cache/pear/converted/). Needs lm_eval
# (`pip install -e ".[lm-eval]"`). Environment: DEVICE (cuda), DTYPE (float32: both tools must
# compute in the same dtype for outputs to agree token for token), BATCH (16), PEAR_DATA, TASKS
# (pear task names, default all seven below; a subset runs only those).
# Writes OUTDIR/agreement.md (the table of benchmarks/lm_eval_agreement.py) and the raw files.
#
# Tasks: oracle, closedbook, mdqa-10 (gold at 1, 5, 10), mdqa-20 (1, 10, 20), hotpotqa
# (start, middle, end), kv (first, middle, last) with the chat template, and mmlu (0-shot, no
# chat template, as pear scores it) in a separate harness call.
set -euo pipefail
OUT=${1:?usage: lm_eval_agreement.sh OUTDIR MODEL_FOLDER [N]}
M=${2:?usage: lm_eval_agreement.sh OUTDIR MODEL_FOLDER [N]}
N=${3:-200}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float32}
BATCH=${BATCH:-16}
PEAR_DTYPE=$([ "$DTYPE" = float32 ] && echo fp32 || echo bf16)
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
TASKS=${TASKS:-oracle,closedbook,mdqa-10,mdqa-20,hotpotqa,kv,mmlu}
python3 -m pear.cli eval --task "$TASKS" --limit "$N" --positions first,middle,last --export-lm-eval "$OUT/tasks"
GEN_NAMES=$(ls "$OUT/tasks" | sed -n 's/\.yaml$//p' | grep -v '^pear_mmlu$' | paste -sd, -)
if [ -n "$GEN_NAMES" ]; then
  lm_eval --model hf --model_args "pretrained=$M,dtype=$DTYPE" --device "$DEVICE" --include_path "$OUT/tasks" \
          --tasks "$GEN_NAMES" --apply_chat_template --batch_size "$BATCH" --log_samples --output_path "$OUT/lm/gen"
fi
if [ -f "$OUT/tasks/pear_mmlu.yaml" ]; then
  lm_eval --model hf --model_args "pretrained=$M,dtype=$DTYPE" --device "$DEVICE" --include_path "$OUT/tasks" \
          --tasks pear_mmlu --batch_size "$BATCH" --log_samples --output_path "$OUT/lm/mc"
fi
python3 -m pear.cli eval --model "$M" --label model --dtype "$PEAR_DTYPE" --device "$DEVICE" --task "$TASKS" \
        --limit "$N" --positions first,middle,last --batch-size "$BATCH" --out "$OUT/lm/pear.json" --log-samples
python3 benchmarks/lm_eval_agreement.py "$OUT/lm/pear.json" "$OUT/lm" | tee "$OUT/agreement.md"
