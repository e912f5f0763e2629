// Host entry points: device selection, dispatch by storage dtype, runtime and device queries.
#include <cuda_runtime.h>

#include <string>

#include "rrcab.h"

namespace msfin {

namespace {

std::string cuda_message(int code) {
  const auto e = static_cast<cudaError_t>(code);
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

}  // namespace

std::string rrcab_pass(Storage storage, int C, int G, const PassParams& params, int device, std::uintptr_t stream) {
  // This module links its own (static) CUDA runtime, whose current device is not torch's: select the
  // device the tensors live on before touching anything (no synchronisation, capture-safe).
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) return "cudaSetDevice(" + std::to_string(device) + ") failed: " + cuda_message(e);
  std::string error;
  void* s = reinterpret_cast<void*>(stream);
  const int code = storage == Storage::kFloat16 ? launch_rrcab_fp16(C, G, params, s, device, &error)
                                                : launch_rrcab_fp32(C, G, params, s, device, &error);
  if (code == 0) return {};
  return error.empty() ? cuda_message(code) : error;
}

std::size_t rrcab_smem_bytes(Storage storage, int C, int G) {
  return storage == Storage::kFloat16 ? smem_bytes_fp16(C, G) : smem_bytes_fp32(C, G);
}

std::vector<std::pair<int, int>> supported_configs() {
  std::vector<std::pair<int, int>> configs;
#define MSFIN_CASE(c, g) configs.emplace_back((c), (g));
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  return configs;
}

std::pair<int, std::string> device_status() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so later calls start clean
    return {0, cuda_message(e)};
  }
  if (count == 0) return {0, "the CUDA runtime sees no device"};
  return {count, {}};
}

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace msfin
