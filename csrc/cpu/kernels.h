// The CPU kernels of msfin_fast (fp32, NHWC activations), declared once and compiled once per
// instruction set: kernels.cpp is built three times, with MSFIN_ISA set to avx512, avx2 or
// portable and the matching compiler flags, into namespaces of those names; module.cpp picks one
// at run time from what the CPU reports. The contract is the engine's (kernels/rrcab.py, one pass):
//
//   x    = t + s[n, c] * u + e1 + e2          s = sigmoid(W2 relu(W1 sums_in / (H W) + b1) + b2)
//   a    = relu(gconv3x3(x; w1, b1))          zero padding, G groups
//   h    = relu(gconv3x3(a; w2, b2))
//   u'   = conv1x1(h; w3t, b3)                written to u_out (NHWC), and sums_out[n, c] += sum u'
//   x_out = x                                 when asked (the next pass's residual base)
//
// Computed in fp32. t, x_out and the sums are fp32; the addends u, e1, e2 (Source::bf16) and u_out
// (Pass::u_bf16) may be stored in bf16 (the engine's bfloat16 mode: what is added to the residual
// stream is rounded to nearest even once, when it is stored; the stream and the sums stay fp32).
// Weights: w1/w2 as torch stores a grouped conv, [C out][C/G in][3][3]; w3t the 1x1 transposed,
// [C in][C out]. Channel counts are multiples of 8 with C/G in {1, 2, 4, 8, 16}.
#pragma once

#include <cstdint>

namespace msfin_cpu {

struct Source {
    const float* t = nullptr;
    const void* u = nullptr;       // null: nothing deferred
    const void* e1 = nullptr;
    const void* e2 = nullptr;
    const float* scale = nullptr;  // [N][C] channel-attention scale, with u
    bool bf16 = false;             // u, e1, e2 hold bf16 (else fp32)
};

struct Pass {
    Source src;
    int N = 0, H = 0, W = 0, C = 0, G = 0;
    const float* w1 = nullptr; const float* b1 = nullptr;
    const float* w2 = nullptr; const float* b2 = nullptr;
    const float* w3t = nullptr; const float* b3 = nullptr;
    float* x_out = nullptr;  // may be null
    void* u_out = nullptr;
    bool u_bf16 = false;     // u_out holds bf16 (else fp32)
};

// A dense conv as the engine's conv launches need it (NHWC in, several inputs read as one
// concatenation). Weights [k*k taps][cin total][K] with K GEMM outputs (a multiple of 8), bias [K].
// How the K outputs of conv pixel (y, x) are stored:
//   kPlain    out[n][y][x][k]                                   (out has K channels)
//   kShuffle  k = q*cout + c, q = 2i + j: out[n][2y+i][2x+j][c]  (a pixel shuffle by 2; a 2x2
//             stride-2 transposed conv is a 1x1 conv stored this way)
enum Store { kPlain = 0, kShuffle = 1 };
constexpr int kMaxParts = 4;

struct Conv {
    const float* part[kMaxParts] = {};
    int part_channels[kMaxParts] = {};
    int parts = 0, cin = 0;
    int N = 0, H = 0, W = 0;      // input
    int Ho = 0, Wo = 0;           // conv output grid
    int ksize = 3, stride = 1, K = 0, cout = 0, store = kPlain;
    bool leaky = false;
    const float* w = nullptr;
    const float* b = nullptr;
    void* out = nullptr;
    bool out_bf16 = false;  // out holds bf16 (else fp32)
};

// The tail: out[n][o][y][x] (NCHW, 3 channels) = b[o] + 3x3 conv (zero padding) of the finished
// source with w [3][C][3][3] (torch's layout).
struct Tail {
    Source src;
    int N = 0, H = 0, W = 0, C = 0;
    const float* w = nullptr;
    const float* b = nullptr;
    float* out = nullptr;
};

// The head: y = mean_w * bilinear(x, scale) + mean_b (align_corners=False; x NCHW, 3 channels,
// h x w; mean_w [3][3]), then out (NHWC, C channels, a multiple of 8) = b + 3x3 conv of y (zero
// padding) with wt [C][3][3][3] (torch's layout).
struct Head {
    const float* x = nullptr;
    int N = 0, h = 0, w = 0, scale = 4, C = 0;
    const float* mean_w = nullptr;
    const float* mean_b = nullptr;
    const float* wt = nullptr;
    const float* b = nullptr;
    float* out = nullptr;
};

// One piece of work: sample n, output rows [r0, r1), columns [c0, c1). Adds the piece's channel
// sums of u to sums[C] (double, owned by the caller). False: its row buffers could not be allocated.
struct Piece {
    int n, r0, r1, c0, c1;
};

#define MSFIN_DECLARE_ISA(ns)                                                                  \
    namespace ns {                                                                             \
    bool rrcab_piece(const Pass& p, const Piece& piece, double* sums);                         \
    bool tail_piece(const Tail& t, const Piece& piece);                                        \
    bool head_piece(const Head& h, const Piece& piece);                                        \
    void finish_rows(const Source& s, int C, int W, int64_t row0, int64_t rows, int64_t rows_per_sample, float* out); \
    void conv_rows(const Conv& c, int64_t row0, int64_t rows);                                 \
    int vector_width();                                                                        \
    }

MSFIN_DECLARE_ISA(avx512)
MSFIN_DECLARE_ISA(avx2)
MSFIN_DECLARE_ISA(portable)

}  // namespace msfin_cpu
