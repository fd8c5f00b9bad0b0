// The schemas of fastres._C's ops (the kernel-level four for SyncBN, and the whole-op three), shared by csrc/fastres.cpp (namespace fastres) and the
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
        "-> (Tensor, Tensor)");                                                                   \
  /* The whole-op contract (fastres/cuda_backend.py). (y, mean, invstd), fp32 [C] mean/invstd; */ \
  /* running stats updated in place with f = momentum, or 1/num_batches_tracked if cumulative. */  \
  m.def("bn_forward_train_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "         \
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? num_batches_tracked, "         \
        "float momentum, bool cumulative, float eps, bool relu) -> (Tensor, Tensor, Tensor)");     \
  /* (y, invstd) with the running statistics. */                                                  \
  m.def("bn_forward_eval_cuda(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "          \
        "Tensor running_mean, Tensor running_var, float eps, bool relu) -> (Tensor, Tensor)");     \
  /* (dx, dres, dweight, dbias), an empty tensor where not needed; dweight/dbias in the */        \
  /* parameters' dtype. */                                                                        \
  m.def("bn_backward_cuda(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, "   \
        "Tensor mean, Tensor invstd, bool relu, bool training, bool need_dx, bool need_dres, "     \
        "bool need_dweight, bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)")
