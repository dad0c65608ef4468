// memnb::_pkm_fwd / memnb::_pkm_fwd_onednn / memnb::_pkm_bwd — fused product-key retrieval (CPU kernels + private
// schemas; _pkm_fwd_onednn is the float32 forward with its half scores from oneDNN GEMMs). The public op
// memnb::pkm_retrieve (and memnb::pkm_retrieve_backward) is a torch.library custom op defined in nbs/09_pkm_ops.ipynb
// whose body calls these, so importing memnb never compiles anything.
//
// q[T,H,2,dh], subkeys[H,2,n,dh], k  ->  scores[T,H,k] (sorted, descending), idx[T,H,k] int64 (slot = row*n + col)
//
// Per token and head: the two half-score rows (n each) are computed for a chunk of tokens at a time by one GEMM into a
// small buffer, each row gets a partial top-k (ties -> lower index), then only the candidate pairs (i, j) with
// (i+1)(j+1) <= k are scored (119 instead of k^2 = 1024 for k = 32), and a final top-k picks the k best slots
// (ties -> lower slot id). Neither the [T,H,2,n] scores nor the [T,H,k^2] candidates are ever materialised.
// The schemas live in the shared `memnb` namespace as a FRAGMENT, so other memnb extensions can add their own ops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>
#include "onednn.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace memnb_pkm {

void check_args(const at::Tensor& q, const at::Tensor& subkeys, int64_t k) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 2, "pkm_retrieve: `q` must have shape [T, H, 2, dh], got ", q.sizes());
  TORCH_CHECK_VALUE(subkeys.dim() == 4 && subkeys.size(1) == 2,
                    "pkm_retrieve: `subkeys` must have shape [H, 2, n, dh], got ", subkeys.sizes());
  TORCH_CHECK_VALUE(subkeys.size(0) == q.size(1) && subkeys.size(3) == q.size(3),
                    "pkm_retrieve: `q` ", q.sizes(), " and `subkeys` ", subkeys.sizes(), " disagree on H or dh");
  const int64_t n = subkeys.size(2);
  TORCH_CHECK_VALUE(k >= 1 && k <= n * n, "pkm_retrieve: need 1 <= k <= n^2 = ", n * n, ", got k = ", k);
  TORCH_CHECK_VALUE(n <= 46340, "pkm_retrieve: slot ids must fit in int32 (n <= 46340), got n = ", n);
  TORCH_CHECK_VALUE(q.scalar_type() == subkeys.scalar_type(), "pkm_retrieve: `q` dtype ", q.scalar_type(),
                    " differs from `subkeys` dtype ", subkeys.scalar_type());
  TORCH_CHECK_VALUE(q.device() == subkeys.device(), "pkm_retrieve: `q` and `subkeys` are on different devices");
}

// Shapes, dtypes and index range of pkm_retrieve_backward's arguments, for the CPU and the CUDA kernel alike: every
// slot id must be in [0, n^2), else row = id / n or col = id % n would read (and write) outside `subkeys`.
// One aminmax over `idx` (on a GPU: one reduction and a sync) before anything is read.
void check_backward_args(const at::Tensor& g, const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& idx) {
  const char* op = "pkm_retrieve_backward";
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 2, op, ": `q` must have shape [T, H, 2, dh], got ", q.sizes());
  TORCH_CHECK_VALUE(subkeys.dim() == 4 && subkeys.size(1) == 2 && subkeys.size(0) == q.size(1) &&
                        subkeys.size(3) == q.size(3),
                    op, ": `subkeys` must have shape [H, 2, n, dh] matching `q` ", q.sizes(), ", got ", subkeys.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 3 && g.sizes() == idx.sizes() && idx.size(0) == q.size(0) && idx.size(1) == q.size(1),
                    op, ": `grad_scores` ", g.sizes(), " and `idx` ", idx.sizes(),
                    " must both be [T, H, k] with T, H from `q` ", q.sizes());
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, op, ": `idx` must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(g.scalar_type() == q.scalar_type() && subkeys.scalar_type() == q.scalar_type(), op,
                    ": `grad_scores`, `q` and `subkeys` must share one dtype, got ", g.scalar_type(), ", ",
                    q.scalar_type(), ", ", subkeys.scalar_type());
  TORCH_CHECK_VALUE(g.device() == q.device() && subkeys.device() == q.device() && idx.device() == q.device(), op,
                    ": `grad_scores`, `q`, `subkeys` and `idx` must be on one device");
  const int64_t n = subkeys.size(2);
  if (idx.numel() == 0) return;
  auto mm = at::aminmax(idx);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK_INDEX(lo >= 0 && hi < n * n, op, ": `idx` contains ", (lo < 0 ? lo : hi),
                    ", out of range for the n^2 = ", n * n, " slots of `subkeys` ", subkeys.sizes(),
                    " (valid: 0 <= idx < ", n * n, ")");
}

template <typename acc_t>
struct Cand {
  acc_t s;
  int64_t id;
};
// Strict total order: higher score first, then lower id.
template <typename acc_t>
inline bool better(const Cand<acc_t>& a, const Cand<acc_t>& b) {
  return a.s > b.s || (a.s == b.s && a.id < b.id);
}
template <typename acc_t>
inline std::vector<acc_t>& group_scratch(int64_t m) {
  thread_local std::vector<acc_t> buf;
  if ((int64_t)buf.size() < m) buf.resize(m);
  return buf;
}

#ifdef __AVX512F__
// float32 on AVX-512: step 2's compaction with register compresses, 16 elements at a time. v may equal bv (in place:
// the 16-lane store at bv + c never reaches past the vector just read, since c <= i). bv, bi need 16 spare slots.
inline int64_t compact_f32(const float* v, const int32_t* ids, int64_t len, float tau, float* bv, int32_t* bi) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), t = _mm512_set1_ps(tau);
  __m512i pos = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0;
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 live = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
    __m512 x = _mm512_maskz_loadu_ps(live, v + i);
    x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x, ninf);              // NaN ranks as -inf
    const __m512i id = ids ? _mm512_maskz_loadu_epi32(live, ids + i) : pos;
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(live, x, t, _CMP_GE_OQ);
    _mm512_storeu_ps(bv + c, _mm512_maskz_compress_ps(keep, x));
    _mm512_storeu_si512(bi + c, _mm512_maskz_compress_epi32(keep, id));
    c += _mm_popcnt_u32(keep);
    pos = _mm512_add_epi32(pos, _mm512_set1_epi32(16));
  }
  return c;
}

// Step 3 for float32: 16 survivors ranked at once against every survivor (no horizontal sums), and each one written
// to out[rank] without a branch (ranks >= m go to the spare slot out[m]).
inline void rank_f32(const float* bv, const int32_t* bi, int64_t c, int64_t m, Cand<float>* out) {
  alignas(64) int32_t rk[16];
  for (int64_t i0 = 0; i0 < c; i0 += 16) {
    const int64_t nl = std::min<int64_t>(16, c - i0);
    const __mmask16 live = __mmask16((1u << nl) - 1);
    const __m512 X = _mm512_maskz_loadu_ps(live, bv + i0);
    const __m512i I = _mm512_maskz_loadu_epi32(live, bi + i0);
    __m512i r = _mm512_setzero_si512();
    for (int64_t j = 0; j < c; ++j) {
      const __m512 y = _mm512_set1_ps(bv[j]);
      const __mmask16 beats = _mm512_cmp_ps_mask(y, X, _CMP_GT_OQ) |
                              (_mm512_cmp_ps_mask(y, X, _CMP_EQ_OQ) & _mm512_cmplt_epi32_mask(_mm512_set1_epi32(bi[j]), I));
      r = _mm512_mask_add_epi32(r, beats, r, _mm512_set1_epi32(1));
    }
    _mm512_store_si512(rk, _mm512_min_epi32(r, _mm512_set1_epi32(int32_t(m))));
    for (int64_t l = 0; l < nl; ++l) out[rk[l]] = {bv[i0 + l], bi[i0 + l]};
  }
}
#endif

// Best `m` of v[0..len) under `better`, sorted, into out[0..m) (ids == nullptr means id = position). NaN = -inf.
// out needs m + 1 slots and bv, bi len + 16 (the float32 AVX-512 path's spare slot and lanes).
// Branch-free, so it vectorises and never mispredicts:
//  1. a lower bound tau on the m-th best: split v into m strided groups; the m group maxima are m distinct elements,
//     so at least m elements are >= tau = min(group maxima)  (tau sits near the 60th percentile for len = 8m);
//  2. compact the elements >= tau (typically ~0.4 len of them), and repeat 1-2 once on the survivors;
//  3. rank each survivor by counting the survivors that beat it (ranks are unique under the strict order) and write
//     the ones with rank < m straight to out[rank] — already sorted.
template <typename acc_t>
inline void topk_row(const acc_t* v, const int32_t* ids, int64_t len, int64_t m, acc_t* bv, int32_t* bi,
                     Cand<acc_t>* out) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  auto val = [&](int64_t i) { const acc_t x = v[i]; return x != x ? ninf : x; };
  acc_t tau = ninf;
  if (len >= 2 * m) {
    for (int64_t g = 0; g < m; ++g) bv[g] = val(g);
    for (int64_t base = m; base < len; base += m) {
      const int64_t e = std::min(m, len - base);
      for (int64_t g = 0; g < e; ++g) bv[g] = std::max(bv[g], val(base + g));
    }
    tau = bv[0];
    for (int64_t g = 1; g < m; ++g) tau = std::min(tau, bv[g]);
  }
  int64_t c = 0;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<acc_t, float>) c = compact_f32(v, ids, len, tau, bv, bi);
  else
#endif
  for (int64_t i = 0; i < len; ++i) {
    const acc_t x = val(i);
    bv[c] = x;
    bi[c] = ids ? ids[i] : (int32_t)i;
    c += (x >= tau);
  }
  if (c >= 2 * m) {  // once more on the survivors (in place: the write index never passes the read index)
    std::vector<acc_t>& gm = group_scratch<acc_t>(m);
    for (int64_t g = 0; g < m; ++g) gm[g] = bv[g];
    for (int64_t base = m; base < c; base += m) {
      const int64_t e = std::min(m, c - base);
      for (int64_t g = 0; g < e; ++g) gm[g] = std::max(gm[g], bv[base + g]);
    }
    acc_t tau2 = gm[0];
    for (int64_t g = 1; g < m; ++g) tau2 = std::min(tau2, gm[g]);
    int64_t c2 = 0;
#ifdef __AVX512F__
    if constexpr (std::is_same_v<acc_t, float>) c2 = compact_f32(bv, bi, c, tau2, bv, bi);
    else
#endif
    for (int64_t i = 0; i < c; ++i) {
      const acc_t x = bv[i];
      const int32_t xi = bi[i];
      bv[c2] = x;
      bi[c2] = xi;
      c2 += (x >= tau2);
    }
    c = c2;
  }
#ifdef __AVX512F__
  if constexpr (std::is_same_v<acc_t, float>) { rank_f32(bv, bi, c, m, out); return; }
#endif
  for (int64_t i = 0; i < c; ++i) {
    const acc_t x = bv[i];
    const int32_t xi = bi[i];
    int32_t r = 0;  // int32 ids and counts: 8 lanes per AVX2 compare, same as the float scores
    for (int64_t j = 0; j < c; ++j) r += (bv[j] > x) | ((bv[j] == x) & (bi[j] < xi));
    if (r < m) out[r] = {x, xi};
  }
}

// All (i, j) with i, j < kk and (i+1)(j+1) <= k: the only pairs of the two sorted top-kk lists that can reach the
// final top-k, since every (i', j') with i' <= i, j' <= j precedes (i, j) in the total order.
std::vector<std::pair<int32_t, int32_t>> pruned_pairs(int64_t k, int64_t kk) {
  std::vector<std::pair<int32_t, int32_t>> out;
  for (int64_t i = 0; i < kk; ++i)
    for (int64_t j = 0; j < kk && (i + 1) * (j + 1) <= k; ++j) out.emplace_back((int32_t)i, (int32_t)j);
  return out;
}

// The half scores of one chunk of tokens, one [tc, n] block per (head, half) hh, by one of two recipes: ATen's bmm
// (every dtype) or, for float32, one oneDNN GEMM per hh (mkldnn::_linear_pointwise: about 2.5x MKL's bmm rate at
// these shapes, measured on one thread). Row t of block hh starts at rows[hh] + t * n.
template <typename acc_t>
std::vector<at::Tensor> chunk_scores(const at::Tensor& qc, const at::Tensor& keys, bool onednn, std::vector<const acc_t*>& rows) {
  // qc [tc, 2H, dh] (acc dtype), keys [2H, n, dh] contiguous (acc dtype)
  const int64_t HH = keys.size(0), tc = qc.size(0), n = keys.size(1);
  std::vector<at::Tensor> out;
  if (!onednn) {
    out.push_back(at::bmm(qc.transpose(0, 1), keys.transpose(1, 2)).contiguous());   // [2H, tc, n]
    for (int64_t hh = 0; hh < HH; ++hh) rows[hh] = out[0].data_ptr<acc_t>() + hh * tc * n;
    return out;
  }
  auto qh = qc.transpose(0, 1).contiguous();                                               // [2H, tc, dh]
  for (int64_t hh = 0; hh < HH; ++hh) {
    out.push_back(memnb_common::onednn_linear(qh[hh], keys[hh], "none").contiguous());     // [tc, n] = q_hh @ keys_hh^T
    rows[hh] = out.back().data_ptr<acc_t>();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> pkm_search(const at::Tensor& q_, const at::Tensor& subkeys_, int64_t k, bool onednn) {
  check_args(q_, subkeys_, k);
  const int64_t T = q_.size(0), H = q_.size(1), dh = q_.size(3), n = subkeys_.size(2), kk = std::min(k, n);
  auto scores = at::empty({T, H, k}, q_.options());
  auto idx = at::empty({T, H, k}, q_.options().dtype(at::kLong));
  if (T == 0) return {scores, idx};
  const auto pairs = pruned_pairs(k, kk);
  const int64_t P = (int64_t)pairs.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_.scalar_type(), "pkm_retrieve_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto keys = subkeys_.to(acc_dtype).contiguous().view({H * 2, n, dh});                  // [2H, n, dh]
    std::vector<const acc_t*> rows(H * 2);
    auto q = q_.contiguous();
    // tokens per chunk: keep the [2H, Tc, n] score buffer at ~4 MiB
    const int64_t Tc = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, 2 * H * n));
    auto* sc_out = scores.data_ptr<scalar_t>();
    auto* id_out = idx.data_ptr<int64_t>();
    for (int64_t t0 = 0; t0 < T; t0 += Tc) {
      const int64_t tc = std::min(Tc, T - t0);
      auto qc = q.narrow(0, t0, tc).to(acc_dtype).view({tc, H * 2, dh});                  // [tc, 2H, dh]
      const auto S = chunk_scores<acc_t>(qc, keys, onednn && std::is_same_v<acc_t, float>, rows);
      at::parallel_for(0, tc * H, 1, [&](int64_t b, int64_t e) {
        std::vector<acc_t> cs(P), bv(std::max(n, P) + 16);             // + 16: the vector compaction's spare lanes
        std::vector<int32_t> cid(P), bi(std::max(n, P) + 16);
        std::vector<Cand<acc_t>> h1(kk + 1), h2(kk + 1), cand(k + 1);   // + 1: where ranks >= m are written
        for (int64_t r = b; r < e; ++r) {
          const int64_t t = r / H, h = r % H;
          topk_row<acc_t>(rows[h * 2 + 0] + t * n, nullptr, n, kk, bv.data(), bi.data(), h1.data());
          topk_row<acc_t>(rows[h * 2 + 1] + t * n, nullptr, n, kk, bv.data(), bi.data(), h2.data());
          for (int64_t p = 0; p < P; ++p) {
            const auto& a = h1[pairs[p].first];
            const auto& c = h2[pairs[p].second];
            cs[p] = a.s + c.s;
            cid[p] = (int32_t)(a.id * n + c.id);
          }
          topk_row<acc_t>(cs.data(), cid.data(), P, k, bv.data(), bi.data(), cand.data());
          scalar_t* so = sc_out + ((t0 + t) * H + h) * k;
          int64_t* io = id_out + ((t0 + t) * H + h) * k;
          for (int64_t j = 0; j < k; ++j) {
            so[j] = static_cast<scalar_t>(cand[j].s);
            io[j] = cand[j].id;
          }
        }
      });
    }
  });
  return {scores, idx};
}

std::tuple<at::Tensor, at::Tensor> pkm_retrieve_cpu(const at::Tensor& q, const at::Tensor& subkeys, int64_t k) {
  return pkm_search(q, subkeys, k, false);
}

std::tuple<at::Tensor, at::Tensor> pkm_retrieve_onednn_cpu(const at::Tensor& q, const at::Tensor& subkeys, int64_t k) {
  TORCH_CHECK(q.scalar_type() == at::kFloat, "pkm_retrieve: the oneDNN kernel is float32 only, got ", q.scalar_type());
  return pkm_search(q, subkeys, k, true);
}

// grad_q[t,h,0] = sum_j g[t,h,j] K[h,0,row_j];  grad_q[t,h,1] = sum_j g[t,h,j] K[h,1,col_j]
// grad_K[h,0,row] += g q[t,h,0];  grad_K[h,1,col] += g q[t,h,1]   (each (h, half, row block) owned by one task, tokens
// visited in order: deterministic, lock-free)
std::tuple<at::Tensor, at::Tensor> pkm_retrieve_backward_cpu(const at::Tensor& g_, const at::Tensor& q_,
                                                             const at::Tensor& subkeys_, const at::Tensor& idx_) {
  check_backward_args(g_, q_, subkeys_, idx_);
  const int64_t T = q_.size(0), H = q_.size(1), dh = q_.size(3), n = subkeys_.size(2), k = idx_.size(2);
  at::Tensor gq_out, gk_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q_.scalar_type(), "pkm_retrieve_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto g = g_.to(acc_dtype).contiguous();
    auto q = q_.to(acc_dtype).contiguous();
    auto K = subkeys_.to(acc_dtype).contiguous();
    auto id = idx_.contiguous();
    auto gq = at::zeros({T, H, 2, dh}, q.options());
    auto gk = at::zeros({H, 2, n, dh}, q.options());
    const acc_t *gp = g.data_ptr<acc_t>(), *qp = q.data_ptr<acc_t>(), *Kp = K.data_ptr<acc_t>();
    const int64_t* ip = id.data_ptr<int64_t>();
    acc_t *gqp = gq.data_ptr<acc_t>(), *gkp = gk.data_ptr<acc_t>();
    at::parallel_for(0, T * H, 16, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t h = r % H;
        acc_t* o1 = gqp + r * 2 * dh;
        acc_t* o2 = o1 + dh;
        for (int64_t j = 0; j < k; ++j) {
          const acc_t w = gp[r * k + j];
          const int64_t s = ip[r * k + j], row = s / n, col = s % n;
          const acc_t* k1 = Kp + ((h * 2 + 0) * n + row) * dh;
          const acc_t* k2 = Kp + ((h * 2 + 1) * n + col) * dh;
          for (int64_t d = 0; d < dh; ++d) o1[d] += w * k1[d];
          for (int64_t d = 0; d < dh; ++d) o2[d] += w * k2[d];
        }
      }
    });
    const int64_t nthreads = at::get_num_threads();
    const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(n, (nthreads + 2 * H - 1) / (2 * H)));
    const int64_t rows_per = (n + nb - 1) / nb;
    at::parallel_for(0, H * 2 * nb, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t hh = task / nb, blk = task % nb, h = hh / 2, half = hh % 2;
        const int64_t lo = blk * rows_per, hi = std::min(n, lo + rows_per);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t r = t * H + h;
          const acc_t* qv = qp + (r * 2 + half) * dh;
          for (int64_t j = 0; j < k; ++j) {
            const int64_t s = ip[r * k + j], row = half == 0 ? s / n : s % n;
            if (row < lo || row >= hi) continue;
            const acc_t w = gp[r * k + j];
            acc_t* o = gkp + (hh * n + row) * dh;
            for (int64_t d = 0; d < dh; ++d) o[d] += w * qv[d];
          }
        }
      }
    });
    gq_out = gq.to(q_.scalar_type());
    gk_out = gk.to(q_.scalar_type());
  });
  return {gq_out, gk_out};
}

}  // namespace memnb_pkm

TORCH_LIBRARY_FRAGMENT(memnb, m) {
  m.def("_pkm_fwd(Tensor q, Tensor subkeys, int k) -> (Tensor, Tensor)");
  m.def("_pkm_fwd_onednn(Tensor q, Tensor subkeys, int k) -> (Tensor, Tensor)");
  m.def("_pkm_bwd(Tensor grad_scores, Tensor q, Tensor subkeys, Tensor idx) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memnb, CPU, m) {
  m.impl("_pkm_fwd", &memnb_pkm::pkm_retrieve_cpu);
  m.impl("_pkm_fwd_onednn", &memnb_pkm::pkm_retrieve_onednn_cpu);
  m.impl("_pkm_bwd", &memnb_pkm::pkm_retrieve_backward_cpu);
}
