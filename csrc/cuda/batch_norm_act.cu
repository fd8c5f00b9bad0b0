// Fused BatchNorm (+ residual) (+ ReLU): the hand-written CUDA kernels of the "cuda" backend.
//
// Four kernel-level ops, the contract of fastres/ops/batch_norm_act.py (TorchBackend is the reference):
//
//   bn_stats_cuda(x)                                   -> (mean, m2)      fp32 [C], m2 = sum (x - mean)^2
//   bn_apply_cuda(x, mean, scale, shift, res?, relu)   -> y = act((x - mean) * scale + shift [+ res])
//   bn_backward_reduce_cuda(dy, x, mean, scale, shift, res?, relu) -> (sum dy', sum dy' * (x - mean))
//   bn_backward_dx_cuda(dy, x, mean, scale, shift, res?, relu, a, k, c, need_dres)
//       -> (dx = a * dy' + k * (x - mean) + c,  dres = dy' or an empty tensor)
//       k == 0 (eval mode) drops the k term exactly, so dx stays finite for Inf/NaN x as in eager.
//
// dy' is dy where NOT (the pre-activation rounded to x's dtype <= 0), else 0: PyTorch's
// threshold_backward rule, which lets NaN through. Arithmetic is fp32 for fp32/fp16/bf16 input.
//
// Layouts. A channels_last tensor is a [rows = N*H*W, C] matrix: a (TX, TY) thread block puts
// threadIdx.x across channels (VEC channels per thread) and threadIdx.y across rows, so every thread
// keeps its channels' parameters and partial sums in registers. A contiguous NCHW tensor is N*C
// planes of H*W ("planar" kernels): reductions give each block one channel and a range of images,
// elementwise kernels give each block one plane (or a chunk of it). H*W == 1 takes the channels_last
// path (the memory order is the same). Outputs take x's layout.
//
// Vectorisation: VEC = 16 / sizeof(T) elements (16-byte loads and stores) when the contiguous
// dimension (C for channels_last, H*W for NCHW) is a multiple of VEC and every pointer is 16-byte
// aligned; a scalar path (VEC = 1) otherwise.
//
// Determinism: reductions are two-stage. Each block merges its threads in a fixed tree order and
// writes one partial per channel to a [splits, C] buffer; a finalize kernel merges the partials in a
// fixed order (strided per thread, then a fixed tree). The split count depends only on the shape
// and the device's SM count. No atomics.
// Statistics use Welford per thread and Chan's merge across threads and blocks (never sum x^2).
//
// Every kernel runs on the current stream and every launch is checked. Offsets are int64.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#ifndef FASTRES_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define FASTRES_DISPATCH_KEY CUDA
#define FASTRES_OPS_NAMESPACE fastres
#else
// Test-only: csrc/emulator/ compiles this file as plain C++ that runs each thread block as CPU fibers
// (see csrc/emulator/cuda_emulation.h), registered for CPU tensors as torch.ops.fastres_emu.*.
#define FASTRES_DISPATCH_KEY CPU
#define FASTRES_OPS_NAMESPACE fastres_emu
#endif

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>

namespace fastres {
namespace {

constexpr int kThreads = 256;     // threads per block (at most), every kernel
constexpr int kBlocksPerSm = 4;   // blocks resident per SM that the grids are sized for ("a wave"):
                                  // __launch_bounds__(kThreads, kBlocksPerSm) caps registers at 64
constexpr int kUnroll = 4;        // rows in flight per thread in the channels_last loops (VEC <= 4),
                                  // and the fewest rows per thread a reduction split gets

// The vectorised channels_last apply, backward-reduce and dx kernels hold VEC channels' parameters
// (up to six fp32 values each) and rows_in_flight(VEC) rows of VEC values per input in registers:
// more than the 64 registers of 4 blocks per SM (ptxas spilled up to 2 KB per thread), so they are
// bounded, and their grids sized, for 2 blocks per SM (128 registers). The statistics kernels and
// every scalar (VEC = 1) or planar kernel fit in 64.
constexpr int channels_last_blocks_per_sm(int vec) { return vec > 1 ? 2 : kBlocksPerSm; }
// 16-bit vectors (VEC = 8) keep 2 rows in flight instead of 4: 16 values per input either way.
constexpr int rows_in_flight(int vec) { return vec >= 8 ? kUnroll / 2 : kUnroll; }
constexpr int kMaxGridY = 65535;
constexpr int kMaxPartialsPerThread = 64;  // a finalize thread merges at most this many partials

// Per-channel parameters and running statistics come in float32, float16 or bfloat16.
enum ParamKind : int { kParamF32 = 0, kParamF16 = 1, kParamBF16 = 2 };

// ------------------------------------------------------------------------------------------------
// Device helpers.

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = static_cast<float>(pack.v[v]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int v = 0; v < VEC; ++v) pack.v[v] = static_cast<T>(in[v]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

// The ReLU gradient passes unless the output, rounded to T, is <= 0 (NaN passes).
template <typename T>
__device__ __forceinline__ bool relu_passes(float pre_activation) {
  return !(static_cast<float>(static_cast<T>(pre_activation)) <= 0.f);
}

__device__ __forceinline__ float load_param(const void* p, int kind, int64_t i) {
  switch (kind) {
    case kParamF16:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case kParamBF16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_param(void* p, int kind, int64_t i, float v) {
  switch (kind) {
    case kParamF16:
      static_cast<c10::Half*>(p)[i] = static_cast<c10::Half>(v);
      break;
    case kParamBF16:
      static_cast<c10::BFloat16*>(p)[i] = static_cast<c10::BFloat16>(v);
      break;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Where a kernel finds its per-channel fp32 (mean, scale, shift), y = (x - mean) * scale + shift:
//  - precomputed fp32 arrays (scale != nullptr): the kernel-level ops and the training forward,
//    whose finalize kernel writes them;
//  - else computed per thread: mean = `mean` (fp32) or the running mean, invstd = `invstd` (fp32) or
//    1 / sqrt(running_var + eps), scale = weight * invstd, shift = bias. The same fp32 operations as
//    the training finalize, so a backward pass recomputes the forward's ReLU mask bit for bit.
struct ChannelAffine {
  const float* mean = nullptr;
  const float* scale = nullptr;
  const float* shift = nullptr;
  const float* invstd = nullptr;
  const void* running_mean = nullptr;
  const void* running_var = nullptr;
  int running_kind = kParamF32;
  float eps = 0.f;
  const void* weight = nullptr;
  const void* bias = nullptr;
  int weight_kind = kParamF32;
  int bias_kind = kParamF32;
  float* invstd_out = nullptr;  // eval forward: the invstd it computed, written once per channel
};

// invstd = 1 / sqrt(var + eps) with IEEE sqrt and division (no fast math), as eager's kernels.
__device__ __forceinline__ float inverse_std(float var, float eps) { return 1.f / sqrtf(var + eps); }

// VEC consecutive per-channel values from c0 as fp32: one branch on the dtype for the whole vector.
// (A branch per channel, VEC times over, let the compiler clone the code along every combination of
// the repeated branches: 10^4 loads per kernel and minutes of ptxas.)
template <int VEC>
__device__ __forceinline__ void load_params(const void* p, int kind, int64_t c0, float (&out)[VEC]) {
  switch (kind) {
    case kParamF16:
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[v] = static_cast<float>(static_cast<const c10::Half*>(p)[c0 + v]);
      break;
    case kParamBF16:
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        out[v] = static_cast<float>(static_cast<const c10::BFloat16*>(p)[c0 + v]);
      break;
    default:
#pragma unroll
      for (int v = 0; v < VEC; ++v) out[v] = static_cast<const float*>(p)[c0 + v];
  }
}

template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, int64_t c0, float (&out)[VEC]) {
#pragma unroll
  for (int v = 0; v < VEC; ++v) out[v] = p[c0 + v];
}

// (mean, scale, shift) of channels c0 .. c0 + VEC - 1. Each optional input is one branch for the
// whole vector, so the code stays linear in VEC.
template <int VEC>
__device__ __forceinline__ void load_affine(const ChannelAffine& p, int64_t c0, bool write_invstd,
                                            float (&m)[VEC], float (&sc)[VEC], float (&sh)[VEC]) {
  if (p.scale != nullptr) {
    load_floats<VEC>(p.mean, c0, m);
    load_floats<VEC>(p.scale, c0, sc);
    load_floats<VEC>(p.shift, c0, sh);
    return;
  }
  if (p.mean != nullptr) {
    load_floats<VEC>(p.mean, c0, m);
  } else {
    load_params<VEC>(p.running_mean, p.running_kind, c0, m);
  }
  float inv[VEC];
  if (p.invstd != nullptr) {
    load_floats<VEC>(p.invstd, c0, inv);
  } else {
    load_params<VEC>(p.running_var, p.running_kind, c0, inv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) inv[v] = inverse_std(inv[v], p.eps);
  }
  if (write_invstd && p.invstd_out != nullptr) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) p.invstd_out[c0 + v] = inv[v];
  }
  if (p.weight != nullptr) {
    load_params<VEC>(p.weight, p.weight_kind, c0, sc);
#pragma unroll
    for (int v = 0; v < VEC; ++v) sc[v] *= inv[v];
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) sc[v] = inv[v];
  }
  if (p.bias != nullptr) {
    load_params<VEC>(p.bias, p.bias_kind, c0, sh);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) sh[v] = 0.f;
  }
}

// One channel (the planar kernels).
__device__ __forceinline__ void load_affine(const ChannelAffine& p, int64_t c, bool write_invstd,
                                            float& m, float& sc, float& sh) {
  float mv[1], scv[1], shv[1];
  load_affine<1>(p, c, write_invstd, mv, scv, shv);
  m = mv[0], sc = scv[0], sh = shv[0];
}

// Chan's merge of Welford states (mean, m2, count) b into a.
__device__ __forceinline__ void chan_merge(float& mean, float& m2, float& n, float mean_b, float m2_b,
                                           float n_b) {
  if (n_b == 0.f) return;
  if (n == 0.f) {
    mean = mean_b, m2 = m2_b, n = n_b;
    return;
  }
  const float n_ab = n + n_b;
  const float w_b = n_b * __frcp_rn(n_ab);
  const float delta = mean_b - mean;
  mean = fmaf(delta, w_b, mean);
  m2 = m2 + m2_b + delta * delta * n * w_b;
  n = n_ab;
}

// Merges the Welford states of a (blockDim.x, blockDim.y) block over threadIdx.y, in a fixed tree
// order (blockDim.y is a power of two). Thread (x, 0) ends with the state of column x.
template <int VEC>
__device__ void block_merge_welford(float (&mean)[VEC], float (&m2)[VEC], float& n) {
  __shared__ float s_mean[kThreads * VEC];
  __shared__ float s_m2[kThreads * VEC];
  __shared__ float s_n[kThreads];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y >= stride && threadIdx.y < 2 * stride) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) s_mean[tid * VEC + v] = mean[v], s_m2[tid * VEC + v] = m2[v];
      s_n[tid] = n;
    }
    __syncthreads();
    if (threadIdx.y < stride) {
      const int other = tid + stride * blockDim.x;
      const float n_b = s_n[other];
      const float n_a = n;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float n_v = n_a;  // the count is the same for the VEC channels of a thread
        chan_merge(mean[v], m2[v], n_v, s_mean[other * VEC + v], s_m2[other * VEC + v], n_b);
      }
      n = n_a + n_b;
    }
    __syncthreads();
  }
}

// Sums a (blockDim.x, blockDim.y) block over threadIdx.y in a fixed tree order.
template <int VEC>
__device__ void block_sum_columns(float (&a)[VEC], float (&b)[VEC]) {
  __shared__ float s_a[kThreads * VEC];
  __shared__ float s_b[kThreads * VEC];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int stride = blockDim.y / 2; stride > 0; stride >>= 1) {
    if (threadIdx.y >= stride && threadIdx.y < 2 * stride) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) s_a[tid * VEC + v] = a[v], s_b[tid * VEC + v] = b[v];
    }
    __syncthreads();
    if (threadIdx.y < stride) {
      const int other = tid + stride * blockDim.x;
#pragma unroll
      for (int v = 0; v < VEC; ++v) a[v] += s_a[other * VEC + v], b[v] += s_b[other * VEC + v];
    }
    __syncthreads();
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------
// Statistics: per-block Welford partials, then a fixed-order Chan merge of the partials.

// channels_last: grid (channel tiles, row splits); block (TX, TY); each block covers rows
// [blockIdx.y * rows_per_block, +rows_per_block).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) stats_channels_last_kernel(const T* __restrict__ x, int64_t rows, int64_t C,
                                           int64_t rows_per_block, float* __restrict__ part_mean,
                                           float* __restrict__ part_m2) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = min64(rows, row_begin + rows_per_block);
  const int64_t step = blockDim.y;
  constexpr int kRows = rows_in_flight(VEC);
  float mean[VEC], m2[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) mean[v] = 0.f, m2[v] = 0.f;
  float n = 0.f;
  if (c0 < C) {
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRows * step) {
      float vals[kRows][VEC];
#pragma unroll
      for (int u = 0; u < kRows; ++u)
        if (r + u * step < row_end) load_vec<T, VEC>(x + (r + u * step) * C + c0, vals[u]);
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (r + u * step < row_end) {
          n += 1.f;
          const float inv_n = __frcp_rn(n);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float delta = vals[u][v] - mean[v];
            mean[v] = fmaf(delta, inv_n, mean[v]);
            m2[v] = fmaf(delta, vals[u][v] - mean[v], m2[v]);
          }
        }
      }
    }
  }
  block_merge_welford<VEC>(mean, m2, n);
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      part_mean[int64_t(blockIdx.y) * C + c0 + v] = mean[v];
      part_m2[int64_t(blockIdx.y) * C + c0 + v] = m2[v];
    }
  }
}

// NCHW: grid (C, image splits); block (1, B): threadIdx.y walks the H*W plane of each image in
// [blockIdx.y * images_per_block, +images_per_block) of channel blockIdx.x.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) stats_planar_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t HW,
                                    int64_t images_per_block, float* __restrict__ part_mean,
                                    float* __restrict__ part_m2) {
  const int64_t c = blockIdx.x;
  const int64_t n_begin = int64_t(blockIdx.y) * images_per_block;
  const int64_t n_end = min64(N, n_begin + images_per_block);
  float mean[1] = {0.f}, m2[1] = {0.f}, n = 0.f;
  for (int64_t img = n_begin; img < n_end; ++img) {
    const T* plane = x + (img * C + c) * HW;
    for (int64_t i = threadIdx.y * VEC; i < HW; i += int64_t(blockDim.y) * VEC) {
      float vals[VEC];
      load_vec<T, VEC>(plane + i, vals);
      // Two-pass over the vector's VEC values, then one Chan merge (one reciprocal per vector).
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum += vals[v];
      const float vec_mean = sum * (1.f / VEC);
      float vec_m2 = 0.f;
#pragma unroll
      for (int v = 0; v < VEC; ++v) vec_m2 = fmaf(vals[v] - vec_mean, vals[v] - vec_mean, vec_m2);
      chan_merge(mean[0], m2[0], n, vec_mean, vec_m2, float(VEC));
    }
  }
  block_merge_welford<1>(mean, m2, n);
  if (threadIdx.y == 0) {
    part_mean[int64_t(blockIdx.y) * C + c] = mean[0];
    part_m2[int64_t(blockIdx.y) * C + c] = m2[0];
  }
}

// Merges the [splits, C] Welford partials of channel c: a block takes blockDim.x channels; thread y
// merges the splits s = y, y + blockDim.y, ... in order (at most kMaxPartialsPerThread of them: the
// host caps the split count by the finalize block), then the block merges its threads in a fixed tree
// order. Split s holds min(units_per_split, total_units - s * units_per_split) * unit_size elements.
// Every thread of the block must call it; thread (x, 0) ends with the channel's state.
__device__ __forceinline__ void merge_welford_partials(
    const float* __restrict__ part_mean, const float* __restrict__ part_m2, int64_t splits,
    int64_t C, int64_t c, int64_t total_units, int64_t units_per_split, int64_t unit_size,
    float (&mean)[1], float (&m2)[1], float& n) {
  mean[0] = 0.f, m2[0] = 0.f, n = 0.f;
  if (c < C) {
#pragma unroll 4
    for (int64_t s = threadIdx.y; s < splits; s += blockDim.y) {
      const int64_t count = min64(units_per_split, total_units - s * units_per_split) * unit_size;
      chan_merge(mean[0], m2[0], n, part_mean[s * C + c], part_m2[s * C + c], float(count));
    }
  }
  block_merge_welford<1>(mean, m2, n);
}

// (mean, m2) of the kernel-level op bn_stats_cuda. No elements: mean = m2 = NaN (as torch.var_mean
// of an empty tensor).
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
stats_finalize_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                      int64_t splits, int64_t C, int64_t total_units, int64_t units_per_split,
                      int64_t unit_size, float* __restrict__ mean_out, float* __restrict__ m2_out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float mean[1], m2[1], n;
  merge_welford_partials(part_mean, part_m2, splits, C, c, total_units, units_per_split, unit_size,
                         mean, m2, n);
  if (threadIdx.y == 0 && c < C) {
    if (n == 0.f) mean[0] = m2[0] = __int_as_float(0x7fc00000);
    mean_out[c] = mean[0];
    m2_out[c] = m2[0];
  }
}

// The training forward's per-channel math, in the launch that finishes the statistics:
// mean, invstd = 1 / sqrt(m2 / M + eps), the apply pass's scale = weight * invstd and shift = bias,
// and the running statistics updated in place (in their dtype, computed in fp32):
//   running_mean = f * mean + (1 - f) * running_mean
//   running_var  = f * m2 / (M - 1) + (1 - f) * running_var      (unbiased variance)
// with f = momentum, or 1 / num_batches_tracked read here (momentum=None: no host read).
struct TrainFinalize {
  float* mean_out;
  float* invstd_out;
  float* scale_out;
  float* shift_out;
  const void* weight;
  const void* bias;
  int weight_kind, bias_kind;
  void* running_mean;  // nullptr: no running statistics
  void* running_var;
  int running_kind;
  const int64_t* num_batches_tracked;  // read when cumulative
  bool cumulative;
  float momentum, eps;
};

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
forward_finalize_kernel(const float* __restrict__ part_mean, const float* __restrict__ part_m2,
                        int64_t splits, int64_t C, int64_t total_units, int64_t units_per_split,
                        int64_t unit_size, TrainFinalize out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float mean[1], m2[1], n;
  merge_welford_partials(part_mean, part_m2, splits, C, c, total_units, units_per_split, unit_size,
                         mean, m2, n);
  if (threadIdx.y != 0 || c >= C) return;
  const float count = float(total_units * unit_size);  // the host launches this only for count > 0
  const float inv = inverse_std(m2[0] / count, out.eps);
  out.mean_out[c] = mean[0];
  out.invstd_out[c] = inv;
  out.scale_out[c] = out.weight != nullptr ? load_param(out.weight, out.weight_kind, c) * inv : inv;
  out.shift_out[c] = out.bias != nullptr ? load_param(out.bias, out.bias_kind, c) : 0.f;
  if (out.running_mean != nullptr) {
    const float f =
        out.cumulative ? float(1.0 / double(*out.num_batches_tracked)) : out.momentum;
    const float rm = load_param(out.running_mean, out.running_kind, c);
    const float rv = load_param(out.running_var, out.running_kind, c);
    store_param(out.running_mean, out.running_kind, c, f * mean[0] + (1.f - f) * rm);
    store_param(out.running_var, out.running_kind, c, f * (m2[0] / (count - 1.f)) + (1.f - f) * rv);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward reduction: per-block (sum dy', sum dy' * (x - mean)), then a fixed-order sum.

// dy' (the gradient through the ReLU) for one element.
template <typename T>
__device__ __forceinline__ float masked_grad(float g, float xc, float sc, float sh, float r,
                                             bool has_residual, bool relu) {
  if (relu) {
    float pre = fmaf(xc, sc, sh);
    if (has_residual) pre += r;
    if (!relu_passes<T>(pre)) g = 0.f;
  }
  return g;
}

// channels_last: grid (channel tiles, row splits) as the statistics. With dres != nullptr (residual
// + ReLU) it also writes dres = dy' (in T), which the dx pass then reads instead of dy, x's mask
// and the residual.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, channels_last_blocks_per_sm(VEC)) backward_reduce_channels_last_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    ChannelAffine affine, bool relu, int64_t rows, int64_t C, int64_t rows_per_block,
    float* __restrict__ part_sum_dy, float* __restrict__ part_sum_dy_xc, T* __restrict__ dres) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = min64(rows, row_begin + rows_per_block);
  const int64_t step = blockDim.y;
  constexpr int kRows = rows_in_flight(VEC);
  float sum_dy[VEC], sum_dy_xc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sum_dy[v] = 0.f, sum_dy_xc[v] = 0.f;
  if (c0 < C) {
    float m[VEC], sc[VEC], sh[VEC];
    load_affine<VEC>(affine, c0, false, m, sc, sh);
    const bool load_residual = relu && residual != nullptr;
    for (int64_t r = row_begin + threadIdx.y; r < row_end; r += kRows * step) {
      float g[kRows][VEC], xv[kRows][VEC], rv[kRows][VEC];
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        const int64_t off = (r + u * step) * C + c0;
        if (r + u * step < row_end) {
          load_vec<T, VEC>(dy + off, g[u]);
          load_vec<T, VEC>(x + off, xv[u]);
          if (load_residual) load_vec<T, VEC>(residual + off, rv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) {
        if (r + u * step < row_end) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            const float xc = xv[u][v] - m[v];
            g[u][v] = masked_grad<T>(g[u][v], xc, sc[v], sh[v], load_residual ? rv[u][v] : 0.f,
                                     load_residual, relu);
            sum_dy[v] += g[u][v];
            sum_dy_xc[v] = fmaf(g[u][v], xc, sum_dy_xc[v]);
          }
          if (dres != nullptr) store_vec<T, VEC>(dres + (r + u * step) * C + c0, g[u]);
        }
      }
    }
  }
  block_sum_columns<VEC>(sum_dy, sum_dy_xc);
  if (threadIdx.y == 0 && c0 < C) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      part_sum_dy[int64_t(blockIdx.y) * C + c0 + v] = sum_dy[v];
      part_sum_dy_xc[int64_t(blockIdx.y) * C + c0 + v] = sum_dy_xc[v];
    }
  }
}

// NCHW: grid (C, image splits); block (1, B), as the statistics.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) backward_reduce_planar_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    ChannelAffine affine, bool relu, int64_t N, int64_t C, int64_t HW, int64_t images_per_block,
    float* __restrict__ part_sum_dy, float* __restrict__ part_sum_dy_xc, T* __restrict__ dres) {
  const int64_t c = blockIdx.x;
  const int64_t n_begin = int64_t(blockIdx.y) * images_per_block;
  const int64_t n_end = min64(N, n_begin + images_per_block);
  float m, sc, sh;
  load_affine(affine, c, false, m, sc, sh);
  const bool load_residual = relu && residual != nullptr;
  float sum_dy[1] = {0.f}, sum_dy_xc[1] = {0.f};
  for (int64_t img = n_begin; img < n_end; ++img) {
    const int64_t base = (img * C + c) * HW;
    for (int64_t i = threadIdx.y * VEC; i < HW; i += int64_t(blockDim.y) * VEC) {
      float g[VEC], xv[VEC], rv[VEC];
      load_vec<T, VEC>(dy + base + i, g);
      load_vec<T, VEC>(x + base + i, xv);
      if (load_residual) load_vec<T, VEC>(residual + base + i, rv);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float xc = xv[v] - m;
        g[v] = masked_grad<T>(g[v], xc, sc, sh, load_residual ? rv[v] : 0.f, load_residual, relu);
        sum_dy[0] += g[v];
        sum_dy_xc[0] = fmaf(g[v], xc, sum_dy_xc[0]);
      }
      if (dres != nullptr) store_vec<T, VEC>(dres + base + i, g);
    }
  }
  block_sum_columns<1>(sum_dy, sum_dy_xc);
  if (threadIdx.y == 0) {
    part_sum_dy[int64_t(blockIdx.y) * C + c] = sum_dy[0];
    part_sum_dy_xc[int64_t(blockIdx.y) * C + c] = sum_dy_xc[0];
  }
}

// Sums the [splits, C] partials of channel c, blocked as merge_welford_partials.
__device__ __forceinline__ void sum_partials(const float* __restrict__ part_a,
                                             const float* __restrict__ part_b, int64_t splits,
                                             int64_t C, int64_t c, float (&a)[1], float (&b)[1]) {
  a[0] = 0.f, b[0] = 0.f;
  if (c < C) {
#pragma unroll 4
    for (int64_t s = threadIdx.y; s < splits; s += blockDim.y) {
      a[0] += part_a[s * C + c];
      b[0] += part_b[s * C + c];
    }
  }
  block_sum_columns<1>(a, b);
}

// (sum dy', sum dy' * (x - mean)) of the kernel-level op bn_backward_reduce_cuda.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
sum_finalize_kernel(const float* __restrict__ part_a, const float* __restrict__ part_b,
                    int64_t splits, int64_t C, float* __restrict__ a_out,
                    float* __restrict__ b_out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float a[1], b[1];
  sum_partials(part_a, part_b, splits, C, c, a, b);
  if (threadIdx.y == 0 && c < C) {
    a_out[c] = a[0];
    b_out[c] = b[0];
  }
}

// The backward's per-channel math, in the launch that finishes its sums:
//   dweight = sum dy' * (x - mean) * invstd,  dbias = sum dy'   (in the parameters' dtype)
//   dx = a * dy' + k * (x - mean) + c  with  a = weight * invstd and, in training (batch statistics),
//   k = -a * invstd^2 * sum dy' (x - mean) / M,  c = -a * sum dy' / M;  eval: k = c = 0.
struct BackwardFinalize {
  const float* invstd;
  const void* weight;
  int weight_kind;
  void* dweight;  // nullptr: not needed
  int dweight_kind;
  void* dbias;
  int dbias_kind;
  float* coef;  // [3, C]: a, k, c
  bool training;
  int64_t count;  // M, the elements per channel
};

__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
backward_finalize_kernel(const float* __restrict__ part_sum_dy,
                         const float* __restrict__ part_sum_dy_xc, int64_t splits, int64_t C,
                         BackwardFinalize out) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  float sum_dy[1], sum_dy_xc[1];
  sum_partials(part_sum_dy, part_sum_dy_xc, splits, C, c, sum_dy, sum_dy_xc);
  if (threadIdx.y != 0 || c >= C) return;
  const float inv = out.invstd[c];
  if (out.dweight != nullptr) store_param(out.dweight, out.dweight_kind, c, sum_dy_xc[0] * inv);
  if (out.dbias != nullptr) store_param(out.dbias, out.dbias_kind, c, sum_dy[0]);
  const float a = out.weight != nullptr ? load_param(out.weight, out.weight_kind, c) * inv : inv;
  float k = 0.f, cc = 0.f;
  if (out.training) {
    const float m = float(out.count);
    k = -a * (inv * inv * (sum_dy_xc[0] / m));
    cc = -a * (sum_dy[0] / m);
  }
  out.coef[c] = a;
  out.coef[C + c] = k;
  out.coef[2 * C + c] = cc;
}

// ------------------------------------------------------------------------------------------------
// Elementwise: apply and dx. Per-channel parameters are held in registers per thread.

// y = act((x - mean) * scale + shift [+ residual]); relu(NaN) stays NaN.
__device__ __forceinline__ float apply_one(float x, float m, float sc, float sh, float r,
                                           bool has_residual, bool relu) {
  float y = fmaf(x - m, sc, sh);
  if (has_residual) y += r;
  if (relu && y < 0.f) y = 0.f;
  return y;
}

// channels_last: grid (channel tiles, row blocks); block (TX, TY); grid-stride over rows. The
// threads of row block 0, row 0 write the invstd they computed when affine.invstd_out is set (eval).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, channels_last_blocks_per_sm(VEC)) apply_channels_last_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, ChannelAffine affine, bool relu,
    int64_t rows, int64_t C, T* __restrict__ y) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  const bool has_residual = residual != nullptr;
  const bool write_invstd = blockIdx.y == 0 && threadIdx.y == 0;
  float m[VEC], sc[VEC], sh[VEC];
  load_affine<VEC>(affine, c0, write_invstd, m, sc, sh);
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  constexpr int kRows = rows_in_flight(VEC);
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += kRows * step) {
    float xv[kRows][VEC], rv[kRows][VEC];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t off = (r + u * step) * C + c0;
      if (r + u * step < rows) {
        load_vec<T, VEC>(x + off, xv[u]);
        if (has_residual) load_vec<T, VEC>(residual + off, rv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (r + u * step < rows) {
        float out[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          out[v] = apply_one(xv[u][v], m[v], sc[v], sh[v], has_residual ? rv[u][v] : 0.f,
                             has_residual, relu);
        store_vec<T, VEC>(y + (r + u * step) * C + c0, out);
      }
    }
  }
}

// NCHW: grid (N * C planes, chunks of the plane); block (B). Plane c (image 0), chunk 0, thread 0
// writes the invstd when affine.invstd_out is set.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) apply_planar_kernel(
    const T* __restrict__ x, const T* __restrict__ residual, ChannelAffine affine, bool relu,
    int64_t C, int64_t HW, int64_t chunk, T* __restrict__ y) {
  const int64_t plane = blockIdx.x;
  const int64_t c = plane % C;
  float m, sc, sh;
  load_affine(affine, c, plane < C && blockIdx.y == 0 && threadIdx.x == 0, m, sc, sh);
  const bool has_residual = residual != nullptr;
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t end = min64(HW, begin + chunk);
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const int64_t off = plane * HW + i;
    float xv[VEC], rv[VEC], out[VEC];
    load_vec<T, VEC>(x + off, xv);
    if (has_residual) load_vec<T, VEC>(residual + off, rv);
#pragma unroll
    for (int v = 0; v < VEC; ++v)
      out[v] = apply_one(xv[v], m, sc, sh, has_residual ? rv[v] : 0.f, has_residual, relu);
    store_vec<T, VEC>(y + off, out);
  }
}

// k * (x - mean) + c of dx. k == 0 (eval mode) is an exact zero term: eager's eval dx = scale * dy'
// stays finite where x is Inf or NaN, and so must ours (IEEE would give 0 * Inf = NaN).
__device__ __forceinline__ float centered_term(float k, float xc, float c) {
  return k != 0.f ? fmaf(k, xc, c) : c;
}

// dx = a * dy' + k * (x - mean) + c and/or dres = dy'. The coefficients a, k, c are fp32 [C] arrays,
// or (a_coef == nullptr, eval) a = scale, k = c = 0. dx or dres may be nullptr (not needed). Given
// dy' itself (the dres the reduce pass wrote), the caller passes it as dy with relu = false and no
// residual: then x is read only for the k term.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, channels_last_blocks_per_sm(VEC)) backward_dx_channels_last_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    ChannelAffine affine, bool relu, const float* __restrict__ a_coef,
    const float* __restrict__ k_coef, const float* __restrict__ c_coef, int64_t rows, int64_t C,
    T* __restrict__ dx, T* __restrict__ dres) {
  const int64_t c0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;
  const bool has_residual = relu && residual != nullptr;  // only the mask reads the residual
  float m[VEC], sc[VEC], sh[VEC], a[VEC], k[VEC], cc[VEC];
  load_affine<VEC>(affine, c0, false, m, sc, sh);
  if (a_coef != nullptr) {
    load_floats<VEC>(a_coef, c0, a);
    load_floats<VEC>(k_coef, c0, k);
    load_floats<VEC>(c_coef, c0, cc);
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) a[v] = sc[v], k[v] = 0.f, cc[v] = 0.f;
  }
  // x is needed for the mask and for a nonzero k term; eval dx = a * dy' without a mask reads dy only.
  bool need_x = relu;
#pragma unroll
  for (int v = 0; v < VEC; ++v) need_x = need_x || k[v] != 0.f;
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  constexpr int kRows = rows_in_flight(VEC);
  for (int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += kRows * step) {
    float g[kRows][VEC], xv[kRows][VEC], rv[kRows][VEC];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int64_t off = (r + u * step) * C + c0;
      if (r + u * step < rows) {
        load_vec<T, VEC>(dy + off, g[u]);
        if (need_x) load_vec<T, VEC>(x + off, xv[u]);
        if (has_residual) load_vec<T, VEC>(residual + off, rv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      if (r + u * step < rows) {
        const int64_t off = (r + u * step) * C + c0;
        float out[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float xc = need_x ? xv[u][v] - m[v] : 0.f;
          g[u][v] = masked_grad<T>(g[u][v], xc, sc[v], sh[v], has_residual ? rv[u][v] : 0.f,
                                   has_residual, relu);
          out[v] = fmaf(a[v], g[u][v], centered_term(k[v], xc, cc[v]));
        }
        if (dx != nullptr) store_vec<T, VEC>(dx + off, out);
        if (dres != nullptr) store_vec<T, VEC>(dres + off, g[u]);
      }
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) backward_dx_planar_kernel(
    const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ residual,
    ChannelAffine affine, bool relu, const float* __restrict__ a_coef,
    const float* __restrict__ k_coef, const float* __restrict__ c_coef, int64_t C, int64_t HW,
    int64_t chunk, T* __restrict__ dx, T* __restrict__ dres) {
  const int64_t plane = blockIdx.x;
  const int64_t c = plane % C;
  const bool has_residual = relu && residual != nullptr;
  float m, sc, sh;
  load_affine(affine, c, false, m, sc, sh);
  const float a = a_coef != nullptr ? a_coef[c] : sc;
  const float k = a_coef != nullptr ? k_coef[c] : 0.f;
  const float cc = a_coef != nullptr ? c_coef[c] : 0.f;
  const bool need_x = relu || k != 0.f;
  const int64_t begin = int64_t(blockIdx.y) * chunk;
  const int64_t end = min64(HW, begin + chunk);
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const int64_t off = plane * HW + i;
    float g[VEC], xv[VEC], rv[VEC], out[VEC];
    load_vec<T, VEC>(dy + off, g);
    if (need_x) load_vec<T, VEC>(x + off, xv);
    if (has_residual) load_vec<T, VEC>(residual + off, rv);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float xc = need_x ? xv[v] - m : 0.f;
      g[v] = masked_grad<T>(g[v], xc, sc, sh, has_residual ? rv[v] : 0.f, has_residual, relu);
      out[v] = fmaf(a, g[v], centered_term(k, xc, cc));
    }
    if (dx != nullptr) store_vec<T, VEC>(dx + off, out);
    if (dres != nullptr) store_vec<T, VEC>(dres + off, g);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: validation, launch geometry, dtype dispatch.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// How the kernels see a validated 4-D tensor.
struct Geometry {
  int64_t N, C, HW;
  bool channels_last;     // treated as [rows = N*HW, C]; otherwise N*C planes of HW
  at::MemoryFormat format;  // the layout of the outputs: x's, as fastres.ops.memory_format(x)
  int64_t rows() const { return N * HW; }
};

Geometry geometry_of(const at::Tensor& x, const char* op) {
#ifndef FASTRES_EMULATE
  TORCH_CHECK(x.is_cuda(), "fastres::", op, ": x must be a CUDA tensor, got one on ", x.device());
#endif
  TORCH_CHECK(x.dim() == 4, "fastres::", op, ": x must be 4-D (N, C, H, W), got ", x.dim(),
              "-D with shape ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "fastres::", op,
              ": x must be float32, float16 or bfloat16, got ", dtype);
  const bool nchw = x.is_contiguous();
  const bool nhwc = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nchw || nhwc, "fastres::", op,
              ": x must be dense NCHW (contiguous) or channels_last, got shape ", x.sizes(),
              " with strides ", x.strides());
  Geometry g;
  g.N = x.size(0), g.C = x.size(1), g.HW = x.size(2) * x.size(3);
  // With H*W == 1 both orders are the same memory: take the channels_last kernels.
  g.channels_last = !nchw || g.HW == 1;
  g.format = nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(g.channels_last || g.N * g.C <= int64_t(INT32_MAX), "fastres::", op,
              ": N * C = ", g.N * g.C, " planes is more than the NCHW kernels support (2^31 - 1)");
  TORCH_CHECK(g.C <= int64_t(INT32_MAX), "fastres::", op, ": too many channels (", g.C, ")");
  return g;
}

// dy and residual: x's shape, dtype, device and memory order.
void check_like_x(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* op,
                  const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.sizes() == x.sizes(), "fastres::", op, ": ", name, " has shape ", t.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastres::", op, ": ", name, " is ",
              t.scalar_type(), " but x is ", x.scalar_type());
  const bool same_order = g.channels_last ? t.is_contiguous(at::MemoryFormat::ChannelsLast)
                                          : t.is_contiguous();
  TORCH_CHECK(same_order, "fastres::", op, ": ", name, " must be dense in x's memory order (",
              g.channels_last ? "channels_last" : "contiguous NCHW", "), got strides ",
              t.strides());
}

// Per-channel parameters: fp32, contiguous, C values, on x's device.
void check_per_channel(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* op,
                       const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastres::", op, ": ", name,
              " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == g.C && t.is_contiguous(), "fastres::", op, ": ", name,
              " must be a contiguous [C] = [", g.C, "] tensor, got shape ", t.sizes());
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T);
}

// 16-byte access needs the contiguous dimension to be a multiple of the vector width and every
// pointer aligned.
template <typename T>
bool can_vectorize(const Geometry& g, std::initializer_list<const void*> ptrs) {
  const int64_t inner = g.channels_last ? g.C : g.HW;
  if (inner % vec_width<T>() != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

// Per-channel parameters and running statistics: C values, contiguous, on x's device, in float32,
// float16 or bfloat16 (computed in fp32 either way).
int param_kind(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* op,
               const char* name) {
  TORCH_CHECK(t.device() == x.device(), "fastres::", op, ": ", name, " is on ", t.device(),
              " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.numel() == g.C && t.is_contiguous(), "fastres::", op, ": ", name,
              " must be a contiguous [C] = [", g.C, "] tensor, got shape ", t.sizes());
  switch (t.scalar_type()) {
    case at::kFloat:
      return kParamF32;
    case at::kHalf:
      return kParamF16;
    case at::kBFloat16:
      return kParamBF16;
    default:
      TORCH_CHECK(false, "fastres::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

int sm_count(const at::Tensor& x) {
#ifndef FASTRES_EMULATE
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
#else
  return fastres_emulation::sm_count();
#endif
}

// Blocks resident at once on the device at blocks_per_sm blocks per SM: the target grid size, and
// what the kernel's __launch_bounds__(kThreads, blocks_per_sm) holds its registers to.
int64_t full_wave(const at::Tensor& x, int blocks_per_sm = kBlocksPerSm) {
  return int64_t(sm_count(x)) * blocks_per_sm;
}

// channels_last block shape: TX threads across channel vectors (a power of two up to 32), TY rows.
dim3 channels_last_block(int64_t channel_vecs) {
  const int tx = int(next_pow2(channel_vecs < 32 ? channel_vecs : 32));
  return dim3(tx, kThreads / tx);
}

// Finalize kernels: TX channels x TY partial lanes per block. Narrow blocks (4 x 64) up to 1023
// channels spread the finalize of C = 64..512 over 16..128 blocks with 64 lanes per channel; wider
// ones for large C. The partial count is capped at kMaxPartialsPerThread * TY (reduction_splits).
dim3 finalize_block_for(int64_t C) {
  const int tx = C >= 4096 ? 32 : C >= 1024 ? 8 : 4;
  return dim3(tx, kThreads / tx);
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "fastres: unsupported dtype ", dtype);
  }
}

const void* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr() : nullptr;
}

template <typename T>
const T* typed_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Row/image splits for a reduction: about one full wave of blocks, a few rows per thread at least,
// and no more partials than a finalize block merges with kMaxPartialsPerThread per thread.
struct Splits {
  int64_t count, units_per_split;
};

Splits reduction_splits(int64_t units, int64_t min_units_per_split, int64_t blocks_per_split,
                        int64_t wave, int64_t C) {
  if (units == 0) return {0, 1};
  int64_t count = wave / (blocks_per_split > 0 ? blocks_per_split : 1);
  count = std::max<int64_t>(1, std::min<int64_t>(count, ceil_div(units, min_units_per_split)));
  const int64_t max_partials = int64_t(kMaxPartialsPerThread) * finalize_block_for(C).y;
  count = std::min<int64_t>({count, max_partials, int64_t(kMaxGridY)});
  const int64_t per = ceil_div(units, count);
  return {ceil_div(units, per), per};
}

// Launches on the current stream and checks the launch. Arguments convert to the kernel's parameter
// types (the CPU emulator in csrc/emulator/ provides its own launch_kernel).
#ifndef FASTRES_EMULATE
#define FASTRES_DEVICE_GUARD_AND_STREAM(x)      \
  c10::cuda::CUDAGuard device_guard((x).device()); \
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream()

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream,
                   Args... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<Params>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// ------------------------------------------------------------------------------------------------
// One launcher per kernel family (channels_last or planar, vectorised or not, chosen inside).

// The partial statistics: [2, splits, C] fp32 (mean, m2) partials in `part` (allocated here).
struct PartialStats {
  at::Tensor part;
  Splits splits{0, 1};
  int64_t total_units = 0, unit_size = 1;
  const float* mean() const { return part.const_data_ptr<float>(); }
  const float* m2() const { return part.const_data_ptr<float>() + splits.count * part.size(2); }
};

PartialStats launch_partial_stats(const at::Tensor& x, const Geometry& g, cudaStream_t stream) {
  const int64_t wave = full_wave(x);
  const auto f32 = x.options().dtype(at::kFloat);
  PartialStats ps;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool vec = can_vectorize<T>(g, {x.const_data_ptr()});
    if (g.channels_last) {
      const int64_t channel_vecs = vec ? g.C / vec_width<T>() : g.C;
      const dim3 block = channels_last_block(channel_vecs);
      const int64_t tiles = ceil_div(channel_vecs, block.x);
      ps.total_units = g.rows(), ps.unit_size = 1;
      ps.splits = reduction_splits(ps.total_units, int64_t(block.y) * kUnroll, tiles, wave, g.C);
      ps.part = at::empty({2, ps.splits.count, g.C}, f32);
      if (ps.splits.count == 0) return;
      float* pm = ps.part.data_ptr<float>();
      auto* kernel = vec ? &stats_channels_last_kernel<T, vec_width<T>()>
                         : &stats_channels_last_kernel<T, 1>;
      launch_kernel(kernel, dim3(tiles, ps.splits.count), block, stream, x.const_data_ptr<T>(),
                    g.rows(), g.C, ps.splits.units_per_split, pm, pm + ps.splits.count * g.C);
    } else {
      const int vw = vec ? vec_width<T>() : 1;
      const dim3 block(1, std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(g.HW / vw))));
      ps.total_units = g.N, ps.unit_size = g.HW;
      ps.splits = reduction_splits(ps.total_units, 1, g.C, wave, g.C);
      ps.part = at::empty({2, ps.splits.count, g.C}, f32);
      if (ps.splits.count == 0) return;
      float* pm = ps.part.data_ptr<float>();
      auto* kernel = vec ? &stats_planar_kernel<T, vec_width<T>()> : &stats_planar_kernel<T, 1>;
      launch_kernel(kernel, dim3(g.C, ps.splits.count), block, stream, x.const_data_ptr<T>(), g.N,
                    g.C, g.HW, ps.splits.units_per_split, pm, pm + ps.splits.count * g.C);
    }
  });
  return ps;
}

// y = act((x - mean) * scale + shift [+ residual]). Launches even for an empty x when the affine
// writes an invstd (eval forward): one block row then, which only does that.
void launch_apply(const at::Tensor& x, const Geometry& geometry,
                  const std::optional<at::Tensor>& residual, const ChannelAffine& affine, bool relu,
                  at::Tensor& y, cudaStream_t stream) {
  Geometry g = geometry;
  if (g.rows() == 0) g.channels_last = true;  // no elements: the channels_last grid has C threads
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool vec = can_vectorize<T>(g, {x.const_data_ptr(), ptr_or_null(residual), y.data_ptr()});
    const T* r = typed_or_null<T>(residual);
    if (g.channels_last) {
      const int64_t channel_vecs = vec ? g.C / vec_width<T>() : g.C;
      const dim3 block = channels_last_block(channel_vecs);
      const int64_t tiles = ceil_div(channel_vecs, block.x);
      const int vw = vec ? vec_width<T>() : 1;
      const int64_t wave = full_wave(x, channels_last_blocks_per_sm(vw));
      const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>(
          {ceil_div(g.rows(), int64_t(block.y) * rows_in_flight(vw)),
           std::max<int64_t>(1, wave / tiles), kMaxGridY}));
      auto* kernel = vec ? &apply_channels_last_kernel<T, vec_width<T>()>
                         : &apply_channels_last_kernel<T, 1>;
      launch_kernel(kernel, dim3(tiles, row_blocks), block, stream, x.const_data_ptr<T>(), r,
                    affine, relu, g.rows(), g.C, y.data_ptr<T>());
    } else {
      const int vw = vec ? vec_width<T>() : 1;
      const int64_t threads = std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(g.HW / vw)));
      const int64_t chunks = std::min<int64_t>(ceil_div(g.HW, threads * vw * kUnroll), kMaxGridY);
      const int64_t chunk = ceil_div(ceil_div(g.HW, chunks), vw) * vw;  // keeps vectors whole
      auto* kernel = vec ? &apply_planar_kernel<T, vec_width<T>()> : &apply_planar_kernel<T, 1>;
      launch_kernel(kernel, dim3(g.N * g.C, ceil_div(g.HW, chunk)), dim3(threads), stream,
                    x.const_data_ptr<T>(), r, affine, relu, g.C, g.HW, chunk, y.data_ptr<T>());
    }
  });
}

// [2, splits, C] fp32 partial (sum dy', sum dy' * (x - mean)); writes dres = dy' when given.
struct PartialSums {
  at::Tensor part;
  int64_t splits = 0;
  const float* sum_dy() const { return part.const_data_ptr<float>(); }
  const float* sum_dy_xc() const { return part.const_data_ptr<float>() + splits * part.size(2); }
};

PartialSums launch_backward_reduce(const at::Tensor& dy, const at::Tensor& x, const Geometry& g,
                                   const std::optional<at::Tensor>& residual,
                                   const ChannelAffine& affine, bool relu, at::Tensor* dres,
                                   cudaStream_t stream) {
  const int64_t wave = full_wave(x);
  const auto f32 = x.options().dtype(at::kFloat);
  PartialSums ps;
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* dres_ptr = dres != nullptr ? dres->data_ptr<T>() : nullptr;
    const bool vec = can_vectorize<T>(g, {x.const_data_ptr(), dy.const_data_ptr(),
                                          relu ? ptr_or_null(residual) : nullptr, dres_ptr});
    const T* r = typed_or_null<T>(residual);
    if (g.channels_last) {
      const int64_t channel_vecs = vec ? g.C / vec_width<T>() : g.C;
      const dim3 block = channels_last_block(channel_vecs);
      const int64_t tiles = ceil_div(channel_vecs, block.x);
      // The split count (and so the fixed summation order) stays that of a 4-blocks-per-SM wave,
      // as the statistics': with VEC > 1 that is two waves of this kernel's 2 blocks per SM.
      const Splits splits = reduction_splits(g.rows(), int64_t(block.y) * kUnroll, tiles, wave, g.C);
      ps.splits = splits.count;
      ps.part = at::empty({2, splits.count, g.C}, f32);
      if (splits.count == 0) return;
      float* pa = ps.part.data_ptr<float>();
      auto* kernel = vec ? &backward_reduce_channels_last_kernel<T, vec_width<T>()>
                         : &backward_reduce_channels_last_kernel<T, 1>;
      launch_kernel(kernel, dim3(tiles, splits.count), block, stream, dy.const_data_ptr<T>(),
                    x.const_data_ptr<T>(), r, affine, relu, g.rows(), g.C,
                    splits.units_per_split, pa, pa + splits.count * g.C, dres_ptr);
    } else {
      const int vw = vec ? vec_width<T>() : 1;
      const dim3 block(1, std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(g.HW / vw))));
      const Splits splits = reduction_splits(g.N, 1, g.C, wave, g.C);
      ps.splits = splits.count;
      ps.part = at::empty({2, splits.count, g.C}, f32);
      if (splits.count == 0) return;
      float* pa = ps.part.data_ptr<float>();
      auto* kernel = vec ? &backward_reduce_planar_kernel<T, vec_width<T>()>
                         : &backward_reduce_planar_kernel<T, 1>;
      launch_kernel(kernel, dim3(g.C, splits.count), block, stream, dy.const_data_ptr<T>(),
                    x.const_data_ptr<T>(), r, affine, relu, g.N, g.C, g.HW,
                    splits.units_per_split, pa, pa + splits.count * g.C, dres_ptr);
    }
  });
  return ps;
}

// dx = a * dy' + k * (x - mean) + c (a_coef == nullptr: a = scale, k = c = 0) and/or dres = dy';
// dx, dres may be nullptr.
void launch_backward_dx(const at::Tensor& dy, const at::Tensor& x, const Geometry& g,
                        const std::optional<at::Tensor>& residual, const ChannelAffine& affine,
                        bool relu, const float* a_coef, const float* k_coef, const float* c_coef,
                        at::Tensor* dx, at::Tensor* dres, cudaStream_t stream) {
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* r = relu ? typed_or_null<T>(residual) : nullptr;
    T* dx_ptr = dx != nullptr ? dx->data_ptr<T>() : nullptr;
    T* dres_ptr = dres != nullptr ? dres->data_ptr<T>() : nullptr;
    const bool vec = can_vectorize<T>(
        g, {x.const_data_ptr(), dy.const_data_ptr(), r, dx_ptr, dres_ptr});
    if (g.channels_last) {
      const int64_t channel_vecs = vec ? g.C / vec_width<T>() : g.C;
      const dim3 block = channels_last_block(channel_vecs);
      const int64_t tiles = ceil_div(channel_vecs, block.x);
      const int vw = vec ? vec_width<T>() : 1;
      const int64_t wave = full_wave(x, channels_last_blocks_per_sm(vw));
      const int64_t row_blocks = std::min<int64_t>(
          {ceil_div(g.rows(), int64_t(block.y) * rows_in_flight(vw)),
           std::max<int64_t>(1, wave / tiles), kMaxGridY});
      auto* kernel = vec ? &backward_dx_channels_last_kernel<T, vec_width<T>()>
                         : &backward_dx_channels_last_kernel<T, 1>;
      launch_kernel(kernel, dim3(tiles, row_blocks), block, stream, dy.const_data_ptr<T>(),
                    x.const_data_ptr<T>(), r, affine, relu, a_coef, k_coef, c_coef, g.rows(), g.C,
                    dx_ptr, dres_ptr);
    } else {
      const int vw = vec ? vec_width<T>() : 1;
      const int64_t threads = std::min<int64_t>(kThreads, std::max<int64_t>(32, next_pow2(g.HW / vw)));
      const int64_t chunks = std::min<int64_t>(ceil_div(g.HW, threads * vw * kUnroll), kMaxGridY);
      const int64_t chunk = ceil_div(ceil_div(g.HW, chunks), vw) * vw;
      auto* kernel = vec ? &backward_dx_planar_kernel<T, vec_width<T>()>
                         : &backward_dx_planar_kernel<T, 1>;
      launch_kernel(kernel, dim3(g.N * g.C, ceil_div(g.HW, chunk)), dim3(threads), stream,
                    dy.const_data_ptr<T>(), x.const_data_ptr<T>(), r, affine, relu, a_coef, k_coef,
                    c_coef, g.C, g.HW, chunk, dx_ptr, dres_ptr);
    }
  });
}

dim3 finalize_grid(int64_t C) { return dim3(ceil_div(C, finalize_block_for(C).x)); }

ChannelAffine precomputed_affine(const at::Tensor& mean, const at::Tensor& scale,
                                 const at::Tensor& shift) {
  ChannelAffine affine;
  affine.mean = mean.const_data_ptr<float>();
  affine.scale = scale.const_data_ptr<float>();
  affine.shift = shift.const_data_ptr<float>();
  return affine;
}

// ------------------------------------------------------------------------------------------------
// The kernel-level ops (SyncBN runs its all-gather between the statistics and the rest).

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& x) {
  const char* op = "bn_stats_cuda";
  const Geometry g = geometry_of(x, op);
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({g.C}, f32), m2 = at::empty({g.C}, f32);
  if (g.C == 0) return {mean, m2};
  const PartialStats ps = launch_partial_stats(x, g, stream);
  launch_kernel(&stats_finalize_kernel, finalize_grid(g.C), finalize_block_for(g.C), stream,
                ps.mean(), ps.m2(), ps.splits.count, g.C, ps.total_units, ps.splits.units_per_split,
                ps.unit_size, mean.data_ptr<float>(), m2.data_ptr<float>());
  return {mean, m2};
}

at::Tensor bn_apply_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
                         const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                         bool relu) {
  const char* op = "bn_apply_cuda";
  const Geometry g = geometry_of(x, op);
  check_per_channel(mean, x, g, op, "mean");
  check_per_channel(scale, x, g, op, "scale");
  check_per_channel(shift, x, g, op, "shift");
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  at::Tensor y = at::empty(x.sizes(), x.options(), g.format);
  if (x.numel() == 0) return y;
  launch_apply(x, g, residual, precomputed_affine(mean, scale, shift), relu, y, stream);
  return y;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual, bool relu) {
  const char* op = "bn_backward_reduce_cuda";
  const Geometry g = geometry_of(x, op);
  check_like_x(dy, x, g, op, "dy");
  check_per_channel(mean, x, g, op, "mean");
  check_per_channel(scale, x, g, op, "scale");
  check_per_channel(shift, x, g, op, "shift");
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sum_dy = at::empty({g.C}, f32), sum_dy_xc = at::empty({g.C}, f32);
  if (g.C == 0) return {sum_dy, sum_dy_xc};
  const PartialSums ps = launch_backward_reduce(
      dy, x, g, residual, precomputed_affine(mean, scale, shift), relu, nullptr, stream);
  launch_kernel(&sum_finalize_kernel, finalize_grid(g.C), finalize_block_for(g.C), stream,
                ps.sum_dy(), ps.sum_dy_xc(), ps.splits, g.C, sum_dy.data_ptr<float>(),
                sum_dy_xc.data_ptr<float>());
  return {sum_dy, sum_dy_xc};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_dx_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual, bool relu,
    const at::Tensor& a, const at::Tensor& k, const at::Tensor& c, bool need_dres) {
  const char* op = "bn_backward_dx_cuda";
  const Geometry g = geometry_of(x, op);
  check_like_x(dy, x, g, op, "dy");
  check_per_channel(mean, x, g, op, "mean");
  check_per_channel(scale, x, g, op, "scale");
  check_per_channel(shift, x, g, op, "shift");
  check_per_channel(a, x, g, op, "a");
  check_per_channel(k, x, g, op, "k");
  check_per_channel(c, x, g, op, "c");
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  at::Tensor dx = at::empty(x.sizes(), x.options(), g.format);
  at::Tensor dres = need_dres ? at::empty(x.sizes(), x.options(), g.format) : at::empty({0}, x.options());
  if (x.numel() == 0) return {dx, dres};
  launch_backward_dx(dy, x, g, residual, precomputed_affine(mean, scale, shift), relu,
                     a.const_data_ptr<float>(), k.const_data_ptr<float>(), c.const_data_ptr<float>(),
                     &dx, need_dres ? &dres : nullptr, stream);
  return {dx, dres};
}

// ------------------------------------------------------------------------------------------------
// The whole-op contract (fastres/cuda_backend.py): 3 launches forward in training, 1 in eval, at
// most 3 in backward; no other device work.

struct AffineParams {  // the optional weight and bias, validated
  const void* weight = nullptr;
  const void* bias = nullptr;
  int weight_kind = kParamF32, bias_kind = kParamF32;
};

AffineParams affine_params(const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const at::Tensor& x,
                           const Geometry& g, const char* op) {
  AffineParams p;
  if (weight.has_value()) {
    p.weight_kind = param_kind(*weight, x, g, op, "weight");
    p.weight = weight->const_data_ptr();
  }
  if (bias.has_value()) {
    p.bias_kind = param_kind(*bias, x, g, op, "bias");
    p.bias = bias->const_data_ptr();
  }
  return p;
}

// (y, mean, invstd): batch statistics, their per-channel math and the running-statistics update in
// place, then y. Launches: partial statistics, finalize, apply.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_forward_train_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& num_batches_tracked, double momentum, bool cumulative,
    double eps, bool relu) {
  const char* op = "bn_forward_train_cuda";
  const Geometry g = geometry_of(x, op);
  const AffineParams params = affine_params(weight, bias, x, g, op);
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), "fastres::", op,
              ": running_mean and running_var must be given together");
  int running_kind = kParamF32;
  if (running_mean.has_value()) {
    running_kind = param_kind(*running_mean, x, g, op, "running_mean");
    TORCH_CHECK(param_kind(*running_var, x, g, op, "running_var") == running_kind, "fastres::", op,
                ": running_var is ", running_var->scalar_type(), " but running_mean is ",
                running_mean->scalar_type());
    if (cumulative) {
      TORCH_CHECK(num_batches_tracked.has_value(), "fastres::", op,
                  ": momentum=None (cumulative) needs num_batches_tracked");
      const at::Tensor& nbt = *num_batches_tracked;
      TORCH_CHECK(nbt.device() == x.device() && nbt.scalar_type() == at::kLong && nbt.numel() == 1,
                  "fastres::", op, ": num_batches_tracked must be a one-element int64 tensor on ",
                  x.device(), ", got ", nbt.scalar_type(), " with shape ", nbt.sizes(), " on ",
                  nbt.device());
    }
  }
  TORCH_CHECK(eps > 0, "fastres::", op, ": eps must be positive in training, got ", eps);
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(x.sizes(), x.options(), g.format);
  at::Tensor mean = at::empty({g.C}, f32), invstd = at::empty({g.C}, f32);
  if (g.C == 0) return {y, mean, invstd};
  if (g.rows() == 0) {  // as eager: no statistics, running statistics untouched
    mean.fill_(std::numeric_limits<float>::quiet_NaN());
    invstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {y, mean, invstd};
  }
  const PartialStats ps = launch_partial_stats(x, g, stream);
  at::Tensor scale_shift = at::empty({2, g.C}, f32);
  TrainFinalize out;
  out.mean_out = mean.data_ptr<float>();
  out.invstd_out = invstd.data_ptr<float>();
  out.scale_out = scale_shift.data_ptr<float>();
  out.shift_out = out.scale_out + g.C;
  out.weight = params.weight, out.bias = params.bias;
  out.weight_kind = params.weight_kind, out.bias_kind = params.bias_kind;
  out.running_mean = running_mean.has_value() ? running_mean->data_ptr() : nullptr;
  out.running_var = running_var.has_value() ? running_var->data_ptr() : nullptr;
  out.running_kind = running_kind;
  out.cumulative = cumulative && running_mean.has_value();
  out.num_batches_tracked = out.cumulative ? num_batches_tracked->const_data_ptr<int64_t>() : nullptr;
  out.momentum = float(momentum), out.eps = float(eps);
  launch_kernel(&forward_finalize_kernel, finalize_grid(g.C), finalize_block_for(g.C), stream,
                ps.mean(), ps.m2(), ps.splits.count, g.C, ps.total_units, ps.splits.units_per_split,
                ps.unit_size, out);
  ChannelAffine affine;
  affine.mean = out.mean_out, affine.scale = out.scale_out, affine.shift = out.shift_out;
  launch_apply(x, g, residual, affine, relu, y, stream);
  return {y, mean, invstd};
}

// (y, invstd) with the running statistics: one launch, which also writes invstd.
std::tuple<at::Tensor, at::Tensor> bn_forward_eval_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& running_mean, const at::Tensor& running_var, double eps, bool relu) {
  const char* op = "bn_forward_eval_cuda";
  const Geometry g = geometry_of(x, op);
  const AffineParams params = affine_params(weight, bias, x, g, op);
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  const int running_kind = param_kind(running_mean, x, g, op, "running_mean");
  TORCH_CHECK(param_kind(running_var, x, g, op, "running_var") == running_kind, "fastres::", op,
              ": running_var is ", running_var.scalar_type(), " but running_mean is ",
              running_mean.scalar_type());
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  at::Tensor y = at::empty(x.sizes(), x.options(), g.format);
  at::Tensor invstd = at::empty({g.C}, x.options().dtype(at::kFloat));
  if (g.C == 0) return {y, invstd};
  ChannelAffine affine;
  affine.running_mean = running_mean.const_data_ptr();
  affine.running_var = running_var.const_data_ptr();
  affine.running_kind = running_kind;
  affine.eps = float(eps);
  affine.weight = params.weight, affine.bias = params.bias;
  affine.weight_kind = params.weight_kind, affine.bias_kind = params.bias_kind;
  affine.invstd_out = invstd.data_ptr<float>();
  launch_apply(x, g, residual, affine, relu, y, stream);
  return {y, invstd};
}

// (dx, dres, dweight, dbias), an empty tensor where not needed. Launches: the reduction (writing
// dres = dy' with residual + ReLU), the finalize (dweight, dbias, dx coefficients), the dx pass
// (reading that dres instead of dy, the residual and the mask) — the first two only when batch
// statistics or dweight / dbias need the sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean, const at::Tensor& invstd, bool relu, bool training, bool need_dx,
    bool need_dres, bool need_dweight, bool need_dbias) {
  const char* op = "bn_backward_cuda";
  const Geometry g = geometry_of(x, op);
  check_like_x(dy, x, g, op, "dy");
  const AffineParams params = affine_params(weight, bias, x, g, op);
  if (residual.has_value()) check_like_x(*residual, x, g, op, "residual");
  const int mean_kind = param_kind(mean, x, g, op, "mean");  // eval: the running mean, any dtype
  check_per_channel(invstd, x, g, op, "invstd");
  TORCH_CHECK(!need_dweight || weight.has_value(), "fastres::", op,
              ": need_dweight without a weight");
  TORCH_CHECK(!need_dbias || bias.has_value(), "fastres::", op, ": need_dbias without a bias");
  FASTRES_DEVICE_GUARD_AND_STREAM(x);
  auto none = [&] { return at::empty({0}, x.options()); };  // a distinct empty tensor per output
  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options(), g.format) : none();
  at::Tensor dres = need_dres ? at::empty(x.sizes(), x.options(), g.format) : none();
  at::Tensor dweight = need_dweight ? at::empty({g.C}, weight->options()) : none();
  at::Tensor dbias = need_dbias ? at::empty({g.C}, bias->options()) : none();
  const bool need_sums = (training && need_dx) || need_dweight || need_dbias;
  if (g.C == 0) return {dx, dres, dweight, dbias};
  if (x.numel() == 0) {  // empty sums
    if (need_dweight) dweight.zero_();
    if (need_dbias) dbias.zero_();
    return {dx, dres, dweight, dbias};
  }
  ChannelAffine affine;
  if (mean_kind == kParamF32) {
    affine.mean = mean.const_data_ptr<float>();
  } else {
    affine.running_mean = mean.const_data_ptr(), affine.running_kind = mean_kind;
  }
  affine.invstd = invstd.const_data_ptr<float>();
  affine.weight = params.weight, affine.bias = params.bias;
  affine.weight_kind = params.weight_kind, affine.bias_kind = params.bias_kind;
  // With a ReLU the reduction writes dy' as dres; the dx pass then reads it, not dy / mask inputs.
  const bool dres_from_reduce = need_sums && need_dres && relu;
  at::Tensor coef;
  if (need_sums) {
    const PartialSums ps = launch_backward_reduce(dy, x, g, residual, affine, relu,
                                                  dres_from_reduce ? &dres : nullptr, stream);
    coef = at::empty({3, g.C}, x.options().dtype(at::kFloat));
    BackwardFinalize out;
    out.invstd = affine.invstd;
    out.weight = params.weight, out.weight_kind = params.weight_kind;
    out.dweight = need_dweight ? dweight.data_ptr() : nullptr;
    out.dweight_kind = need_dweight ? param_kind(dweight, x, g, op, "dweight") : kParamF32;
    out.dbias = need_dbias ? dbias.data_ptr() : nullptr;
    out.dbias_kind = need_dbias ? param_kind(dbias, x, g, op, "dbias") : kParamF32;
    out.coef = coef.data_ptr<float>();
    out.training = training;
    out.count = g.rows();
    launch_kernel(&backward_finalize_kernel, finalize_grid(g.C), finalize_block_for(g.C), stream,
                  ps.sum_dy(), ps.sum_dy_xc(), ps.splits, g.C, out);
  }
  if (!(need_dx || (need_dres && !dres_from_reduce))) return {dx, dres, dweight, dbias};
  const float* a = need_sums ? coef.const_data_ptr<float>() : nullptr;
  const float* k = need_sums ? a + g.C : nullptr;
  const float* c = need_sums ? a + 2 * g.C : nullptr;
  if (dres_from_reduce) {  // dx = a * dres + k * (x - mean) + c
    launch_backward_dx(dres, x, g, std::nullopt, affine, false, a, k, c, &dx, nullptr, stream);
  } else {
    launch_backward_dx(dy, x, g, residual, affine, relu, a, k, c, need_dx ? &dx : nullptr,
                       need_dres ? &dres : nullptr, stream);
  }
  return {dx, dres, dweight, dbias};
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY_IMPL(FASTRES_OPS_NAMESPACE, FASTRES_DISPATCH_KEY, m) {
  m.impl("bn_stats_cuda", &fastres::bn_stats_cuda);
  m.impl("bn_apply_cuda", &fastres::bn_apply_cuda);
  m.impl("bn_backward_reduce_cuda", &fastres::bn_backward_reduce_cuda);
  m.impl("bn_backward_dx_cuda", &fastres::bn_backward_dx_cuda);
  m.impl("bn_forward_train_cuda", &fastres::bn_forward_train_cuda);
  m.impl("bn_forward_eval_cuda", &fastres::bn_forward_eval_cuda);
  m.impl("bn_backward_cuda", &fastres::bn_backward_cuda);
}
