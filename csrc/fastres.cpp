// fastres._C: the op schemas of the hand-written CUDA kernels, and the Python module that loads them.
//
// Layout after pytorch/extension-cpp: this file holds the one TORCH_LIBRARY schema block; the CUDA
// implementations are registered with TORCH_LIBRARY_IMPL(fastres, CUDA, m) in csrc/cuda/*.cu. The
// Python custom ops (fastres::batch_norm_act, ...) live in the same namespace as a FRAGMENT, so the
// kernel-level ops here carry distinct names ending in "_cuda". Importing fastres._C runs the static
// registrations below; it does not depend on whether `import fastres` ran first.
//
// The kernel-level contract (fastres/ops/batch_norm_act.py): x, dy, residual are 4-D, dense NCHW or
// NHWC (the same layout); mean, scale, shift, a, k, c are fp32 contiguous [C]; outputs take x's layout.
#include <Python.h>

#include <torch/library.h>

#include "schemas.h"

extern "C" {
// An empty module: importing it loads this shared object, whose static initialisers register the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "fastres._C: hand-written CUDA kernels, registered as torch.ops.fastres.bn_*_cuda",
      -1,       // no per-interpreter state
      nullptr,  // no methods: everything goes through torch.ops
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastres, m) { FASTRES_DEFINE_BN_OPS(m); }

// CPU tensors reach these ops only by mistake: say what to use instead of failing obscurely.
namespace {

[[noreturn]] void cpu_tensor_error(const char* op) {
  TORCH_CHECK(false, "fastres._C kernels need CUDA tensors, got a CPU tensor (in fastres::", op,
              "); use the 'torch' or 'triton' backend");
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor&) { cpu_tensor_error("bn_stats_cuda"); }

at::Tensor apply_cpu(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const std::optional<at::Tensor>&, bool) {
  cpu_tensor_error("bn_apply_cuda");
}

std::tuple<at::Tensor, at::Tensor> backward_reduce_cpu(const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&, const at::Tensor&,
                                                       const at::Tensor&,
                                                       const std::optional<at::Tensor>&, bool) {
  cpu_tensor_error("bn_backward_reduce_cuda");
}

std::tuple<at::Tensor, at::Tensor> backward_dx_cpu(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&,
                                                   const std::optional<at::Tensor>&, bool,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, bool) {
  cpu_tensor_error("bn_backward_dx_cuda");
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_train_cpu(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, double, bool, double, bool) {
  cpu_tensor_error("bn_forward_train_cuda");
}

std::tuple<at::Tensor, at::Tensor> forward_eval_cpu(const at::Tensor&, const OptTensor&,
                                                    const OptTensor&, const OptTensor&,
                                                    const at::Tensor&, const at::Tensor&, double,
                                                    bool) {
  cpu_tensor_error("bn_forward_eval_cuda");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const at::Tensor&, const at::Tensor&, bool, bool, bool, bool, bool, bool) {
  cpu_tensor_error("bn_backward_cuda");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_forward_train_cuda", &forward_train_cpu);
  m.impl("bn_forward_eval_cuda", &forward_eval_cpu);
  m.impl("bn_backward_cuda", &backward_cpu);
  m.impl("bn_stats_cuda", &stats_cpu);
  m.impl("bn_apply_cuda", &apply_cpu);
  m.impl("bn_backward_reduce_cuda", &backward_reduce_cpu);
  m.impl("bn_backward_dx_cuda", &backward_dx_cpu);
}
