#!/usr/bin/env bash
# The GPU checks and benchmarks, for an environment that has a CUDA build of torch and triton
# (docs/developing.md §5). One command does everything, in this order, each step under its own
# time limit (about 8 minutes in all on one H100):
#   bash benchmarks/gpu_session.sh             # = all:
#     1. the first-use check of every kernel (fp16/bf16/fp32, SD/SDXL/FLUX head dims): first_use.md
#     2. every kernel against the float64 reference in fp16/bf16/fp32: gpu_check.md/.json
#     3. the maps op on triton / sdpa / the materialising reference vs SDPA without maps at the
#        SD 1.5, SDXL and FLUX shapes, paired rounds, and peak memory: maps_backends/
#     4. the ViCo training step at latent 64 vs official and diffusers+maps: vico_step.md
# The parts of earlier sessions stay available (the Triton kernels compile on first use, about
# 260 kernels for sm_90 over all dtypes):
#   bash benchmarks/gpu_session.sh check       # gpu_check.py: fp16 correctness, CUDA graph, op timings
#   bash benchmarks/gpu_session.sh check-more  # gpu_check.py: bf16 and fp32 correctness
#   bash benchmarks/gpu_session.sh bench       # ViCo steps at 64x64 (fp16), scaling (latent 32..128), joint maps
# Results land in $OUT (default /tmp/gpu-out): markdown tables and JSON.
#
# The script installs this checkout into the current environment without touching its
# packages (pip --no-deps). The ViCo step benchmark also needs diffusers and accelerate. On a
# machine that cannot download packages, bring them as wheels in .wheels/ (made elsewhere
# with `pip download ... -d .wheels`, docs/developing.md §5.1); the script installs them first.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .wheels ]; then pip install -q --no-deps .wheels/*.whl; fi
pip install -q --no-build-isolation --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
case "${1:-all}" in
  all)
    step() { local limit=$1; shift; echo "== $* (limit ${limit}s)"; timeout "$limit" "$@" || echo "!! exit $? : $*"; }
    FUSED_SELFCHECK=force step 200 python -m fused.selfcheck --first-use --device cuda | tee "$OUT/first_use.md"
    step 120 python benchmarks/gpu_check.py --dtypes fp16 bf16 fp32 --skip-bench --out "$OUT/gpu_check.json" \
      | tee "$OUT/gpu_check.md"
    step 90 python benchmarks/bench_maps_backends.py --device cuda --dtype fp16 --rounds 10 --memory \
      --out "$OUT/maps_backends" | tee "$OUT/maps_backends.md"
    if python -c "import diffusers, accelerate" 2>/dev/null; then
      step 90 python benchmarks/bench_vico_step.py --model sd15 --latent 64 --repeat 5 | tee "$OUT/vico_step.md"
    fi
    ;;
  check)
    python benchmarks/gpu_check.py --dtypes fp16 --out "$OUT/gpu_check.json" | tee "$OUT/gpu_check.md"
    ;;
  check-more)
    python benchmarks/gpu_check.py --dtypes bf16 fp32 --skip-bench --out "$OUT/gpu_check_more.json" \
      | tee "$OUT/gpu_check_more.md"
    ;;
  bench)  # the ViCo step first: it carries the headline targets
    if python -c "import diffusers, accelerate" 2>/dev/null; then
      python benchmarks/bench_vico_step.py --model sd15 --latent 64 --repeat 5 | tee "$OUT/vico_step.md"
    else
      echo "diffusers/accelerate missing: install them (or bring wheels in .wheels/) for the ViCo step benchmark" | tee "$OUT/vico_step.md"
    fi
    python benchmarks/scaling.py --out "$OUT/scaling" > /dev/null
    cp "$OUT/scaling/scaling.md" "$OUT/scaling.md"; cp "$OUT/scaling/scaling.png" "$OUT/scaling.png" 2>/dev/null || true
    rm -rf "$OUT/scaling"
    python benchmarks/bench_joint_maps.py | tee "$OUT/joint_maps.md"
    ;;
  *) echo "usage: $0 [all|check|check-more|bench]" >&2; exit 2 ;;
esac
