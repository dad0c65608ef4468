// memnb::_pkm_fwd / memnb::_pkm_bwd — CUDA kernels (the schemas are defined in pkm_retrieve.cpp).
// One block per (token, head). The 2 half-score rows live in shared memory; top-k selection is rank-based
// (each element counts how many elements beat it under the strict order "higher score, then lower id", so ranks
// are unique and the result is deterministic); only the pruned pairs (i+1)(j+1) <= k are scored.
// Backward: grad_q by one block per (token, head); grad_subkeys by fp32/fp64 atomicAdd (order-dependent rounding).
// Not yet run on a GPU: see the `#| cuda` cells of nbs/09_pkm_ops.ipynb.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <vector>

namespace memnb_pkm {
// pkm_retrieve.cpp (host): shapes, dtypes, devices and the slot-id range [0, n^2) of the backward's arguments
void check_backward_args(const at::Tensor& g, const at::Tensor& q, const at::Tensor& subkeys, const at::Tensor& idx);
}  // namespace memnb_pkm

namespace memnb_pkm_cuda {

template <typename acc_t>
__device__ __forceinline__ bool better(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

template <typename scalar_t, typename acc_t>
__global__ void pkm_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ K,
                               const int* __restrict__ pairs, int64_t P, int64_t H, int64_t n, int64_t dh,
                               int64_t k, int64_t kk, scalar_t* __restrict__ out_s, int64_t* __restrict__ out_i) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  int64_t* ti = reinterpret_cast<int64_t*>(smem_raw);  // [2kk] top ids per half (8-byte arrays first: aligned)
  int64_t* ci = ti + 2 * kk;                           // [P] candidate slot ids
  acc_t* s = reinterpret_cast<acc_t*>(ci + P);         // [2n] half scores
  acc_t* tv = s + 2 * n;                               // [2kk] top values per half
  acc_t* cv = tv + 2 * kk;                             // [P] candidate scores
  const int64_t r = blockIdx.x, h = r % H;
  const scalar_t* qr = q + r * 2 * dh;
  for (int64_t c = threadIdx.x; c < 2 * n; c += blockDim.x) {
    const int64_t half = c / n, row = c % n;
    const scalar_t* kr = K + ((h * 2 + half) * n + row) * dh;
    const scalar_t* qh = qr + half * dh;
    acc_t acc = 0;
    for (int64_t d = 0; d < dh; ++d) acc += static_cast<acc_t>(qh[d]) * static_cast<acc_t>(kr[d]);
    s[c] = isnan(acc) ? -INFINITY : acc;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < 2 * n; c += blockDim.x) {
    const int64_t half = c / n, row = c % n;
    const acc_t* sh = s + half * n;
    int64_t rank = 0;
    for (int64_t o = 0; o < n && rank < kk; ++o) rank += better(sh[o], o, sh[row], row);
    if (rank < kk) { tv[half * kk + rank] = sh[row]; ti[half * kk + rank] = row; }
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const int i = pairs[2 * p], j = pairs[2 * p + 1];
    cv[p] = tv[i] + tv[kk + j];
    ci[p] = ti[i] * n + ti[kk + j];
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    int64_t rank = 0;
    for (int64_t o = 0; o < P && rank < k; ++o) rank += better(cv[o], ci[o], cv[p], ci[p]);
    if (rank < k) { out_s[r * k + rank] = static_cast<scalar_t>(cv[p]); out_i[r * k + rank] = ci[p]; }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pkm_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ q,
                               const scalar_t* __restrict__ K, const int64_t* __restrict__ idx, int64_t H, int64_t n,
                               int64_t dh, int64_t k, acc_t* __restrict__ gq, acc_t* __restrict__ gk) {
  const int64_t r = blockIdx.x, h = r % H;
  for (int64_t c = threadIdx.x; c < 2 * dh; c += blockDim.x) {
    const int64_t half = c / dh, d = c % dh;
    const acc_t qv = static_cast<acc_t>(q[r * 2 * dh + c]);
    acc_t acc = 0;
    for (int64_t j = 0; j < k; ++j) {
      const acc_t w = static_cast<acc_t>(g[r * k + j]);
      const int64_t sl = idx[r * k + j], row = half == 0 ? sl / n : sl % n;
      const int64_t off = ((h * 2 + half) * n + row) * dh + d;
      acc += w * static_cast<acc_t>(K[off]);
      atomicAdd(gk + off, w * qv);
    }
    gq[r * 2 * dh + c] = acc;
  }
}

static std::vector<int> pruned_pairs(int64_t k, int64_t kk) {
  std::vector<int> out;
  for (int64_t i = 0; i < kk; ++i)
    for (int64_t j = 0; j < kk && (i + 1) * (j + 1) <= k; ++j) { out.push_back((int)i); out.push_back((int)j); }
  return out;
}

std::tuple<at::Tensor, at::Tensor> pkm_retrieve_cuda(const at::Tensor& q_, const at::Tensor& subkeys_, int64_t k) {
  TORCH_CHECK_VALUE(q_.dim() == 4 && q_.size(2) == 2 && subkeys_.dim() == 4 && subkeys_.size(1) == 2 &&
                        subkeys_.size(0) == q_.size(1) && subkeys_.size(3) == q_.size(3),
                    "pkm_retrieve: need q [T, H, 2, dh] and subkeys [H, 2, n, dh], got ", q_.sizes(), " and ",
                    subkeys_.sizes());
  const int64_t T = q_.size(0), H = q_.size(1), dh = q_.size(3), n = subkeys_.size(2), kk = std::min(k, n);
  TORCH_CHECK_VALUE(k >= 1 && k <= n * n, "pkm_retrieve: need 1 <= k <= n^2 = ", n * n, ", got k = ", k);
  c10::cuda::CUDAGuard guard(q_.device());
  auto q = q_.contiguous();
  auto K = subkeys_.contiguous();
  auto scores = at::empty({T, H, k}, q.options());
  auto idx = at::empty({T, H, k}, q.options().dtype(at::kLong));
  if (T == 0) return {scores, idx};
  auto host = pruned_pairs(k, kk);
  const int64_t P = (int64_t)host.size() / 2;
  auto pairs = at::from_blob(host.data(), {P, 2}, at::kInt).to(q.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pkm_retrieve_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t smem = (2 * n + 2 * kk + P) * sizeof(acc_t) + (2 * kk + P) * sizeof(int64_t);
    pkm_fwd_kernel<scalar_t, acc_t><<<T * H, 256, smem, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), pairs.data_ptr<int>(), P, H, n, dh, k, kk,
        scores.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, idx};
}

std::tuple<at::Tensor, at::Tensor> pkm_retrieve_backward_cuda(const at::Tensor& g_, const at::Tensor& q_,
                                                              const at::Tensor& subkeys_, const at::Tensor& idx_) {
  c10::cuda::CUDAGuard guard(q_.device());
  memnb_pkm::check_backward_args(g_, q_, subkeys_, idx_);  // an out-of-range slot id would be an illegal access
  const int64_t T = q_.size(0), H = q_.size(1), dh = q_.size(3), n = subkeys_.size(2), k = idx_.size(2);
  auto g = g_.contiguous();
  auto q = q_.contiguous();
  auto K = subkeys_.contiguous();
  auto idx = idx_.contiguous();
  at::Tensor gq_out, gk_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "pkm_retrieve_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto gq = at::empty({T, H, 2, dh}, q.options().dtype(acc_dtype));
    auto gk = at::zeros({H, 2, n, dh}, q.options().dtype(acc_dtype));
    if (T > 0) {
      pkm_bwd_kernel<scalar_t, acc_t><<<T * H, 128, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), K.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), H, n, dh,
          k, gq.data_ptr<acc_t>(), gk.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    gq_out = gq.to(q.scalar_type());
    gk_out = gk.to(q.scalar_type());
  });
  return {gq_out, gk_out};
}

}  // namespace memnb_pkm_cuda

TORCH_LIBRARY_IMPL(memnb, CUDA, m) {
  m.impl("_pkm_fwd", &memnb_pkm_cuda::pkm_retrieve_cuda);
  m.impl("_pkm_bwd", &memnb_pkm_cuda::pkm_retrieve_backward_cuda);
}
