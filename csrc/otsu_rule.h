// The Otsu selection rules of docs/ops.md §3.2 and §3.3, written once for the CPU (otsu_cpu.cpp)
// and CUDA (otsu_cuda.cu) kernels. Class statistics are float64 in every
// backend (see fused/reference.py: otsu_stat_dtype) so that backends agree on
// which candidate wins.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_HD __host__ __device__ __forceinline__
#else
#define FUSED_HD inline
#endif

namespace fused_otsu {

// Candidate threshold tau_t = t/bins rounded once to scalar_t (IEEE division).
template <typename scalar_t>
FUSED_HD scalar_t vico_candidate(int64_t t, int64_t bins) {
  return static_cast<scalar_t>(t) / static_cast<scalar_t>(bins);
}

// Bucket of a normalised value for mode "vico": the number of candidates
// tau_t (t = 1..bins-1) with tau_t <= x. Membership is decided only by that
// comparison, so x == tau_t goes high.
template <typename scalar_t>
FUSED_HD int vico_bucket(scalar_t x, int64_t bins) {
  int bucket = 0;
  for (int64_t t = 1; t < bins; ++t) bucket += (x >= vico_candidate<scalar_t>(t, bins)) ? 1 : 0;
  return bucket;
}

// The same in O(1) per element: guess floor(x * bins), then correct by one
// in either direction. fl(x * bins) and tau_t = fl(t / bins) are both within
// a few ulps of the exact values while candidates are 1/bins apart, so the
// guess is off by at most one. `fence` has bins + 1 entries: fence[0] = -inf,
// fence[t] = tau_t for t in 1..bins-1, fence[bins] = +inf, so both corrections
// are branch-free table reads. x must be in [0, 1].
template <typename scalar_t>
FUSED_HD int vico_bucket_fenced(scalar_t x, const scalar_t* fence, int64_t bins) {
  int64_t guess = static_cast<int64_t>(x * static_cast<scalar_t>(bins));
  guess = guess < 0 ? 0 : (guess > bins - 1 ? bins - 1 : guess);
  return static_cast<int>(guess - (x < fence[guess] ? 1 : 0) + (x >= fence[guess + 1] ? 1 : 0));
}

// Mode "vico": given per-bucket element counts and sums of normalised values
// (bucket b holds the elements with exactly b candidates <= x), return the
// index t in [1, bins-1] of the first candidate with the largest positive
// between-class variance, or 0 when no candidate has one (threshold 0).
FUSED_HD int64_t vico_best_candidate(const double* count, const double* sum, int64_t bins,
                                     double n_total) {
  double n_low = 0.0, s_low = 0.0, s_all = 0.0;
  for (int64_t b = 0; b < bins; ++b) s_all += sum[b];
  double best_g = 0.0;
  int64_t best = 0;
  for (int64_t t = 1; t < bins; ++t) {
    n_low += count[t - 1];
    s_low += sum[t - 1];
    const double n_high = n_total - n_low;
    if (n_low <= 0.0 || n_high <= 0.0) continue;
    const double s_high = s_all - s_low;
    const double d = s_low / n_low - s_high / n_high;
    const double g = (n_low / n_total) * (n_high / n_total) * (d * d);
    if (g > best_g) {  // strict: the first maximum wins
      best_g = g;
      best = t;
    }
  }
  return best;
}

// Mode "skimage": per-bin counts and bin centres as skimage.filters.threshold_otsu
// uses them; returns the first bin index maximising weight1*weight2*(mean1-mean2)^2.
FUSED_HD int64_t skimage_best_bin(const double* count, const double* centre, int64_t bins) {
  double total_w = 0.0, total_m = 0.0;
  for (int64_t b = 0; b < bins; ++b) {
    total_w += count[b];
    total_m += count[b] * centre[b];
  }
  double w1 = 0.0, m1 = 0.0;
  double best_v = -1.0;
  int64_t best = 0;
  for (int64_t i = 0; i + 1 < bins; ++i) {
    w1 += count[i];
    m1 += count[i] * centre[i];
    const double w2 = total_w - w1;
    if (w1 <= 0.0 || w2 <= 0.0) continue;
    const double d = m1 / w1 - (total_m - m1) / w2;
    const double v = (w1 * w2) * (d * d);
    if (v > best_v) {
      best_v = v;
      best = i;
    }
  }
  return best;
}

}  // namespace fused_otsu
