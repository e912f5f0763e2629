// Every variant of the emulated kernel once, on random data, for the host sanitizers:
//   ThreadSanitizer: a shared-memory race between __syncthreads (a CPU analogue of racecheck);
//   AddressSanitizer + UBSan: a read or write outside any tensor or outside the block's shared
//   memory, which is allocated at exactly the size the launch asks for (an analogue of memcheck).
// tests/test_cuda_ext.py builds and runs it both ways; it prints one line per variant.
#include <cstdio>
#include <random>
#include <vector>

#include "rrcab_host.cpp"

namespace {

template <typename T>
std::vector<T> random_vector(std::size_t n, std::mt19937& gen) {
  std::normal_distribution<float> normal;
  std::vector<T> v(n);
  for (auto& x : v) x = T(normal(gen));
  return v;
}

template <typename T>
int run_variant(int C, int G, int dtype_code, std::mt19937& gen) {
  const int N = 1, H = 13, W = 21, CR = C / 4;
  const std::size_t act = static_cast<std::size_t>(N) * H * W * C;
  auto t = random_vector<T>(act, gen), u = random_vector<T>(act, gen);
  auto e1 = random_vector<T>(act, gen), e2 = random_vector<T>(act, gen);
  std::vector<T> x_out(act), u_out(act);
  auto w1 = random_vector<float>(C * (C / G) * 9, gen), w2 = random_vector<float>(C * (C / G) * 9, gen);
  auto w3t = random_vector<float>(C * C, gen), bias = random_vector<float>(C, gen);
  auto ca_w1 = random_vector<float>(CR * C, gen), ca_b1 = random_vector<float>(CR, gen);
  auto ca_w2 = random_vector<float>(C * CR, gen), sums_in = random_vector<float>(N * C, gen);
  std::vector<float> sums_out(N * C, 0.0f);
  msfin::PassParams p{t.data(), u.data(), e1.data(), e2.data(), sums_in.data(), ca_w1.data(), ca_b1.data(),
                      ca_w2.data(), bias.data(), x_out.data(), u_out.data(), sums_out.data(), w1.data(),
                      bias.data(), w2.data(), bias.data(), w3t.data(), bias.data(), N, H, W, CR};
  if (emulate_rrcab_pass(dtype_code, C, G, &p) != 0) return 1;
  std::printf("C=%d G=%d %s ran\n", C, G, dtype_code ? "fp16" : "fp32");
  return 0;
}

}  // namespace

int main() {
  std::mt19937 gen(0);
#define MSFIN_CASE(c, g) \
  if (run_variant<float>((c), (g), 0, gen) || run_variant<__half>((c), (g), 1, gen)) return 1;
  MSFIN_FOR_EACH_CONFIG(MSFIN_CASE)
#undef MSFIN_CASE
  return 0;
}
