// Launching a (dtype, C, G) variant of rrcab_pass_kernel, and the per-dtype dispatch over (C, G).
#pragma once

#include <atomic>
#include <climits>
#include <cstdint>
#include <string>

#include "rrcab_kernel.cuh"

namespace msfin {

template <typename T, int C, int G>
cudaError_t launch_variant(const PassParams& p, cudaStream_t stream, int device, std::string* error) {
  using S = PassShape<T, C, G>;
  const auto kernel = rrcab_pass_kernel<T, C, G>;

  // Blocks over 48 KB of dynamic shared memory need the function's limit raised, once per device.
  static std::atomic<std::uint64_t> configured{0};
  const std::uint64_t bit = device < 64 ? (std::uint64_t{1} << device) : 0;
  if (bit == 0 || (configured.load(std::memory_order_acquire) & bit) == 0) {
    int optin = 0;
    cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) return e;
    if (S::kSmemBytes > static_cast<std::size_t>(optin)) {
      *error = "the C=" + std::to_string(C) + " kernel needs " + std::to_string(S::kSmemBytes) +
               " bytes of shared memory per block; device " + std::to_string(device) + " allows " +
               std::to_string(optin);
      return cudaErrorInvalidConfiguration;
    }
    e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(S::kSmemBytes));
    if (e != cudaSuccess) return e;
    configured.fetch_or(bit, std::memory_order_release);
  }

  const std::int64_t tiles = static_cast<std::int64_t>((p.H + S::TH - 1) / S::TH) * ((p.W + S::TW - 1) / S::TW);
  if (tiles > INT_MAX || p.N > 65535) {
    *error = "image too large for one launch: " + std::to_string(tiles) + " tiles × batch " + std::to_string(p.N);
    return cudaErrorInvalidConfiguration;
  }
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.N));
  rrcab_pass_kernel<T, C, G><<<grid, kThreads, S::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// MSFIN_FOR_EACH_CONFIG, the (C, G) pairs with a kernel, is defined once in rrcab.h.

template <typename T>
int launch_storage(int C, int G, const PassParams& p, void* stream, int device, std::string* error) {
  const auto s = static_cast<cudaStream_t>(stream);
#define MSFIN_CASE(c, g) \
  if (C == (c) && G == (g)) return static_cast<int>(launch_variant<T, c, g>(p, s, device, error));
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  *error = "no kernel for C=" + std::to_string(C) + ", G=" + std::to_string(G);
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T>
std::size_t smem_bytes(int C, int G) {
#define MSFIN_CASE(c, g) \
  if (C == (c) && G == (g)) return PassShape<T, c, g>::kSmemBytes;
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  return 0;
}

}  // namespace msfin
