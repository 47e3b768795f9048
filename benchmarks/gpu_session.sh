#!/usr/bin/env bash
# The GPU checks and benchmarks in three parts, each a few minutes, for an environment that
# has a CUDA build of torch and triton (docs/developing.md §5). The Triton kernels compile on
# first use (about 260 kernels for sm_90 over all dtypes: minutes), which is why the dtypes are
# split over two parts. Run `check` first, then `bench`, then `check-more`:
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
case "${1:-check}" in
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
  *) echo "usage: $0 check|check-more|bench" >&2; exit 2 ;;
esac
