// msfin_fast._cpu: the CPU kernels' Python binding, the choice of instruction set and the thread
// pool. Tensors arrive as addresses (the Python side, engine/backends/native.py, checks shapes,
// dtypes and contiguity before it calls), so the module needs neither torch's headers nor its
// libraries: it builds with g++ and pybind11 alone.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using namespace msfin_cpu;

namespace {

// ---- instruction set ----------------------------------------------------------------------------

struct Isa {
    const char* name;
    bool (*piece)(const Pass&, const Piece&, double*);
    void (*finish)(const Source&, int, int, int64_t, int64_t, int64_t, float*);
    void (*conv)(const Conv&, int64_t, int64_t);
    bool (*tail)(const Tail&, const Piece&);
    bool (*head)(const Head&, const Piece&);
    int (*width)();
};

const Isa kPortable{"portable", portable::rrcab_piece, portable::finish_rows, portable::conv_rows, portable::tail_piece, portable::head_piece, portable::vector_width};

std::vector<Isa> supported_isas() {
    std::vector<Isa> out;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#ifdef MSFIN_HAVE_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("avx512dq"))
        out.push_back({"avx512", avx512::rrcab_piece, avx512::finish_rows, avx512::conv_rows, avx512::tail_piece, avx512::head_piece, avx512::vector_width});
#endif
#ifdef MSFIN_HAVE_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        out.push_back({"avx2", avx2::rrcab_piece, avx2::finish_rows, avx2::conv_rows, avx2::tail_piece, avx2::head_piece, avx2::vector_width});
#endif
#endif
    out.push_back(kPortable);
    return out;
}

// The instruction sets this CPU and build support, best first (read once).
const std::vector<Isa>& isas_here() {
    static const std::vector<Isa> isas = supported_isas();
    return isas;
}

const Isa* g_isa = nullptr;

const Isa& isa() {
    if (!g_isa) {
        const char* forced = std::getenv("MSFIN_CPU_ISA");  // for tests: run a narrower variant
        g_isa = &isas_here().front();
        if (forced && *forced)
            for (const Isa& candidate : isas_here())
                if (candidate.name == std::string(forced)) g_isa = &candidate;
    }
    return *g_isa;
}

// ---- threads ------------------------------------------------------------------------------------
// Workers sleep on a condition variable between calls (no spinning); a call hands out items by an
// atomic counter and the calling thread works too. The caller does not wait for a worker that has
// not woken yet: once its own loop finds no item left it closes the call, waits only for the
// workers that joined, and a worker waking later finds the call closed and sleeps again. (Waking
// a sleeping core costs ~90 us on the 2-core VM; waiting for it made every small call that long.)
// After a call a worker watches for the next one for kSpinMicros (0.2 ms) before it sleeps: the
// engine's launches come tens of microseconds apart, and a worker that has to be woken joins each
// of them ~90 us late. Idle for longer than that, no thread spins.

inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

class Pool {
public:
    static constexpr int kSpinMicros = 200;

    void run(int items, int threads, const std::function<void(int)>& fn) {
        threads = std::max(1, std::min(threads, items));
        if (threads == 1) {
            for (int i = 0; i < items; ++i) fn(i);
            return;
        }
        std::unique_lock<std::mutex> call(call_mutex_);  // one parallel region at a time
        grow(threads - 1);
        {
            std::lock_guard<std::mutex> lock(m_);
            fn_ = &fn;
            items_ = items;
            next_.store(0);
            helpers_ = threads - 1;
            open_ = true;
            active_ = 0;
            ++generation_;
        }
        cv_.notify_all();
        work();
        std::unique_lock<std::mutex> lock(m_);
        open_ = false;  // no worker joins from now on
        done_.wait(lock, [&] { return active_ == 0; });
        fn_ = nullptr;
    }

    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }

private:
    void work() {
        for (int i = next_.fetch_add(1); i < items_; i = next_.fetch_add(1)) (*fn_)(i);
    }

    void grow(int n) {
        while ((int)workers_.size() < n) {
            const int index = (int)workers_.size();
            workers_.emplace_back([this, index] { loop(index); });
        }
    }

    void loop(int index) {
        uint64_t seen = 0;
        for (;;) {
            // The next call usually comes within a few tens of microseconds (the engine's Python
            // between two launches): watch for it for kSpinMicros before sleeping, then sleep.
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
            while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
                pause();
            {
                std::unique_lock<std::mutex> lock(m_);
                cv_.wait(lock, [&] { return stop_ || (generation_.load() != seen && index < helpers_); });
                if (stop_) return;
                seen = generation_.load();
                if (!open_) continue;  // the call ended without this worker
                ++active_;
            }
            work();
            std::lock_guard<std::mutex> lock(m_);
            if (--active_ == 0) done_.notify_one();
        }
    }

    std::mutex call_mutex_, m_;
    std::condition_variable cv_, done_;
    std::vector<std::thread> workers_;
    const std::function<void(int)>* fn_ = nullptr;
    std::atomic<int> next_{0};
    int items_ = 0, helpers_ = 0, active_ = 0;
    bool open_ = false;
    std::atomic<uint64_t> generation_{0};
    bool stop_ = false;
};

Pool& pool() {
    static Pool* p = new Pool();  // never destroyed: workers may outlive interpreter shutdown order
    return *p;
}

template <typename T>
T* ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

// s[n][c] = sigmoid(W2 relu(W1 sums[n] / hw + b1) + b2); W1 [cr][C], W2 [C][cr].
std::vector<float> ca_scale(const float* sums, int N, int C, int cr, double hw, const float* w1, const float* b1,
                            const float* w2, const float* b2) {
    std::vector<float> scale((size_t)N * C);
    std::vector<float> z(cr);
    for (int n = 0; n < N; ++n) {
        for (int r = 0; r < cr; ++r) {
            double acc = b1[r];
            for (int c = 0; c < C; ++c) acc += (double)w1[r * C + c] * (sums[n * C + c] / hw);
            z[r] = acc > 0 ? (float)acc : 0.0f;
        }
        for (int c = 0; c < C; ++c) {
            double acc = b2[c];
            for (int r = 0; r < cr; ++r) acc += (double)w2[c * cr + r] * z[r];
            scale[(size_t)n * C + c] = (float)(1.0 / (1.0 + std::exp(-acc)));
        }
    }
    return scale;
}

struct CaArgs {
    uintptr_t sums, w1, b1, w2, b2;
    int cr;
};

Source make_source(uintptr_t t, uintptr_t u, uintptr_t e1, uintptr_t e2, const std::vector<float>& scale,
                   bool bf16) {
    Source s;
    s.t = ptr<const float>(t);
    s.u = ptr<const void>(u);
    s.e1 = ptr<const void>(e1);
    s.e2 = ptr<const void>(e2);
    s.scale = u ? scale.data() : nullptr;
    s.bf16 = bf16;
    return s;
}

std::vector<float> scale_of(uintptr_t u, const CaArgs& ca, int N, int H, int W, int C) {
    if (!u) return {};
    return ca_scale(ptr<const float>(ca.sums), N, C, ca.cr, (double)H * W, ptr<const float>(ca.w1),
                    ptr<const float>(ca.b1), ptr<const float>(ca.w2), ptr<const float>(ca.b2));
}

// Sample x band x strip pieces: bands of band_rows rows, strips of tile_cols columns.
std::vector<Piece> cut(int N, int H, int W, int tile_cols, int band_rows) {
    const int tw = std::max(1, std::min(tile_cols, W));
    const int strips = (W + tw - 1) / tw;
    const int bh = std::max(1, std::min(band_rows, H));
    const int bands = (H + bh - 1) / bh;
    std::vector<Piece> pieces;
    for (int n = 0; n < N; ++n)
        for (int b = 0; b < bands; ++b)
            for (int s = 0; s < strips; ++s)
                pieces.push_back({n, b * bh, std::min(H, (b + 1) * bh), s * tw, std::min(W, (s + 1) * tw)});
    return pieces;
}

// fn(i) for every piece on the pool; a piece that could not allocate its row buffers (fn false)
// is a MemoryError in Python.
template <typename F>
void run_pieces(const std::vector<Piece>& pieces, int threads, F&& fn) {
    std::atomic<bool> failed{false};
    {
        py::gil_scoped_release release;
        pool().run((int)pieces.size(), threads, [&](int i) {
            if (!fn(i)) failed.store(true);
        });
    }
    if (failed.load()) throw std::bad_alloc();
}

void rrcab_pass(uintptr_t t, uintptr_t u, uintptr_t e1, uintptr_t e2, CaArgs ca, uintptr_t x_out, uintptr_t u_out,
                uintptr_t sums_out, uintptr_t w1, uintptr_t b1, uintptr_t w2, uintptr_t b2, uintptr_t w3t,
                uintptr_t b3, int N, int H, int W, int C, int G, int threads, int tile_cols, int band_rows,
                bool addends_bf16, bool u_bf16) {
    std::vector<float> scale = scale_of(u, ca, N, H, W, C);
    Pass p;
    p.src = make_source(t, u, e1, e2, scale, addends_bf16);
    p.N = N, p.H = H, p.W = W, p.C = C, p.G = G;
    p.w1 = ptr<const float>(w1), p.b1 = ptr<const float>(b1);
    p.w2 = ptr<const float>(w2), p.b2 = ptr<const float>(b2);
    p.w3t = ptr<const float>(w3t), p.b3 = ptr<const float>(b3);
    p.x_out = ptr<float>(x_out);
    p.u_out = ptr<void>(u_out);
    p.u_bf16 = u_bf16;

    const std::vector<Piece> pieces = cut(N, H, W, tile_cols, band_rows);
    std::vector<double> partial(pieces.size() * (size_t)C, 0.0);
    const Isa& chosen = isa();
    run_pieces(pieces, threads, [&](int i) { return chosen.piece(p, pieces[i], partial.data() + (size_t)i * C); });
    // The sums in a fixed order whatever the threads did: the result does not depend on timing.
    float* sums = ptr<float>(sums_out);
    for (int n = 0; n < N; ++n)
        for (int c = 0; c < C; ++c) {
            double acc = 0;
            for (size_t i = 0; i < pieces.size(); ++i)
                if (pieces[i].n == n) acc += partial[i * C + c];
            sums[n * C + c] += (float)acc;
        }
}

// Rows [0, rows) in about 4 chunks per thread, each chunk one item.
template <typename F>
void parallel_rows(int64_t rows, int threads, F&& fn) {
    const int64_t chunk = std::max<int64_t>(1, (rows + 4 * threads - 1) / (4 * threads));
    const int items = (int)((rows + chunk - 1) / chunk);
    py::gil_scoped_release release;
    pool().run(items, threads, [&](int i) {
        const int64_t r0 = i * chunk;
        fn(r0, std::min(chunk, rows - r0));
    });
}

void materialize(uintptr_t t, uintptr_t u, uintptr_t e1, uintptr_t e2, CaArgs ca, uintptr_t out, int N, int H,
                 int W, int C, int threads, bool addends_bf16) {
    std::vector<float> scale = scale_of(u, ca, N, H, W, C);
    const Source s = make_source(t, u, e1, e2, scale, addends_bf16);
    const Isa& chosen = isa();
    parallel_rows((int64_t)N * H, threads,
                  [&](int64_t r0, int64_t rows) { chosen.finish(s, C, W, r0, rows, H, ptr<float>(out)); });
}

void conv(std::vector<uintptr_t> parts, std::vector<int> channels, int N, int H, int W, int Ho, int Wo, int ksize,
          int stride, int K, int cout, int store, bool leaky, uintptr_t w, uintptr_t b, uintptr_t out, int threads,
          bool out_bf16) {
    if (parts.empty() || parts.size() > (size_t)kMaxParts || parts.size() != channels.size())
        throw std::invalid_argument("conv: 1 to 4 inputs, each with its channel count");
    Conv c;
    c.parts = (int)parts.size();
    for (int k = 0; k < c.parts; ++k) {
        if (channels[k] < 1 || channels[k] > 1024) throw std::invalid_argument("conv: 1 to 1024 channels per input");
        c.part[k] = ptr<const float>(parts[k]);
        c.part_channels[k] = channels[k];
        c.cin += channels[k];
    }
    if (K % 8) throw std::invalid_argument("conv: K must be a multiple of 8");
    if (store != kPlain && store != kShuffle) throw std::invalid_argument("conv: store must be 0 (plain) or 1 (shuffle)");
    c.N = N, c.H = H, c.W = W, c.Ho = Ho, c.Wo = Wo, c.ksize = ksize, c.stride = stride, c.K = K, c.cout = cout;
    c.store = store, c.leaky = leaky;
    c.w = ptr<const float>(w), c.b = ptr<const float>(b), c.out = ptr<void>(out), c.out_bf16 = out_bf16;
    const Isa& chosen = isa();
    parallel_rows((int64_t)N * Ho, threads, [&](int64_t r0, int64_t rows) { chosen.conv(c, r0, rows); });
}

void tail(uintptr_t t, uintptr_t u, uintptr_t e1, uintptr_t e2, CaArgs ca, uintptr_t w, uintptr_t b, uintptr_t out,
          int N, int H, int W, int C, int threads, int tile_cols, int band_rows, bool addends_bf16) {
    std::vector<float> scale = scale_of(u, ca, N, H, W, C);
    Tail tl;
    tl.src = make_source(t, u, e1, e2, scale, addends_bf16);
    tl.N = N, tl.H = H, tl.W = W, tl.C = C;
    tl.w = ptr<const float>(w), tl.b = ptr<const float>(b), tl.out = ptr<float>(out);
    const std::vector<Piece> pieces = cut(N, H, W, tile_cols, band_rows);
    const Isa& chosen = isa();
    run_pieces(pieces, threads, [&](int i) { return chosen.tail(tl, pieces[i]); });
}

void head(uintptr_t x, int N, int h, int w, int scale, uintptr_t mean_w, uintptr_t mean_b, uintptr_t wt, uintptr_t b,
          int C, uintptr_t out, int threads, int tile_cols, int band_rows) {
    if (C % 8) throw std::invalid_argument("head: the output channels must be a multiple of 8");
    Head hd;
    hd.x = ptr<const float>(x), hd.N = N, hd.h = h, hd.w = w, hd.scale = scale, hd.C = C;
    hd.mean_w = ptr<const float>(mean_w), hd.mean_b = ptr<const float>(mean_b);
    hd.wt = ptr<const float>(wt), hd.b = ptr<const float>(b), hd.out = ptr<float>(out);
    const std::vector<Piece> pieces = cut(N, h * scale, w * scale, tile_cols, band_rows);
    const Isa& chosen = isa();
    run_pieces(pieces, threads, [&](int i) { return chosen.head(hd, pieces[i]); });
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
    m.doc() = "msfin_fast's CPU kernels (fp32 compute, NHWC; addends optionally stored in bf16)";
    py::class_<CaArgs>(m, "CaArgs")
        .def(py::init<uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, int>(), py::arg("sums"), py::arg("w1"),
             py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("cr"));
    m.def("rrcab_pass", &rrcab_pass,
          "one RRCAB pass (addresses of NHWC tensors, 0 for none; u, e1, e2 bf16 with addends_bf16, u_out with u_bf16)");
    m.def("materialize", &materialize, "out = t + s*u + e1 + e2 (addresses of NHWC tensors; out fp32)");
    m.def("conv", &conv, "a dense conv (addresses of fp32 NHWC inputs; see kernels.h for K and the stores; out bf16 with out_bf16)");
    m.def("tail", &tail, "the tail: a 3x3 conv C->3 of a deferred value, NCHW fp32 out");
    m.def("head", &head, "the head: bilinear upsampling of an NCHW RGB image, sub_mean, a 3x3 conv 3->C; NHWC out");
    m.def("isa", [] { return std::string(isa().name); }, "the instruction set the kernels run with");
    m.def("vector_width", [] { return isa().width(); }, "floats per vector of the kernels in use");
    m.def("use_isa", [](const std::string& name) {
        isa();
        for (const Isa& candidate : isas_here())
            if (candidate.name == name) {
                const std::string before = g_isa->name;
                g_isa = &candidate;
                return before;
            }
        throw std::invalid_argument("instruction set " + name + " is not supported here");
    }, "run the kernels with the named instruction set (from isas()); returns the one used before");
    m.def("isas", [] {
        std::vector<std::string> names;
        for (const Isa& i : isas_here()) names.push_back(i.name);
        return names;
    }, "the instruction sets this CPU and this build support, best first");
}
