// The one place memnb's C++ kernels call oneDNN: torch's private mkldnn::_linear_pointwise op (oneDNN's float32 GEMM
// with an element-wise op fused in), found once through the dispatcher. Shared by ops.cpp (topk_mean_sigmoid) and
// pkm_retrieve.cpp (the sub-key scores).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <optional>
#include <string>

namespace memnb_common {

// x [m, k] and w [n, k] float32 -> [m, n] = post(x @ w^T), with post "none" or "sigmoid".
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const char* post) {
  static const auto lp = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack st{x, w, c10::IValue(), std::string(post), c10::List<std::optional<at::Scalar>>(), std::string("")};
  lp.callBoxed(&st);
  return st[0].toTensor();
}

}  // namespace memnb_common
