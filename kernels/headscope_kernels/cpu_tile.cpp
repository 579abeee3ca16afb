// The per-tile online-softmax step of headscope_kernels' CPU torch backend (see cpu_tile.py, which
// compiles this file once per machine and calls softmax_tile through ctypes).
// GCC/Clang vector extensions, no torch headers.
#include <cstdint>
#include <cstring>
#include <cmath>

typedef float vf __attribute__((vector_size(32)));      // 8 floats: one AVX register
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
static const int L = 8;

static inline vf splat(float x) { vf v = {x, x, x, x, x, x, x, x}; return v; }
static inline vf load(const float* x) { vf v; std::memcpy(&v, x, sizeof v); return v; }
static inline void store(float* x, vf v) { std::memcpy(x, &v, sizeof v); }
static inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m; return m; }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < L; ++i) s += v[i]; return s; }

// 2^x for x <= 0: x = n + f with n = round(x), |f| <= 1/2; 2^f = e^(f ln 2) by its Taylor series to
// degree 7 (truncation error < 1e-8 relative), then n added to the exponent bits.
// Exactly 0 below -125, where 2^x leaves the normal fp32 range.
static inline vf exp2v(vf x) {
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    vf xc = x < splat(-125.0f) ? splat(-125.0f) : x;
    vf t = xc + round_magic;
    vf n = t - round_magic;
    vf f = xc - n;
    vf y = splat(1.5252733804059840e-05f);                 // ln2^7 / 7!
    y = y * f + 1.5403530393381609e-04f;                   // ln2^6 / 6!
    y = y * f + 1.3333558146428443e-03f;                   // ln2^5 / 5!
    y = y * f + 9.6181291076284772e-03f;                   // ln2^4 / 4!
    y = y * f + 5.5504108664821580e-02f;                   // ln2^3 / 3!
    y = y * f + 2.4022650695910072e-01f;                   // ln2^2 / 2!
    y = y * f + 6.9314718055994531e-01f;                   // ln2
    y = y * f + 1.0f;
    vi ti, yi;
    std::memcpy(&ti, &t, sizeof t);
    std::memcpy(&yi, &y, sizeof y);
    vi n_int = ti - 0x4B400000;                            // bits of t minus bits of round_magic = n
    // n <= 0: shift the unsigned bits (defined for every value, unlike a signed left shift in
    // C++17); the wrap-around of the unsigned add is the two's-complement add of n * 2^23.
    yi = (vi)((vu)yi + ((vu)n_int << 23));
    std::memcpy(&y, &yi, sizeof y);
    return x < splat(-125.0f) ? splat(0.0f) : y;
}

// The last (m % 8) scores of a row, padded with `pad` to a full vector.
static inline vf load_tail(const float* x, int64_t count, float pad) {
    vf v = splat(pad);
    for (int64_t i = 0; i < count; ++i) v[i] = x[i];
    return v;
}

// One pass: p = 2^(x - shift) into y (y may be x), returns sum p and (ENT) sum p (x - shift).
template <bool ENT>
static inline void exp_row(const float* x, float* y, int64_t m, float shift, float pad,
                           float* l_out, float* h_out) {
    vf l = splat(0.0f), h = splat(0.0f);
    int64_t j = 0;
    for (; j + L <= m; j += L) {
        vf d = load(x + j) - shift;
        vf p = exp2v(d);
        store(y + j, p);
        l += p;
        if (ENT) h += p * d;
    }
    if (j < m) {
        vf d = load_tail(x + j, m - j, pad) - shift;
        vf p = exp2v(d);                                   // the padding gives p = 0
        for (int64_t i = 0; i < m - j; ++i) y[j + i] = p[i];
        l += p;
        if (ENT) h += p * d;
    }
    *l_out = hsum(l);
    *h_out = ENT ? hsum(h) : 0.0f;
}

// s, p: [rows, m] (p may be s); run_*, alpha, weight: [rows]; run_ent and best may be null.
// neg: running maxima start there and a row max at or below it means "no allowed key";
// masked: the value masked scores hold (also pads the row tails).
extern "C" void softmax_tile(const float* s, float* p, int64_t rows, int64_t m, int64_t ks,
                             float* run_max, float* run_sum, float* run_ent, int64_t* best,
                             float* alpha, float* weight, float neg, float masked) {
    for (int64_t r = 0; r < rows; ++r) {
        const float* x = s + r * m;
        vf mv = splat(masked);
        int64_t j = 0;
        for (; j + L <= m; j += L) {
            vf v = load(x + j);
            mv = v > mv ? v : mv;
        }
        float bmax = hmax(mv);
        for (; j < m; ++j) bmax = x[j] > bmax ? x[j] : bmax;
        float m_old = run_max[r];
        if (best && bmax > m_old) {                        // strict: earlier tiles keep ties
            int64_t i = 0;
            while (i < m - 1 && x[i] != bmax) ++i;          // first index holding the max
            best[r] = ks + i;
        }
        bool allowed = bmax > neg;                          // else every p is 2^masked = 0
        float shift = allowed ? bmax : 0.0f;
        float l_tile, h_tile;
        if (run_ent) exp_row<true>(x, p + r * m, m, shift, masked, &l_tile, &h_tile);
        else exp_row<false>(x, p + r * m, m, shift, masked, &l_tile, &h_tile);
        float m_new = bmax > m_old ? bmax : m_old;
        float a = std::exp2(m_old - m_new);
        float w = allowed ? std::exp2(bmax - m_new) : 0.0f;
        if (run_ent)
            run_ent[r] = a * (run_ent[r] + (m_old - m_new) * run_sum[r]) + w * (h_tile + l_tile * (bmax - m_new));
        run_sum[r] = run_sum[r] * a + w * l_tile;
        run_max[r] = m_new;
        alpha[r] = a;
        weight[r] = w;
    }
}
