// Test-only: csrc/cuda/batch_norm_act.cu compiled as plain C++ on the CUDA emulation of
// cuda_emulation.h, its ops registered for CPU tensors as torch.ops.fastres_emu.bn_*_cuda.
// Built (cached by source hash) by tests/test_cuda_ext.py, never by setup.py.
#define FASTRES_EMULATE 1
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../schemas.h"
#include "cuda_emulation.h"

TORCH_LIBRARY(fastres_emu, m) {
  FASTRES_DEFINE_BN_OPS(m);
  // The launches since the last call, flattened (grid.x, grid.y, block.x, block.y) each; clears.
  m.def("emulated_launch_log() -> int[]", [] {
    std::vector<int64_t> log;
    log.swap(fastres_emulation::launch_log);
    return log;
  });
}

#include "../cuda/batch_norm_act.cu"
