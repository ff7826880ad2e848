#!/usr/bin/env bash
# One device call: checks and times libtpla's CUDA kernels beside FlashMLA's dense decode
# (../shared/anchors) on the same GPU, in the same call. Run from the repository root on
# the device machine, with the stripped binaries in .devbin/ (tpla, the cuda_decode test,
# the library's unit tests) and FlashMLA's export in .anchors/ (anchors README).
#   benches/gpu/session.sh [tests|bench|all] [extra tpla bench args...]
# Logs go to $OUT; the last lines printed are the summary.
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The pip NVIDIA packages ship only lib*.so.N; the backend dlopens the plain names.
libs=/tmp/tpla-libs; mkdir -p $libs
for n in nvrtc cublas cublasLt nccl; do
  f=$(find / -name "lib$n.so.*[0-9]" -not -path "*/proc/*" 2>/dev/null | grep -v stub | head -1)
  [ -n "$f" ] && ln -sf "$f" $libs/lib$n.so && ln -sf "$f" $libs/$(basename "$f")
  [ -n "$f" ] && for x in $(dirname "$f")/lib$n*.so*; do ln -sf "$x" $libs/ 2>/dev/null; done
done
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
export TPLA_CACHE_DIR=/tmp/tpla-kcache
LOG=$OUT/log.txt  # everything but the tables (the device returns at most 8 files)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,power.limit,temperature.gpu --format=csv >> $LOG 2>&1
if [ "$what" = all ] || [ "$what" = bench ]; then
  # a FlashMLA build carried from an earlier call (copied back to $OUT below) saves ~90 s
  if [ -f .anchors/flash_mla_dense.so ]; then
    so=$(pwd)/.anchors/flash_mla_dense.so; fm_pid=
  else
    ( python3 .anchors/flashmla_build.py .anchors/flashmla /tmp/fm > /tmp/fm_build.log 2>&1 ) &
    fm_pid=$!
  fi
fi
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout 120 .devbin/tpla-lib decode_sources_compile >> $LOG 2>&1; echo "unit compile test rc=$?"
  timeout 400 .devbin/cuda_decode --nocapture --test-threads 1 > $OUT/cuda_decode.log 2>&1; rc=$?
  echo "cuda_decode rc=$rc"; grep -E "^test |panicked|test result" $OUT/cuda_decode.log | grep -v " ok$" | head -20
  for t in ${SANITIZE:-}; do  # test names to run under compute-sanitizer
    for tool in memcheck racecheck; do
      timeout 240 compute-sanitizer --tool $tool .devbin/cuda_decode $t --test-threads 1 > /tmp/san.log 2>&1
      echo "compute-sanitizer $tool ($t) rc=$?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|hazard' /tmp/san.log | head -3 | tr '\n' ' ')"
      cat /tmp/san.log >> $LOG
    done
  done
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  if [ -n "$fm_pid" ]; then
    wait $fm_pid; cat /tmp/fm_build.log >> $LOG; so=$(tail -1 /tmp/fm_build.log); cp "$so" $OUT/flash_mla_dense.so
  fi
  echo "flashmla: $so"
  timeout 300 .devbin/tpla bench --backend cuda --json --repeats 30 "$@" > $OUT/tpla_bench.jsonl 2>> $LOG
  echo "tpla bench rc=$?"
  timeout 200 python3 .anchors/flashmla_bench.py "$so" --heads 128,64,32 --shapes ${FM_SHAPES:-32768:64,32768:128} > $OUT/flashmla.jsonl 2>> $LOG
  echo "flashmla bench rc=$?"
  python3 benches/gpu/summary.py $OUT/tpla_bench.jsonl $OUT/flashmla.jsonl | tee $OUT/summary.txt
fi
