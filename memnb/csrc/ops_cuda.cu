// memnb compiled ops, CUDA kernels. Built only when torch has CUDA; the private schemas live in ops.cpp.
// Not yet executed on a GPU in this repository's CI (see nbs/01_ops.ipynb `#| cuda` cells).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <type_traits>
#include <vector>

namespace memnb {
using at::Tensor;

std::vector<int64_t> keep_map(const Tensor& drop_idx, int64_t Lyr, int64_t N, const char* op);  // ops.cpp (host)

constexpr int kThreads = 256;

// ---------------------------------------------------------------- embedding_bag_wsum forward
// One CTA per token. Thread i owns VEC consecutive elements of D per step (16-byte loads for fp32 when D % 4 == 0);
// the bag's indices and weights are staged in shared memory; accumulation in fp32 registers (fp64 for fp64).
template <typename V, typename W, typename I, int VEC>
__global__ void ebw_fwd_kernel(const V* __restrict__ values, const I* __restrict__ idx, const W* __restrict__ w,
                               V* __restrict__ out, int64_t L, int64_t D) {
  using A = at::opmath_type<V>;
  extern __shared__ unsigned char smem_raw[];
  int64_t* s_row = reinterpret_cast<int64_t*>(smem_raw);
  A* s_w = reinterpret_cast<A*>(s_row + kThreads);
  const int64_t t = blockIdx.x;
  for (int64_t d0 = int64_t(threadIdx.x) * VEC; d0 < D; d0 += int64_t(blockDim.x) * VEC) {
    A acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = A(0);
    for (int64_t l0 = 0; l0 < L; l0 += kThreads) {
      const int64_t nl = (L - l0 < kThreads) ? (L - l0) : int64_t(kThreads);
      __syncthreads();
      if (threadIdx.x < nl) {
        s_row[threadIdx.x] = int64_t(idx[t * L + l0 + threadIdx.x]) * D;
        s_w[threadIdx.x] = static_cast<A>(w[t * L + l0 + threadIdx.x]);
      }
      __syncthreads();
      for (int64_t l = 0; l < nl; ++l) {
        const V* row = values + s_row[l] + d0;
        const A wl = s_w[l];
        if constexpr (VEC == 4 && std::is_same<V, float>::value) {
          const float4 x = *reinterpret_cast<const float4*>(row);
          acc[0] += wl * x.x; acc[1] += wl * x.y; acc[2] += wl * x.z; acc[3] += wl * x.w;
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] += wl * static_cast<A>(row[v]);
        }
      }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) out[t * D + d0 + v] = static_cast<V>(acc[v]);
  }
}

static void check_bag_cuda(const Tensor& values, const Tensor& idx, const Tensor& weights, const char* op) {
  TORCH_CHECK(values.dim() == 2 && idx.dim() == 2 && weights.sizes() == idx.sizes(), op, ": bad shapes ", values.sizes(), " ",
              idx.sizes(), " ", weights.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op, ": `idx` must be int32 or int64");
  TORCH_CHECK(weights.scalar_type() == values.scalar_type() || weights.scalar_type() == at::kFloat, op,
              ": `weights` dtype must be `values` dtype or float32");
  TORCH_CHECK(values.is_cuda() && idx.device() == values.device() && weights.device() == values.device(), op,
              ": tensors must be on one CUDA device");
  if (idx.numel()) {  // one reduction + sync; an out-of-range row would be an illegal memory access
    auto mm = at::aminmax(idx);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK_INDEX(lo >= 0 && hi < values.size(0), op, ": `idx` contains ", (lo < 0 ? lo : hi),
                      ", out of range for `values` with ", values.size(0), " rows (valid: 0 <= idx < ", values.size(0), ")");
  }
}

Tensor ebw_fwd_cuda(const Tensor& values_, const Tensor& idx_, const Tensor& weights_) {
  const char* op = "embedding_bag_wsum";
  check_bag_cuda(values_, idx_, weights_, op);
  c10::cuda::CUDAGuard guard(values_.device());
  auto values = values_.contiguous(); auto idx = idx_.contiguous(); auto weights = weights_.contiguous();
  const int64_t D = values.size(1), T = idx.size(0), L = idx.size(1);
  auto out = at::empty({T, D}, values.options());
  if (T == 0 || D == 0) return out;
  if (L == 0) return out.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "ebw_fwd_cuda_idx", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ebw_fwd_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      const size_t smem = kThreads * (sizeof(int64_t) + sizeof(A));
      const bool vec4 = std::is_same<scalar_t, float>::value && D % 4 == 0;
      const int threads = int(std::min<int64_t>(kThreads, std::max<int64_t>(32, vec4 ? D / 4 : D)));
      auto launch = [&](auto wptr) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(wptr)>>;
        if (vec4)
          ebw_fwd_kernel<scalar_t, W, index_t, 4><<<T, threads, smem, stream>>>(values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                                                             wptr, out.data_ptr<scalar_t>(), L, D);
        else
          ebw_fwd_kernel<scalar_t, W, index_t, 1><<<T, threads, smem, stream>>>(values.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                                                             wptr, out.data_ptr<scalar_t>(), L, D);
      };
      if (weights.scalar_type() == values.scalar_type()) launch(weights.data_ptr<scalar_t>());
      else launch(weights.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// ---------------------------------------------------------------- embedding_bag_wsum backward
// dw[t, l] = g[t]·V[idx[t, l]]: one warp per (t, l), fixed-order shuffle reduction (deterministic).
template <typename V, typename W, typename I>
__global__ void ebw_dw_kernel(const V* __restrict__ g, const V* __restrict__ values, const I* __restrict__ idx,
                              W* __restrict__ dw, int64_t n, int64_t L, int64_t D) {
  using A = at::opmath_type<V>;
  const int64_t e = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (e >= n) return;
  const V* gr = g + (e / L) * D;
  const V* vr = values + int64_t(idx[e]) * D;
  A s = 0;
  for (int64_t d = lane; d < D; d += 32) s += static_cast<A>(gr[d]) * static_cast<A>(vr[d]);
  for (int o = 16; o > 0; o /= 2) s += __shfl_down_sync(0xffffffff, s, o);
  if (lane == 0) dw[e] = static_cast<W>(s);
}

// atomic mode: one CTA per token, acc[row, d] += w·g[t, d] with atomicAdd into an fp32 (fp64) buffer.
template <typename V, typename W, typename I, typename A>
__global__ void ebw_dv_atomic_kernel(const V* __restrict__ g, const I* __restrict__ idx, const W* __restrict__ w,
                                     A* __restrict__ acc, int64_t L, int64_t D) {
  const int64_t t = blockIdx.x;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t row = int64_t(idx[t * L + l]);
    const A wl = static_cast<A>(w[t * L + l]);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) atomicAdd(acc + row * D + d, wl * static_cast<A>(g[t * D + d]));
  }
}

// deterministic mode: a stable sort of the slots by row gives a CSR; one CTA per row sums its contributions in
// (t, l) order and writes the row once (zeros for unused rows), so no memset and bitwise-reproducible results.
template <typename V, typename W>
__global__ void ebw_dv_csr_kernel(const V* __restrict__ g, const int64_t* __restrict__ start, const int64_t* __restrict__ slot,
                                  const W* __restrict__ w, V* __restrict__ dv, int64_t L, int64_t D) {
  using A = at::opmath_type<V>;
  const int64_t r = blockIdx.x;
  const int64_t b = start[r], e_end = start[r + 1];
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    A acc = 0;
    for (int64_t s = b; s < e_end; ++s) {
      const int64_t e = slot[s];
      acc += static_cast<A>(w[e]) * static_cast<A>(g[(e / L) * D + d]);
    }
    dv[r * D + d] = static_cast<V>(acc);
  }
}

std::tuple<Tensor, Tensor> ebw_bwd_cuda(const Tensor& grad_, const Tensor& values_, const Tensor& idx_, const Tensor& weights_,
                                        bool need_dv, bool need_dw, bool deterministic) {
  const char* op = "embedding_bag_wsum_backward";
  check_bag_cuda(values_, idx_, weights_, op);
  c10::cuda::CUDAGuard guard(values_.device());
  auto values = values_.contiguous(); auto idx = idx_.contiguous(); auto weights = weights_.contiguous();
  const int64_t N = values.size(0), D = values.size(1), T = idx.size(0), L = idx.size(1), n = T * L;
  TORCH_CHECK(grad_.dim() == 2 && grad_.size(0) == T && grad_.size(1) == D, op, ": `grad` shape ", grad_.sizes(), " must be [T, D]");
  auto grad = grad_.to(values.scalar_type()).contiguous();
  Tensor dv = at::empty({0}, values.options()), dw = at::empty({0}, weights.options());
  if (need_dw) dw = n && D ? at::empty({T, L}, weights.options()) : at::zeros({T, L}, weights.options());
  if (need_dv && (n == 0 || D == 0)) dv = at::zeros({N, D}, values.options());
  if (n == 0 || D == 0) return {need_dv ? dv : at::empty({0}, values.options()), dw};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = int(std::min<int64_t>(kThreads, std::max<int64_t>(32, D)));
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "ebw_bwd_cuda_idx", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "ebw_bwd_cuda", [&] {
      using A = at::opmath_type<scalar_t>;
      auto run = [&](auto wptr, auto dwptr) {
        using W = std::remove_const_t<std::remove_pointer_t<decltype(wptr)>>;
        if (need_dw) {
          const int64_t blocks = (n * 32 + kThreads - 1) / kThreads;
          ebw_dw_kernel<scalar_t, W, index_t><<<blocks, kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(),
                                                                              idx.data_ptr<index_t>(), dwptr, n, L, D);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (!need_dv) return;
        if (deterministic) {
          auto flat = idx.reshape({n}).to(at::kLong);
          auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
          auto slot = std::get<1>(sorted).contiguous();
          auto start = at::zeros({N + 1}, flat.options());
          start.narrow(0, 1, N).copy_(at::bincount(flat, {}, N).cumsum(0));
          dv = at::empty({N, D}, values.options());
          ebw_dv_csr_kernel<scalar_t, W><<<N, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), start.data_ptr<int64_t>(),
                                                                   slot.data_ptr<int64_t>(), wptr, dv.data_ptr<scalar_t>(), L, D);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          auto acc = at::zeros({N, D}, values.options().dtype(c10::CppTypeToScalarType<A>::value));
          ebw_dv_atomic_kernel<scalar_t, W, index_t, A><<<T, threads, 0, stream>>>(grad.data_ptr<scalar_t>(), idx.data_ptr<index_t>(),
                                                                                  wptr, acc.data_ptr<A>(), L, D);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          dv = acc.scalar_type() == values.scalar_type() ? acc : acc.to(values.scalar_type());
        }
      };
      if (weights.scalar_type() == values.scalar_type())
        run(weights.data_ptr<scalar_t>(), need_dw ? dw.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr));
      else
        run(weights.data_ptr<float>(), need_dw ? dw.data_ptr<float>() : static_cast<float*>(nullptr));
    });
  });
  return {dv, dw};
}

// ---------------------------------------------------------------- pool_drop_append
// The keep map is built and validated on the host (drop_idx is small: Lyr x K), then one CTA per source row copies
// it to its new position; new rows and dropped rows are two more copies.
template <typename V>
__global__ void pool_compact_kernel(const V* __restrict__ src, const int64_t* __restrict__ dest, V* __restrict__ dst,
                                    int64_t N, int64_t D) {
  const int64_t r = blockIdx.x;  // l * N + n
  const int64_t to = dest[r];
  if (to < 0) return;
  const int64_t l = r / N;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) dst[(l * N + to) * D + d] = src[r * D + d];
}

static std::tuple<Tensor, Tensor> pool_drop_append_cuda_impl(const Tensor& pool, const Tensor& nw_, const Tensor& drop_idx,
                                                             const char* op) {
  TORCH_CHECK(pool.dim() == 3 && nw_.dim() == 3 && drop_idx.dim() == 2 && drop_idx.size(0) == pool.size(0) &&
              drop_idx.size(1) <= pool.size(1) && nw_.size(0) == pool.size(0) && nw_.size(1) == drop_idx.size(1) &&
              nw_.size(2) == pool.size(2), op, ": bad shapes pool ", pool.sizes(), " new ", nw_.sizes(), " drop_idx ", drop_idx.sizes());
  TORCH_CHECK(nw_.scalar_type() == pool.scalar_type(), op, ": `new` dtype must equal `pool` dtype");
  TORCH_CHECK(pool.is_cuda() && nw_.device() == pool.device() && drop_idx.device() == pool.device(), op, ": tensors must be on one CUDA device");
  c10::cuda::CUDAGuard guard(pool.device());
  const int64_t Lyr = pool.size(0), N = pool.size(1), D = pool.size(2), K = drop_idx.size(1);
  auto dest_h = keep_map(drop_idx.cpu(), Lyr, N, op);  // validates (IndexError) before anything is written
  auto dest = at::from_blob(dest_h.data(), {Lyr * N}, at::kLong).to(pool.device());
  auto src = pool.contiguous();
  auto out = at::empty_like(src);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (Lyr * N > 0 && D > 0) {
    const int threads = int(std::min<int64_t>(kThreads, std::max<int64_t>(32, D)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pool.scalar_type(), "pool_compact_cuda", [&] {
      pool_compact_kernel<scalar_t><<<Lyr * N, threads, 0, stream>>>(src.data_ptr<scalar_t>(), dest.data_ptr<int64_t>(),
                                                                     out.data_ptr<scalar_t>(), N, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  out.narrow(1, N - K, K).copy_(nw_);
  auto dropped = at::gather(src, 1, drop_idx.to(at::kLong).unsqueeze(-1).expand({Lyr, K, D}));
  return {out, dropped};
}

std::tuple<Tensor, Tensor> pool_drop_append_cuda(const Tensor& pool, const Tensor& nw, const Tensor& drop_idx) {
  return pool_drop_append_cuda_impl(pool, nw, drop_idx, "pool_drop_append");
}

// In place on the GPU: rows move left and CTAs run in any order, so the compaction goes through a temporary pool
// (one pool of extra memory) and is copied back.
Tensor pool_drop_append_inplace_cuda(Tensor pool, const Tensor& nw, const Tensor& drop_idx) {
  TORCH_CHECK(pool.is_contiguous(), "pool_drop_append_: `pool` must be contiguous");
  auto res = pool_drop_append_cuda_impl(pool, nw, drop_idx, "pool_drop_append_");
  pool.copy_(std::get<0>(res));
  return std::get<1>(res);
}

// ---------------------------------------------------------------- topk_mean_sigmoid
// Per key tile: cuBLAS GEMM into a reused [Q, tile] buffer (the best route for the GEMM), then a fused kernel takes
// the column mean of the sigmoid and writes the tile's M-scores; one stable descending sort of the M scores (ties:
// lower index first) gives the top k. Keys on the CPU are streamed to the GPU tile by tile. A NaN score is written
// as -inf, so it sorts after every finite score (and ties with other -inf scores by index), like the CPU kernel.
template <typename A>
__global__ void sigmoid_colmean_kernel(const A* __restrict__ buf, A* __restrict__ out, int64_t Q, int64_t n) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  A s = 0;
  for (int64_t q = 0; q < Q; ++q) s += A(1) / (A(1) + exp(-buf[q * n + j]));
  const A m = s / A(Q);
  out[j] = isnan(m) ? A(-INFINITY) : m;
}

std::tuple<Tensor, Tensor> topk_mean_sigmoid_cuda(const Tensor& queries, const Tensor& keys, int64_t k) {
  const char* op = "topk_mean_sigmoid";
  TORCH_CHECK(queries.dim() == 2 && keys.dim() == 2 && queries.size(1) == keys.size(1), op, ": `queries` ", queries.sizes(),
              " and `keys` ", keys.sizes(), " must be [Q, dk] and [M, dk]");
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()) && keys.scalar_type() == queries.scalar_type(), op,
              ": `queries` and `keys` must share one floating dtype");
  TORCH_CHECK(queries.is_cuda() && (keys.device() == queries.device() || keys.is_cpu()), op,
              ": keys must be on the queries' CUDA device or on the CPU");
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t M = keys.size(0), Q = queries.size(0);
  TORCH_CHECK_VALUE(k >= 0 && k <= M, op, ": k=", k, " must be in [0, M=", M, "]");
  TORCH_CHECK(Q > 0, op, ": `queries` has no rows");
  const auto acc = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto q = queries.to(acc).contiguous();
  const int64_t tile = std::max<int64_t>(1024, std::min<int64_t>(32768, (int64_t(64) << 20) / Q));
  auto scores = at::empty({M}, q.options());
  auto buf = at::empty({Q * std::min(tile, std::max<int64_t>(M, 1))}, q.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t s = 0; s < M; s += tile) {
    const int64_t n = std::min(tile, M - s);
    auto kt = keys.narrow(0, s, n).to(q.device(), acc, /*non_blocking=*/false, /*copy=*/false);
    auto b = buf.narrow(0, 0, Q * n).view({Q, n});
    at::mm_out(b, q, kt.t());
    AT_DISPATCH_FLOATING_TYPES(acc, "sigmoid_colmean", [&] {
      sigmoid_colmean_kernel<scalar_t><<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
          b.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>() + s, Q, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto sorted = at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  return {std::get<0>(sorted).narrow(0, 0, k).to(queries.scalar_type()), std::get<1>(sorted).narrow(0, 0, k).contiguous()};
}

}  // namespace memnb

TORCH_LIBRARY_IMPL(memnb, CUDA, m) {
  m.impl("_ebw_fwd", &memnb::ebw_fwd_cuda);
  m.impl("_ebw_bwd", &memnb::ebw_bwd_cuda);
  m.impl("_pool_drop_append", &memnb::pool_drop_append_cuda);
  m.impl("_pool_drop_append_", &memnb::pool_drop_append_inplace_cuda);
  m.impl("_topk_mean_sigmoid", &memnb::topk_mean_sigmoid_cuda);
}
