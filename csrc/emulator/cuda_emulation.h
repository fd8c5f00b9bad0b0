// Test-only CPU emulation of the little of CUDA that csrc/cuda/batch_norm_act.cu uses, so that its
// kernels AND its host code (validation, launch geometry, splits) run on machines without a GPU.
// Each launch runs blockDim threads as std::threads; they walk the grid's blocks in order, with
// __syncthreads as a std::barrier and __shared__ arrays as statics (one block runs at a time).
// It checks indexing, coverage, merges and rounding, not timing, memory coalescing or races.
#pragma once

#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace fastres_emulation {
inline constexpr int kSmCount = 2;  // small: several splits and row blocks even for small tensors
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
}  // namespace fastres_emulation

#define threadIdx (fastres_emulation::thread_idx)
#define blockIdx (fastres_emulation::block_idx)
#define blockDim (fastres_emulation::block_dim)
#define gridDim (fastres_emulation::grid_dim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { fastres_emulation::block_barrier->arrive_and_wait(); }
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }

#define FASTRES_DEVICE_GUARD_AND_STREAM(x) cudaStream_t stream = nullptr

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  using namespace fastres_emulation;
  TORCH_CHECK(block.x * block.y * block.z <= 1024 && grid.y <= 65535 && grid.z <= 65535,
              "invalid launch geometry");
  grid_dim = grid, block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            kernel(static_cast<Params>(args)...);
            barrier.arrive_and_wait();  // the block's shared memory is reused by the next block
          }
    });
  }
  for (auto& th : pool) th.join();
}
