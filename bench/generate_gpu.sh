#!/usr/bin/env bash
# poslsh generate-bench on one GPU, in one device call of at most ~8 minutes (H100 80GB or H200):
#   560m  a BLOOM-560m-shaped model (24 layers, 16 heads, random weights, bf16), prompts of 4K..256K tokens
#         read in one call, every arm: transformers' own attention (until it runs out of memory), poslsh
#         exact, window, window + eviction, LSH r = 8, LSH + eviction. A patched arm whose one-call prefill
#         runs out of memory (transformers' 4-D n x n mask at 256K, unless the patch avoids building it) is
#         measured again with the prompt in chunks of 32K (--oom-chunk), and so are its longer prompts.
#   7b1   the moonshot: a BLOOM-7b1-shaped model (30 layers, 32 heads) with window + eviction reads 256K and
#         then 1M tokens in chunks of 8K (the 1M point only if its estimate, 4x the 256K point's time, fits
#         the budget); its warm-up reads 16K tokens in those chunks, so the kernels of the timed shapes compile
#         there
# Time, estimated from the H100 numbers (~16-130 ms per token at 4K..256K; exact's 256K prefill
# ~10 s of attention): 560m ~250 s (38 points at 2-20 s, six warm-ups with their compiles, the model),
# 7b1 ~100 s (7B weights drawn on the GPU in seconds; 1M tokens ~ 1.3e16 FLOPs of projections, ~30 s).
# Each part stops starting points at its --budget-s (and skips a point whose estimate would pass it);
# `timeout` is the hard stop, 30 s later. Both JSON files are saved after every point.
#     OUT=/tmp/out bash bench/generate_gpu.sh            # results in $OUT/generate_bench{,_7b1}/
#     bash bench/generate_gpu.sh                         # results in bench/results/generate_bench{,_7b1}/
set -u
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-bench/results}
STEPS=${STEPS:-560m 7b1}
mkdir -p "$RESULTS"
log=$RESULTS/generate_log.txt
has() { [[ " $STEPS " == *" $1 "* ]]; }
step() { local t=$1; shift; echo "=== $(date +%T) $*" | tee -a "$log"; timeout "$t" "$@" 2>&1 | tee -a "$log" | tail -15;
         echo "=== rc=${PIPESTATUS[0]}" | tee -a "$log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$log"
if has 560m; then
  step 300 python3 -m poslsh_lab.cli generate-bench --shape bloom-560m --oom-chunk 32768 --budget-s 270 \
    --out "$RESULTS/generate_bench"
fi
if has 7b1; then
  step 180 python3 -m poslsh_lab.cli generate-bench --shape bloom-7b1 --arms window_evict --contexts 262144 1048576 \
    --prefill-chunk 8192 --warmup-context 16384 --budget-s 150 --out "$RESULTS/generate_bench_7b1"
fi
