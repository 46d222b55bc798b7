#!/usr/bin/env bash
# Session 5's GPU steps (issues 21-23), two device calls of at most ~9.5 min each on one H100 or H200:
#   tests     the CUDA-only tests of this session's code: the cuDNN backend and its conformance cases,
#             the AttentionPlan's CUDA-graph capture, FlashAttention's ported ALiBi grid on Triton, the
#             public calls on CUDA tensors (4 pytest workers so the compiles overlap)
#   exact     bench/exact_gpu.py: exact ALiBi through poslsh.attention (cudnn, triton, flex, auto) beside
#             bias-free SDPA (cuDNN and flash), 16K-256K, forward and forward + backward; the shipped speed
#             table with those measurements merged ($OUT/speed_table.json)
#   decode    bench/host_overhead.py --device cuda: one decode step (B = 1, H = 32, D = 128, bf16) per method
#             through the plan and the public call: enqueue, wall, GPU-event and graph-replay time, 64K-1M keys
#   generate  bench/generate_gpu.sh: poslsh generate-bench, BLOOM-560m shape 4K-256K every arm, then the
#             BLOOM-7b1 shape with window + eviction by chunked prefill up to 1M tokens
# The cuDNN frontend travels as a wheel (.whl, carried): installed into /tmp/site first.
#     STEPS="tests exact decode" OUT=/tmp/out bash bench/gpu_session5.sh ; STEPS=generate ... (a second call)
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-tests exact decode}
mkdir -p "$OUT"
log=$OUT/log.txt
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { [[ " $STEPS " == *" $1 "* ]]; }
step() { local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$log"; timeout "$t" "$@" >>"$log" 2>&1;
         echo "=== rc=$?" | tee -a "$log"; tail -4 "$log"; }

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$log"
if has tests; then
  step 200 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_cudnn.py tests/test_plan.py tests/test_cuda_public_calls.py \
    tests/test_flash_grid.py tests/test_hf_integration.py -k "cuda or cudnn or graph"
  step 120 python3 -m pytest -q -n 4 -p no:cacheprovider tests/test_conformance.py -k cudnn
fi
if has exact; then
  cp poslsh/attention/speed_table.json "$OUT/"
  step 200 python3 bench/exact_gpu.py --out "$OUT/exact_gpu" --write-table "$OUT/speed_table.json"
fi
if has decode; then
  for nk in 65536 262144 1048576; do
    step 60 python3 bench/host_overhead.py --device cuda --nk $nk --reps 200 --json "$OUT/decode_$nk.json"
  done
fi
if has generate; then
  OUT=$OUT bash bench/generate_gpu.sh
fi
