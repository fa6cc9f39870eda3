// The one schema block of the unlearn_ext ops (docs/algorithms.md#the-ops). CPU implementations live in cpu/*_cpu.cpp,
// CUDA ones in cuda/*_cuda.cu; each registers itself with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(unlearn_ext, m) {
  m.def("layerwise_topk(Tensor[] xs, float ratio, bool largest=True, Tensor[]? subtract=None) "
        "-> (Tensor values, Tensor indices, Tensor offsets)");
  m.def("layerwise_topk_mask(Tensor[] xs, float ratio, bool largest=True) -> Tensor[]");
  m.def("sparse_accumulate_(Tensor(a!)[] dense, Tensor values, Tensor indices, Tensor offsets, float alpha) -> ()");
  m.def("masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[]? masks, "
        "float ratio, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
        "bool maximize, float off_scale) -> ()");
  m.def("masked_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor[]? masks, float ratio, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "int step, bool maximize, float off_scale) -> ()");
}
