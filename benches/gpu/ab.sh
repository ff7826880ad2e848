#!/usr/bin/env bash
# One device call: A/B of libtpla builds in .devbin/, by default tpla (A) and tpla_b (B)
# timed alternately twice (A B A B, so a clock drop shows as a difference between the
# two runs of the same build; BINS="tpla tpla_b tpla_c tpla tpla_b tpla_c" for more),
# then FlashMLA's dense decode on the same GPU (FM_SHAPES=context:batch,...).
#   benches/gpu/ab.sh [tpla bench args...]   e.g. --preset deepseek-v3 --groups 1 --batch 64
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
libs=/tmp/tpla-libs; mkdir -p $libs
f=$(find / -name "libnvrtc.so.*[0-9]" -not -path "*/proc/*" 2>/dev/null | grep -v stub | head -1)
[ -n "$f" ] && for x in $(dirname "$f")/libnvrtc*.so*; do ln -sf "$x" $libs/; done && ln -sf "$f" $libs/libnvrtc.so
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
for v in ${BINS:-tpla tpla_b tpla tpla_b}; do
  TPLA_CACHE_DIR=/tmp/kc_$v timeout 200 .devbin/$v bench --backend cuda --json --repeats 30 --context 32768 "$@" \
    > $OUT/$v.jsonl 2>> $OUT/log.txt
  echo "== $v"; python3 benches/gpu/summary.py $OUT/$v.jsonl /dev/null
done
timeout 200 python3 .anchors/flashmla_bench.py "$(pwd)/.anchors/flash_mla_dense.so" --heads 128,64,32 \
  --shapes ${FM_SHAPES:-32768:64,32768:128} > $OUT/fm.jsonl 2>> $OUT/log.txt
cat $OUT/fm.jsonl
