// The schemas of fastres._C's kernel-level ops, shared by csrc/fastres.cpp (namespace fastres) and the
// test-only CPU emulator in csrc/emulator/ (namespace fastres_emu).
#pragma once

#define FASTRES_DEFINE_BN_OPS(m)                                                                   \
  /* (mean, m2): per-channel fp32 batch mean and M2 = sum((x - mean)^2), Welford/Chan merged. */   \
  m.def("bn_stats_cuda(Tensor x) -> (Tensor, Tensor)");                                            \
  /* y = act((x - mean) * scale + shift [+ residual]), in x's dtype and layout. */                 \
  m.def("bn_apply_cuda(Tensor x, Tensor mean, Tensor scale, Tensor shift, Tensor? residual, "      \
        "bool relu) -> Tensor");                                                                   \
  /* (sum dy', sum dy' * (x - mean)), dy' = dy masked where the rounded pre-activation <= 0. */    \
  m.def("bn_backward_reduce_cuda(Tensor dy, Tensor x, Tensor mean, Tensor scale, Tensor shift, "   \
        "Tensor? residual, bool relu) -> (Tensor, Tensor)");                                       \
  /* (dx, dres): dx = a * dy' + k * (x - mean) + c; dres = dy' (an empty tensor unless need_dres) */ \
  m.def("bn_backward_dx_cuda(Tensor dy, Tensor x, Tensor mean, Tensor scale, Tensor shift, "       \
        "Tensor? residual, bool relu, Tensor a, Tensor k, Tensor c, bool need_dres) "              \
        "-> (Tensor, Tensor)")
