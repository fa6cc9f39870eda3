// pybind11 module unlearn_ext._C: importing it loads this library, which registers the ops; it also
// reports how the library was built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#ifndef UNLEARN_EXT_CUDA_ARCH_LIST
#define UNLEARN_EXT_CUDA_ARCH_LIST ""
#endif

static pybind11::dict build_info() {
  pybind11::dict d;
#ifdef UNLEARN_EXT_WITH_CUDA
  d["cuda_compiled"] = true;
#else
  d["cuda_compiled"] = false;
#endif
  d["cuda_arch_list"] = UNLEARN_EXT_CUDA_ARCH_LIST;
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["threads"] = at::get_num_threads();
  d["parallel_info"] = at::get_parallel_info();
  return d;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "unlearn_ext compiled kernels (registers torch.ops.unlearn_ext.*)";
  m.def("build_info", &build_info, "How the compiled library was built");
}
