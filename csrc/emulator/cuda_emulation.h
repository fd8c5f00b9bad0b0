// Test-only CPU emulation of the little of CUDA that csrc/cuda/batch_norm_act.cu uses, so that its
// kernels AND its host code (validation, launch geometry, splits) run on machines without a GPU.
// One OS thread: each CUDA thread of a block is a ucontext fiber; __syncthreads switches back to the
// scheduler, which runs every fiber of the block up to the same barrier before going on. __shared__
// arrays are statics (one block runs at a time). Blocks run in grid order.
// It checks indexing, coverage, merges and rounding, not timing, memory coalescing or races.
#pragma once

#include <ucontext.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <tuple>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

namespace fastres_emulation {
// A small device (several splits and row blocks even for small tensors); FASTRES_EMULATE_SMS=n
// changes it, e.g. for more reduction splits than the finalize kernels' lanes.
inline int sm_count() {
  const char* env = std::getenv("FASTRES_EMULATE_SMS");
  return env != nullptr && std::atoi(env) > 0 ? std::atoi(env) : 2;
}

inline dim3 thread_idx, block_idx, block_dim, grid_dim;
// (grid.x, grid.y, block.x, block.y) of each launch since the tests last read it.
inline std::vector<int64_t> launch_log;

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};
inline std::vector<Fiber>& fiber_pool() {  // one pool for every kernel: 1024 x 64 KiB stacks at most
  static std::vector<Fiber> pool(1024);
  return pool;
}
inline ucontext_t scheduler;
inline Fiber* running = nullptr;
inline std::function<void()> body;

inline void fiber_main() {
  body();
  running->done = true;  // returning resumes the scheduler (uc_link)
}

// Runs body() as one block of `threads` fibers.
inline void run_block(std::vector<Fiber>& fibers, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = fibers[t];
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  for (bool pending = true; pending;) {  // one round per barrier
    pending = false;
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      if (f.done) continue;
      thread_idx = dim3(t % block_dim.x, (t / block_dim.x) % block_dim.y,
                        t / (block_dim.x * block_dim.y));
      running = &f;
      swapcontext(&scheduler, &f.context);
      pending = pending || !f.done;
    }
  }
}
}  // namespace fastres_emulation

#define threadIdx (fastres_emulation::thread_idx)
#define blockIdx (fastres_emulation::block_idx)
#define blockDim (fastres_emulation::block_dim)
#define gridDim (fastres_emulation::grid_dim)
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() {
  swapcontext(&fastres_emulation::running->context, &fastres_emulation::scheduler);
}
inline float __frcp_rn(float v) { return 1.0f / v; }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }

#define FASTRES_DEVICE_GUARD_AND_STREAM(x) cudaStream_t stream = nullptr

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, Args... args) {
  using namespace fastres_emulation;
  const unsigned threads = block.x * block.y * block.z;
  TORCH_CHECK(threads >= 1 && threads <= 1024 && grid.y <= 65535 && grid.z <= 65535,
              "invalid launch geometry");
  launch_log.insert(launch_log.end(), {grid.x, grid.y, block.x, block.y});
  grid_dim = grid, block_dim = block;
  std::tuple<Params...> params(static_cast<Params>(args)...);
  body = [&] { std::apply(kernel, params); };
  std::vector<Fiber>& fibers = fiber_pool();
  for (unsigned t = 0; t < threads; ++t)
    if (fibers[t].stack.empty()) fibers[t].stack.resize(64 * 1024);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        run_block(fibers, threads);
      }
}
