// Shared by ops.cpp (the dense value-read backward) and value_update.cpp (the fused sparse update), so the two give
// the same row gradients and weight gradients bit for bit. Edits to this header reach JIT builds through
// memnb.ops.headers_tag().
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace memnb_common {

template <typename T> struct Acc { using type = float; };   // fp32 accumulation for fp32/bf16/fp16
template <> struct Acc<double> { using type = double; };

// Software prefetch of a whole row (into L2, locality 1).
template <typename V>
inline void prefetch_row(const V* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t o = 0; o < D * int64_t(sizeof(V)); o += 64) __builtin_prefetch(p + o, 0, 1);
}

// a[d] += w * row[d]: written so that gcc -O3 vectorises it (restrict pointers, no reduction).
template <typename A, typename V>
inline void axpy(A* __restrict a, const V* __restrict row, A w, int64_t D) {
  for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<A>(row[d]);
}

// Σ_d a[d]·b[d] with 16 independent partial sums (vectorises without -ffast-math, deterministic order).
template <typename A, typename G, typename V>
inline A dot(const G* __restrict a, const V* __restrict b, int64_t D) {
  A s[16] = {0};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    for (int j = 0; j < 16; ++j) s[j] += static_cast<A>(a[d + j]) * static_cast<A>(b[d + j]);
  A r = 0;
  for (int j = 0; j < 16; ++j) r += s[j];
  for (; d < D; ++d) r += static_cast<A>(a[d]) * static_cast<A>(b[d]);
  return r;
}

#ifdef __AVX512F__
// `row_grad` for float32 with D a multiple of 16: the row gradient is accumulated in 16 zmm registers, 256 floats
// of D at a time, instead of in memory, and each slot's dot product keeps its 16 lane sums in `scratch` between
// blocks. The arithmetic is the generic version's (multiply, then add; the same 16 lane sums, summed in lane order).
inline void row_grad_f32_avx512(const float* g, const float* row, const int64_t* slot, int64_t b, int64_t e_end,
                                int64_t L, const float* w, float* dw, float* acc, int64_t D, std::vector<float>& scratch) {
  const int64_t c = e_end - b;
  if (dw && int64_t(scratch.size()) < 16 * c) scratch.resize(16 * c);
  for (int64_t d0 = 0; d0 < D; d0 += 256) {
    const int nv = int(std::min<int64_t>(256, D - d0) / 16);
    __m512 a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
    for (int64_t s = b; s < e_end; ++s) {
      const int64_t e = slot[s];
      const float* gt = g + (e / L) * D + d0;
      if (s + 2 < e_end) {
        const char* p = reinterpret_cast<const char*>(g + (slot[s + 2] / L) * D + d0);
        for (int j = 0; j < nv; ++j) _mm_prefetch(p + 64 * j, _MM_HINT_T0);
      }
      const __m512 wv = _mm512_set1_ps(w[e]);
      __m512 part = d0 == 0 || !dw ? _mm512_setzero_ps() : _mm512_loadu_ps(scratch.data() + 16 * (s - b));
      for (int j = 0; j < 16; ++j) {
        if (j >= nv) break;
        const __m512 gv = _mm512_loadu_ps(gt + 16 * j);
        a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(wv, gv));
        if (dw) part = _mm512_add_ps(part, _mm512_mul_ps(gv, _mm512_loadu_ps(row + d0 + 16 * j)));
      }
      if (dw) _mm512_storeu_ps(scratch.data() + 16 * (s - b), part);
    }
    for (int j = 0; j < nv; ++j) _mm512_storeu_ps(acc + d0 + 16 * j, a[j]);
  }
  if (dw)
    for (int64_t s = b; s < e_end; ++s) {
      const float* p = scratch.data() + 16 * (s - b);
      float r = 0;
      for (int j = 0; j < 16; ++j) r += p[j];
      dw[slot[s]] = r;
    }
}
#endif

// For one table row with slots slot[b..e_end) (in (t, l) order, slot = t·L + l): its gradient
// acc[d] = Σ_s w[e]·g[t][d], accumulated in slot order, and, if dw is given, dw[e] = g[t]·row for each slot.
template <typename A, typename V, typename W>
inline void row_grad(const V* g, const V* row, const int64_t* slot, int64_t b, int64_t e_end, int64_t L, const W* w,
                     W* dw, A* acc, int64_t D, std::vector<float>& scratch) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<A, float> && std::is_same_v<V, float> && std::is_same_v<W, float>) {
    if (D % 16 == 0) { row_grad_f32_avx512(g, row, slot, b, e_end, L, w, dw, acc, D, scratch); return; }
  }
#endif
  std::fill(acc, acc + D, A(0));
  for (int64_t s = b; s < e_end; ++s) {
    const int64_t e = slot[s], t = e / L;
    if (s + 2 < e_end) prefetch_row(g + (slot[s + 2] / L) * D, D);
    axpy<A, V>(acc, g + t * D, static_cast<A>(w[e]), D);
    if (dw) dw[e] = static_cast<W>(dot<A, V, V>(g + t * D, row, D));
  }
}

}  // namespace memnb_common
