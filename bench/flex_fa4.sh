#!/usr/bin/env bash
# FlexAttention's FlashAttention-4 backend (BACKEND="FLASH") on the GPU machine, from wheels carried in
# two device calls (the CuTe DSL's cu13 library wheel is 88 MiB, split in two parts; see .whl_fa4/).
# Run from the repo root:
#   call 1, carry [".whl_fa4/call1"]:  bash bench/flex_fa4.sh stage
#   call 2, carry [".whl_fa4/call2"]:  bash bench/flex_fa4.sh run --json "$OUT/flex_fa4.json" [check args]
#   or, for any command with FlashAttention-4 importable (the poslsh "flex_fa4" backend registered):
#                                       bash bench/flex_fa4.sh with COMMAND...
# (call 2 must come while the machine of call 1 is still warm: it needs part00 left by call 1.)
# `run` reassembles the split wheel, checks every wheel's sha256, installs them with pip --target
# /tmp/site_fa4 (no index, no deps: torch, triton, cuda-bindings, numpy, einops, protobuf, typing_extensions
# come from the image), puts the CuTe DSL's dsl_packages on PYTHONPATH (its .pth file is not read from a
# --target folder), prints the versions and whether flash_attn.cute imports, then runs
# bench/flex_fa4_check.py (extra arguments passed on). Budget: FA4_BUDGET_S (default 235 s) for the whole
# run; the check gets what is left. Log: $OUT/flex_fa4.log when OUT is set. FA4_DIR (default .whl_fa4)
# selects another prepared set with the same call1/ call2/ layout (.whl_fa4/alt_cu12: the DSL's CUDA 12
# library flavor instead of CUDA 13; carry ".whl_fa4/alt_cu12/call1", then ".whl_fa4/alt_cu12/call2").
# To rebuild .whl_fa4 here (ignored by git; pip reaches the registries from this machine, not from the GPU's):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d /tmp/fa4 flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 \
#     nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
#     quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
#   then split -b 50M the libs-cu13 wheel into <wheel>.part00 (call1/) and .part01 (call2/, with the other
#   wheels) and write each folder's SHA256SUMS (call2's last line: the whole libs-cu13 wheel's).
# First run on an H100 in session 12 (bench/results/flex_fa4_h100_s12).
set -u

cd "$(dirname "$0")/.." || exit 2
mode=${1:-run}
[ $# -gt 0 ] && shift
STAGE=/tmp/fa4_stage
WHEELS=/tmp/fa4_wheels
SITE=/tmp/site_fa4
DIR=${FA4_DIR:-.whl_fa4}
T0=$(date +%s)

export PYTHONUNBUFFERED=1

stage() {
    if ! ls "$DIR"/call1/*.whl.part00 >/dev/null 2>&1; then
        echo "[flex_fa4.sh] stage: no $DIR/call1/*.whl.part00: carry [\"$DIR/call1\"]"
        return 1
    fi
    rm -rf "$STAGE" && mkdir -p "$STAGE" && cp -f "$DIR"/call1/* "$STAGE/" || return 1
    (cd "$STAGE" && sha256sum -c SHA256SUMS) || { echo "[flex_fa4.sh] stage: part00 checksum FAILED"; return 1; }
    ls -la "$STAGE"
    echo "[flex_fa4.sh] staged part00 in $STAGE (and $DIR/call1); now call 2 within ~30 s"
}

install() {
    local part01 split part00=""
    part01=$(ls "$DIR"/call2/*.whl.part01 2>/dev/null | head -n 1)
    if [ -z "$part01" ]; then
        echo "[flex_fa4.sh] FAILED: no $DIR/call2/*.whl.part01: carry [\"$DIR/call2\"]"
        return 3
    fi
    split=$(basename "$part01" .part01)
    for d in "$STAGE" "$DIR/call1"; do
        [ -f "$d/$split.part00" ] && { part00="$d/$split.part00"; break; }
    done
    if [ -z "$part00" ]; then
        echo "[flex_fa4.sh] FAILED: $split.part00 is neither in $STAGE nor in $DIR/call1: the machine of call 1"
        echo "             was given back (not warm). Redo call 1 (stage) and call 2 right after it."
        return 3
    fi
    rm -rf "$WHEELS" "$SITE" && mkdir -p "$WHEELS" || return 3
    cp -f "$DIR"/call2/*.whl "$DIR"/call2/SHA256SUMS "$WHEELS/" || return 3
    cat "$part00" "$part01" > "$WHEELS/$split" || return 3
    if ! (cd "$WHEELS" && grep -v '\.part0' SHA256SUMS | sha256sum -c); then
        echo "[flex_fa4.sh] FAILED: wheel checksums (above)"
        return 3
    fi
    echo "[flex_fa4.sh] installing $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl; then
        echo "[flex_fa4.sh] FAILED: pip install (above)"
        return 3
    fi
    export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "[flex_fa4.sh] PYTHONPATH=$PYTHONPATH ($(( $(date +%s) - T0 )) s so far)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 - <<'EOF'
import importlib.metadata as md, sys
for n in ("torch", "triton", "cuda-bindings", "cuda-python", "numpy", "einops", "protobuf", "typing_extensions",
          "packaging", "flash-attn-4", "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base",
          "nvidia-cutlass-dsl-libs-core", "nvidia-cutlass-dsl-libs-cu13", "nvidia-cutlass-dsl-libs-cu12",
          "quack-kernels", "apache-tvm-ffi",
          "torch-c-dlpack-ext"):
    try:
        print(f"  {n:32s} {md.version(n)}")
    except md.PackageNotFoundError:
        print(f"  {n:32s} MISSING")
import torch
print(f"  torch.version.cuda {torch.version.cuda}; device {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
EOF
    local import_rc=0
    python3 - <<'EOF' || import_rc=$?
import sys, time, traceback
t = time.time()
try:
    import cutlass
    import cutlass.cute
    import cuda.bindings.driver
    import flash_attn.cute
    from flash_attn.cute.interface import _flash_attn_fwd, _flash_attn_bwd  # what torch's FLASH template calls
    from torch._inductor.kernel.flex.flex_flash_attention import ensure_flash_available
    ok = ensure_flash_available()
    print(f"[flex_fa4.sh] import flash_attn.cute: OK in {time.time() - t:.1f} s ({flash_attn.cute.__file__}); "
          f"torch ensure_flash_available() = {ok}")
except Exception:
    print("[flex_fa4.sh] import flash_attn.cute: FAILED")
    traceback.print_exc()
    ok = False
sys.exit(0 if ok else 1)
EOF
    return "$import_rc"
}

run() {
    local import_rc=0
    install || import_rc=$?
    [ "$import_rc" -gt 1 ] && return "$import_rc"
    local left=$(( ${FA4_BUDGET_S:-235} - ( $(date +%s) - T0 ) ))
    [ "$left" -lt 30 ] && left=30
    echo "[flex_fa4.sh] running bench/flex_fa4_check.py with --budget-s $((left - 15)) (hard limit ${left} s)"
    local rc=0
    timeout -k 5 "$left" python3 bench/flex_fa4_check.py --budget-s "$((left - 15))" "$@" || rc=$?
    [ "$rc" -eq 124 ] && echo "[flex_fa4.sh] check killed at its time limit (rows so far are in the JSON)"
    [ "$import_rc" -ne 0 ] && echo "[flex_fa4.sh] NOTE: flash_attn.cute did not import (traceback above)"
    echo "[flex_fa4.sh] done in $(( $(date +%s) - T0 )) s: import rc $import_rc, check rc $rc"
    [ "$import_rc" -ne 0 ] && return 1
    return "$rc"
}

case "$mode" in
    stage) stage ;;
    run)
        if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
            run "$@" 2>&1 | tee -a "$OUT/flex_fa4.log"
            exit "${PIPESTATUS[0]}"
        fi
        run "$@" ;;
    with)  # install, then run the given command with FlashAttention-4 on PYTHONPATH
        install 2>&1 | tee -a "${OUT:-/tmp}/flex_fa4.log"
        [ "${PIPESTATUS[0]}" -gt 1 ] && exit 3
        export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages:$PWD${PYTHONPATH:+:$PYTHONPATH}"
        "$@" ;;
    *) echo "usage: bash bench/flex_fa4.sh stage | run [--json PATH] [flex_fa4_check.py args] | with COMMAND..."; exit 2 ;;
esac
