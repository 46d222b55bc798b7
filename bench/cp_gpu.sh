#!/usr/bin/env bash
# Context parallelism on N GPUs (issue 16): `poslsh cp-bench` under torchrun, NCCL, one GPU per process.
# B=1, H=32, D=128, bf16, causal, Press slopes; window (eps 1e-3), hybrid and LSH (r = 8), exact (ring,
# zigzag layout); 256K and 1M tokens per GPU; weak scaling over 1, 2, 4, 8 GPUs (sub-groups of the launched
# ranks), a correctness check against one GPU on the gathered sequence at 32K tokens per GPU.
#
#   bench/cp_gpu.sh [NPROC [OUT]]     NPROC: GPUs to use (default: all visible); OUT: results folder
#   SMOKE=1 bench/cp_gpu.sh 1         one GPU, 32K tokens: the NCCL code path end to end, checked
#
# NCCL's NVLink multicast stays off (the lent machines' rule), here and again inside poslsh itself.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
NPROC=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
WORLD_SIZES=""
for w in 1 2 4 8 16; do
  if [ "$w" -le "$NPROC" ]; then WORLD_SIZES="$WORLD_SIZES $w"; fi
done
if [ "${SMOKE:-0}" = "1" ]; then
  OUT=${2:-reports/cp_gpu_smoke}
  SIZES=(--lengths 32768 --check-max-total 32768 --exact-max-local 32768 --repeats 2 --no-halo-max)
else
  OUT=${2:-bench/results/cp_gpu_${NPROC}gpu}
  SIZES=(--lengths 262144 1048576 --check-lengths 32768 --check-max-total 262144 --exact-max-local 262144
         --repeats 3)
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # poslsh from this checkout
exec torchrun --standalone --nproc-per-node "$NPROC" -m poslsh.cli cp-bench --world-sizes $WORLD_SIZES \
  --batch 1 --heads 32 --head-dim 128 --dtype bfloat16 --causal --window-eps 1e-3 --samples 8 \
  --methods window hybrid lsh exact --exact-layout zigzag --device cuda --threads 0 "${SIZES[@]}" --out "$OUT"
