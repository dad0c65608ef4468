// memnb compiled ops, CPU kernels and private schemas.
// The public ops (memnb::embedding_bag_wsum, ...) are torch.library custom ops defined in nbs/01_ops.ipynb; their
// bodies call the private ops registered here. Schemas use TORCH_LIBRARY_FRAGMENT so other memnb sources can add
// ops to the same `memnb` namespace from their own shared libraries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include "rows.h"
#include "onednn.h"
#include <algorithm>
#include <cstring>
#include <vector>
#include <mutex>
#include <cstdlib>
#include <cmath>
#include <limits>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace memnb {
using at::Tensor;

// A fresh output backed by transparent huge pages where the OS allows it (madvise mode). A dense dV is written once
// per backward; with 4 KiB pages the first-touch page faults of a fresh 128 MiB buffer cost more than the kernel
// itself, with 2 MiB pages they are ~500x fewer. Every caller overwrites the whole buffer, so when one is freed it is
// kept (one buffer, up to 1 GiB) for the next call of the same size class, as a caching allocator would: a training
// loop then reuses the same pages step after step, with no page faults and no compaction stall at all.
struct HugeCache { std::mutex m; void* p = nullptr; size_t cap = 0; };
static HugeCache& huge_cache() { static HugeCache c; return c; }
constexpr size_t kHuge = size_t(2) << 20, kCacheMax = size_t(1) << 30;

static void release_huge(void* q, size_t cap) {
  auto& c = huge_cache();
  std::lock_guard<std::mutex> lock(c.m);
  if (cap <= kCacheMax && (c.p == nullptr || cap >= c.cap)) { std::swap(q, c.p); c.cap = cap; }   // keep the larger
  std::free(q);
}

static Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  const size_t nbytes = size_t(n) * at::elementSize(at::typeMetaToScalarType(opt.dtype()));
#ifdef __linux__
  if (nbytes >= 2 * kHuge) {
    const size_t cap = (nbytes + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    size_t have = cap;
    {
      auto& c = huge_cache();
      std::lock_guard<std::mutex> lock(c.m);
      if (c.p && c.cap >= cap && c.cap <= 2 * cap) { p = c.p; have = c.cap; c.p = nullptr; c.cap = 0; }
    }
    if (!p) {
      if (posix_memalign(&p, kHuge, cap) != 0) return at::empty(sizes, opt);
      madvise(p, cap, MADV_HUGEPAGE);
    }
    return at::from_blob(p, sizes, [have](void* q) { release_huge(q, have); }, opt);
  }
#endif
  return at::empty(sizes, opt);
}

#ifndef MEMNB_PF
#define MEMNB_PF 16
#endif
constexpr int64_t kPrefetchRows = MEMNB_PF;  // software-prefetch the row this many bag slots ahead

// a[d] += w0*r0[d] + w1*r1[d] + w2*r2[d] + w3*r3[d]: four rows per pass over the accumulator (fewer loads/stores)
template <typename A, typename V>
inline void axpy4(A* __restrict a, const V* __restrict r0, const V* __restrict r1, const V* __restrict r2,
                  const V* __restrict r3, A w0, A w1, A w2, A w3, int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    a[d] += w0 * static_cast<A>(r0[d]) + w1 * static_cast<A>(r1[d]) + w2 * static_cast<A>(r2[d]) + w3 * static_cast<A>(r3[d]);
}

// rows.h: one definition each for the dense and the fused backward
using memnb_common::Acc; using memnb_common::prefetch_row; using memnb_common::axpy; using memnb_common::dot;
using memnb_common::row_grad;

template <typename I>
void check_indices(const I* idx, int64_t n, int64_t N, const char* op) {
  for (int64_t e = 0; e < n; ++e)
    TORCH_CHECK_INDEX(idx[e] >= 0 && idx[e] < N, op, ": `idx` contains ", int64_t(idx[e]), ", out of range for `values` with ",
                      N, " rows (valid: 0 <= idx < ", N, ")");
}

static void check_bag(const Tensor& values, const Tensor& idx, const Tensor& weights, const char* op) {
  TORCH_CHECK(values.dim() == 2, op, ": `values` must have 2 dims, got ", values.sizes());
  TORCH_CHECK(idx.dim() == 2, op, ": `idx` must have 2 dims, got ", idx.sizes());
  TORCH_CHECK(weights.sizes() == idx.sizes(), op, ": `weights` shape ", weights.sizes(), " must equal `idx` shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": `idx` must be int32 or int64");
  TORCH_CHECK(weights.scalar_type() == values.scalar_type() || weights.scalar_type() == at::kFloat, op,
              ": `weights` dtype must be `values` dtype or float32");
  TORCH_CHECK(values.device() == idx.device() && values.device() == weights.device(), op, ": tensors on different devices");
}

// ---------------------------------------------------------------- embedding_bag_wsum forward
template <typename V, typename W, typename I>
void ebw_fwd_impl(const V* values, const I* idx, const W* w, V* out, int64_t T, int64_t L, int64_t D) {
  using A = typename Acc<V>::type;
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    std::vector<A> acc(D);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), A(0));
      const I* it = idx + t * L;
      const W* wt = w + t * L;
      if (kPrefetchRows > 0)
        for (int64_t l = 0; l < std::min(kPrefetchRows, L); ++l) prefetch_row(values + int64_t(it[l]) * D, D);
      int64_t l = 0;
      for (; l + 4 <= L; l += 4) {
        if (kPrefetchRows > 0)
          for (int64_t u = l + kPrefetchRows; u < std::min(l + kPrefetchRows + 4, L); ++u) prefetch_row(values + int64_t(it[u]) * D, D);
        axpy4<A, V>(acc.data(), values + int64_t(it[l]) * D, values + int64_t(it[l + 1]) * D, values + int64_t(it[l + 2]) * D,
                    values + int64_t(it[l + 3]) * D, static_cast<A>(wt[l]), static_cast<A>(wt[l + 1]), static_cast<A>(wt[l + 2]),
                    static_cast<A>(wt[l + 3]), D);
      }
      for (; l < L; ++l) {
        if (kPrefetchRows > 0 && l + kPrefetchRows < L) prefetch_row(values + int64_t(it[l + kPrefetchRows]) * D, D);
        axpy<A, V>(acc.data(), values + int64_t(it[l]) * D, static_cast<A>(wt[l]), D);
      }
      V* o = out + t * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<V>(acc[d]);
    }
  });
}

#ifdef __AVX512F__
// float32 rows with D a multiple of 16, on AVX-512: the accumulator lives in NV zmm registers (16 NV floats) instead
// of in memory, one block of D at a time (256 wide, then the rest). Each cache line of the block is prefetched for the
// row 8 slots ahead right after its FMA, so the prefetches spread over the loop instead of coming in bursts, and the
// prefetch address never branches (past the bag's end it repeats the current row). Measured at the benchmark size
// (D=512, L=128), interleaved with torch: 1 thread 16.1 vs 17.5 ms for the bursty prefetch before (torch/fbgemm
// 14.5-14.6 ms), 2 threads 8.3 vs 9.3 ms (torch 7.8).
template <int NV, typename I>
inline void ebw_block_f32(const float* values, const I* it, const float* wt, float* o, int64_t L, int64_t D) {
  constexpr int64_t kPf = 8;       // values and o point at the block's first column
  __m512 acc[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t l = 0; l < L; ++l) {
    const float* r = values + int64_t(it[l]) * D;
    const char* p = reinterpret_cast<const char*>(values + int64_t(it[l + kPf < L ? l + kPf : l]) * D);
    const __m512 wv = _mm512_set1_ps(wt[l]);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      acc[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(r + 16 * j), acc[j]);
      _mm_prefetch(p + 64 * j, _MM_HINT_T0);
    }
  }
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + 16 * j, acc[j]);
}

// The last block's width nv in [1, 15] vectors, as a compile-time NV.
template <typename I, int NV = 15>
inline void ebw_tail_f32(int nv, const float* values, const I* it, const float* wt, float* o, int64_t L, int64_t D) {
  if constexpr (NV >= 1) {
    if (nv == NV) ebw_block_f32<NV, I>(values, it, wt, o, L, D);
    else ebw_tail_f32<I, NV - 1>(nv, values, it, wt, o, L, D);
  }
}

template <typename I>
void ebw_fwd_f32_avx512(const float* values, const I* idx, const float* w, float* out, int64_t T, int64_t L, int64_t D) {
  const int64_t full = D / 256 * 256;
  const int tail = int((D - full) / 16);
  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const I* it = idx + t * L;
      const float* wt = w + t * L;
      for (int64_t d0 = 0; d0 < full; d0 += 256) ebw_block_f32<16, I>(values + d0, it, wt, out + t * D + d0, L, D);
      if (tail) ebw_tail_f32<I>(tail, values + full, it, wt, out + t * D + full, L, D);
    }
  });
}
#endif

Tensor ebw_fwd_cpu(const Tensor& values_, const Tensor& idx_, const Tensor& weights_) {
  const char* op = "embedding_bag_wsum";
  check_bag(values_, idx_, weights_, op);
  auto values = values_.contiguous(); auto idx = idx_.contiguous(); auto weights = weights_.contiguous();
  const int64_t N = values.size(0), D = values.size(1), T = idx.size(0), L = idx.size(1);
  auto out = at::empty({T, D}, values.options());
  if (T == 0 || D == 0) return out;
  if (L == 0) return out.zero_();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "ebw_fwd_idx", [&] {
    check_indices(idx.data_ptr<index_t>(), idx.numel(), N, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ebw_fwd", [&] {
#ifdef __AVX512F__
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (D % 16 == 0 && weights.scalar_type() == at::kFloat) {
          ebw_fwd_f32_avx512<index_t>(values.data_ptr<float>(), idx.data_ptr<index_t>(), weights.data_ptr<float>(),
                                      out.data_ptr<float>(), T, L, D);
          return;
        }
      }
#endif
      if (weights.scalar_type() == values.scalar_type())
        ebw_fwd_impl<scalar_t, scalar_t, index_t>(values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                                  weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, L, D);
      else
        ebw_fwd_impl<scalar_t, float, index_t>(values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                               weights.data_ptr<float>(), out.data_ptr<scalar_t>(), T, L, D);
    });
  });
  return out;
}

// ---------------------------------------------------------------- embedding_bag_wsum backward
// dV: a stable counting sort of the (t, l) slots by row gives each row its contributions in (t, l) order (a CSR);
// rows are then split across threads, so each thread owns its rows: lock-free, deterministic, every dV row written
// exactly once (rows nobody used are written as zeros; no separate memset pass). While a row's values are hot in
// L1, dw[t, l] = g[t]·V[row] is computed for all its slots, so V is read once per distinct row, not once per slot.
template <typename V, typename W, typename I>
void ebw_bwd_impl(const V* g, const V* values, const I* idx, const W* w, V* dv, W* dw,
                  int64_t N, int64_t T, int64_t L, int64_t D) {
  using A = typename Acc<V>::type;
  const int64_t n = T * L;
  if (dv) {
    std::vector<int64_t> start(N + 1, 0);
    for (int64_t e = 0; e < n; ++e) start[int64_t(idx[e]) + 1]++;
    for (int64_t r = 0; r < N; ++r) start[r + 1] += start[r];
    std::vector<int64_t> slot(n), cursor(start.begin(), start.end() - 1);
    for (int64_t e = 0; e < n; ++e) slot[cursor[int64_t(idx[e])]++] = e;
    at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
      std::vector<A> buf(std::is_same_v<A, V> ? 0 : D);
      std::vector<float> scratch;
      for (int64_t r = r0; r < r1; ++r) {
        V* out = dv + r * D;
        const int64_t b = start[r], e_end = start[r + 1];
        if (b == e_end) { std::memset(out, 0, D * sizeof(V)); continue; }
        A* acc = std::is_same_v<A, V> ? reinterpret_cast<A*>(out) : buf.data();   // fp32/fp64: straight into dV
        row_grad<A, V, W>(g, values + r * D, slot.data(), b, e_end, L, w, dw, acc, D, scratch);
        if (!std::is_same_v<A, V>) for (int64_t d = 0; d < D; ++d) out[d] = static_cast<V>(acc[d]);
      }
    });
  } else if (dw) {  // only dw: one gather pass over the bags, like the forward
    at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const I* it = idx + t * L;
        for (int64_t l = 0; l < L; ++l) {
          if (l + kPrefetchRows < L) prefetch_row(values + int64_t(it[l + kPrefetchRows]) * D, D);
          dw[t * L + l] = static_cast<W>(dot<A, V, V>(g + t * D, values + int64_t(it[l]) * D, D));
        }
      }
    });
  }
}

std::tuple<Tensor, Tensor> ebw_bwd_cpu(const Tensor& grad_, const Tensor& values_, const Tensor& idx_, const Tensor& weights_,
                                       bool need_dv, bool need_dw, bool deterministic) {
  const char* op = "embedding_bag_wsum_backward";
  check_bag(values_, idx_, weights_, op);
  auto values = values_.contiguous(); auto idx = idx_.contiguous(); auto weights = weights_.contiguous();
  const int64_t N = values.size(0), D = values.size(1), T = idx.size(0), L = idx.size(1);
  TORCH_CHECK(grad_.dim() == 2 && grad_.size(0) == T && grad_.size(1) == D, op, ": `grad` shape ", grad_.sizes(),
              " must be [T=", T, ", D=", D, "]");
  auto grad = grad_.to(values.scalar_type()).contiguous();
  Tensor dv = need_dv ? empty_huge({N, D}, values.options()) : at::empty({0}, values.options());
  Tensor dw = need_dw ? at::empty({T, L}, weights.options()) : at::empty({0}, weights.options());
  if (need_dv && (T * L == 0 || D == 0)) dv.zero_();
  if (need_dw && (D == 0 || T * L == 0)) dw.zero_();
  if ((!need_dv && !need_dw) || T * L == 0 || D == 0) return {dv, dw};
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "ebw_bwd_idx", [&] {
    check_indices(idx.data_ptr<index_t>(), idx.numel(), N, op);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ebw_bwd", [&] {
      scalar_t* dvp = need_dv ? dv.data_ptr<scalar_t>() : nullptr;
      if (weights.scalar_type() == values.scalar_type())
        ebw_bwd_impl<scalar_t, scalar_t, index_t>(grad.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
            weights.data_ptr<scalar_t>(), dvp, need_dw ? dw.data_ptr<scalar_t>() : nullptr, N, T, L, D);
      else
        ebw_bwd_impl<scalar_t, float, index_t>(grad.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
            weights.data_ptr<float>(), dvp, need_dw ? dw.data_ptr<float>() : nullptr, N, T, L, D);
    });
  });
  return {dv, dw};
}

// ---------------------------------------------------------------- pool_drop_append
// dest[l*N + n] = new position of slot n of layer l, or -1 if dropped. Validates everything before any write.
std::vector<int64_t> keep_map(const Tensor& drop_idx, int64_t Lyr, int64_t N, const char* op) {
  const int64_t K = drop_idx.size(1);
  auto d = drop_idx.to(at::kLong).contiguous();
  const int64_t* dp = d.data_ptr<int64_t>();
  std::vector<int64_t> dest(Lyr * N, 0);
  for (int64_t l = 0; l < Lyr; ++l) {
    int64_t* m = dest.data() + l * N;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = dp[l * K + j];
      TORCH_CHECK_INDEX(i >= 0 && i < N, op, ": layer ", l, ": drop index ", i, " (drop_idx[", l, ", ", j,
                        "]) is out of range for a pool of ", N, " slots");
      TORCH_CHECK_INDEX(m[i] == 0, op, ": layer ", l, ": drop index ", i, " appears more than once in `drop_idx`");
      m[i] = -1;
    }
    int64_t pos = 0;
    for (int64_t n = 0; n < N; ++n) m[n] = (m[n] < 0) ? -1 : pos++;
  }
  return dest;
}

static void check_pool(const Tensor& pool, const Tensor& nw, const Tensor& drop_idx, const char* op) {
  TORCH_CHECK(pool.dim() == 3, op, ": `pool` must have 3 dims, got ", pool.sizes());
  TORCH_CHECK(drop_idx.dim() == 2 && drop_idx.size(0) == pool.size(0) && drop_idx.size(1) <= pool.size(1), op,
              ": `drop_idx` shape ", drop_idx.sizes(), " must be [Lyr, K<=N] for `pool` ", pool.sizes());
  TORCH_CHECK(drop_idx.scalar_type() == at::kInt || drop_idx.scalar_type() == at::kLong, op, ": `drop_idx` must be int32 or int64");
  TORCH_CHECK(nw.dim() == 3 && nw.size(0) == pool.size(0) && nw.size(1) == drop_idx.size(1) && nw.size(2) == pool.size(2), op,
              ": `new` shape ", nw.sizes(), " must be (Lyr, K, D)");
  TORCH_CHECK(nw.scalar_type() == pool.scalar_type(), op, ": `new` dtype must equal `pool` dtype");
  TORCH_CHECK(pool.device() == nw.device() && pool.device() == drop_idx.device(), op, ": tensors on different devices");
}

std::tuple<Tensor, Tensor> pool_drop_append_cpu(const Tensor& pool_, const Tensor& nw_, const Tensor& drop_idx) {
  const char* op = "pool_drop_append";
  check_pool(pool_, nw_, drop_idx, op);
  auto pool = pool_.contiguous(); auto nw = nw_.contiguous();
  const int64_t Lyr = pool.size(0), N = pool.size(1), D = pool.size(2), K = drop_idx.size(1);
  auto dest = keep_map(drop_idx, Lyr, N, op);
  auto out = empty_huge(pool.sizes(), pool.options());  // a fresh pool-sized output: huge pages, few page faults
  auto dropped = at::empty({Lyr, K, D}, pool.options());
  const int64_t rb = D * pool.element_size();
  const char* src = static_cast<const char*>(pool.data_ptr());
  const char* nsrc = static_cast<const char*>(nw.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  char* drp = static_cast<char*>(dropped.data_ptr());
  auto d64 = drop_idx.to(at::kLong).contiguous();
  const int64_t* dp = d64.data_ptr<int64_t>();
  constexpr int64_t CH = 256;  // rows per work item
  const int64_t nch = (N + CH - 1) / CH;
  // survivors: parallel over layers x row-chunks, each contiguous run of kept rows is one memcpy
  at::parallel_for(0, Lyr * nch, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t l = c / nch, n0 = (c % nch) * CH, n1 = std::min(N, n0 + CH);
      const int64_t* m = dest.data() + l * N;
      for (int64_t n = n0; n < n1;) {
        if (m[n] < 0) { ++n; continue; }
        int64_t e = n + 1;
        while (e < n1 && m[e] >= 0) ++e;
        std::memcpy(dst + (l * N + m[n]) * rb, src + (l * N + n) * rb, (e - n) * rb);
        n = e;
      }
    }
  });
  at::parallel_for(0, Lyr, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      std::memcpy(dst + (l * N + N - K) * rb, nsrc + l * K * rb, K * rb);
      for (int64_t j = 0; j < K; ++j) std::memcpy(drp + (l * K + j) * rb, src + (l * N + dp[l * K + j]) * rb, rb);
    }
  });
  return {out, dropped};
}

Tensor pool_drop_append_inplace_cpu(Tensor pool, const Tensor& nw_, const Tensor& drop_idx) {
  const char* op = "pool_drop_append_";
  check_pool(pool, nw_, drop_idx, op);
  TORCH_CHECK(pool.is_contiguous(), op, ": `pool` must be contiguous");
  auto nw = nw_.contiguous();
  const int64_t Lyr = pool.size(0), N = pool.size(1), D = pool.size(2), K = drop_idx.size(1);
  auto dest = keep_map(drop_idx, Lyr, N, op);  // throws before anything is written
  auto dropped = at::empty({Lyr, K, D}, pool.options());
  const int64_t rb = D * pool.element_size();
  char* p = static_cast<char*>(pool.data_ptr());
  const char* nsrc = static_cast<const char*>(nw.data_ptr());
  char* drp = static_cast<char*>(dropped.data_ptr());
  auto d64 = drop_idx.to(at::kLong).contiguous();
  const int64_t* dp = d64.data_ptr<int64_t>();
  // in place, rows only move left, so a layer is compacted in ascending order by one thread; layers in parallel
  at::parallel_for(0, Lyr, 1, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      char* base = p + l * N * rb;
      for (int64_t j = 0; j < K; ++j) std::memcpy(drp + (l * K + j) * rb, base + dp[l * K + j] * rb, rb);
      const int64_t* m = dest.data() + l * N;
      for (int64_t n = 0; n < N;) {
        if (m[n] < 0) { ++n; continue; }
        int64_t e = n + 1;
        while (e < N && m[e] >= 0) ++e;
        if (m[n] != n) std::memmove(base + m[n] * rb, base + n * rb, (e - n) * rb);
        n = e;
      }
      std::memcpy(base + (N - K) * rb, nsrc + l * K * rb, K * rb);
    }
  });
  return dropped;
}

// ---------------------------------------------------------------- topk_mean_sigmoid
// Keys are scored tile by tile: a GEMM of the queries with one tile of keys into a reused [Q, tile] buffer,
// sigmoid in place, mean over the queries; then the tile's candidates are merged into a running top-k
// (nth_element on (score desc, index asc)). Memory: the buffer plus k candidates, never Q x M. The GEMM and the
// elementwise ops are ATen's multi-threaded kernels; the merge is O(tile + k) per tile. A NaN score is ranked (and
// returned) as -inf: NaN in a comparator is undefined behaviour, and as -inf it never beats a finite score.
template <typename A>
struct Better {
  bool operator()(const std::pair<A, int64_t>& a, const std::pair<A, int64_t>& b) const {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  }
};

// The k best (score, index) pairs seen so far: each tile's candidates are appended, then cut back to k with
// nth_element on (score desc, index asc). NaN is ranked as -inf.
template <typename A>
struct RunningTopK {
  int64_t k;
  std::vector<std::pair<A, int64_t>> best;
  Better<A> better;
  RunningTopK(int64_t k, int64_t tile) : k(k) { best.reserve(k + tile); }
  void add(const A* sp, int64_t n, int64_t first) {   // the scores of rows first..first+n-1
    constexpr A ninf = -std::numeric_limits<A>::infinity();
    for (int64_t j = 0; j < n; ++j) best.emplace_back(std::isnan(sp[j]) ? ninf : sp[j], first + j);
    if (int64_t(best.size()) > k) {
      std::nth_element(best.begin(), best.begin() + k, best.end(), better);
      best.resize(k);
    }
  }
  void finish(const at::TensorOptions& opt, Tensor& scores, Tensor& index) {   // sorted best first into [k] outputs
    std::sort(best.begin(), best.end(), better);
    scores = at::empty({k}, opt);
    A* sop = scores.data_ptr<A>();
    int64_t* ip = index.data_ptr<int64_t>();
    for (int64_t j = 0; j < k; ++j) { sop[j] = best[j].first; ip[j] = best[j].second; }
  }
};

// Tile by tile over the M keys: `tile_means(s, n)` returns the [n] mean-sigmoid scores of keys s..s+n-1.
template <typename A, typename F>
void topk_tiles(int64_t M, int64_t k, int64_t tile, const at::TensorOptions& opt, F tile_means, Tensor& scores, Tensor& index) {
  RunningTopK<A> top(k, tile);
  for (int64_t s = 0; s < M; s += tile) {
    const int64_t n = std::min(tile, M - s);
    top.add(tile_means(s, n).template data_ptr<A>(), n, s);
  }
  top.finish(opt, scores, index);
}

// The MKL recipe: a GEMM of the queries with the tile into a reused [Q, tile] buffer, sigmoid in place, mean over
// the queries.
template <typename A>
void topk_mkl(const Tensor& q, const Tensor& keys, int64_t k, int64_t tile, Tensor& scores, Tensor& index) {
  const int64_t Q = q.size(0);
  auto buf = at::empty({Q * tile}, q.options());
  auto ts = at::empty({tile}, q.options());
  topk_tiles<A>(keys.size(0), k, tile, q.options(), [&](int64_t s, int64_t n) {
    auto kt = keys.narrow(0, s, n).to(q.scalar_type());      // [n, dk], a view for fp32/fp64 keys
    auto b = buf.narrow(0, 0, Q * n).view({Q, n});           // [Q, n]
    at::mm_out(b, q, kt.t());
    b.sigmoid_();
    auto tsn = ts.narrow(0, 0, n);
    return at::mean_out(tsn, b, {0}, false);
  }, scores, index);
}

// The oneDNN recipe: per tile one GEMM of the keys with the queries with the sigmoid fused into it
// (mkldnn::_linear_pointwise, [tile, Q] scores, about 2 MiB), then ATen's mean over each contiguous row. oneDNN's
// float32 GEMM runs at about twice MKL's rate at these shapes and the fusion saves a pass over the buffer; bf16/fp16
// key tiles are widened into one reused float32 buffer.
void topk_onednn(const Tensor& q, const Tensor& keys, int64_t k, int64_t tile, Tensor& scores, Tensor& index) {
  const int64_t M = keys.size(0), dk = keys.size(1);
  const bool widen = keys.scalar_type() != at::kFloat;
  auto kbuf = widen ? at::empty({std::min(tile, M), dk}, q.options()) : Tensor();
  auto ts = at::empty({tile}, q.options());
  topk_tiles<float>(M, k, tile, q.options(), [&](int64_t s, int64_t n) {
    auto kt = widen ? kbuf.narrow(0, 0, n).copy_(keys.narrow(0, s, n)) : keys.narrow(0, s, n);   // [n, dk] float32
    auto tsn = ts.narrow(0, 0, n);
    return at::mean_out(tsn, memnb_common::onednn_linear(kt, q, "sigmoid"), {1}, false);   // [n, Q] sigmoid(k_j . q_t) -> [n]
  }, scores, index);
}

// The bf16 recipe (bf16 queries and keys, AVX-512 BF16): products of bf16 pairs summed in float32 by `vdpbf16ps`
// (each bf16 x bf16 product is exact in float32), sigmoid and the mean over the queries in float32 registers, so
// neither the [Q, M] logits nor a widened copy of the keys is ever written. The queries are packed once per call
// into VNNI pairs, qp[(i * Qp + t) * 2 + c] = q[t][2i + c] with Qp = Q rounded up to 16 (zero padding, masked out of
// the mean); each key row is read straight from the caller's [M, dk] tensor, one 32-bit pair broadcast at a time.
// R keys x NQ vectors of 16 queries are held in R * NQ accumulators (at most 24 of the 32 zmm registers).
#if defined(__AVX512BF16__)
static inline __m512 sigmoid16(__m512 x) {   // 1 / (1 + 2^t), t = -x log2(e); 2^t = scalef(2^f, round(t)), |f| <= 1/2
  // t within [-126, 126] keeps 1 + 2^t finite (its reciprocal then underflows to 0, sigmoid < 1e-37: exact enough)
  const __m512 hi = _mm512_set1_ps(126.f), lo = _mm512_set1_ps(-126.f);
  __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(-1.4426950408889634f));
  t = _mm512_max_ps(lo, _mm512_min_ps(hi, t));   // NaN stays NaN (min/max return their second operand on NaN)
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));   // f ln 2, |.| <= 0.347
  __m512 p = _mm512_set1_ps(1.f / 5040);   // exp(f ln 2) to degree 7: truncation error below 1e-8 relative
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  const __m512 one = _mm512_set1_ps(1.f), den = _mm512_add_ps(one, _mm512_scalef_ps(p, n));
  const __m512 r = _mm512_rcp14_ps(den);                                        // 1/den to 2^-14, then one Newton step
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
}

// Keys k0..k0+R-1 against query vectors v0..v0+NQ-1: adds sum over those queries of sigmoid(q . key) to sums[r]
// (lanes past Q in the last vector, `last`, are masked by `tail`).
template <int R, int NQ>
static inline void bf16_block(const uint16_t* keys, int64_t dk, const uint16_t* qp, int64_t Qp, int64_t v0,
                              int64_t last, __mmask16 tail, __m512* sums) {
  __m512 acc[R][NQ];
  for (int r = 0; r < R; ++r) for (int j = 0; j < NQ; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dk / 2; ++i) {
    const uint16_t* qrow = qp + (i * Qp + v0 * 16) * 2;
    __m512bh qv[NQ];
    for (int j = 0; j < NQ; ++j) qv[j] = (__m512bh)_mm512_loadu_si512(qrow + 32 * j);
    for (int r = 0; r < R; ++r) {
      int32_t pair; std::memcpy(&pair, keys + r * dk + 2 * i, 4);
      const __m512bh kb = (__m512bh)_mm512_set1_epi32(pair);
      for (int j = 0; j < NQ; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], kb, qv[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NQ; ++j) {
      const __m512 s = sigmoid16(acc[r][j]);
      sums[r] = v0 + j == last ? _mm512_mask_add_ps(sums[r], tail, sums[r], s) : _mm512_add_ps(sums[r], s);
    }
}

// Mean-sigmoid scores of keys k0..k0+R-1 over all Q queries, into out[0..R-1].
template <int R>
static void bf16_keys(const uint16_t* keys, int64_t dk, const uint16_t* qp, int64_t Q, float* out) {
  const int64_t Qp = (Q + 15) / 16 * 16, nv = Qp / 16, last = nv - 1;
  const __mmask16 tail = Q % 16 ? __mmask16((1u << (Q % 16)) - 1) : __mmask16(0xFFFF);
  __m512 sums[R];
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
  int64_t v = 0;
  for (; v + 4 <= nv; v += 4) bf16_block<R, 4>(keys, dk, qp, Qp, v, last, tail, sums);
  switch (nv - v) {
    case 3: bf16_block<R, 3>(keys, dk, qp, Qp, v, last, tail, sums); break;
    case 2: bf16_block<R, 2>(keys, dk, qp, Qp, v, last, tail, sums); break;
    case 1: bf16_block<R, 1>(keys, dk, qp, Qp, v, last, tail, sums); break;
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(sums[r]) / float(Q);
}

void topk_bf16(const Tensor& q, const Tensor& keys, int64_t k, Tensor& scores, Tensor& index) {
  const int64_t Q = q.size(0), M = keys.size(0), dk = keys.size(1), Qp = (Q + 15) / 16 * 16;
  std::vector<uint16_t> qp(size_t(dk) * Qp, 0);   // VNNI pairs, zero padding
  const uint16_t* qs = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  for (int64_t t = 0; t < Q; ++t)
    for (int64_t i = 0; i < dk / 2; ++i)
      for (int c = 0; c < 2; ++c) qp[(i * Qp + t) * 2 + c] = qs[t * dk + 2 * i + c];
  const uint16_t* ks = reinterpret_cast<const uint16_t*>(keys.data_ptr<at::BFloat16>());
  constexpr int64_t R = 6, tile = 4096;   // keys per register block; keys scored per top-k merge
  std::vector<float> sc(std::min(tile, M));
  RunningTopK<float> top(k, tile);
  for (int64_t s = 0; s < M; s += tile) {
    const int64_t n = std::min(tile, M - s);
    at::parallel_for(0, (n + R - 1) / R, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t j = b * R;
        if (j + R <= n) bf16_keys<R>(ks + (s + j) * dk, dk, qp.data(), Q, sc.data() + j);
        else for (int64_t r = j; r < n; ++r) bf16_keys<1>(ks + (s + r) * dk, dk, qp.data(), Q, sc.data() + r);
      }
    });
    top.add(sc.data(), n, s);
  }
  top.finish(q.options().dtype(at::kFloat), scores, index);
}
#endif

// True when this build has the bf16 recipe (compiled for a CPU with AVX-512 BF16).
bool has_topk_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

static void check_topk_args(const char* op, const Tensor& queries, const Tensor& keys, int64_t k) {
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1), op, ": `queries` ", queries.sizes(),
              " and `keys` ", keys.sizes(), " must be [Q, dk] and [M, dk]");
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()) && keys.scalar_type() == queries.scalar_type(), op,
              ": `queries` and `keys` must share one floating dtype");
  TORCH_CHECK(keys.device().is_cpu() && queries.device().is_cpu(), op, ": CPU kernel called with non-CPU tensors");
  TORCH_CHECK_VALUE(k >= 0 && k <= keys.size(0), op, ": k=", k, " must be in [0, M=", keys.size(0), "]");
}

std::tuple<Tensor, Tensor> topk_mean_sigmoid_onednn_cpu(const Tensor& queries, const Tensor& keys, int64_t k) {
  const char* op = "topk_mean_sigmoid";
  check_topk_args(op, queries, keys, k);
  TORCH_CHECK(queries.scalar_type() != at::kDouble, op, ": the oneDNN kernel is float32 only (float64 takes `_topk_mean_sigmoid`)");
  const int64_t M = keys.size(0), Q = queries.size(0);
  Tensor scores, index = at::empty({k}, queries.options().dtype(at::kLong));
  if (k == 0 || M == 0) return {at::empty({0}, queries.options()), index};
  if (Q == 0) return {at::full({k}, -INFINITY, queries.options()), at::arange(k, index.options())};
  // [tile, Q] float32 scores of about 2 MiB (L2-sized), within [256, 4096] keys: memnb.retriever._op_tile replays this rule
  const int64_t tile = std::max<int64_t>(256, std::min<int64_t>(4096, (int64_t(1) << 19) / Q));
  topk_onednn(queries.to(at::kFloat).contiguous(), keys.contiguous(), k, tile, scores, index);
  return {scores.to(queries.scalar_type()), index};
}

std::tuple<Tensor, Tensor> topk_mean_sigmoid_bf16_cpu(const Tensor& queries, const Tensor& keys, int64_t k) {
  const char* op = "topk_mean_sigmoid";
  check_topk_args(op, queries, keys, k);
  TORCH_CHECK(queries.scalar_type() == at::kBFloat16, op, ": the bf16 kernel takes bfloat16 queries and keys, got ", queries.scalar_type());
  TORCH_CHECK(keys.size(1) % 2 == 0, op, ": the bf16 kernel needs an even key width (bf16 pairs), got dk=", keys.size(1));
  TORCH_CHECK(has_topk_bf16(), op, ": this build has no AVX-512 BF16 kernel (the CPU lacks avx512_bf16)");
  const int64_t M = keys.size(0), Q = queries.size(0);
  Tensor scores, index = at::empty({k}, queries.options().dtype(at::kLong));
  if (k == 0 || M == 0) return {at::empty({0}, queries.options()), index};
  if (Q == 0) return {at::full({k}, -INFINITY, queries.options()), at::arange(k, index.options())};
#if defined(__AVX512BF16__)
  topk_bf16(queries.contiguous(), keys.contiguous(), k, scores, index);
#endif
  return {scores.to(queries.scalar_type()), index};
}

std::tuple<Tensor, Tensor> topk_mean_sigmoid_cpu(const Tensor& queries, const Tensor& keys, int64_t k) {
  const char* op = "topk_mean_sigmoid";
  check_topk_args(op, queries, keys, k);
  const int64_t M = keys.size(0), Q = queries.size(0);
  const auto acc = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto q = queries.to(acc).contiguous();
  auto kk = keys.contiguous();
  Tensor scores, index = at::empty({k}, queries.options().dtype(at::kLong));
  // tile so the [Q, tile] buffer stays around 4 MiB (cache-resident), within [256, 4096] keys
  const int64_t tile = std::max<int64_t>(256, std::min<int64_t>(4096, (int64_t(1) << 20) / std::max<int64_t>(Q, 1)));
  if (k == 0 || M == 0) return {at::empty({0}, queries.options()), index};
  if (Q == 0) {  // mean over no queries is NaN for every key, ranked as -inf (ties: index order), like the reference
    return {at::full({k}, -INFINITY, queries.options()), at::arange(k, index.options())};
  }
  if (acc == at::kDouble) topk_mkl<double>(q, kk, k, tile, scores, index);
  else topk_mkl<float>(q, kk, k, tile, scores, index);
  return {scores.to(queries.scalar_type()), index};
}

}  // namespace memnb

TORCH_LIBRARY_FRAGMENT(memnb, m) {
  m.def("_ebw_fwd(Tensor values, Tensor idx, Tensor weights) -> Tensor");
  m.def("_ebw_bwd(Tensor grad, Tensor values, Tensor idx, Tensor weights, bool need_dv, bool need_dw, bool deterministic) -> (Tensor, Tensor)");
  m.def("_pool_drop_append(Tensor pool, Tensor new, Tensor drop_idx) -> (Tensor, Tensor)");
  m.def("_pool_drop_append_(Tensor(a!) pool, Tensor new, Tensor drop_idx) -> Tensor");
  m.def("_topk_mean_sigmoid(Tensor queries, Tensor keys, int k) -> (Tensor, Tensor)");
  m.def("_topk_mean_sigmoid_onednn(Tensor queries, Tensor keys, int k) -> (Tensor, Tensor)");
  m.def("_topk_mean_sigmoid_bf16(Tensor queries, Tensor keys, int k) -> (Tensor, Tensor)");
  m.def("_has_topk_bf16() -> bool", &memnb::has_topk_bf16);
}

TORCH_LIBRARY_IMPL(memnb, CPU, m) {
  m.impl("_ebw_fwd", &memnb::ebw_fwd_cpu);
  m.impl("_ebw_bwd", &memnb::ebw_bwd_cpu);
  m.impl("_pool_drop_append", &memnb::pool_drop_append_cpu);
  m.impl("_pool_drop_append_", &memnb::pool_drop_append_inplace_cpu);
  m.impl("_topk_mean_sigmoid", &memnb::topk_mean_sigmoid_cpu);
  m.impl("_topk_mean_sigmoid_onednn", &memnb::topk_mean_sigmoid_onednn_cpu);
  m.impl("_topk_mean_sigmoid_bf16", &memnb::topk_mean_sigmoid_bf16_cpu);
}
