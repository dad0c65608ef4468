// Shared by ops.cpp (the dense value-read backward) and value_update.cpp (the fused sparse update), so the two give
// the same weight gradient bit for bit. Edits to this header reach JIT builds through memnb.ops.headers_tag().
#pragma once
#include <cstdint>

namespace memnb_common {

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

}  // namespace memnb_common
