#!/usr/bin/env bash
# The lead's GPU session: real models on a lent GPU machine (no network, no gguf package there).
#
# Here (CPU machine), once: build a bundle of the GGUF files of MODELS (default: both), the evaluation data and the
# wheels the GPU image lacks, split into 42 MB chunks under .m/ (ignored by git; one chunk plus
# the working tree, ~22 MB with the recorded results, stays under the tool's 64 MiB per call):
#     bash benchmarks/gpu_session.sh bundle
# Then one device call per chunk (carry .m/cNN; command: mkdir -p /root/m && cp .m/c* /root/m/; the
# tool runs several calls of one message back to back, ~5 s each), and on the GPU machine, in order:
#     bash benchmarks/gpu_session.sh setup      # join, unpack, install wheels, convert models,
#                                               # fold the recorded PEAR coefficients
#     setsid nohup bash benchmarks/gpu_session.sh queue > /root/queue.log 2>&1 &   # evaluations
# Several queues may share the GPU (decoding is Python-bound: one process leaves the GPU mostly
# idle), but each process's PyTorch caches what it once used: two at BATCH=384
# MAX_TOKENS=1100000 peaked at ~120 GB of an H200; three at 512/1.5M ran out of
# memory while loading models. Start a queue only after `setup` has finished.
#     bash benchmarks/gpu_session.sh collect    # tar results (no weights) into $OUT
# (To start on the larger model while the smaller one travels: MODELS=<large> bash ... bundle, then
# PREFIX=s MODELS_ONLY=1 MODELS=<small> bash ... bundle for chunks .m/sNN without data and wheels;
# on the GPU machine `PREFIX=s MODELS=<small> setup` joins the second.)
# On a machine of several GPUs, the baselines on the full development data run data-parallel:
#     GPUS="0 1 2" bash benchmarks/gpu_session.sh workers   # torchrun, WORKERS (2) processes per GPU,
#                                               # from a copy of the tree; parts in /root/parts
#     bash benchmarks/gpu_session.sh assemble   # once they are done: one results JSON per model
#                                               # from the parts alone (--parts only; nothing computed)
# Every pear eval call writes its own results JSON and keeps per-example parts in /root/parts,
# so whatever finished is kept if the machine's time runs out, and a later machine given the
# parts back (PARTS_IN=folder, e.g. PARTS_IN=benchmarks/results/gpu_eval_full/parts, which
# travels with the working tree) continues where the last one stopped. The queue runs in priority
# order: (1) base and PEAR on the full development data, (2) base, PEAR, Ms-PoE and Attention
# Buckets on the first LIMIT items of each task (LIMIT=all: all of them; the parts make a
# long run resumable over several machines), (3) a Ms-PoE diagnostic (uniform ratio 1.2).
set -uo pipefail
M=/root/m
MODELS=${MODELS:-"smollm2-135m qwen2.5-coder-0.5b"}
export PYTHONPATH=/tmp/site:$PWD PEAR_CACHE=/root/cache PEAR_DATA=$M/data PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # several processes share a GPU: less fragmentation
LIMIT=${LIMIT:-200}  # items per task for the baselines; LIMIT=all: the full development data
LIM=(--limit $LIMIT); [ "$LIMIT" = all ] && LIM=()
EVAL=(--dtype bf16 --device cuda --seed 0 --no-progress --parts-dir /root/parts)
BIG=(--batch-size ${BATCH:-auto} --max-batch-tokens ${MAX_TOKENS:-auto})  # auto: from free GPU memory
BUCKETS=(--batch-size 96 --max-batch-tokens 300000)
PREFIX=${PREFIX:-c}  # the chunks' name: .m/c00, .m/c01, ... (a second bundle: PREFIX=s MODELS_ONLY=1)
# the baselines' tasks, longest parts first: kv is one part of 1,500 long prompts (Attention Buckets:
# 900-1,150 s in one process, the last to finish on machine 5 when it came third)
BTASKS=${BTASKS:-kv,mdqa-20,hotpotqa,mdqa-10,mmlu}
# the Ms-PoE diagnostic: one uniform ratio 1.2 instead of the spread 1.2-1.8
UNIFORM=(--variant ms-poe --variant-option min_ratio=1.2 --variant-option max_ratio=1.2 --label ms-poe-uniform-1.2)

case "${1:-}" in
bundle)
  set -e
  d=$(mktemp -d); mkdir -p "$d/whl"
  # parts are keyed on the model file's name, size and mtime: each GGUF travels with the mtime the
  # recorded parts (benchmarks/results/gpu_eval_full/parts) were made with, whenever it was installed here
  declare -A MTIME=([smollm2-135m]=1795304670 [qwen2.5-coder-0.5b]=1795315955)
  for m in $MODELS; do  # only the models this session needs (MODELS=...): fewer chunks
    f=$(python3 -c "from pear.loading import resolve_spec as r; s=r('$m'); print(s.path+'/'+s.gguf_file)")
    cp "$f" "$d/$m.gguf" && touch -d @${MTIME[$m]:-1767225600} "$d/$m.gguf"
  done
  extra=()
  if [ -z "${MODELS_ONLY:-}" ]; then  # MODELS_ONLY=1: a second bundle of more models, for a machine that has the rest
    mkdir -p "$d/data"; for x in README.md litm hotpotqa mmlu squad_v2; do cp -r "${DATA_SRC:-../shared/data}/$x" "$d/data/"; done
    python3 -m pip download -q --no-deps -d "$d/whl" transformers==5.23.0 gguf==0.19.0 rank-bm25==0.2.2
    extra=(data whl)
  fi
  mkdir -p .m && rm -f .m/$PREFIX??
  (cd "$d" && tar ch *.gguf "${extra[@]}") | split -b ${CHUNK:-42000000} -d - .m/$PREFIX
  ls -la .m ;;
setup)
  set -e
  cat $M/$PREFIX?? | tar x -C $M && rm -f $M/$PREFIX??
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $M/whl/*.whl
  mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -m pear.cli "$@"\n' > /tmp/bin/pear; chmod +x /tmp/bin/pear
  for m in $MODELS; do
    [ -n "${NO_FOLD:-}" ] && continue  # NO_FOLD=1: only the base models are run here (e.g. the baselines' parts)
    pear inspect --model $M/$m.gguf --device cuda
    # the PEAR checkpoints evaluated: the coefficients `pear run` learned on this GPU (recorded in
    # benchmarks/results/gpu_eval/runs/), folded into the base weights again
    pear fold --model $M/$m.gguf --device cuda --coefficients benchmarks/results/gpu_eval/runs/$m-nonneg/coefficients.json \
      --out /root/runs/$m-nonneg/model --force
  done
  # result parts are keyed on model files' name, size and mtime: a fixed mtime lets the next
  # machine's fold (same bytes) reuse this machine's parts
  [ -d /root/runs ] && find /root/runs -type f -exec touch -d 2026-01-01T00:00:00 {} +
  if [ -n "${PARTS_IN:-}" ]; then mkdir -p /root/parts && cp -n $PARTS_IN/* /root/parts/; fi ;;
pear)
  for m in $MODELS; do
    for b in ${BOUNDS:-nonneg none unit}; do
      ( time pear run --model $M/$m.gguf --device cuda --bounds $b --out /root/runs/$m-$b --force --no-progress ) 2>&1 | tail -25
    done
  done ;;
queue)  # queue [full] [baselines] [diagnostic]: the parts to run (default: all three, in this order)
  mkdir -p /root/res
  shift; parts=${*:-full baselines diagnostic}
  ev() {
    local name=$1 rc; shift; echo "== $(date +%T) start $name"
    ( time pear eval "$@" "${EVAL[@]}" --out /root/res/$name.json ) > /root/res/$name.log 2>&1; rc=$?
    echo "== $(date +%T) done $name rc=$rc"; grep -A12 "^task" /root/res/$name.log | tail -8
  }
  if [[ " $parts " == *" full "* ]]; then
    for t in ${FULL_TASKS:-closedbook mmlu kv mdqa-10 hotpotqa mdqa-20}; do
      for m in $MODELS; do
        ev "full-$m-$t" --model $M/$m.gguf --label base --model /root/runs/$m-nonneg/model --label pear --task $t "${BIG[@]}"
      done
    done
  fi
  if [[ " $parts " == *" baselines "* ]]; then
    for m in $MODELS; do
      ev "baselines-$m" --model $M/$m.gguf --label base --model /root/runs/$m-nonneg/model --label pear \
         --model $M/$m.gguf --variant ms-poe --label ms-poe --task mdqa-10,mdqa-20,kv,hotpotqa,mmlu "${LIM[@]}" "${BIG[@]}"
      ev "buckets-$m" --model $M/$m.gguf --label base \
         --model $M/$m.gguf --variant attention-buckets --label attention-buckets --task mdqa-10,mdqa-20,kv,hotpotqa,mmlu "${LIM[@]}" "${BUCKETS[@]}"
    done
  fi
  if [[ " $parts " == *" diagnostic "* ]]; then
    for m in $MODELS; do
      ev "ms-poe-uniform-$m" --model $M/$m.gguf --label base --model $M/$m.gguf --variant ms-poe --label ms-poe \
         --model $M/$m.gguf "${UNIFORM[@]}" \
         --task mdqa-10 "${LIM[@]}" "${BIG[@]}"
    done
  fi
  echo "== $(date +%T) queue finished: $parts" ;;
workers)  # data-parallel baselines: one torchrun of WORKERS (2) processes per GPU of GPUS (default: all), detached
  tree=$(mktemp -d /root/w.XXXX) && cp -r "$PWD/." $tree  # the next call replaces this tree, and
  mkdir -p /root/res                                     # earlier runs still go on from their own copy
  gpus=${GPUS:-$(seq -s' ' 0 $(($(nvidia-smi -L | wc -l) - 1)))}
  (cd $tree && CUDA_VISIBLE_DEVICES=${gpus// /,} NPROC=$(( $(wc -w <<< "$gpus") * ${WORKERS:-2} )) setsid nohup \
     bash benchmarks/gpu_session.sh worker > /root/res/workers-${tree#/root/w.}.log 2>&1 < /dev/null &)
  sleep 2; pgrep -fc "gpu_session.sh worker" ;;
worker)  # every baseline run (VARIANTS) on the full data, each one torchrun of NPROC processes sharing the batches
  W=(--out /root/res/worker.json)
  dp() { python3 -m torch.distributed.run --standalone --nproc-per-node ${NPROC:-2} -m pear eval "$@"; }
  [ "${DIAG:-1}" = 1 ] && dp --model $M/qwen2.5-coder-0.5b.gguf "${UNIFORM[@]}" --task mdqa-10 --limit 150 "${EVAL[@]}" "${BIG[@]}" "${W[@]}"
  for v in ${VARIANTS:-ms-poe attention-buckets}; do
    lim=("${BIG[@]}"); [ $v = attention-buckets ] && lim=(--batch-size ${BUCKET_BATCH:-64} --max-batch-tokens ${BUCKET_TOKENS:-200000})
    for m in $MODELS; do
      dp --model $M/$m.gguf --variant $v --label $v --task $BTASKS "${LIM[@]}" "${EVAL[@]}" "${lim[@]}" "${W[@]}"
    done
  done
  echo "== $(date +%T) worker finished" ;;
assemble)  # one results JSON per model: base, pear, ms-poe, attention-buckets, from the parts only
  mkdir -p /root/res
  for m in $MODELS; do
    ( pear eval --model $M/$m.gguf --label base --model /root/runs/$m-nonneg/model --label pear \
        --model $M/$m.gguf --variant ms-poe --label ms-poe --model $M/$m.gguf --variant attention-buckets \
        --label attention-buckets --task $BTASKS "${LIM[@]}" "${EVAL[@]}" "${BIG[@]}" --parts only \
        --out /root/res/baselines-full-$m.json ) > /root/res/baselines-full-$m.log 2>&1
    tail -45 /root/res/baselines-full-$m.log
  done
  pear eval --model $M/qwen2.5-coder-0.5b.gguf --label base --model $M/qwen2.5-coder-0.5b.gguf --variant ms-poe \
    --label ms-poe --model $M/qwen2.5-coder-0.5b.gguf "${UNIFORM[@]}" --task mdqa-10 --limit 150 "${EVAL[@]}" "${BIG[@]}" \
    --parts only --out /root/res/ms-poe-uniform-qwen2.5-coder-0.5b.json > /root/res/ms-poe-uniform-qwen2.5-coder-0.5b.log 2>&1
  tail -12 /root/res/ms-poe-uniform-qwen2.5-coder-0.5b.log ;;
collect)
  mkdir -p /root/res/runs
  for d in /root/runs/*; do
    [ -d "$d" ] || continue
    mkdir -p /root/res/runs/$(basename $d)
    cp $d/*.json $d/*.md $d/*.png /root/res/runs/$(basename $d)/ 2>/dev/null
    cp $d/model/pear.json /root/res/runs/$(basename $d)/model_pear.json 2>/dev/null
  done
  cp /root/queue*.log /root/res/ 2>/dev/null
  tar czf "$OUT/gpu_results.tgz" -C /root res parts
  ls -la "$OUT" ;;
*) echo "usage: gpu_session.sh bundle|setup|pear|queue|workers|worker|assemble|collect" >&2; exit 2 ;;
esac
