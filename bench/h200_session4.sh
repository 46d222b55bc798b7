#!/usr/bin/env bash
# The one-GPU machine's share of context parallelism (issues 15 and 16), in one device call (~9 min):
#  * in the background, on CPU cores 8-15: `poslsh cp-bench` on gloo at 1, 2 and 4 processes, one thread
#    each (the CPU weak-scaling run; the 2-core CI machine cannot hold 4 busy processes);
#  * on cores 0-7 and the GPU: the CUDA-only tests (compiled backends with q_offset; the public calls on
#    CUDA tensors), cp-bench through torchrun and NCCL with one process (every method, checked), the
#    one-GPU weak-scaling baseline at 256K and 1M tokens (window, hybrid, LSH), and the split form at 1M.
#     bash bench/h200_session4.sh          (OUT: where the JSON goes; defaults to /tmp/out)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log=$OUT/log.txt
step() { local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$log"; timeout "$t" taskset -c 0-7 "$@" >>"$log" 2>&1;
         echo "=== rc=$?" | tee -a "$log"; tail -3 "$log"; }

(timeout 520 taskset -c 8-15 python3 -m poslsh.cli cp-bench --device cpu --threads 1 --out "$OUT/cp_cpu16" \
   >"$OUT/cpu_log.txt" 2>&1; echo "=== cp-bench cpu rc=$?" >>"$OUT/cpu_log.txt") &
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())" | tee -a "$log"
step 150 python3 -m pytest -q -p no:cacheprovider tests/test_distributed_cuda.py
step 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_public_calls.py
MODE=smoke step 100 bash bench/cp_gpu.sh 1 "$OUT/cp_smoke"
MODE=halo step 150 bash bench/cp_gpu.sh 1 "$OUT/cp_halo_1gpu"
step 110 python3 bench/split_gpu.py --out "$OUT/split_1m" --ns 1048576 --budget-s 90
wait
tail -5 "$OUT/cpu_log.txt"
find "$OUT" -type f ! -name '*.json' ! -name '*log.txt' -delete
