// fp32 storage variants of the RRCAB pass (a translation unit of its own so builds run in parallel).
#include "rrcab_launch.cuh"

namespace msfin {

int launch_rrcab_fp32(int C, int G, const PassParams& params, void* stream, int device, std::string* error) {
  return launch_storage<float>(C, G, params, stream, device, error);
}

std::size_t smem_bytes_fp32(int C, int G) { return smem_bytes<float>(C, G); }

}  // namespace msfin
