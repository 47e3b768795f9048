// Otsu thresholding of many maps at once on the GPU: one thread block per map,
// no Python loop and no host-device sync. Rules in otsu_rule.h (shared with
// otsu_cpu.cpp); ground truth in fused/reference.py. fp16/bf16 maps are read
// as float32 inside the kernel, so they follow the same rules as the CPU
// backend, which upcasts them before its kernel.
//
// Class statistics (bucket counts and sums) are float64 and are accumulated
// in a fixed order (per-thread partials, then fixed-shape warp and block
// reductions; integer shared-memory atomics only for the skimage counts), so
// the result never depends on scheduling and the backends agree on which
// candidate wins even when two candidates' variances are within a float32
// rounding of each other. Membership itself is decided in the compute dtype
// with correctly rounded arithmetic; the build uses -fmad=false so no
// multiply-add is contracted into an FMA, and the explicit __*_rn intrinsics
// below keep that true even without the flag.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: no cuBLAS/cuSPARSE headers needed
#include <torch/library.h>

#include <ATen/ops/empty.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "otsu_rule.h"

namespace fused_cuda {
namespace {

constexpr int kThreads = 256;  // per block; a multiple of the warp size
constexpr int kWarps = kThreads / 32;
// The bin limits come from fused/_cpp.py (CUDA_MAX_BINS), the one source the
// Python checks also read: per-thread register/local partials for "vico", a
// shared-memory histogram for "skimage".
#if !defined(FUSED_MAX_VICO_BINS) || !defined(FUSED_MAX_SKIMAGE_BINS)
#error "build with fused._cpp.CUDA_CFLAGS (defines FUSED_MAX_VICO_BINS and FUSED_MAX_SKIMAGE_BINS)"
#endif
constexpr int64_t kMaxVicoBins = FUSED_MAX_VICO_BINS;
constexpr int64_t kMaxSkimageBins = FUSED_MAX_SKIMAGE_BINS;
constexpr unsigned kFullMask = 0xffffffffu;

// Correctly rounded arithmetic in the compute dtype (float or double).
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }

// Min and max of x[0..n) over the block, broadcast to every thread. Every
// thread starts from x[0] so threads without elements need no identity value.
// min/max are exact, so the reduction order cannot change the result.
template <typename scalar_t, typename acc_t>
__device__ void block_min_max(const scalar_t* x, int64_t n, acc_t& lo_out, acc_t& hi_out) {
  __shared__ acc_t s_lo[kWarps];
  __shared__ acc_t s_hi[kWarps];
  acc_t lo = static_cast<acc_t>(x[0]);
  acc_t hi = lo;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[i]);
    lo = v < lo ? v : lo;
    hi = hi < v ? v : hi;
  }
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t olo = __shfl_down_sync(kFullMask, lo, off);
    const acc_t ohi = __shfl_down_sync(kFullMask, hi, off);
    lo = olo < lo ? olo : lo;
    hi = hi < ohi ? ohi : hi;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
  }
  __syncthreads();
  lo = s_lo[0];
  hi = s_hi[0];
  for (int w = 1; w < kWarps; ++w) {
    lo = s_lo[w] < lo ? s_lo[w] : lo;
    hi = hi < s_hi[w] ? s_hi[w] : hi;
  }
  lo_out = lo;
  hi_out = hi;
}

// Mode "vico": one block per map. Thread i accumulates the elements
// i, i + blockDim, ... into private per-bucket partials (int counts, float64
// sums); each bucket is then reduced by a fixed warp-shuffle tree and a fixed
// in-order sum over warps, so the float64 sums are bitwise reproducible.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    otsu_vico_kernel(const scalar_t* __restrict__ maps, int64_t n, int64_t bins,
                     acc_t* __restrict__ thr, bool* __restrict__ mask) {
  __shared__ int s_wcount[kWarps][kMaxVicoBins];
  __shared__ double s_wsum[kWarps][kMaxVicoBins];
  __shared__ double s_count[kMaxVicoBins];
  __shared__ double s_sum[kMaxVicoBins];
  __shared__ acc_t s_tau;

  const int64_t row = blockIdx.x;
  const scalar_t* x = maps + row * n;
  bool* m = mask + row * n;

  acc_t lo, hi;
  block_min_max(x, n, lo, hi);
  const acc_t span = sub_rn(hi, lo);
  if (span == acc_t(0)) {  // constant map: tau = 0, everything is object
    if (threadIdx.x == 0) thr[row] = acc_t(0);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m[i] = true;
    return;
  }

  int count[kMaxVicoBins];
  double sum[kMaxVicoBins];
  for (int b = 0; b < kMaxVicoBins; ++b) {
    count[b] = 0;
    sum[b] = 0.0;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    // IEEE division, correctly rounded as on the CPU and in PyTorch.
    const acc_t xn = div_rn(sub_rn(static_cast<acc_t>(x[i]), lo), span);
    const int b = fused_otsu::vico_bucket(xn, bins);
    count[b] += 1;
    sum[b] += static_cast<double>(xn);
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int b = 0; b < bins; ++b) {
    int c = count[b];
    double s = sum[b];
    for (int off = 16; off > 0; off >>= 1) {
      c += __shfl_down_sync(kFullMask, c, off);
      s += __shfl_down_sync(kFullMask, s, off);
    }
    if (lane == 0) {
      s_wcount[warp][b] = c;
      s_wsum[warp][b] = s;
    }
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) {
    int64_t c = 0;
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      c += s_wcount[w][b];
      s += s_wsum[w][b];
    }
    s_count[b] = static_cast<double>(c);
    s_sum[b] = s;
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    const int64_t best =
        fused_otsu::vico_best_candidate(s_count, s_sum, bins, static_cast<double>(n));
    const acc_t tau =
        best > 0 ? div_rn(static_cast<acc_t>(best), static_cast<acc_t>(bins)) : acc_t(0);
    s_tau = tau;
    thr[row] = tau;
  }
  __syncthreads();

  const acc_t tau = s_tau;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t xn = div_rn(sub_rn(static_cast<acc_t>(x[i]), lo), span);
    m[i] = tau > acc_t(0) ? (xn >= tau) : (xn > acc_t(0));
  }
}

// std::upper_bound(edges, edges + len, v) - edges, probing in the same order
// as libstdc++ so the result matches the CPU kernel for any edge array.
template <typename acc_t>
__device__ __forceinline__ int upper_bound_index(const acc_t* edges, int len, acc_t v) {
  int first = 0;
  while (len > 0) {
    const int half = len >> 1;
    const int middle = first + half;
    if (v < edges[middle]) {
      len = half;
    } else {
      first = middle + 1;
      len = len - half - 1;
    }
  }
  return first;
}

// Mode "skimage": one block per map; np.histogram's linspace edges in the
// compute dtype, integer bin counts via shared-memory atomics (exact, so
// order-independent), then thread 0 picks the bin.
// Dynamic shared memory: double count[bins], double centre[bins],
// acc_t edges[bins + 1], int icount[bins].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    otsu_skimage_kernel(const scalar_t* __restrict__ maps, int64_t n, int64_t bins,
                        acc_t* __restrict__ thr, bool* __restrict__ mask) {
  extern __shared__ double s_dyn[];
  double* s_count = s_dyn;
  double* s_centre = s_count + bins;
  acc_t* s_edges = reinterpret_cast<acc_t*>(s_centre + bins);
  int* s_icount = reinterpret_cast<int*>(s_edges + bins + 1);
  __shared__ acc_t s_thr;

  const int64_t row = blockIdx.x;
  const scalar_t* x = maps + row * n;
  bool* m = mask + row * n;

  acc_t lo, hi;
  block_min_max(x, n, lo, hi);
  if (hi == lo) {  // constant map: its value, nothing above it
    // x[0] == lo; it is the value the CPU kernel reports (same sign of zero).
    if (threadIdx.x == 0) thr[row] = static_cast<acc_t>(x[0]);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m[i] = false;
    return;
  }

  // np.linspace(lo, hi, bins + 1) in acc_t: i * step + lo (two roundings),
  // last edge = hi.
  const acc_t step = div_rn(sub_rn(hi, lo), static_cast<acc_t>(bins));
  for (int64_t i = threadIdx.x; i <= bins; i += blockDim.x) {
    s_edges[i] = i < bins ? add_rn(mul_rn(static_cast<acc_t>(i), step), lo) : hi;
  }
  for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) s_icount[i] = 0;
  __syncthreads();

  for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) {
    s_centre[i] = static_cast<double>(div_rn(add_rn(s_edges[i], s_edges[i + 1]), acc_t(2)));
  }
  const int n_edges = static_cast<int>(bins + 1);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int b = upper_bound_index(s_edges, n_edges, static_cast<acc_t>(x[i])) - 1;
    b = b < 0 ? 0 : b;
    b = b > bins - 1 ? static_cast<int>(bins - 1) : b;
    atomicAdd(&s_icount[b], 1);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < bins; i += blockDim.x) {
    s_count[i] = static_cast<double>(s_icount[i]);
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    const int64_t best = fused_otsu::skimage_best_bin(s_count, s_centre, bins);
    const acc_t t = div_rn(add_rn(s_edges[best], s_edges[best + 1]), acc_t(2));
    s_thr = t;
    thr[row] = t;
  }
  __syncthreads();

  const acc_t t = s_thr;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m[i] = static_cast<acc_t>(x[i]) > t;
}

std::tuple<at::Tensor, at::Tensor> otsu_mask(const at::Tensor& maps_in, int64_t bins,
                                             const std::string& mode) {
  TORCH_CHECK(mode == "vico" || mode == "skimage", "otsu_mask: unknown mode ", mode);
  TORCH_CHECK(bins >= 2, "otsu_mask: bins must be >= 2");
  const bool vico = mode == "vico";
  TORCH_CHECK(!vico || bins <= kMaxVicoBins, "otsu_mask (CUDA): mode \"vico\" supports bins <= ",
              kMaxVicoBins, ", got ", bins);
  TORCH_CHECK(vico || bins <= kMaxSkimageBins,
              "otsu_mask (CUDA): mode \"skimage\" supports bins <= ", kMaxSkimageBins, ", got ",
              bins);
  TORCH_CHECK(maps_in.is_cuda(), "otsu_mask (CUDA): maps must be a CUDA tensor, got one on ",
              maps_in.device());
  const at::ScalarType dtype = maps_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "otsu_mask (CUDA): maps must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK(maps_in.dim() >= 1 && maps_in.numel() > 0,
              "otsu_mask: maps must be non-empty [..., N], got shape ", maps_in.sizes());
  c10::cuda::CUDAGuard guard(maps_in.device());
  const at::Tensor maps = maps_in.contiguous();
  const int64_t n = maps.size(-1);
  const int64_t rows = maps.numel() / n;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(),
              "otsu_mask (CUDA): too many maps for one launch (", rows, ")");

  const at::ScalarType compute =
      (maps.scalar_type() == at::kHalf || maps.scalar_type() == at::kBFloat16)
          ? at::kFloat
          : maps.scalar_type();
  auto thr_shape = maps.sizes().vec();
  thr_shape.pop_back();
  at::Tensor thr = at::empty(thr_shape, maps.options().dtype(compute));
  at::Tensor mask = at::empty(maps.sizes(), maps.options().dtype(at::kBool));

  const dim3 grid(static_cast<unsigned>(rows));
  const dim3 block(kThreads);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // == at::cuda::getCurrentCUDAStream
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "otsu_mask_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = maps.const_data_ptr<scalar_t>();
    acc_t* t = thr.mutable_data_ptr<acc_t>();
    bool* mk = mask.mutable_data_ptr<bool>();
    if (vico) {
      otsu_vico_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(x, n, bins, t, mk);
    } else {
      const size_t shmem = 2 * bins * sizeof(double) + (bins + 1) * sizeof(acc_t) +
                           bins * sizeof(int);
      otsu_skimage_kernel<scalar_t, acc_t><<<grid, block, shmem, stream>>>(x, n, bins, t, mk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {thr, mask};
}

}  // namespace
}  // namespace fused_cuda

// The schema is declared once, in Python (fused/_library.py), before this library is loaded.
TORCH_LIBRARY_IMPL(fused_cuda, CUDA, m) { m.impl("otsu_mask", &fused_cuda::otsu_mask); }
