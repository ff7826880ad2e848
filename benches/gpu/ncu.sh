#!/usr/bin/env bash
# One device call: Nsight Compute reports of libtpla's decode kernel and FlashMLA's
# split-KV kernel on the same shape, same GPU, same call (the evidence behind a kernel
# change: tensor-pipe and shared-memory utilisation, stall reasons, DRAM throughput).
#   benches/gpu/ncu.sh PRESET GROUPS BATCH CONTEXT FLASHMLA_HEADS
# Reports go to $OUT/ncu_*.txt. Needs .devbin/ and .anchors/ as session.sh does.
set -uo pipefail
preset=$1 groups=$2 batch=$3 context=$4 fm_heads=$5
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
libs=/tmp/tpla-libs; mkdir -p $libs
for n in nvrtc cublas cublasLt nccl; do
  f=$(find / -name "lib$n.so.*[0-9]" -not -path "*/proc/*" 2>/dev/null | grep -v stub | head -1)
  [ -n "$f" ] && for x in $(dirname "$f")/lib$n*.so*; do ln -sf "$x" $libs/ 2>/dev/null; done
  [ -n "$f" ] && ln -sf "$f" $libs/lib$n.so
done
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
export TPLA_CACHE_DIR=/tmp/tpla-kcache
sections="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
 --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
 --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__inst_executed.sum,sm__cycles_elapsed.avg"
timeout 240 ncu $sections --kernel-name tpla_decode --launch-skip 3 --launch-count 1 \
  .devbin/tpla bench --backend cuda --preset "$preset" --groups "$groups" --batch "$batch" \
  --context "$context" --repeats 2 -q > $OUT/ncu_tpla.txt 2>&1
echo "ncu tpla rc=$?"
so=$(pwd)/.anchors/flash_mla_dense.so
timeout 240 ncu $sections --kernel-name regex:flash_fwd_splitkv_mla --launch-skip 2 --launch-count 1 \
  python3 .anchors/flashmla_bench.py "$so" --heads "$fm_heads" --shapes "$context:$batch" --steps 3 \
  > $OUT/ncu_flashmla.txt 2>&1
echo "ncu flashmla rc=$?"
for f in $OUT/ncu_tpla.txt $OUT/ncu_flashmla.txt; do
  echo "== $f"; grep -E "^  [a-z_]+|Duration|Throughput|Pipe|hmma|wavefronts|conflicts|Stall|Issued|Eligible|Active Warps|Registers|Shared Memory Config|Dynamic Shared|inst_executed|cycles_elapsed|==PROF==|Error" $f | head -70
done
