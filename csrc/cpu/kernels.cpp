// One RRCAB pass on the CPU, streamed row by row over a column strip (see kernels.h for the
// contract). Compiled once per instruction set (MSFIN_ISA: avx512, avx2, portable); the same
// source, so every variant computes the same thing with wider or narrower vectors.
//
// A piece (sample n, rows [r0, r1), columns [c0, c1)) walks its rows top to bottom. Inside it the
// activations are planar per row ([channel][column], so a vector holds V neighbouring pixels of
// one channel and every multiply-add of a grouped conv is useful) in three small rings:
//   x  rows y-1, y, y+1 of the finished input, columns c0-2 .. c1+2   (3 rows)
//   a  rows y-1, y, y+1 of conv1's output,     columns c0-1 .. c1+1   (3 rows)
//   h  row y of conv2's output,                 columns c0   .. c1
// Each input row is finished once (t + s*u + e1 + e2, written to x_out where the piece owns it),
// each conv1 row computed once; only the two halo columns each side and the two rows above a band
// are computed twice. The 1x1 conv reads h planar and writes u in NHWC directly (a vector holds 8
// channels of one pixel), adding its channel sums in the same loop.
// No templates from the standard library here: this file is compiled once per instruction set into
// one module, and an out-of-line instance of, say, std::vector<float> would be a weak symbol the
// linker shares between the variants, so the portable code could end up calling AVX-512 code.
#include <cstdlib>
#include <cstring>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "kernels.h"

#ifndef MSFIN_ISA
#error "build with -DMSFIN_ISA=avx512|avx2|portable"
#endif

#define MSFIN_CAT2(a, b) a##b
#define MSFIN_CAT(a, b) MSFIN_CAT2(a, b)
#define MSFIN_ISA_avx512 1
#define MSFIN_ISA_avx2 2
#define MSFIN_ISA_portable 3
#define MSFIN_ISA_ID MSFIN_CAT(MSFIN_ISA_, MSFIN_ISA)

namespace msfin_cpu {
namespace MSFIN_ISA {
namespace {

#if MSFIN_ISA_ID == 1
constexpr int V = 16;  // floats per vector (zmm)
constexpr int R = 4;   // vectors of pixels per register block (32 registers: 4x4 accumulators)
#elif MSFIN_ISA_ID == 2
constexpr int V = 8;   // ymm, 16 registers: 4x2 accumulators, 2 inputs, 1 weight (4x3 spilled)
constexpr int R = 2;
#else
constexpr int V = 4;   // SSE2 / NEON
constexpr int R = 2;
#endif

typedef float vf __attribute__((vector_size(V * 4)));
typedef float vfu __attribute__((vector_size(V * 4), aligned(4)));  // unaligned access
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

inline vf loadu(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void storeu(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }
inline void store8(float* p, v8 x) { *reinterpret_cast<v8u*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }
inline v8 splat8(float x) { return v8{} + x; }
inline vf relu(vf x) { return x > 0 ? x : vf{}; }

// bf16 storage (the engine's bfloat16 mode): 8 values are widened to fp32 on load (a bf16 is the
// top half of an fp32) and rounded to nearest even on store. Integer arithmetic only, so every
// instruction set has it; nothing here needs the CPU's own bf16 instructions.
typedef unsigned short v8h __attribute__((vector_size(16)));
typedef unsigned short v8hu __attribute__((vector_size(16), aligned(2)));
typedef unsigned int v8w __attribute__((vector_size(32)));
typedef unsigned short bf16_t;

// The bf16 that x rounds to (nearest, ties to even), in the low 16 bits of each lane.
inline v8w bf16_bits(v8 x) {
    v8w b = (v8w)x;
    b += 0x7FFFu + ((b >> 16) & 1u);
    return b >> 16;
}
#if defined(__AVX2__)
// GCC lowers the generic widening to two 128-bit zero-extensions and an insert, and the
// narrowing to a masked pack: one vpmovzxwd (the load folded in) and an unmasked pack instead.
inline v8 load8_bf16(const bf16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return (v8)_mm256_slli_epi32(w, 16);
}
inline void store8_bf16(bf16_t* p, v8 x) {
    const __m256i r = (__m256i)bf16_bits(x);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // qwords 0, 2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
inline v8 load8_bf16(const bf16_t* p) {
    const v8w w = __builtin_convertvector(*reinterpret_cast<const v8hu*>(p), v8w) << 16;
    return (v8)w;
}
inline void store8_bf16(bf16_t* p, v8 x) { *reinterpret_cast<v8hu*>(p) = __builtin_convertvector(bf16_bits(x), v8h); }
#endif
// 8 values at element `at` of an fp32 (BF false) or bf16 (BF true) array.
template <bool BF>
inline v8 load8_any(const void* base, size_t at) {
    return BF ? load8_bf16(static_cast<const bf16_t*>(base) + at) : load8(static_cast<const float*>(base) + at);
}
template <bool BF>
inline void store8_any(void* base, size_t at, v8 x) {
    if (BF)
        store8_bf16(static_cast<bf16_t*>(base) + at, x);
    else
        store8(static_cast<float*>(base) + at, x);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// out[o][q .. q + RR*V) for outputs o = o0 .. o0+OB of a 3x3 conv over the input channels
// i0 .. i0+cin (a group, or all of them): b[o] + the sum over those channels and the taps, ReLU'd
// when RELU. Weights as torch stores them, [out][cin][3][3]. rows[ky] point at column 0 of the
// three planar input rows ([channel][column], s_in floats per channel); input column q + kx feeds
// output column q (the input row starts one column further left than the output row). CIN > 0
// fixes cin at compile time (the grouped convs: 1 to 16 channels per group, loops unrolled).
template <int OB, int RR, bool RELU, int CIN = 0>
inline void conv3_block(const float* const* rows, int s_in, int cin_any, int i0, int o0, const float* w,
                        const float* b, float* out, int s_out, int q) {
    const int cin = CIN > 0 ? CIN : cin_any;
    vf acc[OB][RR];
    for (int o = 0; o < OB; ++o)
        for (int r = 0; r < RR; ++r) acc[o][r] = splat(b[o0 + o]);
    for (int i = 0; i < cin; ++i) {
        for (int ky = 0; ky < 3; ++ky) {
            const float* src = rows[ky] + (size_t)(i0 + i) * s_in + q;
            for (int kx = 0; kx < 3; ++kx) {
                vf x[RR];
                for (int r = 0; r < RR; ++r) x[r] = loadu(src + kx + r * V);
                for (int o = 0; o < OB; ++o) {
                    const float wv = w[((o0 + o) * cin + i) * 9 + ky * 3 + kx];
                    for (int r = 0; r < RR; ++r) acc[o][r] += wv * x[r];
                }
            }
        }
    }
    for (int o = 0; o < OB; ++o)
        for (int r = 0; r < RR; ++r)
            storeu(out + (size_t)(o0 + o) * s_out + q + r * V, RELU ? relu(acc[o][r]) : acc[o][r]);
}

template <int CPG>
void gconv_row(const float* const* rows, int s_in, int C, const float* w, const float* b, float* out,
               int s_out, int nq) {
    constexpr int OB = CPG < 4 ? CPG : 4;
    for (int g = 0; g < C / CPG; ++g) {
        for (int o0 = g * CPG; o0 < (g + 1) * CPG; o0 += OB) {
            int q = 0;
            for (; q + R * V <= nq; q += R * V)
                conv3_block<OB, R, true, CPG>(rows, s_in, CPG, g * CPG, o0, w, b, out, s_out, q);
            for (; q < nq; q += V) conv3_block<OB, 1, true, CPG>(rows, s_in, CPG, g * CPG, o0, w, b, out, s_out, q);
        }
    }
}

void gconv(int cpg, const float* const* rows, int s_in, int C, const float* w, const float* b, float* out,
           int s_out, int nq) {
    switch (cpg) {
        case 1: return gconv_row<1>(rows, s_in, C, w, b, out, s_out, nq);
        case 2: return gconv_row<2>(rows, s_in, C, w, b, out, s_out, nq);
        case 4: return gconv_row<4>(rows, s_in, C, w, b, out, s_out, nq);
        case 8: return gconv_row<8>(rows, s_in, C, w, b, out, s_out, nq);
        default: return gconv_row<16>(rows, s_in, C, w, b, out, s_out, nq);
    }
}

// u[px][ov0*8 ...] for PB pixels from h planar: u = b3 + sum_i h[i][px] * w3t[i][:], stored NHWC;
// the block's values are added to rowsum.
template <int OVB, int PB, bool UBF>
inline void pointwise_block(const float* h, int s_h, int C, const float* w3t, const float* b3, void* u,
                            int px, int ov0, v8* rowsum) {
    v8 acc[PB][OVB];
    for (int v = 0; v < OVB; ++v) {
        const v8 bias = load8(b3 + (ov0 + v) * 8);
        for (int p = 0; p < PB; ++p) acc[p][v] = bias;
    }
    for (int i = 0; i < C; ++i) {
        v8 wv[OVB];
        for (int v = 0; v < OVB; ++v) wv[v] = load8(w3t + (size_t)i * C + (ov0 + v) * 8);
        const float* hi = h + (size_t)i * s_h + px;
        for (int p = 0; p < PB; ++p) {
            const float hv = hi[p];
            for (int v = 0; v < OVB; ++v) acc[p][v] += hv * wv[v];
        }
    }
    for (int p = 0; p < PB; ++p)
        for (int v = 0; v < OVB; ++v) {
            store8_any<UBF>(u, (size_t)(px + p) * C + (ov0 + v) * 8, acc[p][v]);
            rowsum[ov0 + v] += acc[p][v];
        }
}

template <int OVB, bool UBF>
void pointwise_row(const float* h, int s_h, int C, const float* w3t, const float* b3, void* u, int width,
                   v8* rowsum) {
    constexpr int PB = 12 / OVB;  // 12 accumulators
    for (int ov0 = 0; ov0 < C / 8; ov0 += OVB) {
        int px = 0;
        for (; px + PB <= width; px += PB) pointwise_block<OVB, PB, UBF>(h, s_h, C, w3t, b3, u, px, ov0, rowsum);
        for (; px < width; ++px) pointwise_block<OVB, 1, UBF>(h, s_h, C, w3t, b3, u, px, ov0, rowsum);
    }
}

// u for one row (NHWC from element `at`), the block size the channel count fills best.
void pointwise(const float* h, int s_h, int C, const float* w3t, const float* b3, void* u, size_t at, bool bf16,
               int width, v8* rowsum) {
    const bool threes = (C / 8) % 3 == 0;
    if (bf16) {
        bf16_t* ub = static_cast<bf16_t*>(u) + at;
        threes ? pointwise_row<3, true>(h, s_h, C, w3t, b3, ub, width, rowsum)
               : pointwise_row<2, true>(h, s_h, C, w3t, b3, ub, width, rowsum);
    } else {
        float* uf = static_cast<float*>(u) + at;
        threes ? pointwise_row<3, false>(h, s_h, C, w3t, b3, uf, width, rowsum)
               : pointwise_row<2, false>(h, s_h, C, w3t, b3, uf, width, rowsum);
    }
}

// The finished input for npx pixels (NHWC, C channels) from element `at`: into dst, and into xo
// when given. Specialised on which addends there are and how they are stored (BF: bf16), so the
// loop has no branches. The sum is fp32 whatever the addends are stored in.
template <bool U, bool E1, bool E2, bool BF>
void finish_span(const Source& s, size_t at, const float* scale, int C, int npx, float* dst, float* xo) {
    const float* t = s.t + at;
    size_t j = 0;
    for (int px = 0; px < npx; ++px)
        for (int c = 0; c < C; c += 8, j += 8) {
            v8 x = load8(t + j);
            if (U) x += load8(scale + c) * load8_any<BF>(s.u, at + j);
            if (E1) x += load8_any<BF>(s.e1, at + j);
            if (E2) x += load8_any<BF>(s.e2, at + j);
            store8(dst + j, x);
            if (xo) store8(xo + j, x);
        }
}

typedef void (*Finish)(const Source&, size_t, const float*, int, int, float*, float*);

template <bool BF>
Finish finisher_of(int k) {
    switch (k) {
        case 0: return finish_span<false, false, false, BF>;
        case 1: return finish_span<true, false, false, BF>;
        case 2: return finish_span<false, true, false, BF>;
        case 3: return finish_span<true, true, false, BF>;
        case 4: return finish_span<false, false, true, BF>;
        case 5: return finish_span<true, false, true, BF>;
        case 6: return finish_span<false, true, true, BF>;
        default: return finish_span<true, true, true, BF>;
    }
}

Finish finisher(const Source& s) {
    const int k = (s.u ? 1 : 0) | (s.e1 ? 2 : 0) | (s.e2 ? 4 : 0);
    return s.bf16 ? finisher_of<true>(k) : finisher_of<false>(k);
}

#if defined(__clang__)
#define MSFIN_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define MSFIN_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// r[i][k] (pixel i, channel k) → r[k][i] (channel k, pixel i), in registers.
inline void transpose8(v8* r) {
    v8 t[8], s[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = MSFIN_SHUFFLE(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = MSFIN_SHUFFLE(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4) {
        s[i] = MSFIN_SHUFFLE(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        s[i + 1] = MSFIN_SHUFFLE(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        s[i + 2] = MSFIN_SHUFFLE(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        s[i + 3] = MSFIN_SHUFFLE(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int k = 0; k < 4; ++k) {
        r[k] = MSFIN_SHUFFLE(s[k], s[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        r[k + 4] = MSFIN_SHUFFLE(s[k], s[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}

// A per-thread buffer that grows and is kept: zeroed when (re)allocated, so lanes past a row's end
// stay finite.
struct Scratch {
    float* buf = nullptr;
    size_t size = 0;
    float* get(size_t n) {
        if (size < n) {
            std::free(buf);
            buf = static_cast<float*>(std::calloc(n, sizeof(float)));
            size = buf ? n : 0;
        }
        return buf;
    }
    ~Scratch() { std::free(buf); }
};
thread_local Scratch scratch;

inline int mod3(int y) { return ((y % 3) + 3) % 3; }

// Rows of a finished source (t + s*u + e1 + e2) for one strip: columns c0-2 .. c1+2 of sample n,
// planar ([channel][column], sx floats per channel), zero outside the image. Each row's pixels
// inside the image are finished into xrow (NHWC, a contiguous span of the source; x_out, when
// given, gets the part in rows [r0, r1) and columns [c0, c1)), then transposed 8x8 at a time.
struct FinishedRows {
    const Source& src;
    Finish finish;
    const float* scale;
    int n, H, W, C, c0, c1, nx, sx;
    float* xrow;  // nx * C floats
    float* x_out;
    int r0, r1;

    void make(int y, float* xr) const {
        if (y < 0 || y >= H) {
            for (int c = 0; c < C; ++c) std::memset(xr + (size_t)c * sx, 0, sizeof(float) * nx);
            return;
        }
        const int tw = c1 - c0;
        const int lo = c0 - 2 < 0 ? 0 : c0 - 2, hi = c1 + 2 > W ? W : c1 + 2;
        const size_t row_at = (size_t)(n * H + y) * W;
        float* dst = xrow + (size_t)(lo - (c0 - 2)) * C;
        // zero padding: the pixels left and right of the image (another strip may have left values)
        std::memset(xrow, 0, sizeof(float) * C * (lo - (c0 - 2)));
        std::memset(xrow + (size_t)(hi - (c0 - 2)) * C, 0, sizeof(float) * C * (nx - (hi - (c0 - 2))));
        if (x_out && y >= r0 && y < r1) {
            finish(src, (row_at + lo) * C, scale, C, c0 - lo, dst, nullptr);
            finish(src, (row_at + c0) * C, scale, C, tw, dst + (size_t)(c0 - lo) * C, x_out + (row_at + c0) * C);
            finish(src, (row_at + c1) * C, scale, C, hi - c1, dst + (size_t)(c1 - lo) * C, nullptr);
        } else {
            finish(src, (row_at + lo) * C, scale, C, hi - lo, dst, nullptr);
        }
        for (int q = 0; q < nx; q += 8)
            for (int c = 0; c < C; c += 8) {
                v8 r[8];
                for (int i = 0; i < 8; ++i) r[i] = load8(xrow + (size_t)(q + i) * C + c);
                transpose8(r);
                for (int k = 0; k < 8; ++k) store8(xr + (size_t)(c + k) * sx + q, r[k]);
            }
    }
};

// Outputs o0 .. o0+OB of a dense 3x3 conv (cin inputs, no activation) over columns [0, nq), nq a
// multiple of V: the head's and the tail's.
template <int OB>
void dense_row(const float* const* rows, int s_in, int cin, int o0, const float* w, const float* b, float* out,
               int s_out, int nq) {
    constexpr int RR = OB * (R + 1) <= (V == 8 ? 9 : 4 * R) ? R + 1 : R;  // accumulators the registers hold
    int q = 0;
    for (; q + RR * V <= nq; q += RR * V) conv3_block<OB, RR, false>(rows, s_in, cin, 0, o0, w, b, out, s_out, q);
    for (; q < nq; q += V) conv3_block<OB, 1, false>(rows, s_in, cin, 0, o0, w, b, out, s_out, q);
}

}  // namespace

int vector_width() { return V; }

void finish_rows(const Source& s, int C, int W, int64_t row0, int64_t rows, int64_t rows_per_sample, float* out) {
    const Finish finish = finisher(s);
    for (int64_t row = row0; row < row0 + rows; ++row) {
        const float* scale = s.scale ? s.scale + (row / rows_per_sample) * C : nullptr;
        const size_t base = (size_t)row * W * C;
        finish(s, base, scale, C, W, out + base, nullptr);
    }
}

bool rrcab_piece(const Pass& p, const Piece& piece, double* sums) {
    const int C = p.C, H = p.H, W = p.W, cpg = p.C / p.G;
    const int n = piece.n, r0 = piece.r0, r1 = piece.r1, c0 = piece.c0, c1 = piece.c1;
    const int tw = c1 - c0;
    const int na = round_up(tw + 2, V), nh = round_up(tw, V), nx = round_up(tw + 4, 8);
    // floats per channel row: the +V for reads past the end, nx for the 8-wide transposes
    const int sx = na + V > nx ? na + V : nx, sa = na + V, sh = nh;
    float* base = scratch.get((size_t)3 * C * sx + (size_t)3 * C * sa + (size_t)C * sh + (size_t)nx * C);
    if (!base) return false;  // out of memory: the caller raises
    float* xring = base;
    float* aring = xring + (size_t)3 * C * sx;
    float* hrow = aring + (size_t)3 * C * sa;
    float* xrow = hrow + (size_t)C * sh;  // one finished input row, NHWC; pixels outside the image stay 0
    const Finish finish = finisher(p.src);
    const float* scale = p.src.scale ? p.src.scale + (size_t)n * C : nullptr;
    auto xslot = [&](int y) { return xring + (size_t)mod3(y) * C * sx; };
    auto aslot = [&](int y) { return aring + (size_t)mod3(y) * C * sa; };

    const FinishedRows rows_of{p.src, finish, scale, n, H, W, C, c0, c1, nx, sx, xrow, p.x_out, r0, r1};
    auto make_x = [&](int y) { rows_of.make(y, xslot(y)); };
    auto make_a = [&](int y) {  // conv1 row y, columns c0-1 .. c1+1 (zero outside the image)
        float* ar = aslot(y);
        if (y < 0 || y >= H) {
            for (int c = 0; c < C; ++c) std::memset(ar + (size_t)c * sa, 0, sizeof(float) * (tw + 2));
            return;
        }
        const float* rows[3] = {xslot(y - 1), xslot(y), xslot(y + 1)};
        gconv(cpg, rows, sx, C, p.w1, p.b1, ar, sa, na);
        if (c0 == 0)
            for (int c = 0; c < C; ++c) ar[(size_t)c * sa] = 0.0f;
        if (c1 == W)
            for (int c = 0; c < C; ++c) ar[(size_t)c * sa + tw + 1] = 0.0f;
    };

    v8 rowsum[16];
    for (int y = r0 - 2; y <= r0; ++y) make_x(y);
    make_a(r0 - 1);  // reads x rows r0-2 .. r0
    make_x(r0 + 1);  // takes r0-2's slot
    make_a(r0);
    for (int y = r0; y < r1; ++y) {
        make_x(y + 2);
        make_a(y + 1);
        const float* rows[3] = {aslot(y - 1), aslot(y), aslot(y + 1)};
        gconv(cpg, rows, sa, C, p.w2, p.b2, hrow, sh, nh);
        for (int v = 0; v < C / 8; ++v) rowsum[v] = v8{};
        pointwise(hrow, sh, C, p.w3t, p.b3, p.u_out, ((size_t)(n * H + y) * W + c0) * C, p.u_bf16, tw, rowsum);
        for (int v = 0; v < C / 8; ++v)
            for (int k = 0; k < 8; ++k) sums[v * 8 + k] += rowsum[v][k];
    }
    return true;
}

bool tail_piece(const Tail& t, const Piece& piece) {
    const int C = t.C, H = t.H, W = t.W;
    const int n = piece.n, r0 = piece.r0, r1 = piece.r1, c0 = piece.c0, c1 = piece.c1;
    const int tw = c1 - c0;
    const int na = round_up(tw + 2, V), nh = round_up(tw, V), nx = round_up(tw + 4, 8);
    const int sx = na + V > nx ? na + V : nx;
    float* base = scratch.get((size_t)3 * C * sx + (size_t)3 * nh + (size_t)nx * C);
    if (!base) return false;
    float* xring = base;
    float* orow = xring + (size_t)3 * C * sx;
    float* xrow = orow + (size_t)3 * nh;
    const float* scale = t.src.scale ? t.src.scale + (size_t)n * C : nullptr;
    const FinishedRows rows_of{t.src, finisher(t.src), scale, n, H, W, C, c0, c1, nx, sx, xrow, nullptr, 0, 0};
    // ring rows start at column c0-2; the conv's output column q reads input columns c0-1+q+kx
    auto xslot = [&](int y) { return xring + (size_t)mod3(y) * C * sx; };
    rows_of.make(r0 - 1, xslot(r0 - 1));
    rows_of.make(r0, xslot(r0));
    for (int y = r0; y < r1; ++y) {
        rows_of.make(y + 1, xslot(y + 1));
        const float* rows[3] = {xslot(y - 1) + 1, xslot(y) + 1, xslot(y + 1) + 1};
        dense_row<3>(rows, sx, C, 0, t.w, t.b, orow, nh, nh);
        for (int o = 0; o < 3; ++o)
            std::memcpy(t.out + ((size_t)(n * 3 + o) * H + y) * W + c0, orow + (size_t)o * nh, sizeof(float) * tw);
    }
    return true;
}

bool head_piece(const Head& hd, const Piece& piece) {
    const int C = hd.C, h = hd.h, w = hd.w, H = h * hd.scale, W = w * hd.scale;
    const int n = piece.n, r0 = piece.r0, r1 = piece.r1, c0 = piece.c0, c1 = piece.c1;
    const int tw = c1 - c0;
    const int nh = round_up(tw, V) > round_up(tw, 8) ? round_up(tw, V) : round_up(tw, 8);
    const int sy = nh + V + 2;  // floats per channel row of the upsampled image: columns c0-1 .. c0+nh+V
    float* base = scratch.get((size_t)3 * 3 * sy + (size_t)C * nh);
    if (!base) return false;
    float* yring = base;
    float* orow = yring + (size_t)3 * 3 * sy;
    auto yslot = [&](int y) { return yring + (size_t)mod3(y) * 3 * sy; };
    const float inv = 1.0f / hd.scale;
    const float* img = hd.x + (size_t)n * 3 * h * w;
    // Row Y of sub_mean(upsampled image), planar, columns c0-1 .. (zero outside the image).
    auto make_y = [&](int Y) {
        float* yr = yslot(Y);
        std::memset(yr, 0, sizeof(float) * 3 * sy);
        if (Y < 0 || Y >= H) return;
        float fy = (Y + 0.5f) * inv - 0.5f;
        if (fy < 0) fy = 0;
        const int y0 = (int)fy, y1 = y0 + (y0 < h - 1 ? 1 : 0);
        const float ly1 = fy - y0, ly0 = 1.0f - ly1;
        const int lo = c0 - 1 < 0 ? 0 : c0 - 1, hi = c1 + 1 > W ? W : c1 + 1;
        for (int X = lo; X < hi; ++X) {
            float fx = (X + 0.5f) * inv - 0.5f;
            if (fx < 0) fx = 0;
            const int x0 = (int)fx, x1 = x0 + (x0 < w - 1 ? 1 : 0);
            const float lx1 = fx - x0, lx0 = 1.0f - lx1;
            float v[3];
            for (int ch = 0; ch < 3; ++ch) {
                const float* plane = img + (size_t)ch * h * w;
                v[ch] = ly0 * (lx0 * plane[y0 * w + x0] + lx1 * plane[y0 * w + x1]) +
                        ly1 * (lx0 * plane[y1 * w + x0] + lx1 * plane[y1 * w + x1]);
            }
            const int q = X - (c0 - 1);
            for (int ch = 0; ch < 3; ++ch)
                yr[(size_t)ch * sy + q] = hd.mean_w[ch * 3 + 0] * v[0] + hd.mean_w[ch * 3 + 1] * v[1] +
                                          hd.mean_w[ch * 3 + 2] * v[2] + hd.mean_b[ch];
        }
    };
    make_y(r0 - 1);
    make_y(r0);
    for (int y = r0; y < r1; ++y) {
        make_y(y + 1);
        const float* rows[3] = {yslot(y - 1), yslot(y), yslot(y + 1)};
        for (int o0 = 0; o0 < C; o0 += 4) dense_row<4>(rows, sy, 3, o0, hd.wt, hd.b, orow, nh, nh);
        // planar [C][column] → NHWC, 8 pixels x 8 channels at a time
        float* out = hd.out + ((size_t)(n * H + y) * W + c0) * C;
        for (int q = 0; q < tw; q += 8)
            for (int c = 0; c < C; c += 8) {
                v8 r[8];
                for (int k = 0; k < 8; ++k) r[k] = load8(orow + (size_t)(c + k) * nh + q);
                transpose8(r);
                const int m = tw - q < 8 ? tw - q : 8;
                for (int i = 0; i < m; ++i) store8(out + (size_t)(q + i) * C + c, r[i]);
            }
    }
    return true;
}

}  // namespace MSFIN_ISA
}  // namespace msfin_cpu

// ---- dense convs -------------------------------------------------------------------------------
// Output pixels in blocks of PB along a row, GEMM outputs in blocks of OVB vectors of 8: for every
// tap and input channel, PB broadcasts of the input and OVB weight vectors feed PB*OVB
// accumulators. An input pixel outside the image reads a row of zeros instead (no branches).

namespace msfin_cpu {
namespace MSFIN_ISA {
namespace {

alignas(64) const float kZeros[1024] = {};

template <int OVB, int PB, int STORE, bool OBF>
inline void conv_block(const Conv& c, int n, int y, int x0, int ov0, size_t row_at) {
    v8 acc[PB][OVB];
    for (int v = 0; v < OVB; ++v) {
        const v8 bias = load8(c.b + (ov0 + v) * 8);
        for (int p = 0; p < PB; ++p) acc[p][v] = bias;
    }
    const int pad = c.ksize / 2;
    for (int ky = 0; ky < c.ksize; ++ky) {
        const int iy = y * c.stride + ky - pad;
        if (iy < 0 || iy >= c.H) continue;
        for (int kx = 0; kx < c.ksize; ++kx) {
            const float* wt = c.w + (size_t)(ky * c.ksize + kx) * c.cin * c.K + ov0 * 8;
            int cin0 = 0;
            for (int k = 0; k < c.parts; ++k) {
                const int ck = c.part_channels[k];
                const float* row = c.part[k] + (size_t)(n * c.H + iy) * c.W * ck;
                const float* xp[PB];
                for (int p = 0; p < PB; ++p) {
                    const int ix = (x0 + p) * c.stride + kx - pad;
                    xp[p] = (ix >= 0 && ix < c.W) ? row + (size_t)ix * ck : kZeros;
                }
                const float* wk = wt + (size_t)cin0 * c.K;
                for (int ci = 0; ci < ck; ++ci) {
                    v8 wv[OVB];
                    for (int v = 0; v < OVB; ++v) wv[v] = load8(wk + (size_t)ci * c.K + v * 8);
                    for (int p = 0; p < PB; ++p) {
                        const float xb = xp[p][ci];
                        for (int v = 0; v < OVB; ++v) acc[p][v] += xb * wv[v];
                    }
                }
                cin0 += ck;
            }
        }
    }
    for (int p = 0; p < PB; ++p)
        for (int v = 0; v < OVB; ++v) {
            v8 r = acc[p][v];
            if (c.leaky) r = r > 0 ? r : r * 0.2f;
            const int k = (ov0 + v) * 8;
            if (STORE == kShuffle) {  // 8 outputs of one sub-pixel q (cout is a multiple of 8)
                const int q = k / c.cout, co = k % c.cout;
                const size_t at = ((size_t)(n * 2 * c.Ho + 2 * y + (q >> 1)) * 2 * c.Wo + 2 * (x0 + p) + (q & 1));
                store8_any<OBF>(c.out, at * c.cout + co, r);
            } else {
                store8_any<OBF>(c.out, row_at + (size_t)(x0 + p) * c.K + k, r);
            }
        }
}

// OVB x PB = 12 accumulators (16 vector registers on AVX2: 12, the OVB weights and a broadcast;
// 8 when K is a single vector).
template <int OVB, int PB, int STORE, bool OBF>
void conv_row(const Conv& c, int n, int y, size_t row_at) {
    for (int ov0 = 0; ov0 < c.K / 8; ov0 += OVB) {
        int x = 0;
        for (; x + PB <= c.Wo; x += PB) conv_block<OVB, PB, STORE, OBF>(c, n, y, x, ov0, row_at);
        for (; x < c.Wo; ++x) conv_block<OVB, 1, STORE, OBF>(c, n, y, x, ov0, row_at);
    }
}

template <int STORE, bool OBF>
void conv_row_any(const Conv& c, int n, int y, size_t row_at) {
    const int vecs = c.K / 8;
    if (vecs % 3 == 0)
        conv_row<3, 4, STORE, OBF>(c, n, y, row_at);
    else if (vecs % 4 == 0)
        conv_row<4, 3, STORE, OBF>(c, n, y, row_at);
    else if (vecs % 2 == 0)
        conv_row<2, 6, STORE, OBF>(c, n, y, row_at);
    else
        conv_row<1, 8, STORE, OBF>(c, n, y, row_at);
}

template <bool OBF>
void conv_row_stored(const Conv& c, int n, int y, size_t row_at) {
    if (c.store == kShuffle)
        conv_row_any<kShuffle, OBF>(c, n, y, row_at);
    else
        conv_row_any<kPlain, OBF>(c, n, y, row_at);
}

}  // namespace

void conv_rows(const Conv& c, int64_t row0, int64_t rows) {
    for (int64_t r = row0; r < row0 + rows; ++r) {
        const int n = (int)(r / c.Ho), y = (int)(r % c.Ho);
        const size_t row_at = (size_t)r * c.Wo * c.K;  // the plain store's row
        if (c.out_bf16)
            conv_row_stored<true>(c, n, y, row_at);
        else
            conv_row_stored<false>(c, n, y, row_at);
    }
}

}  // namespace MSFIN_ISA
}  // namespace msfin_cpu
