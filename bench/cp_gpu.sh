#!/usr/bin/env bash
# Context parallelism on N GPUs (issue 16): `poslsh cp-bench` under torchrun, NCCL, one GPU per process.
# B=1, H=32, D=128, bf16, causal, Press slopes; weak scaling over 1, 2, 4, 8 GPUs (sub-groups of the
# launched ranks); each method checked against one GPU on the gathered sequence at 32K tokens per GPU.
#
#   bench/cp_gpu.sh [NPROC [OUT [cp-bench flags...]]]   NPROC: GPUs (default: all visible)
#   MODE=halo  (default) window (eps 1e-3), hybrid and LSH (r = 8) at 256K and 1M tokens per GPU
#   MODE=exact the exact ring (zigzag layout) at 256K tokens per GPU, one timed call per phase (it is
#              quadratic: on 8 GPUs one forward+backward takes about a minute; 1M per GPU would take ~16x)
#   MODE=smoke every method at 32K tokens per GPU, checked: the NCCL code path end to end
#              (one GPU: MODE=smoke bench/cp_gpu.sh 1)
# Extra flags after OUT go to cp-bench (the last occurrence of a flag wins), e.g. --methods window lsh;
# DEVICE=cpu runs the same launch on gloo (to check the script without a GPU).
#
# NCCL's NVLink multicast stays off (the lent machines' rule), here and again inside poslsh itself.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
cd "$(dirname "$0")/.."
NPROC=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
MODE=${MODE:-halo}
OUT=${2:-bench/results/cp_gpu_${MODE}_${NPROC}gpu}
shift $(( $# < 2 ? $# : 2 ))
WORLD_SIZES=""
for w in 1 2 4 8 16; do
  if [ "$w" -le "$NPROC" ]; then WORLD_SIZES="$WORLD_SIZES $w"; fi
done
case "$MODE" in
  halo)  RUN=(--methods window hybrid lsh --lengths 262144 1048576 --check-lengths 32768 --check-max-total 0
              --repeats 3) ;;
  exact) RUN=(--methods exact --lengths 262144 --exact-max-local 262144 --check-lengths 32768
              --check-max-total 0 --repeats 1 --warmup 1) ;;
  smoke) RUN=(--methods window hybrid lsh exact --lengths 32768 --exact-max-local 32768 --check-max-total 1048576
              --repeats 2 --no-halo-max) ;;
  *) echo "MODE must be halo, exact or smoke, got $MODE" >&2; exit 2 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # poslsh from this checkout
exec torchrun --standalone --nproc-per-node "$NPROC" -m poslsh_lab.cli cp-bench --world-sizes $WORLD_SIZES \
  --batch 1 --heads 32 --head-dim 128 --dtype bfloat16 --causal --window-eps 1e-3 --samples 8 --hybrid-eps 1e-2 \
  --exact-layout zigzag --device "${DEVICE:-cuda}" --threads 0 "${RUN[@]}" --out "$OUT" "$@"
