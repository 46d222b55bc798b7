#!/usr/bin/env bash
# The one-GPU machine's share of context parallelism (issues 15 and 16) and the GPU checks of the public
# calls, in one device call (~8 min; the Triton and Flex compiles dominate the tests and the smoke run):
#   tests  the CUDA-only tests (compiled backends with q_offset: what a shard runs; flash_attn_func,
#          varlen and poslsh.attention on CUDA tensors), 6 pytest workers so the compiles overlap
#   smoke  cp-bench through torchrun and NCCL with one process: every method at 32K, checked (the exact
#          ring too), run beside the tests on the other CPU cores
#   halo   the one-GPU weak-scaling baseline at 256K and 1M tokens (window, hybrid, LSH; bench/cp_gpu.sh)
#   split  the split form at 1M tokens (its int64 offsets)
#   cpu    the CPU weak-scaling run the 2-core CI machine cannot hold: cp-bench on gloo, 1 and 4
#          processes of one thread each on cores 8-15, window, LSH and hybrid at 2048 and 8192 per rank
#   exact  issue 23: the cudnn backend's GPU tests and its conformance cases (needs nvidia-cudnn-frontend:
#          pip install --no-index --no-deps --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site)
#   exactbench  bench/exact_gpu.py (exact ALiBi: cudnn, triton, flex, auto, bias-free SDPA; 16K-256K,
#          ~2.5 min on an H100) and the shipped speed table with its measurements merged, $OUT/speed_table.json
# SMOKE_FLAGS go to the smoke run's cp-bench (e.g. --methods exact).
#     STEPS="tests smoke halo split cpu" OUT=/tmp/out bash bench/h200_session4.sh
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
if has cpu; then
  (timeout 480 taskset -c 8-15 python3 -m poslsh_lab.cli cp-bench --device cpu --threads 1 --world-sizes 1 4 \
     --lengths 2048 8192 --methods window lsh hybrid --out "$OUT/cp_cpu_4proc" >"$OUT/cpu_log.txt" 2>&1
   echo "=== cpu rc=$?" >>"$OUT/cpu_log.txt") &
fi
if has smoke; then  # on cores 0-7 when the CPU run has 8-15, else beside the tests on 8-15
  (MODE=smoke timeout 330 taskset -c "$(has cpu && echo 0-7 || echo 8-15)" bash bench/cp_gpu.sh 1 "$OUT/cp_smoke" \
     ${SMOKE_FLAGS:-} >"$OUT/smoke_log.txt" 2>&1; echo "=== smoke rc=$?" >>"$OUT/smoke_log.txt") &
fi
if has tests; then
  step 220 python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_distributed_cuda.py
  step 220 python3 -m pytest -q -n 6 -p no:cacheprovider tests/test_cuda_public_calls.py
fi
wait
if has smoke; then tail -4 "$OUT/smoke_log.txt"; fi
if has cpu; then tail -4 "$OUT/cpu_log.txt"; fi
if has halo; then MODE=halo step 150 bash bench/cp_gpu.sh 1 "$OUT/cp_halo_1gpu"; fi
if has split; then step 110 python3 bench/split_gpu.py --out "$OUT/split_1m" --ns 1048576 --budget-s 90; fi
if has exact; then step 150 python3 -m pytest -q -p no:cacheprovider tests/test_cudnn.py; step 200 python3 -m pytest -q -p no:cacheprovider tests/test_conformance.py -k cudnn; fi
if has exactbench; then cp poslsh/attention/speed_table.json "$OUT/"; step 220 python3 bench/exact_gpu.py --out "$OUT/exact_gpu" --write-table "$OUT/speed_table.json"; fi
find "$OUT" -type f ! -name '*.json' ! -name '*log.txt' -delete
