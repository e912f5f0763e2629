// The RRCAB kernel's own source compiled for the CPU, one OS thread per CUDA thread: a test harness,
// not a backend. It runs rrcab_pass_kernel block by block, with __syncthreads as a barrier of the
// block's 256 threads, warp shuffles as a barrier of 32, shared memory as a per-block buffer and
// atomics under a lock, so the indexing, halo, padding, rounding and CA sums of the real kernel are
// checked on machines without a GPU (tests/test_cuda_ext.py builds it with the host compiler).
// What it cannot check: timing, memory-model subtleties of the GPU, and code generation by nvcc.

#include <cuda_fp16.h>
#include <vector_types.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../rrcab.h"

namespace msfin::host_emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  std::vector<unsigned char> shared;
  std::barrier<> block_barrier{256};
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  float exchange[256] = {};
};

thread_local Block* current_block = nullptr;
thread_local Dim3 thread_idx, block_idx;
std::mutex atomic_lock;

unsigned char* shared_memory() { return current_block->shared.data(); }

}  // namespace msfin::host_emulation

#define MSFIN_HOST_EMULATION 1
#define __launch_bounds__(...)
#define threadIdx (::msfin::host_emulation::thread_idx)
#define blockIdx (::msfin::host_emulation::block_idx)

inline void __syncthreads() { msfin::host_emulation::current_block->block_barrier.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  auto* b = msfin::host_emulation::current_block;
  const int tid = static_cast<int>(threadIdx.x), warp = tid / 32, lane = tid % 32;
  b->exchange[tid] = v;
  b->warp_barriers[warp]->arrive_and_wait();
  const float other = b->exchange[warp * 32 + (lane ^ lane_mask)];
  b->warp_barriers[warp]->arrive_and_wait();
  return other;
}

inline float atomicAdd(float* address, float v) {
  std::lock_guard<std::mutex> hold(msfin::host_emulation::atomic_lock);
  const float old = *address;
  *address = old + v;
  return old;
}

inline float4 __ldg(const float4* p) { return *p; }
inline uint4 __ldg(const uint4* p) { return *p; }

#include "../rrcab_kernel.cuh"

namespace msfin::host_emulation {

template <typename T, int C, int G>
void run(const PassParams& p) {
  using S = PassShape<T, C, G>;
  const unsigned tiles = ((p.H + S::TH - 1) / S::TH) * ((p.W + S::TW - 1) / S::TW);
  Block block;
  block.shared.resize(S::kSmemBytes);
  for (int w = 0; w < kThreads / 32; ++w) block.warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  // The block's threads live for the whole grid and run its blocks one after another.
  std::vector<std::thread> threads;
  threads.reserve(kThreads);
  for (unsigned t = 0; t < static_cast<unsigned>(kThreads); ++t) {
    threads.emplace_back([&, t] {
      current_block = &block;
      thread_idx = Dim3{t, 0, 0};
      for (unsigned n = 0; n < static_cast<unsigned>(p.N); ++n) {
        for (unsigned tile = 0; tile < tiles; ++tile) {
          // Garbage, not zeros, in shared memory: a read of a location nothing wrote shows up.
          if (t == 0) std::memset(block.shared.data(), 0xFF, block.shared.size());
          block.block_barrier.arrive_and_wait();
          block_idx = Dim3{tile, n, 0};
          rrcab_pass_kernel<T, C, G>(p);
          block.block_barrier.arrive_and_wait();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
}

template <typename T>
int dispatch(int C, int G, const PassParams& p) {
#define MSFIN_CASE(c, g)    \
  if (C == (c) && G == (g)) { \
    run<T, c, g>(p);          \
    return 0;                 \
  }
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  return 1;
}

}  // namespace msfin::host_emulation

extern "C" int emulate_rrcab_pass(int dtype_code, int C, int G, const msfin::PassParams* p) {
  return dtype_code == 1 ? msfin::host_emulation::dispatch<__half>(C, G, *p)
                         : msfin::host_emulation::dispatch<float>(C, G, *p);
}

extern "C" int emulate_params_size() { return static_cast<int>(sizeof(msfin::PassParams)); }

// The (C, G) pairs the emulation dispatches (MSFIN_FOR_EACH_CONFIG of rrcab.h): writes up to
// `capacity` pairs to out[0..2·capacity) as C, G, C, G, ... and returns how many pairs there are.
extern "C" int msfin_supported_configs(int* out, int capacity) {
  int n = 0;
#define MSFIN_CASE(c, g)   \
  if (n < capacity) {      \
    out[2 * n] = (c);      \
    out[2 * n + 1] = (g);  \
  }                        \
  ++n;
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  return n;
}
