// msfin_fast._C: the pybind11 face of the RRCAB pass. Pointers, shapes and the stream arrive as
// Python integers, so neither this module nor its build needs a CUDA build of torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "rrcab.h"

namespace py = pybind11;

#ifndef MSFIN_VERSION
#error "the build defines MSFIN_VERSION"
#endif
#ifndef MSFIN_CUDA_ARCHS
#error "the build defines MSFIN_CUDA_ARCHS"
#endif

namespace {

template <typename P>
P* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<P*>(address);
}

void rrcab_pass(int dtype_code, int N, int H, int W, int C, int G, int CR, std::uintptr_t t, std::uintptr_t u,
                std::uintptr_t sums_in, std::uintptr_t ca_w1, std::uintptr_t ca_b1, std::uintptr_t ca_w2,
                std::uintptr_t ca_b2, std::uintptr_t e1, std::uintptr_t e2, std::uintptr_t x_out,
                std::uintptr_t u_out, std::uintptr_t sums_out, std::uintptr_t w1, std::uintptr_t b1,
                std::uintptr_t w2, std::uintptr_t b2, std::uintptr_t w3t, std::uintptr_t b3, int device,
                std::uintptr_t stream) {
  // The Python wrapper validates tensors; these checks only keep a direct caller from launching junk.
  if (dtype_code != 0 && dtype_code != 1) throw std::invalid_argument("dtype_code must be 0 (fp32) or 1 (fp16)");
  if (N < 1 || H < 1 || W < 1) throw std::invalid_argument("N, H and W must be at least 1");
  if (!t || !u_out || !sums_out || !w1 || !b1 || !w2 || !b2 || !w3t || !b3)
    throw std::invalid_argument("t, u_out, sums_out and the block's weights are required");
  if (u && (!sums_in || !ca_w1 || !ca_b1 || !ca_w2 || !ca_b2 || CR < 1 || CR > C))
    throw std::invalid_argument("u needs sums_in, the producer's CA weights and 1 <= CR <= C");

  msfin::PassParams p{};
  p.t = as_ptr<const void>(t);
  p.u = as_ptr<const void>(u);
  p.e1 = as_ptr<const void>(e1);
  p.e2 = as_ptr<const void>(e2);
  p.sums_in = as_ptr<const float>(sums_in);
  p.ca_w1 = as_ptr<const float>(ca_w1);
  p.ca_b1 = as_ptr<const float>(ca_b1);
  p.ca_w2 = as_ptr<const float>(ca_w2);
  p.ca_b2 = as_ptr<const float>(ca_b2);
  p.x_out = as_ptr<void>(x_out);
  p.u_out = as_ptr<void>(u_out);
  p.sums_out = as_ptr<float>(sums_out);
  p.w1 = as_ptr<const float>(w1);
  p.b1 = as_ptr<const float>(b1);
  p.w2 = as_ptr<const float>(w2);
  p.b2 = as_ptr<const float>(b2);
  p.w3t = as_ptr<const float>(w3t);
  p.b3 = as_ptr<const float>(b3);
  p.N = N;
  p.H = H;
  p.W = W;
  p.CR = u ? CR : 0;

  std::string error;
  {
    py::gil_scoped_release released;
    error = msfin::rrcab_pass(static_cast<msfin::Storage>(dtype_code), C, G, p, device, stream);
  }
  if (!error.empty()) throw std::runtime_error("rrcab_pass: " + error);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA C++ RRCAB pass of msfin_fast (see csrc/README.md for the contract)";
  m.def("rrcab_pass", &rrcab_pass,
        "One RRCAB pass (NHWC, fp16/fp32 storage) launched on `stream`; absent pointers are 0.",
        py::arg("dtype_code"), py::arg("N"), py::arg("H"), py::arg("W"), py::arg("C"), py::arg("G"),
        py::arg("CR"), py::arg("t"), py::arg("u"), py::arg("sums_in"), py::arg("ca_w1"), py::arg("ca_b1"),
        py::arg("ca_w2"), py::arg("ca_b2"), py::arg("e1"), py::arg("e2"), py::arg("x_out"), py::arg("u_out"),
        py::arg("sums_out"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("w3t"),
        py::arg("b3"), py::arg("device"), py::arg("stream"));
  m.def("version", [] { return std::string(MSFIN_VERSION); }, "msfin_fast version the module was built from");
  m.def(
      "compiled_archs",
      [] {
        std::vector<std::string> archs;
        std::string all = MSFIN_CUDA_ARCHS;
        std::size_t start = 0;
        while (start <= all.size()) {
          const std::size_t end = all.find(';', start);
          const std::string item = all.substr(start, end == std::string::npos ? std::string::npos : end - start);
          if (!item.empty()) archs.push_back(item);
          if (end == std::string::npos) break;
          start = end + 1;
        }
        return archs;
      },
      "GPU code in the module: sm_XX machine code and compute_XX PTX");
  m.def("supported_configs", &msfin::supported_configs, "(C, G) pairs with a compiled kernel");
  m.def(
      "smem_bytes",
      [](int dtype_code, int C, int G) {
        return msfin::rrcab_smem_bytes(static_cast<msfin::Storage>(dtype_code), C, G);
      },
      py::arg("dtype_code"), py::arg("C"), py::arg("G"), "shared memory per block of a variant (0: none)");
  m.def("device_status", &msfin::device_status,
        "(device count, '') or (0, why not) as the CUDA runtime linked into this module sees it");
  m.def("device_count", [] { return msfin::device_status().first; });
  m.def("runtime_version", &msfin::runtime_version, "CUDA runtime version linked in, e.g. 13000");
  m.def("driver_version", &msfin::driver_version, "CUDA version the driver supports, 0 without a driver");
}
