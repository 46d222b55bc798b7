#!/usr/bin/env bash
# The H200 runs behind the committed session-3 results, in one device call (about 9 minutes):
# the benchmark (checks, backward sweep, forward, decoding, backward), the speed table it implies,
# the split form's primitives checked and timed, and the Pareto study at 256K on the library's fastest
# backends ("auto", after the speed table) and on FlexAttention alone. Logs go to $OUT/all_log.txt.
#     bash bench/h200_session3.sh          (OUT: where the JSON goes; defaults to /tmp/out)
set -u
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1
P=python3
log=$OUT/all_log.txt
mkdir -p "$OUT"
step() { echo "=== $(date +%T) $*" | tee -a "$log"; "$@" >>"$log" 2>&1; echo "=== rc=$?" | tee -a "$log"; tail -4 "$log"; }

step $P -m poslsh_lab.cli bench --out "$OUT/bench" --ns 16384 65536 262144 1048576 --decode-ns 65536 262144 1048576 \
    --budget-s 290
$P - "$OUT/bench/gpu_bench.json" <<'PY' >>"$log" 2>&1
import json, sys
from poslsh.attention.speed import TABLE_PATH
from poslsh_lab.experiments.gpu_bench import speed_table
TABLE_PATH.write_text(json.dumps(speed_table(json.load(open(sys.argv[1]))), indent=1) + "\n")
print("speed table written for the Pareto runs")
PY
step $P bench/split_gpu.py --out "$OUT/split" --ns 65536 262144 --budget-s 60
PARETO="--device cuda --n 262144 --heads 32 --head-dim 128 --dtype bfloat16 --reference-dtype float32 --error-rows 8192
        --heavy-n 0 --no-convergence --no-plots --threads 0"
step $P -m poslsh_lab.cli pareto $PARETO --backend auto --window-eps 0.3 0.1 0.03 0.01 0.003 0.001 0.0001 \
    --hybrid-eps 0.1 0.03 0.01 0.003 0.001 --budget-s 70 --out "$OUT/pareto"
step $P -m poslsh_lab.cli pareto $PARETO --backend flex --window-eps 0.1 0.03 0.01 0.001 0.0001 --samples 8 \
    --samplings iid --hybrid-eps 0.1 0.01 --budget-s 50 --out "$OUT/pareto_flex"
# what comes back: JSON and the log (plots and reports are redrawn here from the JSON)
find "$OUT" -type f ! -name '*.json' ! -name all_log.txt -delete
