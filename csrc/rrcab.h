// The host-side interface of the RRCAB pass: plain C++ with no CUDA headers, so that the pybind11
// binding compiles with the host compiler alone. See rrcab_kernel.cuh for the contract.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

// THE list of (C, G) pairs with a kernel — the only place it is written. Everything else derives from
// it: the CUDA dispatch (rrcab_launch.cuh), supported_configs() (rrcab_api.cu, hence
// msfin_fast._C.supported_configs()), the host emulation's dispatch and msfin_supported_configs()
// (host_emulation/), and, through those, csrc/*.py and tests/test_cuda_ext.py (which also reads this
// line with a regex: keep it one line of X(C, G) entries). MSFIN (G = 6) and MSFIN-S (G = 4) at their
// three levels: 4, 8 or 16 channels per group.
#define MSFIN_FOR_EACH_CONFIG(X) X(16, 4) X(24, 6) X(32, 4) X(48, 6) X(64, 4) X(96, 6)

namespace msfin {

// Device pointers of one pass. Activations are NHWC of the storage dtype; everything else is fp32.
// Optional inputs and outputs are nullptr when absent.
struct PassParams {
  const void* t;           // [N, H, W, C] required
  const void* u;           // [N, H, W, C] optional; needs sums_in and ca_*
  const void* e1;          // [N, H, W, C] optional
  const void* e2;          // [N, H, W, C] optional
  const float* sums_in;    // [N, C] Σ_hw of u (the producer's CA sums)
  const float* ca_w1;      // [CR, C]
  const float* ca_b1;      // [CR]
  const float* ca_w2;      // [C, CR]
  const float* ca_b2;      // [C]
  void* x_out;             // [N, H, W, C] optional: the rounded x
  void* u_out;             // [N, H, W, C] required
  float* sums_out;         // [N, C] required, accumulated into
  const float* w1;         // conv1, packed [G][C/G ci][3 dy][3 dx][C/G co]
  const float* b1;         // [C]
  const float* w2;         // conv2, packed like w1
  const float* b2;         // [C]
  const float* w3t;        // 1×1, transposed: [C ci][C co]
  const float* b3;         // [C]
  int N, H, W;
  int CR;                  // channels of the CA squeeze (0 when u is absent)
};

enum class Storage : int { kFloat32 = 0, kFloat16 = 1 };

// Launch one pass on `stream` (a cudaStream_t as an integer) of CUDA device `device`.
// Returns "" on success, otherwise what went wrong (a CUDA error string or a contract violation).
std::string rrcab_pass(Storage storage, int C, int G, const PassParams& params, int device,
                       std::uintptr_t stream);

// Shared memory one block of a (storage, C, G) variant asks for; 0 for an unsupported variant.
std::size_t rrcab_smem_bytes(Storage storage, int C, int G);

// (C, G) pairs that have a compiled kernel.
std::vector<std::pair<int, int>> supported_configs();

// Number of CUDA devices the runtime sees, and "" — or 0 and the runtime's error string (no driver,
// driver too old for this runtime, no device).
std::pair<int, std::string> device_status();

int runtime_version();  // CUDA runtime this module is linked with, e.g. 13000
int driver_version();   // 0 without a driver

// The per-dtype launchers (rrcab_fp32.cu, rrcab_fp16.cu). Return a cudaError_t as int; fill *error
// with a message for errors that are not CUDA's own.
int launch_rrcab_fp32(int C, int G, const PassParams& params, void* stream, int device, std::string* error);
int launch_rrcab_fp16(int C, int G, const PassParams& params, void* stream, int device, std::string* error);
std::size_t smem_bytes_fp32(int C, int G);
std::size_t smem_bytes_fp16(int C, int G);

}  // namespace msfin
