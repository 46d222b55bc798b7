#!/usr/bin/env bash
# The one-GPU machine's share of context parallelism (issues 15 and 16) and the GPU checks of the public
# calls, in one device call (~8 min; the Triton and Flex compiles dominate the tests and the smoke run):
#   tests  the CUDA-only tests (compiled backends with q_offset: what a shard runs; flash_attn_func,
#          varlen and poslsh.attention on CUDA tensors), 6 pytest workers so the compiles overlap
#   smoke  cp-bench through torchrun and NCCL with one process: every method at 32K, checked (the exact
#          ring too), run beside the tests on the other CPU cores
#   halo   the one-GPU weak-scaling baseline at 256K and 1M tokens (window, hybrid, LSH; bench/cp_gpu.sh)
#   split  the split form at 1M tokens (its int64 offsets)
#     STEPS="tests smoke halo split" OUT=/tmp/out bash bench/h200_session4.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-tests smoke halo split}
mkdir -p "$OUT"
log=$OUT/log.txt
has() { [[ " $STEPS " == *" $1 "* ]]; }
step() { local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$log"; timeout "$t" taskset -c 0-7 "$@" >>"$log" 2>&1;
         echo "=== rc=$?" | tee -a "$log"; tail -3 "$log"; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$log"
if has smoke; then
  (MODE=smoke timeout 330 taskset -c 8-15 bash bench/cp_gpu.sh 1 "$OUT/cp_smoke" >"$OUT/smoke_log.txt" 2>&1
   echo "=== smoke rc=$?" >>"$OUT/smoke_log.txt") &
fi
if has tests; then
  step 220 python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_distributed_cuda.py
  step 220 python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_cuda_public_calls.py
fi
wait
if has smoke; then tail -4 "$OUT/smoke_log.txt"; fi
if has halo; then MODE=halo step 150 bash bench/cp_gpu.sh 1 "$OUT/cp_halo_1gpu"; fi
if has split; then step 110 python3 bench/split_gpu.py --out "$OUT/split_1m" --ns 1048576 --budget-s 90; fi
find "$OUT" -type f ! -name '*.json' ! -name '*log.txt' -delete
