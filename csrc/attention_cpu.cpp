// Attention with token-map extraction and key-masked attention on the CPU.
//
// One core serves both ops: flash-style tiles of kQueryBlock queries against
// kKeyBlock keys with an online softmax, so no [N, L] matrix is ever held
// (working memory per thread is one query-block x key-block tile). GEMMs on
// tiles go straight to BLAS (gemm_rm below); softmax and the map epilogue are
// plain loops.
//
// Maps come from the final log-sum-exp: while a key block that holds a chosen
// column is processed, that column's raw score is kept, and after the last
// block p = exp(score - lse). Backward recomputes P from the saved lse (never
// stores it) and adds the map term of docs/ops.md §2.5 to dP and to the row term D.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/TypeCast.h>

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fused_cpp {
namespace {

constexpr int64_t kQueryBlock = 256;
constexpr int64_t kKeyBlock = 256;

// Fortran BLAS, which libtorch_cpu exports (MKL) on x86_64 Linux. Weak: where the
// symbols are absent they are null and gemm_rm takes the ATen route instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

// C[m x n] = alpha * opA . opB + beta * C on row-major tiles given by pointer and
// leading dimension. opA is A ([m x k] stored) or, with a_t, the transpose of a
// stored [k x m]; likewise opB with b_t. Why not at::mm_out on tensor views: per
// tile that route costs about a dozen dispatcher calls (select, narrow, t, mm),
// a large share of the work when L = 77. BLAS is column-major, so it computes
// C^T = opB^T . opA^T.
template <typename scalar_t>
void gemm_rm(bool a_t, bool b_t, int64_t m, int64_t n, int64_t k, scalar_t alpha, const scalar_t* a, int64_t lda,
             const scalar_t* b, int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  const char ta = b_t ? 'T' : 'N', tb = a_t ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  // FUSED_CPP_ATEN_GEMM=1 forces the ATen route (tests exercise it that way).
  static const bool blas = std::getenv("FUSED_CPP_ATEN_GEMM") == nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (blas && sgemm_) return sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (blas && dgemm_) return dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor A = a_t ? view(a, k, m, lda, true) : view(a, m, k, lda, false);
  at::Tensor B = b_t ? view(b, n, k, ldb, true) : view(b, k, n, ldb, false);
  at::Tensor C = view(c, m, n, ldc, false);
  if (beta == scalar_t(0)) {
    at::mm_out(C, A, B);
    if (alpha != scalar_t(1)) C.mul_(alpha);
  } else {
    C.addmm_(A, B, beta, alpha);
  }
}

// Run, once per process and dtype and on one thread, the library calls the tiles
// make (BLAS, ATen's vectorised exp) before several OpenMP workers make them at
// once. Without this, the first op of a process computed wrong values (float64
// errors ~1e-9 instead of ~1e-16, on the rows of one worker) in about 1 run in 8
// with 2 threads, with the BLAS and the ATen GEMM routes alike, never with 1 thread
// or with std::exp in place of exp_: a race in the lazy set-up of ATen's exp on
// first concurrent use, found by bisection, cause inside ATen not pinned down.
// 0 failures in 80 runs with this in place (test: test_cpp_first_call_in_a_process).
template <typename scalar_t>
void init_library_state_once() {
  static std::once_flag flag;
  std::call_once(flag, [] {
    scalar_t a = 1, b = 1, c = 0;
    gemm_rm<scalar_t>(false, false, 1, 1, 1, scalar_t(1), &a, 1, &b, 1, scalar_t(0), &c, 1);
    at::empty({64}, at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value)).fill_(0).exp_();
  });
}

// Optional parts of the problem, shared by both ops.
struct Extras {
  const bool* key_mask = nullptr;   // [B, L] or null
  const int64_t* index = nullptr;   // [B, T] or null
  int64_t T = 0;
  bool head_mean = true;
};

// Per batch row: true when its key mask hides every key. Such a row attends
// uniformly (all scores 0), like the paper's large-negative fill.
std::vector<char> fully_masked_rows(const Extras& ex, int64_t B, int64_t L) {
  std::vector<char> rows(B, 0);
  if (!ex.key_mask) return rows;
  for (int64_t b = 0; b < B; ++b) {
    bool any = false;
    for (int64_t j = 0; j < L && !any; ++j) any = ex.key_mask[b * L + j];
    rows[b] = !any;
  }
  return rows;
}

// Row reductions with eight independent accumulators: a single running
// sum/max is bound by the latency of one add per element and does not
// vectorise without -ffast-math; eight partials do both.
template <typename scalar_t>
scalar_t row_max(const scalar_t* x, int64_t n, scalar_t init) {
  scalar_t part[8] = {init, init, init, init, init, init, init, init};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) part[u] = part[u] > x[j + u] ? part[u] : x[j + u];
  for (; j < n; ++j) part[0] = part[0] > x[j] ? part[0] : x[j];
  scalar_t mx = part[0];
  for (int u = 1; u < 8; ++u) mx = mx > part[u] ? mx : part[u];
  return mx;
}

template <typename scalar_t>
scalar_t row_sum(const scalar_t* x, int64_t n) {
  scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) part[u] += x[j + u];
  for (; j < n; ++j) part[0] += x[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <typename scalar_t>
scalar_t row_dot(const scalar_t* x, const scalar_t* y, int64_t n) {
  scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) part[u] += x[j + u] * y[j + u];
  for (; j < n; ++j) part[0] += x[j] * y[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Per key block of one batch row: a keep factor (1 visible / 0 hidden). Hidden
// keys' scores are *replaced* by -inf (mask_scores), never added to: -inf + NaN
// is NaN, and one NaN or Inf stored in a hidden key then spread to the whole
// row. Branch-free element loops vectorise.
template <typename scalar_t>
struct KeyBlockMask {
  std::vector<scalar_t> keep;
  bool active = false;      // a mask applies to this block (not a uniform row)
  bool any_hidden = false;  // ... and hides at least one of its keys

  void set(const bool* visible, int64_t cols, bool uniform) {
    active = visible != nullptr && !uniform;
    any_hidden = false;
    if (!active) return;
    keep.resize(cols);
    for (int64_t j = 0; j < cols; ++j) {
      keep[j] = visible[j] ? scalar_t(1) : scalar_t(0);
      any_hidden = any_hidden || !visible[j];
    }
  }
};

// A [cols x D] key or value block with the rows of hidden keys set to 0, so a NaN
// or Inf stored in a hidden key or value never meets a GEMM: a zero probability
// does not keep it out (0 * NaN and 0 * Inf are NaN). Returns `src` itself when
// the block hides nothing; otherwise a copy in `buf` (cols * D elements, about
// 1/kQueryBlock of the GEMM work that reads it).
template <typename scalar_t>
const scalar_t* visible_rows(const scalar_t* src, int64_t cols, int64_t D, const KeyBlockMask<scalar_t>& mask,
                             std::vector<scalar_t>& buf) {
  if (!mask.any_hidden) return src;
  buf.resize(cols * D);
  for (int64_t j = 0; j < cols; ++j) {
    scalar_t* dst = buf.data() + j * D;
    if (mask.keep[j] != scalar_t(0)) {
      std::copy(src + j * D, src + (j + 1) * D, dst);
    } else {
      std::fill(dst, dst + D, scalar_t(0));
    }
  }
  return buf.data();
}

// Shift a row of scores by `shift` and clamp at -87 in one pass. Inputs below -87
// (exp < 1.7e-38), and -inf for hidden keys, send ATen's vectorised exp down a slow
// path (7-30x slower per element), so they are clamped before exp_tile; hidden keys
// are set to exactly 0 after it, so masking stays exact.
template <typename scalar_t>
void shift_and_clamp(scalar_t* row, int64_t cols, scalar_t shift) {
  const scalar_t floor = scalar_t(-87);
  for (int64_t j = 0; j < cols; ++j) {
    const scalar_t x = row[j] - shift;
    row[j] = x < floor ? floor : x;
  }
}

// exp of a tile of shifted, clamped scores (shift_and_clamp), in place, then zero
// the hidden keys.
template <typename scalar_t>
void exp_tile(at::Tensor& tile, scalar_t* s, int64_t rows, int64_t cols, int64_t ld,
              const KeyBlockMask<scalar_t>& mask) {
  tile.exp_();
  if (!mask.any_hidden) return;
  const scalar_t* keep = mask.keep.data();
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = s + i * ld;
    for (int64_t j = 0; j < cols; ++j) row[j] *= keep[j];
  }
}

// Apply the key mask to a tile of scaled scores (the GEMM applies the scale):
// hidden keys' scores are replaced by -inf, a batch row with every key hidden
// gets all zeros (uniform attention). Replacing, not adding, keeps whatever a
// hidden key holds (NaN, Inf) out of the row. Nothing to do without a mask.
template <typename scalar_t>
void mask_scores(scalar_t* s, int64_t rows, int64_t cols, int64_t ld, const KeyBlockMask<scalar_t>& mask,
                 bool uniform) {
  if (!uniform && !mask.any_hidden) return;
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t i = 0; i < rows; ++i) {
    scalar_t* row = s + i * ld;
    if (uniform) {
      for (int64_t j = 0; j < cols; ++j) row[j] = scalar_t(0);
      continue;
    }
    const scalar_t* keep = mask.keep.data();
    for (int64_t j = 0; j < cols; ++j) row[j] = keep[j] != scalar_t(0) ? row[j] : neg_inf;
  }
}

template <typename scalar_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Extras& ex,
                  double scale_d, at::Tensor& out, at::Tensor& lse, at::Tensor* maps) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), L = k.size(2);
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
  const auto uniform = fully_masked_rows(ex, B, L);
  init_library_state_once<scalar_t>();
  const int64_t n_blocks = (N + kQueryBlock - 1) / kQueryBlock;
  const scalar_t* q_p = q.data_ptr<scalar_t>();
  const scalar_t* k_p = k.data_ptr<scalar_t>();
  const scalar_t* v_p = v.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* lse_p = lse.data_ptr<scalar_t>();
  scalar_t* maps_p = maps ? maps->data_ptr<scalar_t>() : nullptr;
  const int64_t T = ex.T;
  const auto opts = q.options();

  // Tasks are (batch row, query block); heads loop inside so the head-mean
  // of the maps accumulates without atomics or races.
  at::parallel_for(0, B * n_blocks, 1, [&](int64_t begin, int64_t end) {
    // Tiles are plain buffers: keep the ATen calls below autograd (the op's
    // gradient is registered as a whole) in every worker thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor s_buf = at::empty({kQueryBlock, std::min(kKeyBlock, L)}, opts);
    at::Tensor acc = at::empty({kQueryBlock, D}, opts);
    KeyBlockMask<scalar_t> key_mask;
    std::vector<scalar_t> v_clean;
    std::vector<scalar_t> m(kQueryBlock), l(kQueryBlock), alpha(kQueryBlock), kept(kQueryBlock * std::max<int64_t>(T, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_blocks;
      const int64_t n0 = (task % n_blocks) * kQueryBlock;
      const int64_t bn = std::min(kQueryBlock, N - n0);
      const bool* visible_b = ex.key_mask ? ex.key_mask + b * L : nullptr;
      const int64_t* idx_b = ex.index ? ex.index + b * T : nullptr;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* qt = q_p + ((b * H + h) * N + n0) * D;
        const scalar_t* kh = k_p + (b * H + h) * L * D;
        const scalar_t* vh = v_p + (b * H + h) * L * D;
        scalar_t* a = acc.data_ptr<scalar_t>();
        std::fill(a, a + bn * D, scalar_t(0));
        std::fill(m.begin(), m.end(), neg_inf);
        std::fill(l.begin(), l.end(), scalar_t(0));
        for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
          const int64_t bk = std::min(kKeyBlock, L - j0);
          at::Tensor s_t = s_buf.narrow(0, 0, bn).narrow(1, 0, bk);  // for exp_tile's vectorised exp
          scalar_t* s = s_buf.data_ptr<scalar_t>();
          const int64_t ld = s_buf.size(1);
          gemm_rm<scalar_t>(false, true, bn, bk, D, scale, qt, D, kh + j0 * D, D, scalar_t(0), s, ld);
          key_mask.set(visible_b ? visible_b + j0 : nullptr, bk, uniform[b]);
          mask_scores(s, bn, bk, ld, key_mask, uniform[b]);
          // Keep the raw scores of chosen columns that live in this block.
          for (int64_t t = 0; t < T; ++t) {
            const int64_t j = idx_b[t];
            if (j < j0 || j >= j0 + bk) continue;
            for (int64_t i = 0; i < bn; ++i) kept[i * T + t] = s[i * ld + (j - j0)];
          }
          // Online softmax: shift each row by its running max, exponentiate the
          // whole tile with ATen's vectorised exp, then rescale the accumulator.
          for (int64_t i = 0; i < bn; ++i) {
            scalar_t* row = s + i * ld;
            const scalar_t mx = row_max(row, bk, m[i]);
            // A row whose keys so far are all masked keeps mx = -inf; its
            // entries are clamped to -87 and the key mask zeroes them after the exp.
            const scalar_t shift = (mx == neg_inf) ? scalar_t(0) : mx;
            shift_and_clamp(row, bk, shift);
            alpha[i] = (mx == neg_inf) ? scalar_t(1) : std::exp(m[i] - mx);  // 0 on the first live block
            m[i] = mx;
          }
          exp_tile(s_t, s, bn, bk, ld, key_mask);
          for (int64_t i = 0; i < bn; ++i) {
            const scalar_t* row = s + i * ld;
            l[i] = l[i] * alpha[i] + row_sum(row, bk);
            if (alpha[i] != scalar_t(1)) {
              for (int64_t d = 0; d < D; ++d) a[i * D + d] *= alpha[i];
            }
          }
          // Hidden keys' scores were replaced above, so only their values need cleaning.
          const scalar_t* vt = visible_rows(vh + j0 * D, bk, D, key_mask, v_clean);
          gemm_rm<scalar_t>(false, false, bn, D, bk, scalar_t(1), s, ld, vt, D, scalar_t(1), a, D);
        }
        // Epilogue: normalise, store lse, and the chosen columns' probabilities.
        scalar_t* o = out_p + ((b * H + h) * N + n0) * D;
        scalar_t* lse_row = lse_p + (b * H + h) * N + n0;
        for (int64_t i = 0; i < bn; ++i) {
          const scalar_t inv = scalar_t(1) / l[i];
          for (int64_t d = 0; d < D; ++d) o[i * D + d] = a[i * D + d] * inv;
          lse_row[i] = m[i] + std::log(l[i]);
        }
        if (!maps_p) continue;
        for (int64_t t = 0; t < T; ++t) {
          if (idx_b[t] < 0) continue;  // no map for this slot: nothing to do
          if (ex.head_mean) {
            scalar_t* dst = maps_p + (b * T + t) * N + n0;
            const scalar_t w = scalar_t(1) / static_cast<scalar_t>(H);
            // a probability: H terms of p/H may round past 1 (H = 3, L = 1 gave 1.0000001)
            for (int64_t i = 0; i < bn; ++i) dst[i] = std::min(dst[i] + std::exp(kept[i * T + t] - lse_row[i]) * w, scalar_t(1));
          } else {
            scalar_t* dst = maps_p + ((b * H + h) * T + t) * N + n0;
            for (int64_t i = 0; i < bn; ++i) dst[i] = std::exp(kept[i * T + t] - lse_row[i]);
          }
        }
      }
    }
  });
}

// How many shares of the query blocks each (batch row, head) of the backward is
// split into: 1 when B * H alone gives every thread a task, else enough shares
// for all threads (at most one per query block).
int64_t backward_shares(int64_t heads, int64_t query_blocks, int64_t threads) {
  if (heads >= threads) return 1;
  return std::max<int64_t>(1, std::min(query_blocks, (threads + heads - 1) / heads));
}

template <typename scalar_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Extras& ex,
                   const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout,
                   const at::Tensor* dmaps, double scale_d, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), L = k.size(2);
  const int64_t T = ex.T;
  const scalar_t scale = static_cast<scalar_t>(scale_d);
  const auto uniform = fully_masked_rows(ex, B, L);
  const scalar_t c = ex.head_mean ? scalar_t(1) / static_cast<scalar_t>(H) : scalar_t(1);
  init_library_state_once<scalar_t>();
  const scalar_t* q_p = q.data_ptr<scalar_t>();
  const scalar_t* k_p = k.data_ptr<scalar_t>();
  const scalar_t* o_p = out.data_ptr<scalar_t>();
  const scalar_t* do_p = dout.data_ptr<scalar_t>();
  const scalar_t* lse_p = lse.data_ptr<scalar_t>();
  const scalar_t* dm_p = dmaps ? dmaps->data_ptr<scalar_t>() : nullptr;
  const scalar_t* v_p = v.data_ptr<scalar_t>();
  scalar_t* dq_p = dq.data_ptr<scalar_t>();
  scalar_t* dk_p = dk.data_ptr<scalar_t>();
  scalar_t* dv_p = dv.data_ptr<scalar_t>();
  const auto opts = q.options();

  // Tasks are (batch row, head, share of the query blocks). dq rows belong to one
  // query block, so to one task. dk and dv of a head sum over every query block:
  // with one share per head (B * H fills the threads) a task owns them outright;
  // with S > 1 shares (few heads, e.g. B * H = 1 on a long sequence, where one
  // thread per head left the others idle) each share accumulates into its own
  // [L, D] slice of dk_parts / dv_parts, summed once all tasks are done, so the
  // result does not depend on how threads pick up tasks.
  const int64_t n_qblocks = (N + kQueryBlock - 1) / kQueryBlock;
  const int64_t shares = backward_shares(B * H, n_qblocks, at::get_num_threads());
  const int64_t per_share = (n_qblocks + shares - 1) / shares;
  at::Tensor dk_parts, dv_parts;
  if (shares > 1) {
    dk_parts = at::zeros({shares, B * H, L, D}, opts);
    dv_parts = at::zeros({shares, B * H, L, D}, opts);
  }
  at::parallel_for(0, B * H * shares, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor p_buf = at::empty({kQueryBlock, std::min(kKeyBlock, L)}, opts);
    at::Tensor dp_buf = at::empty({kQueryBlock, std::min(kKeyBlock, L)}, opts);
    std::vector<scalar_t> drow(kQueryBlock);
    std::vector<scalar_t> k_clean, v_clean;
    KeyBlockMask<scalar_t> key_mask;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / shares, share = task % shares;
      const int64_t b = bh / H, h = bh % H;
      const bool* visible_b = ex.key_mask ? ex.key_mask + b * L : nullptr;
      const int64_t* idx_b = ex.index ? ex.index + b * T : nullptr;
      scalar_t* dk_bh = shares > 1 ? dk_parts.data_ptr<scalar_t>() + (share * B * H + bh) * L * D : dk_p + bh * L * D;
      scalar_t* dv_bh = shares > 1 ? dv_parts.data_ptr<scalar_t>() + (share * B * H + bh) * L * D : dv_p + bh * L * D;
      const int64_t n_begin = share * per_share * kQueryBlock, n_end = std::min(N, n_begin + per_share * kQueryBlock);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kQueryBlock) {
        const int64_t bn = std::min(kQueryBlock, N - n0);
        const scalar_t* qt = q_p + (bh * N + n0) * D;
        const scalar_t* dot = do_p + (bh * N + n0) * D;
        const scalar_t* lse_row = lse_p + bh * N + n0;
        // dM[t, i] for this head and query block, or null.
        auto dm_at = [&](int64_t t, int64_t i) -> scalar_t {
          return ex.head_mean ? dm_p[(b * T + t) * N + n0 + i] : dm_p[((b * H + h) * T + t) * N + n0 + i];
        };
        // D = rowsum(dO * O) + c * sum_t dM[t] * P[:, idx_t]
        for (int64_t i = 0; i < bn; ++i) {
          const scalar_t* o_row = o_p + (bh * N + n0 + i) * D;
          const scalar_t* do_row = do_p + (bh * N + n0 + i) * D;
          scalar_t acc = 0;
          for (int64_t d = 0; d < D; ++d) acc += do_row[d] * o_row[d];
          if (dm_p) {
            const scalar_t* q_row = q_p + (bh * N + n0 + i) * D;
            for (int64_t t = 0; t < T; ++t) {
              const int64_t j = idx_b[t];
              // A hidden column has p = 0; a row that hides every key has all scores 0 (p = 1/L).
              if (j < 0 || (visible_b && !uniform[b] && !visible_b[j])) continue;
              const scalar_t* k_row = k_p + (bh * L + j) * D;
              scalar_t sc = 0;
              if (!uniform[b])
                for (int64_t d = 0; d < D; ++d) sc += q_row[d] * k_row[d];
              acc += c * dm_at(t, i) * std::exp(sc * scale - lse_row[i]);
            }
          }
          drow[i] = acc;
        }
        for (int64_t j0 = 0; j0 < L; j0 += kKeyBlock) {
          const int64_t bk = std::min(kKeyBlock, L - j0);
          key_mask.set(visible_b ? visible_b + j0 : nullptr, bk, uniform[b]);
          // Hidden keys and values as zeros: dP = dO.V^T and dq = dS.K must not
          // meet a NaN or Inf they hold (their dS is 0, but 0 * NaN is NaN).
          const scalar_t* kt = visible_rows(k_p + (bh * L + j0) * D, bk, D, key_mask, k_clean);
          const scalar_t* vt = visible_rows(v_p + (bh * L + j0) * D, bk, D, key_mask, v_clean);
          at::Tensor p_t = p_buf.narrow(0, 0, bn).narrow(1, 0, bk);  // for exp_tile's vectorised exp
          scalar_t* p = p_buf.data_ptr<scalar_t>();
          scalar_t* dp = dp_buf.data_ptr<scalar_t>();
          const int64_t ld = p_buf.size(1);
          gemm_rm<scalar_t>(false, true, bn, bk, D, scale, qt, D, kt, D, scalar_t(0), p, ld);
          gemm_rm<scalar_t>(false, true, bn, bk, D, scalar_t(1), dot, D, vt, D, scalar_t(0), dp, ld);
          mask_scores(p, bn, bk, ld, key_mask, uniform[b]);
          for (int64_t i = 0; i < bn; ++i) shift_and_clamp(p + i * ld, bk, lse_row[i]);
          // P recomputed from the saved lse
          exp_tile(p_t, p, bn, bk, ld, key_mask);
          if (dm_p) {  // duplicated columns add, -1 slots add nothing
            for (int64_t t = 0; t < T; ++t) {
              const int64_t j = idx_b[t];
              if (j < j0 || j >= j0 + bk) continue;
              for (int64_t i = 0; i < bn; ++i) dp[i * ld + (j - j0)] += c * dm_at(t, i);
            }
          }
          for (int64_t i = 0; i < bn; ++i)
            for (int64_t j = 0; j < bk; ++j) dp[i * ld + j] = p[i * ld + j] * (dp[i * ld + j] - drow[i]);
          gemm_rm<scalar_t>(true, false, bk, D, bn, scalar_t(1), p, ld, dot, D, scalar_t(1), dv_bh + j0 * D, D);
          if (!uniform[b]) {  // uniform rows have constant scores: no dq, dk
            gemm_rm<scalar_t>(false, false, bn, D, bk, scale, dp, ld, kt, D, scalar_t(1), dq_p + (bh * N + n0) * D, D);
            gemm_rm<scalar_t>(true, false, bk, D, bn, scale, dp, ld, qt, D, scalar_t(1), dk_bh + j0 * D, D);
          }
        }
      }
    }
  });
  if (shares > 1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    dk.view({B * H, L, D}).copy_(dk_parts.sum(0));
    dv.view({B * H, L, D}).copy_(dv_parts.sum(0));
  }
}

// Argument checks. torch.ops.fused_cpp.* is public and reached without fused's
// Python validation, so every entry point checks every tensor's device, dtype and
// shape before a pointer into it is read: a wrong size would read out of bounds.
void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "fused_cpp: ", name, " is an undefined tensor");
  TORCH_CHECK(t.device().is_cpu(), "fused_cpp: ", name, " must be a CPU tensor, got one on ", t.device());
}

// A tensor of q's dtype with exactly the shape `want`.
void check_like_q(const at::Tensor& t, const char* name, const at::Tensor& q, at::IntArrayRef want) {
  check_cpu(t, name);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "fused_cpp: ", name, " must have q's dtype ", q.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == want, "fused_cpp: ", name, " must have shape ", want, ", got ", t.sizes());
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  check_cpu(v, "v");
  TORCH_CHECK(q.dim() == 4, "fused_cpp: q must be 4-D [B, H, N, D], got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "fused_cpp: k must be 4-D [B, H, L, D], got shape ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "fused_cpp: q must be float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "fused_cpp: q, k, v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "fused_cpp: k must be [B, H, L, D] with q's B, H and D; q is ", q.sizes(), ", k is ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "fused_cpp: v must have k's shape ", k.sizes(), ", got ", v.sizes());
  // An empty key set has no softmax; a zero head dim is an invalid BLAS leading dimension.
  TORCH_CHECK(k.size(2) >= 1 && k.size(3) >= 1, "fused_cpp: k needs L >= 1 keys and D >= 1, got shape ",
              k.sizes());
}

void check_index(const at::Tensor& idx, const at::Tensor& q, const at::Tensor& k) {
  check_cpu(idx, "token_index");
  TORCH_CHECK(idx.scalar_type() == at::kLong, "fused_cpp: token_index must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == q.size(0), "fused_cpp: token_index must be [B=", q.size(0),
              ", T], got shape ", idx.sizes());
  const at::Tensor c = idx.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  const int64_t L = k.size(2);
  for (int64_t i = 0; i < c.numel(); ++i)
    TORCH_CHECK(p[i] >= -1 && p[i] < L, "fused_cpp: token_index values must lie in [-1, ", L - 1, "], got ", p[i]);
}

void check_key_mask(const at::Tensor& key_mask, const at::Tensor& q, const at::Tensor& k) {
  check_cpu(key_mask, "key_mask");
  TORCH_CHECK(key_mask.scalar_type() == at::kBool, "fused_cpp: key_mask must be bool, got ",
              key_mask.scalar_type());
  TORCH_CHECK(key_mask.dim() == 2 && key_mask.size(0) == q.size(0) && key_mask.size(1) == k.size(2),
              "fused_cpp: key_mask must have shape [B=", q.size(0), ", L=", k.size(2), "], got ", key_mask.sizes());
}

// What a backward op receives from its forward: out and grad_out like q, lse [B, H, N].
void check_saved(const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out) {
  check_like_q(out, "out", q, q.sizes());
  check_like_q(grad_out, "grad_out", q, q.sizes());
  check_like_q(lse, "lse", q, {q.size(0), q.size(1), q.size(2)});
}

// Torch's own CPU flash kernel gives out and lse at SDPA's speed; the chosen
// columns' probabilities then need only a second dot over the T chosen keys,
// p = exp(scale * q.k_t - lse). That recomputed score rounds differently from
// the ones lse was summed from, by about eps * |score| (one fp32 step is 5e-4 at
// |score| ~ 5000), so this route is taken only when Cauchy-Schwarz bounds every
// score, scale * |q_i| * |k_j|, so that eps * bound stays within the rounding
// budget (about 1e-5 in p for float32 at a bound of 256; float64 always passes at
// realistic sizes). Otherwise the tiles keep maps and lse from the same scores
// (docs/ops.md §2.4).
constexpr double kSecondDotRoundingBudget = 3e-5;

// The largest squared row norm of a contiguous [..., D] tensor, in one pass; +inf when any row's is not finite
// (NaN or inf inputs then take the tiles, which propagate them as attention does).
template <typename scalar_t>
double max_row_norm_sq(const at::Tensor& x) {
  const scalar_t* p = x.data_ptr<scalar_t>();
  const int64_t D = x.size(-1), rows = D ? x.numel() / D : 0;
  return at::parallel_reduce(0, rows, 256, 0.0, [&](int64_t begin, int64_t end, double m) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = p + r * D;
      const double sd = static_cast<double>(row_dot(row, row, D));
      if (!std::isfinite(sd)) return std::numeric_limits<double>::infinity();
      if (sd > m) m = sd;
    }
    return m;
  }, [](double a, double b) { return a > b ? a : b; });
}

bool second_dot_is_exact_enough(const at::Tensor& q, const at::Tensor& k, double scale) {
  // FUSED_CPU_MAPS_ROUTE=tiles forces the tiles (so tests check both routes at any scale).
  const char* route = std::getenv("FUSED_CPU_MAPS_ROUTE");
  if (route != nullptr && std::string(route) == "tiles") return false;
  double q_sq = 0, k_sq = 0, eps = 0;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "maps_route_bound", [&] {
    q_sq = max_row_norm_sq<scalar_t>(q);
    k_sq = max_row_norm_sq<scalar_t>(k);
    eps = static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
  });
  const double bound = std::abs(scale) * std::sqrt(q_sq) * std::sqrt(k_sq);
  return std::isfinite(bound) && bound * eps <= kSecondDotRoundingBudget;
}

// maps from out's own lse: p[b,h,t,n] = exp(scale * q[b,h,n] . k[b,h,idx[b,t]] - lse[b,h,n]), head-averaged into
// maps [B, T, N] (zero-filled) or written to maps [B, H, T, N]. One pass over q per (batch row, block of rows),
// every head of a row in the same task, so the head mean needs no atomics; a slot -1 stays zero.
template <typename scalar_t>
void chosen_column_maps(const at::Tensor& q, const at::Tensor& k, const at::Tensor& idx, const at::Tensor& lse,
                        double scale, bool head_mean, at::Tensor& maps) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), L = k.size(2), T = idx.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* lp = lse.data_ptr<scalar_t>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  scalar_t* mp = maps.data_ptr<scalar_t>();
  const scalar_t sc = static_cast<scalar_t>(scale), inv_h = static_cast<scalar_t>(1.0 / H);
  constexpr int64_t kRows = 64;
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, n0 = (task % blocks) * kRows, n1 = std::min(N, n0 + kRows);
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* qh = qp + ((b * H + h) * N) * D;
        const scalar_t* kh = kp + ((b * H + h) * L) * D;
        const scalar_t* lh = lp + (b * H + h) * N;
        for (int64_t n = n0; n < n1; ++n) {  // each query row read once, against the T chosen keys (in L1)
          const scalar_t* qn = qh + n * D;
          for (int64_t t = 0; t < T; ++t) {
            const int64_t j = ip[b * T + t];
            if (j < 0) continue;
            const scalar_t p = std::exp(row_dot(qn, kh + j * D, D) * sc - lh[n]);
            if (head_mean) mp[(b * T + t) * N + n] += p * inv_h; else mp[((b * H + h) * T + t) * N + n] = p;
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_with_maps(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& idx, double scale,
    bool head_mean) {
  auto [out, lse_raw] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, false, std::nullopt, scale);
  const at::Tensor lse = lse_raw.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), T = idx.size(1);
  at::Tensor maps = head_mean ? at::zeros({B, T, N}, q.options()) : at::zeros({B, H, T, N}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "chosen_column_maps", [&] {
    chosen_column_maps<scalar_t>(q, k, idx, lse, scale, head_mean, maps);
  });
  return {out.contiguous(), maps, lse};
}

// Key compaction for masked attention. A hidden key contributes nothing to the
// output or the gradients (docs/ops.md §4.2), so when every batch row sees at
// least one key and the row that sees most sees at most kCompactShare of them,
// each row's visible keys are gathered, in order, into [B, H, Lc, D] (Lc = that
// largest count; a shorter row's tail slots stay hidden) and the kernels run on
// Lc keys instead of L: ViCo's image attention hides the reference's background,
// often half the keys. A fully hidden row attends to all L keys (§4.3), so any
// such row turns compaction off.
constexpr double kCompactShare = 0.75;

struct CompactKeys {
  bool used = false;
  at::Tensor index;  // int64 [B, H, Lc, D]: where each compacted slot came from along L
  at::Tensor k, v;   // [B, H, Lc, D]
  at::Tensor mask;   // bool [B, Lc]
};

CompactKeys compact_keys(const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  CompactKeys c;
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), D = k.size(3);
  const at::Tensor counts = mask.sum(1);
  if (counts.min().item<int64_t>() == 0) return c;
  const int64_t Lc = counts.max().item<int64_t>();
  if (static_cast<double>(Lc) > kCompactShare * static_cast<double>(L)) return c;
  // A stable descending sort of the mask puts each row's visible keys first, in key order.
  const at::Tensor order = std::get<1>(mask.to(at::kInt).sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor slots = order.narrow(1, 0, Lc);
  c.used = true;
  c.index = slots.view({B, 1, Lc, 1}).expand({B, H, Lc, D}).contiguous();
  c.k = k.gather(2, c.index);
  c.v = v.gather(2, c.index);
  c.mask = at::arange(Lc, counts.options()).unsqueeze(0) < counts.unsqueeze(1);
  return c;
}

// Optional tensors of one call, checked and made contiguous; `ex` points into them.
struct Inputs {
  at::Tensor q, k, v, idx, mask;
  Extras ex;
};

Inputs prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const std::optional<at::Tensor>& token_index, const std::optional<at::Tensor>& key_mask,
               bool head_mean) {
  check_qkv(q, k, v);
  Inputs in{q.contiguous(), k.contiguous(), v.contiguous(), at::Tensor(), at::Tensor(), Extras()};
  if (token_index.has_value()) {
    check_index(*token_index, q, k);
    in.idx = token_index->contiguous();
    in.ex.index = in.idx.data_ptr<int64_t>();
    in.ex.T = in.idx.size(1);
  }
  if (key_mask.has_value()) {
    check_key_mask(*key_mask, q, k);
    in.mask = key_mask->contiguous();
  }
  in.ex.head_mean = head_mean;
  return in;
}

// Keys and mask the tiles run on: the visible keys only (compacted) when the call takes no maps, whose
// token_index names columns of the full key set.
struct KeySet {
  CompactKeys c;
  at::Tensor k, v, mask;
};

KeySet key_set(const Inputs& in) {
  KeySet s;
  if (in.mask.defined() && !in.idx.defined()) s.c = compact_keys(in.k, in.v, in.mask);
  s.k = s.c.used ? s.c.k : in.k;
  s.v = s.c.used ? s.c.v : in.v;
  s.mask = s.c.used ? s.c.mask : in.mask;
  return s;
}

at::Tensor empty_maps(const at::Tensor& q, int64_t T, bool head_mean) {
  return head_mean ? at::zeros({q.size(0), T, q.size(2)}, q.options())
                   : at::zeros({q.size(0), q.size(1), T, q.size(2)}, q.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& token_index, const std::optional<at::Tensor>& key_mask, double scale,
    bool head_mean) {
  Inputs in = prepare(q_in, k_in, v_in, token_index, key_mask, head_mean);
  const bool maps_wanted = in.idx.defined();
  if (maps_wanted && !in.mask.defined() && second_dot_is_exact_enough(in.q, in.k, scale))
    return flash_attention_with_maps(in.q, in.k, in.v, in.idx, scale, head_mean);
  KeySet keys = key_set(in);
  at::Tensor out = at::empty_like(in.q);
  at::Tensor lse = at::empty({in.q.size(0), in.q.size(1), in.q.size(2)}, in.q.options());
  at::Tensor maps = empty_maps(in.q, in.ex.T, head_mean);
  if (keys.mask.defined()) in.ex.key_mask = keys.mask.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "attention_cpu", [&] {
    forward_impl<scalar_t>(in.q, keys.k, keys.v, in.ex, scale, out, lse, maps_wanted ? &maps : nullptr);
  });
  return {out, maps, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& token_index, const std::optional<at::Tensor>& key_mask, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_maps, double scale,
    bool head_mean) {
  Inputs in = prepare(q_in, k_in, v_in, token_index, key_mask, head_mean);
  check_saved(q_in, out, lse, grad_out);
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), T = in.ex.T;
  at::Tensor dm;
  if (grad_maps.has_value()) {
    TORCH_CHECK(in.idx.defined(), "fused_cpp: grad_maps was given but token_index was not");
    const std::vector<int64_t> want = head_mean ? std::vector<int64_t>{B, T, N} : std::vector<int64_t>{B, H, T, N};
    check_like_q(*grad_maps, "grad_maps", q_in, want);
    dm = grad_maps->contiguous();
  }
  KeySet keys = key_set(in);  // the forward's choice: same mask, same keys
  if (keys.mask.defined()) in.ex.key_mask = keys.mask.data_ptr<bool>();
  const at::Tensor o = out.contiguous(), l = lse.contiguous(), d_o = grad_out.contiguous();
  at::Tensor dq = at::zeros_like(in.q), dk = at::zeros_like(keys.k), dv = at::zeros_like(keys.v);
  AT_DISPATCH_FLOATING_TYPES(in.q.scalar_type(), "attention_backward_cpu", [&] {
    backward_impl<scalar_t>(in.q, keys.k, keys.v, in.ex, o, l, d_o, dm.defined() ? &dm : nullptr, scale, dq, dk, dv);
  });
  if (keys.c.used) {  // hidden keys get exact zeros, as without compaction
    return {dq, at::zeros_like(in.k).scatter_(2, keys.c.index, dk), at::zeros_like(in.v).scatter_(2, keys.c.index, dv)};
  }
  return {dq, dk, dv};
}

}  // namespace fused_cpp

// The ops declared in fused/_library.py, implemented for CPU tensors.
TORCH_LIBRARY_IMPL(fused_cpp, CPU, m) {
  m.impl("attention", &fused_cpp::attention);
  m.impl("attention_backward", &fused_cpp::attention_backward);
}
