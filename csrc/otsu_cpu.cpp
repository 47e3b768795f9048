// Otsu thresholding of many maps at once on the CPU: one OpenMP task per map,
// no Python loop. Rules in otsu_rule.h; ground truth in fused/reference.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "otsu_rule.h"

namespace fused_cpp {
namespace {

template <typename scalar_t>
void otsu_vico_one(const scalar_t* x, int64_t n, int64_t bins, scalar_t* thr, bool* mask,
                   std::vector<double>& count, std::vector<double>& sum, std::vector<scalar_t>& fence,
                   std::vector<scalar_t>& xn) {
  scalar_t lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  const scalar_t span = hi - lo;
  if (span == scalar_t(0)) {  // constant map: tau = 0, everything is object
    *thr = scalar_t(0);
    std::fill(mask, mask + n, true);
    return;
  }
  std::fill(count.begin(), count.end(), 0.0);
  std::fill(sum.begin(), sum.end(), 0.0);
  fence[0] = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t t = 1; t < bins; ++t) fence[t] = fused_otsu::vico_candidate<scalar_t>(t, bins);
  fence[bins] = std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < n; ++i) xn[i] = (x[i] - lo) / span;  // IEEE division: correctly rounded
  for (int64_t i = 0; i < n; ++i) {
    const int b = fused_otsu::vico_bucket_fenced(xn[i], fence.data(), bins);
    count[b] += 1.0;
    sum[b] += static_cast<double>(xn[i]);
  }
  const int64_t best =
      fused_otsu::vico_best_candidate(count.data(), sum.data(), bins, static_cast<double>(n));
  const scalar_t threshold = best > 0 ? fence[best] : scalar_t(0);
  *thr = threshold;
  if (threshold > scalar_t(0)) {
    for (int64_t i = 0; i < n; ++i) mask[i] = xn[i] >= threshold;
  } else {
    for (int64_t i = 0; i < n; ++i) mask[i] = xn[i] > scalar_t(0);
  }
}

template <typename scalar_t>
void otsu_skimage_one(const scalar_t* x, int64_t n, int64_t bins, scalar_t* thr, bool* mask,
                      std::vector<double>& count, std::vector<double>& centre,
                      std::vector<scalar_t>& edges) {
  scalar_t lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  if (hi == lo) {  // constant map: its value, nothing above it
    *thr = lo;
    std::fill(mask, mask + n, false);
    return;
  }
  // np.linspace(lo, hi, bins + 1) in scalar_t: i * step + lo, last edge = hi.
  const scalar_t step = (hi - lo) / static_cast<scalar_t>(bins);
  for (int64_t i = 0; i < bins; ++i) edges[i] = static_cast<scalar_t>(i) * step + lo;
  edges[bins] = hi;
  for (int64_t i = 0; i < bins; ++i) centre[i] = static_cast<double>((edges[i] + edges[i + 1]) / scalar_t(2));
  std::fill(count.begin(), count.end(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    int64_t b = std::upper_bound(edges.begin(), edges.end(), x[i]) - edges.begin() - 1;
    b = std::min<int64_t>(std::max<int64_t>(b, 0), bins - 1);
    count[b] += 1.0;
  }
  const int64_t best = fused_otsu::skimage_best_bin(count.data(), centre.data(), bins);
  const scalar_t t = (edges[best] + edges[best + 1]) / scalar_t(2);
  *thr = t;
  for (int64_t i = 0; i < n; ++i) mask[i] = x[i] > t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> otsu_mask(const at::Tensor& maps_in, int64_t bins,
                                             const std::string& mode) {
  // torch.ops.fused_cpp.otsu_mask is public: check what fused.otsu_mask would have.
  TORCH_CHECK(mode == "vico" || mode == "skimage", "otsu_mask: unknown mode ", mode);
  // Buckets are ints (otsu_rule.h), and one histogram of `bins` doubles is made per thread.
  TORCH_CHECK(bins >= 2 && bins <= std::numeric_limits<int32_t>::max(),
              "otsu_mask: bins must be in [2, 2^31 - 1], got ", bins);
  TORCH_CHECK(maps_in.device().is_cpu(), "otsu_mask: maps must be a CPU tensor, got one on ", maps_in.device());
  TORCH_CHECK(maps_in.scalar_type() == at::kFloat || maps_in.scalar_type() == at::kDouble,
              "otsu_mask: maps must be float32 or float64 (fused.otsu_mask upcasts fp16/bf16 maps), got ",
              maps_in.scalar_type());
  TORCH_CHECK(maps_in.dim() >= 1 && maps_in.numel() > 0, "otsu_mask: maps must be non-empty [..., N], got shape ",
              maps_in.sizes());
  const at::Tensor maps = maps_in.contiguous();
  const int64_t n = maps.size(-1);
  const int64_t rows = maps.numel() / n;
  auto thr_shape = maps.sizes().vec();
  thr_shape.pop_back();
  at::Tensor thr = at::empty(thr_shape, maps.options());
  at::Tensor mask = at::empty(maps.sizes(), maps.options().dtype(at::kBool));
  bool* mask_ptr = mask.data_ptr<bool>();
  const bool vico = mode == "vico";
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "otsu_mask_cpu", [&] {
    const scalar_t* x = maps.data_ptr<scalar_t>();
    scalar_t* t = thr.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> count(bins), aux(bins);
      std::vector<scalar_t> edges(bins + 1), normalised(vico ? n : 0);
      for (int64_t r = begin; r < end; ++r) {
        if (vico) {
          otsu_vico_one<scalar_t>(x + r * n, n, bins, t + r, mask_ptr + r * n, count, aux, edges, normalised);
        } else {
          otsu_skimage_one<scalar_t>(x + r * n, n, bins, t + r, mask_ptr + r * n, count, aux, edges);
        }
      }
    });
  });
  return {thr, mask};
}

}  // namespace fused_cpp

// The op declared in fused/_library.py, implemented for CPU tensors.
TORCH_LIBRARY_IMPL(fused_cpp, CPU, m) { m.impl("otsu_mask", &fused_cpp::otsu_mask); }
