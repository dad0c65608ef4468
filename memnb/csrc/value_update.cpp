// memnb fused sparse value update (CPU): the backward of the weighted value read (memnb::embedding_bag_wsum) that
// applies an SGD or Adam step to each touched value row in place instead of writing a dense N×D gradient.
// Used by memnb.layers (nbs/10_layers.ipynb); the pure-PyTorch reference there defines the semantics.
//
// Per backward: a stable counting sort of the T·L (token, slot) pairs by row gives each row its contributions in
// (t, l) order (the same order, hence the same fp32 sums, as the dense kernel in ops.cpp). Rows are split across
// threads, each thread owning its rows; for a row, first dw[e] = g[t]·V[row] for all its slots (with the row as it
// was before the step), then the row gradient acc = Σ w[e]·g[t] is accumulated in a D-wide thread-local buffer and
// the optimizer step is applied to the row (and its Adam moments). Extra memory: (N+1) + T·L int64 for the sort and
// one D-wide buffer per thread; no [N, D] or [U, D] tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include "rows.h"
#include <algorithm>
#include <cmath>
#include <vector>

namespace memnb_vu {
using at::Tensor;

using memnb_common::Acc; using memnb_common::row_grad;   // rows.h: the dense backward's row gradient, bit for bit

// One row's optimizer step, element-wise. Separate functions with restrict pointers so that gcc vectorises them (sqrt
// and division included, with -fno-math-errno): inline in the row loop it could not rule out that the row, its moments
// and the gradient overlap, and Adam ran as scalar code (94.5 vs 23 ms per backward for SGD at the benchmark size).
template <typename A, typename V>
inline void sgd_row(V* __restrict row, const A* __restrict acc, A lr, int64_t D) {
  for (int64_t d = 0; d < D; ++d) row[d] = static_cast<V>(A(row[d]) - lr * acc[d]);
}

template <typename A, typename V>
inline void adam_row(V* __restrict row, V* __restrict mr, V* __restrict vr, const A* __restrict acc, A b1, A b2, A eps,
                     A step_size, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const A gd = acc[d];
    const A mo = A(mr[d]), vo = A(vr[d]);
    const A mn = mo + (gd - mo) * (A(1) - b1);
    const A vn = vo + (gd * gd - vo) * (A(1) - b2);
    mr[d] = static_cast<V>(mn); vr[d] = static_cast<V>(vn);
    row[d] = static_cast<V>(A(row[d]) - step_size * (mn / (std::sqrt(vn) + eps)));
  }
}

// kind 0: SGD, row -= lr·acc. kind 1: Adam as torch.optim.SparseAdam:
//   m = m + (acc - m)(1-β1);  v = v + (acc² - v)(1-β2);  row -= step_size · m / (√v + eps),
// with step_size = lr·√(1-β2^t)/(1-β1^t) computed by the caller (t = the pool's global step count).
template <typename V, typename W, typename I>
void bwd_update_impl(const V* g, V* values, const I* idx, const W* w, W* dw, V* m, V* v, int64_t N, int64_t T,
                     int64_t L, int64_t D, int64_t kind, double lr, double beta1, double beta2, double eps,
                     double step_size) {
  using A = typename Acc<V>::type;
  const int64_t n = T * L;
  std::vector<int64_t> start(N + 1, 0);
  for (int64_t e = 0; e < n; ++e) start[int64_t(idx[e]) + 1]++;
  for (int64_t r = 0; r < N; ++r) start[r + 1] += start[r];
  std::vector<int64_t> slot(n), cursor(start.begin(), start.end() - 1);
  for (int64_t e = 0; e < n; ++e) slot[cursor[int64_t(idx[e])]++] = e;
  const A alr = A(lr), b1 = A(beta1), b2 = A(beta2), aeps = A(eps), ss = A(step_size);
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    std::vector<A> acc(D);
    std::vector<float> scratch;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = start[r], e_end = start[r + 1];
      if (b == e_end) continue;  // untouched row: no step, no moment decay (as SparseAdam)
      V* row = values + r * D;
      row_grad<A, V, W>(g, row, slot.data(), b, e_end, L, w, dw, acc.data(), D, scratch);   // dw with the row before the step
      if (kind == 0) sgd_row<A, V>(row, acc.data(), alr, D);
      else adam_row<A, V>(row, m + r * D, v + r * D, acc.data(), b1, b2, aeps, ss, D);
    }
  });
}

Tensor bwd_update_cpu(const Tensor& grad_, const Tensor& values, const Tensor& idx_, const Tensor& weights_,
                      const Tensor& exp_avg, const Tensor& exp_avg_sq, bool need_dw, int64_t kind, double lr, double beta1, double beta2, double eps,
                      double step_size) {
  const char* op = "sparse_value_step_";
  TORCH_CHECK(values.dim() == 2 && values.is_contiguous(), op, ": `values` must be a contiguous 2-d table, got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble, op, ": `values` must be float32 or float64");
  TORCH_CHECK(idx_.dim() == 2 && weights_.sizes() == idx_.sizes(), op, ": `idx` and `weights` must be [T, L] alike");
  TORCH_CHECK(kind == 0 || kind == 1, op, ": kind must be 0 (sgd) or 1 (adam)");
  const int64_t N = values.size(0), D = values.size(1), T = idx_.size(0), L = idx_.size(1);
  TORCH_CHECK(grad_.dim() == 2 && grad_.size(0) == T && grad_.size(1) == D, op, ": `grad` must be [T, D]");
  if (kind == 1)
    TORCH_CHECK(exp_avg.sizes() == values.sizes() && exp_avg_sq.sizes() == values.sizes() && exp_avg.is_contiguous() &&
                exp_avg_sq.is_contiguous() && exp_avg.scalar_type() == values.scalar_type() &&
                exp_avg_sq.scalar_type() == values.scalar_type(), op, ": Adam state must be contiguous, shaped and typed as `values`");
  auto idx = idx_.contiguous(); auto weights = weights_.contiguous();
  auto grad = grad_.to(values.scalar_type()).contiguous();
  Tensor dw = at::empty({need_dw ? T : 0, need_dw ? L : 0}, weights.options());  // every slot's dw is written below
  if (T * L == 0 || D == 0) return dw.zero_();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "vu_idx", [&] {
    const index_t* ip = idx.data_ptr<index_t>();
    for (int64_t e = 0; e < T * L; ++e)
      TORCH_CHECK_INDEX(ip[e] >= 0 && ip[e] < N, op, ": `idx` contains ", int64_t(ip[e]), ", out of range for `values` with ",
                        N, " rows (valid: 0 <= idx < ", N, ")");
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "vu", [&] {
      scalar_t* mp = kind == 1 ? exp_avg.data_ptr<scalar_t>() : nullptr;
      scalar_t* vp = kind == 1 ? exp_avg_sq.data_ptr<scalar_t>() : nullptr;
      if (weights.scalar_type() == values.scalar_type())
        bwd_update_impl<scalar_t, scalar_t, index_t>(grad.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), ip,
            weights.data_ptr<scalar_t>(), need_dw ? dw.data_ptr<scalar_t>() : nullptr, mp, vp, N, T, L, D, kind, lr, beta1,
            beta2, eps, step_size);
      else {
        TORCH_CHECK(weights.scalar_type() == at::kFloat, op, ": `weights` must be `values` dtype or float32");
        bwd_update_impl<scalar_t, float, index_t>(grad.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), ip,
            weights.data_ptr<float>(), need_dw ? dw.data_ptr<float>() : nullptr, mp, vp, N, T, L, D, kind, lr, beta1,
            beta2, eps, step_size);
      }
    });
  });
  return dw;
}
}  // namespace memnb_vu

TORCH_LIBRARY_FRAGMENT(memnb, m) {
  m.def("_ebw_bwd_update(Tensor grad, Tensor(a!) values, Tensor idx, Tensor weights, Tensor(b!) exp_avg, "
        "Tensor(c!) exp_avg_sq, bool need_dw, int kind, float lr, float beta1, float beta2, float eps, float step_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(memnb, CPU, m) {
  m.impl("_ebw_bwd_update", &memnb_vu::bwd_update_cpu);
}
