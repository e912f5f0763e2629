// One RRCAB pass in one launch: prologue, grouped 3×3, ReLU, grouped 3×3, ReLU, 1×1, CA partial sums.
//
// Contract (the same as the Triton kernels, so an engine can mix backends pass by pass):
//   layout   NHWC, contiguous, [N, H, W, C]; storage dtype T = float or __half; fp32 arithmetic.
//   prologue x = t + s[n,c]·u + e1 + e2, computed in fp32 as the tile is loaded, then rounded to T;
//            s = sigmoid(ca_w2 · relu(ca_w1 · (sums_in[n]/(H·W)) + ca_b1) + ca_b2) is the channel
//            attention of the pass that produced u (used only when u is given). The rounded x is what
//            the convolutions see, and is written to x_out (interior pixels) when x_out is given.
//   body     a = relu(gconv3x3(x) + b1), h = relu(gconv3x3(a) + b2), u_out = conv1x1(h) + b3, zero
//            padding 1 at the image border for both 3×3 convs (a outside the image is 0, not conv1
//            evaluated there). With T = __half, a and h are rounded to half before the next conv, as
//            the Triton kernels do; u_out is rounded to T when stored.
//   deferred sums_out[n,c] += Σ_hw u_out (fp32 values before rounding, one atomicAdd per channel per
//            block; the caller zeroes sums_out). The channel attention of this pass is left to the
//            consumer, which reads u_out with the scale made from sums_out.
//   aliasing inputs (t, u, e1, e2) must not overlap outputs (x_out, u_out): other blocks read the halo.
//
// Shape of the work: one thread block computes a TH×TW tile of one image. It loads x over the tile
// plus a 2-pixel halo into shared memory (all C channels), computes a over the tile plus a 1-pixel
// halo into shared memory, then h over the tile (reusing x's storage), then the 1×1 from h. Shared
// memory holds activations in the storage dtype, channel-planar ([c][pixel]), so that consecutive
// threads read consecutive pixels of one channel (no bank conflicts). A thread of a 3×3 stage owns a
// vertical strip of P pixels × CO output channels of one group, so each x value it loads feeds up to
// 3·CO FMAs and each weight P FMAs. Weights stay in global memory (fp32, packed so that a thread's CO
// output channels are one or two float4 loads) and are read through the read-only cache; the threads
// of a warp mostly share a group, so those loads are broadcasts.

#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "rrcab.h"

namespace msfin {

constexpr int kThreads = 256;

// ---- storage-dtype helpers --------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The value a float takes once stored as T and read back.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// 16 bytes of T (8 halves or 4 floats) ↔ floats.
template <typename T> struct Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

__device__ __forceinline__ void load16(const float* p, float* v) {
  const float4 q = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}

__device__ __forceinline__ void load16(const __half* p, float* v) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h2;
    static_assert(sizeof(h2) == sizeof(uint32_t), "half2 is 32 bits");
    memcpy(&h2, &w[i], sizeof(h2));
    const float2 f = __half22float2(h2);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store16(float* p, const float* v) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store16(__half* p, const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 h2 = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    memcpy(&w[i], &h2, sizeof(h2));
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// CO consecutive fp32 weights (CO a multiple of 4, 16-byte aligned) through the read-only cache.
template <int CO>
__device__ __forceinline__ void load_weights(const float* __restrict__ p, float* w) {
#pragma unroll
  for (int k = 0; k < CO; k += 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p + k));
    w[k] = q.x; w[k + 1] = q.y; w[k + 2] = q.z; w[k + 3] = q.w;
  }
}

// ---- tile shapes --------------------------------------------------------------------------------
// TH×TW output pixels per block; P1 / P2 rows per thread strip in conv1 / conv2 (P1 divides TH+2,
// P2 divides TH). Chosen so that a block's shared memory stays ≤ 99 KB (the opt-in limit of sm_86 and
// sm_89) and half storage gets the larger tiles. Unmeasured starting points, not tuned values.

template <int C, int kBytes> struct TileShape;
template <> struct TileShape<16, 2> { static constexpr int TH = 16, TW = 32, P1 = 6, P2 = 8; };
template <> struct TileShape<16, 4> { static constexpr int TH = 8, TW = 32, P1 = 5, P2 = 8; };
template <> struct TileShape<24, 2> { static constexpr int TH = 16, TW = 32, P1 = 6, P2 = 8; };
template <> struct TileShape<24, 4> { static constexpr int TH = 8, TW = 32, P1 = 5, P2 = 8; };
template <> struct TileShape<32, 2> { static constexpr int TH = 8, TW = 32, P1 = 5, P2 = 4; };
template <> struct TileShape<32, 4> { static constexpr int TH = 8, TW = 16, P1 = 5, P2 = 4; };
template <> struct TileShape<48, 2> { static constexpr int TH = 8, TW = 16, P1 = 5, P2 = 4; };
template <> struct TileShape<48, 4> { static constexpr int TH = 8, TW = 16, P1 = 5, P2 = 4; };
template <> struct TileShape<64, 2> { static constexpr int TH = 8, TW = 16, P1 = 5, P2 = 4; };
template <> struct TileShape<64, 4> { static constexpr int TH = 4, TW = 16, P1 = 6, P2 = 4; };
template <> struct TileShape<96, 2> { static constexpr int TH = 8, TW = 16, P1 = 5, P2 = 4; };
template <> struct TileShape<96, 4> { static constexpr int TH = 4, TW = 8, P1 = 6, P2 = 4; };

template <typename T, int C, int G> struct PassShape {
  using Tile = TileShape<C, static_cast<int>(sizeof(T))>;
  static constexpr int TH = Tile::TH, TW = Tile::TW, P1 = Tile::P1, P2 = Tile::P2;
  static constexpr int CG = C / G;                 // channels per group
  static constexpr int CO = CG < 8 ? CG : 8;       // output channels per thread in the 3×3 stages
  static constexpr int XH = TH + 4, XW = TW + 4;   // x: tile + 2-pixel halo
  static constexpr int AH = TH + 2, AW = TW + 2;   // a: tile + 1-pixel halo
  static constexpr int XPIX = XH * XW, APIX = AH * AW, TPIX = TH * TW;
  static constexpr int P3 = 4, K3 = 8;             // 1×1: pixels × output channels per thread
  static constexpr int NPG = TPIX / P3;            // pixel groups in the 1×1
  static constexpr size_t kSmemBytes =
      static_cast<size_t>(XPIX + APIX) * C * sizeof(T) + 4 * C * sizeof(float);

  static_assert(C % G == 0, "C must be a multiple of G");
  static_assert(CG == 4 || CG == 8 || CG == 16, "4, 8 or 16 channels per group");
  static_assert(CG % CO == 0 && CO % 4 == 0, "a thread's output channels are whole float4s");
  static_assert(C % Vec16<T>::kN == 0 && C % K3 == 0, "C must be a multiple of 8");
  static_assert(AH % P1 == 0 && TH % P2 == 0, "strips tile the rows exactly");
  static_assert(TPIX % P3 == 0, "1×1 pixel groups tile the block");
  static_assert(TPIX <= XPIX, "h reuses x's shared memory");
  static_assert((static_cast<size_t>(XPIX + APIX) * C * sizeof(T)) % 16 == 0, "fp32 scratch is aligned");
  static_assert(kSmemBytes <= 99 * 1024, "fits the smallest opt-in shared memory of the targets");
};

// ---- the kernel ---------------------------------------------------------------------------------

template <typename T, int C, int G>
__global__ void __launch_bounds__(kThreads) rrcab_pass_kernel(const PassParams p) {
  using S = PassShape<T, C, G>;
  constexpr int TH = S::TH, TW = S::TW, P1 = S::P1, P2 = S::P2, CG = S::CG, CO = S::CO;
  constexpr int XW = S::XW, AW = S::AW, AH = S::AH;
  constexpr int XPIX = S::XPIX, APIX = S::APIX, TPIX = S::TPIX;
  constexpr int VEC = Vec16<T>::kN;

#ifdef MSFIN_HOST_EMULATION
  unsigned char* smem_raw = host_emulation::shared_memory();
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
#endif
  T* xs = reinterpret_cast<T*>(smem_raw);                   // [C][XPIX]  x, tile + 2-pixel halo
  T* as = xs + C * XPIX;                                     // [C][APIX]  a, tile + 1-pixel halo
  T* hs = xs;                                                // [C][TPIX]  h, once x is consumed
  float* ca_scale = reinterpret_cast<float*>(as + C * APIX);  // [C]
  float* block_sums = ca_scale + C;                          // [C]
  float* ca_mean = block_sums + C;                           // [C]
  float* ca_hidden = ca_mean + C;                            // [C] (CR ≤ C)

  const int tid = threadIdx.x;
  const int n = blockIdx.y;
  const int tiles_x = (p.W + TW - 1) / TW;
  const int y0 = (blockIdx.x / tiles_x) * TH;
  const int x0 = (blockIdx.x % tiles_x) * TW;
  const int H = p.H, W = p.W;
  const int64_t image_base = static_cast<int64_t>(n) * H * W;

  const T* __restrict__ t_in = static_cast<const T*>(p.t);
  const T* __restrict__ u_in = static_cast<const T*>(p.u);
  const T* __restrict__ e1_in = static_cast<const T*>(p.e1);
  const T* __restrict__ e2_in = static_cast<const T*>(p.e2);
  T* __restrict__ x_out = static_cast<T*>(p.x_out);
  T* __restrict__ u_out = static_cast<T*>(p.u_out);

  // Channel attention of u's producer, for this image.
  for (int c = tid; c < C; c += kThreads) block_sums[c] = 0.0f;
  if (u_in != nullptr) {
    const float hw = static_cast<float>(H) * static_cast<float>(W);
    for (int c = tid; c < C; c += kThreads) ca_mean[c] = p.sums_in[static_cast<int64_t>(n) * C + c] / hw;
    __syncthreads();
    for (int j = tid; j < p.CR; j += kThreads) {
      float acc = p.ca_b1[j];
      for (int c = 0; c < C; ++c) acc = fmaf(p.ca_w1[j * C + c], ca_mean[c], acc);
      ca_hidden[j] = fmaxf(acc, 0.0f);
    }
    __syncthreads();
    for (int c = tid; c < C; c += kThreads) {
      float acc = p.ca_b2[c];
      for (int j = 0; j < p.CR; ++j) acc = fmaf(p.ca_w2[c * p.CR + j], ca_hidden[j], acc);
      ca_scale[c] = 1.0f / (1.0f + expf(-acc));
    }
  }
  __syncthreads();

  // x = t + s·u + e1 + e2 over the tile and its 2-pixel halo; 0 outside the image.
  constexpr int kChunks = C / VEC;
  for (int i = tid; i < XPIX * kChunks; i += kThreads) {
    const int chunk = i % kChunks;
    const int xp = i / kChunks;
    const int xr = xp / XW, xc = xp % XW;
    const int gy = y0 - 2 + xr, gx = x0 - 2 + xc;
    float v[VEC];
    if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
      const int64_t off = (image_base + static_cast<int64_t>(gy) * W + gx) * C + chunk * VEC;
      load16(t_in + off, v);
      if (u_in != nullptr) {
        float uv[VEC];
        load16(u_in + off, uv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] += ca_scale[chunk * VEC + k] * uv[k];
      }
      if (e1_in != nullptr) {
        float ev[VEC];
        load16(e1_in + off, ev);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] += ev[k];
      }
      if (e2_in != nullptr) {
        float ev[VEC];
        load16(e2_in + off, ev);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] += ev[k];
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = round_to<T>(v[k]);
      const bool interior = xr >= 2 && xr < TH + 2 && xc >= 2 && xc < TW + 2;
      if (x_out != nullptr && interior) store16(x_out + off, v);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = 0.0f;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) xs[(chunk * VEC + k) * XPIX + xp] = from_float<T>(v[k]);
  }
  __syncthreads();

  // a = relu(gconv3x3(x) + b1) over the tile and its 1-pixel halo; 0 outside the image.
  {
    constexpr int kStrips = AH / P1;
    constexpr int kItems = (C / CO) * kStrips * AW;
    for (int i = tid; i < kItems; i += kThreads) {
      const int col = i % AW;
      const int strip = (i / AW) % kStrips;
      const int co0 = (i / (AW * kStrips)) * CO;
      const int g = co0 / CG;
      const int r0 = strip * P1;
      float acc[P1][CO];
      {
        float b[CO];
        load_weights<CO>(p.b1 + co0, b);
#pragma unroll
        for (int r = 0; r < P1; ++r)
#pragma unroll
          for (int k = 0; k < CO; ++k) acc[r][k] = b[k];
      }
      // packed w1: [G][CG ci][3 dy][3 dx][CG co]
      const float* __restrict__ wg = p.w1 + static_cast<int64_t>(g) * CG * 9 * CG + (co0 - g * CG);
#pragma unroll
      for (int ci = 0; ci < CG; ++ci) {
        const T* plane = xs + (g * CG + ci) * XPIX + r0 * XW + col;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
          float v[P1 + 2];
#pragma unroll
          for (int r = 0; r < P1 + 2; ++r) v[r] = to_float(plane[r * XW + dx]);
#pragma unroll
          for (int dy = 0; dy < 3; ++dy) {
            float w[CO];
            load_weights<CO>(wg + ((ci * 3 + dy) * 3 + dx) * CG, w);
#pragma unroll
            for (int r = 0; r < P1; ++r)
#pragma unroll
              for (int k = 0; k < CO; ++k) acc[r][k] = fmaf(v[r + dy], w[k], acc[r][k]);
          }
        }
      }
      const int gx = x0 - 1 + col;
#pragma unroll
      for (int r = 0; r < P1; ++r) {
        const int gy = y0 - 1 + r0 + r;
        const bool inside = gy >= 0 && gy < H && gx >= 0 && gx < W;
#pragma unroll
        for (int k = 0; k < CO; ++k)
          as[(co0 + k) * APIX + (r0 + r) * AW + col] = from_float<T>(inside ? fmaxf(acc[r][k], 0.0f) : 0.0f);
      }
    }
  }
  __syncthreads();

  // h = relu(gconv3x3(a) + b2) over the tile, into x's storage.
  {
    constexpr int kStrips = TH / P2;
    constexpr int kItems = (C / CO) * kStrips * TW;
    for (int i = tid; i < kItems; i += kThreads) {
      const int col = i % TW;
      const int strip = (i / TW) % kStrips;
      const int co0 = (i / (TW * kStrips)) * CO;
      const int g = co0 / CG;
      const int r0 = strip * P2;
      float acc[P2][CO];
      {
        float b[CO];
        load_weights<CO>(p.b2 + co0, b);
#pragma unroll
        for (int r = 0; r < P2; ++r)
#pragma unroll
          for (int k = 0; k < CO; ++k) acc[r][k] = b[k];
      }
      const float* __restrict__ wg = p.w2 + static_cast<int64_t>(g) * CG * 9 * CG + (co0 - g * CG);
#pragma unroll
      for (int ci = 0; ci < CG; ++ci) {
        const T* plane = as + (g * CG + ci) * APIX + r0 * AW + col;
#pragma unroll
        for (int dx = 0; dx < 3; ++dx) {
          float v[P2 + 2];
#pragma unroll
          for (int r = 0; r < P2 + 2; ++r) v[r] = to_float(plane[r * AW + dx]);
#pragma unroll
          for (int dy = 0; dy < 3; ++dy) {
            float w[CO];
            load_weights<CO>(wg + ((ci * 3 + dy) * 3 + dx) * CG, w);
#pragma unroll
            for (int r = 0; r < P2; ++r)
#pragma unroll
              for (int k = 0; k < CO; ++k) acc[r][k] = fmaf(v[r + dy], w[k], acc[r][k]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < P2; ++r)
#pragma unroll
        for (int k = 0; k < CO; ++k)
          hs[(co0 + k) * TPIX + (r0 + r) * TW + col] = from_float<T>(fmaxf(acc[r][k], 0.0f));
    }
  }
  __syncthreads();

  // u_out = conv1x1(h) + b3 over the tile; CA partial sums of the fp32 values.
  {
    constexpr int P3 = S::P3, K3 = S::K3, NPG = S::NPG;
    constexpr int kItems = (C / K3) * NPG;
    for (int i = tid; i < kItems; i += kThreads) {
      const int pg = i % NPG;
      const int co0 = (i / NPG) * K3;
      float acc[P3][K3];
      {
        float b[K3];
        load_weights<K3>(p.b3 + co0, b);
#pragma unroll
        for (int j = 0; j < P3; ++j)
#pragma unroll
          for (int k = 0; k < K3; ++k) acc[j][k] = b[k];
      }
#pragma unroll 8
      for (int ci = 0; ci < C; ++ci) {
        float hv[P3];
#pragma unroll
        for (int j = 0; j < P3; ++j) hv[j] = to_float(hs[ci * TPIX + pg + j * NPG]);
        float w[K3];
        load_weights<K3>(p.w3t + ci * C + co0, w);  // w3t: [C ci][C co]
#pragma unroll
        for (int j = 0; j < P3; ++j)
#pragma unroll
          for (int k = 0; k < K3; ++k) acc[j][k] = fmaf(hv[j], w[k], acc[j][k]);
      }
      float sums[K3];
#pragma unroll
      for (int k = 0; k < K3; ++k) sums[k] = 0.0f;
#pragma unroll
      for (int j = 0; j < P3; ++j) {
        const int q = pg + j * NPG;
        const int gy = y0 + q / TW, gx = x0 + q % TW;
        if (gy < H && gx < W) {
          T* dst = u_out + (image_base + static_cast<int64_t>(gy) * W + gx) * C + co0;
#pragma unroll
          for (int k = 0; k < K3; k += VEC) store16(dst + k, &acc[j][k]);
#pragma unroll
          for (int k = 0; k < K3; ++k) sums[k] += acc[j][k];
        }
      }
      if constexpr (NPG % 32 == 0) {
        // The whole warp shares co0 (kItems is a multiple of 32, so no lane sits a round out).
#pragma unroll
        for (int k = 0; k < K3; ++k)
#pragma unroll
          for (int m = 16; m > 0; m >>= 1) sums[k] += __shfl_xor_sync(0xffffffffu, sums[k], m);
        if ((tid & 31) == 0)
#pragma unroll
          for (int k = 0; k < K3; ++k) atomicAdd(&block_sums[co0 + k], sums[k]);
      } else {
#pragma unroll
        for (int k = 0; k < K3; ++k) atomicAdd(&block_sums[co0 + k], sums[k]);
      }
    }
  }
  __syncthreads();
  for (int c = tid; c < C; c += kThreads) atomicAdd(&p.sums_out[static_cast<int64_t>(n) * C + c], block_sums[c]);
}

}  // namespace msfin
