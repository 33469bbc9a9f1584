/* Branch-free float32 helpers that gcc and clang can vectorise (libm's tanhf,
 * expf, logf and sincosf are calls the compiler cannot vectorise): tanh, and
 * the Box-Muller transform behind the normal draws. Used by _kernels.pyx. */
#ifndef MNISTGAN_FASTMATH_H
#define MNISTGAN_FASTMATH_H
#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(x) for x in [-87, 0]: x = (k + f) ln 2 with integer k and f in [0, 1);
 * 2^f from its Taylor series to degree 8 (relative error < 1.1e-7, about
 * one float32 ulp); 2^k written straight into the exponent bits.
 * mg_exp2_parts takes t = x / ln 2 and k = floor(t). */
static inline float mg_exp2_parts(float t, float k) {
    float f = (t - k) * 0.6931471805599453f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f
              + f * (8.3333338e-3f + f * (1.3888889e-3f + f * (1.9841270e-4f + f * 2.4801587e-5f)))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float mg_exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float k = (float)(int32_t)t;          /* truncates toward zero ... */
    k = k > t ? k - 1.0f : k;             /* ... so step down for negatives: floor */
    return mg_exp2_parts(t, k);
}

/* tanh(x) to a few float32 ulps, from e = exp(-2|x|). Below 0.25 an odd
 * Taylor polynomial to x^9 (truncation below 0.2 ulp); above, (1 - e) / (1 + e),
 * where 1 - e magnifies e's rounding at most e / (1 - e) < 1.6 times. (The
 * switch at 0.0625 magnified it 8 times: 10 ulps without FMA contraction.) */
static inline float mg_tanh_from(float x, float e) {
    float a = fabsf(x);
    float a2 = a * a;
    float small = a * (1.0f + a2 * (-0.33333334f + a2 * (0.13333334f + a2 * (-0.053968254f
                  + a2 * 0.021869488f))));
    float large = (1.0f - e) / (1.0f + e);
    float r = a < 0.25f ? small : large;
    return x < 0 ? -r : r;
}

static inline float mg_tanhf(float x) {
    return mg_tanh_from(x, mg_exp_nonpositive(-2.0f * fabsf(x)));
}

/* log(u) for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)), and
 * log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, from its odd series
 * to s^9 (truncation below 1e-9; the result is good to a few float32 ulps). */
static inline float mg_log_unit(float u) {
    int32_t bits;
    memcpy(&bits, &u, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mbits = (bits & 0x007fffff) | 0x3f800000;   /* m in [1, 2) */
    float m;
    memcpy(&m, &mbits, sizeof m);
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    e = big ? e + 1 : e;
    float s = (m - 1.0f) / (m + 1.0f);
    float s2 = s * s;
    float series = 2.0f * s * (1.0f + s2 * (0.33333334f + s2 * (0.2f + s2 * (0.14285715f + s2 * 0.11111111f))));
    return (float)e * 0.6931471805599453f + series;
}

/* sin and cos of 2 pi u for u in [0, 1): 2 pi u = k pi/2 + r with integer k
 * and |r| <= pi/4; Taylor polynomials of sin r (to r^9) and cos r (to r^10),
 * then the quadrant k picks and signs them, branch-free. */
static inline void mg_sincos_2pi(float u, float *s_out, float *c_out) {
    float t = 4.0f * u;
    int32_t k = (int32_t)(t + 0.5f);                   /* nearest quadrant, 0..4 */
    float r = (t - (float)k) * 1.5707963267948966f;
    float r2 = r * r;
    float s = r * (1.0f + r2 * (-1.6666667e-1f + r2 * (8.3333338e-3f + r2 * (-1.9841270e-4f + r2 * 2.7557319e-6f))));
    float c = 1.0f + r2 * (-0.5f + r2 * (4.1666668e-2f + r2 * (-1.3888889e-3f + r2 * (2.4801587e-5f + r2 * -2.7557319e-7f))));
    int q = k & 3;
    float sin_v = (q == 0) ? s : (q == 1) ? c : (q == 2) ? -s : -c;
    float cos_v = (q == 0) ? c : (q == 1) ? -s : (q == 2) ? -c : s;
    *s_out = sin_v;
    *c_out = cos_v;
}

/* Box-Muller in float32: each 64-bit word gives two 24-bit uniforms,
 * u1 = (bits 9..31 + 1/2) / 2^23 in (0, 1) and u2 = (bits 40..63) / 2^24
 * in [0, 1) (both exact in float32), and from them the two standard normals
 * sqrt(-2 log u1) cos(2 pi u2) and sqrt(-2 log u1) sin(2 pi u2), written as
 * out[2i], out[2i + 1]. |z| <= 5.77 (u1 >= 2^-24): a tail cut with
 * probability below 1e-8 per draw. */
/* x86-64 wheels target the baseline ISA (SSE2); this loop runs 3x faster
 * with AVX2 and FMA, so gcc builds both and picks one at load time (an
 * ifunc: Linux/glibc only; elsewhere the baseline build alone). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
#define MG_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MG_CLONES
#endif

MG_CLONES static void mg_normal_pairs_f(const uint64_t *raw, float *out, long n_pairs) {
    /* The words read as 32-bit halves (low half first on little-endian
     * machines, as numpy's raw draws are read back in the tests): plain int32
     * lanes vectorise, 64-bit ones would not. */
    const uint32_t *half = (const uint32_t *)raw;
    for (long i = 0; i < n_pairs; i++) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        uint32_t lo = half[2 * i + 1], hi = half[2 * i];
#else
        uint32_t lo = half[2 * i], hi = half[2 * i + 1];
#endif
        float u1 = ((float)(int32_t)(lo >> 9) + 0.5f) * 1.1920928955078125e-7f;
        float u2 = (float)(int32_t)(hi >> 8) * 5.9604644775390625e-8f;
        float rad = sqrtf(-2.0f * mg_log_unit(u1));
        float s, c;
        mg_sincos_2pi(u2, &s, &c);
        out[2 * i] = rad * c;
        out[2 * i + 1] = rad * s;
    }
}

/* The same three steps in float64, with longer series: log m to s^21
 * (truncation below 3e-17), sin r to r^17 and cos r to r^18 (below 1e-19). */
static inline double mg_log_unit_d(double u) {
    int64_t bits;
    memcpy(&bits, &u, sizeof bits);
    int32_t e = (int32_t)((bits >> 52) & 0x7ff) - 1023;
    int64_t mbits = (bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL;
    double m;
    memcpy(&m, &mbits, sizeof m);
    int big = m > 1.4142135623730951;
    m = big ? 0.5 * m : m;
    e = big ? e + 1 : e;
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    static const double c[10] = {0.33333333333333331, 0.20000000000000001, 0.14285714285714285, 0.1111111111111111, 0.090909090909090912, 0.076923076923076927, 0.066666666666666666, 0.058823529411764705, 0.052631578947368418, 0.047619047619047616};
    double p = c[9];
    for (int k = 8; k >= 0; k--) p = c[k] + s2 * p;
    return (double)e * 0.6931471805599453 + 2.0 * s * (1.0 + s2 * p);
}

static inline void mg_sincos_2pi_d(double u, double *s_out, double *c_out) {
    double t = 4.0 * u;
    int32_t k = (int32_t)(t + 0.5);
    double r = (t - (double)k) * 1.5707963267948966;
    double r2 = r * r;
    static const double sc[8] = {-0.16666666666666666, 0.0083333333333333332, -0.00019841269841269841, 2.7557319223985893e-06, -2.505210838544172e-08, 1.6059043836821613e-10, -7.6471637318198164e-13, 2.8114572543455206e-15};
    static const double cc[9] = {-0.5, 0.041666666666666664, -0.0013888888888888889, 2.4801587301587302e-05, -2.7557319223985888e-07, 2.08767569878681e-09, -1.1470745597729725e-11, 4.7794773323873853e-14, -1.5619206968586225e-16};
    double ps = sc[7], pc = cc[8];
    for (int j = 6; j >= 0; j--) ps = sc[j] + r2 * ps;
    for (int j = 7; j >= 0; j--) pc = cc[j] + r2 * pc;
    double sn = r * (1.0 + r2 * ps);
    double cs = 1.0 + r2 * pc;
    int q = k & 3;
    *s_out = (q == 0) ? sn : (q == 1) ? cs : (q == 2) ? -sn : -cs;
    *c_out = (q == 0) ? cs : (q == 1) ? -sn : (q == 2) ? -cs : sn;
}

/* x < 2^52 as a double, exactly, without an int64 -> double conversion
 * (which AVX2 lacks): put x in the mantissa of 2^52, subtract 2^52. */
static inline double mg_u52_to_double(uint64_t x) {
    uint64_t bits = x | 0x4330000000000000ULL;
    double d;
    memcpy(&d, &bits, sizeof d);
    return d - 4503599627370496.0;
}

/* Box-Muller in float64, two words per pair: u1 = (raw[2i] >> 12 + 1/2) / 2^52,
 * u2 = (raw[2i + 1] >> 12) / 2^52 (|z| <= 8.5). */
MG_CLONES static void mg_normal_pairs_d(const uint64_t *raw, double *out, long n_pairs) {
    for (long i = 0; i < n_pairs; i++) {
        double u1 = (mg_u52_to_double(raw[2 * i] >> 12) + 0.5) * 2.220446049250313e-16;
        double u2 = mg_u52_to_double(raw[2 * i + 1] >> 12) * 2.220446049250313e-16;
        double rad = sqrt(-2.0 * mg_log_unit_d(u1));
        double sn, cs;
        mg_sincos_2pi_d(u2, &sn, &cs);
        out[2 * i] = rad * cs;
        out[2 * i + 1] = rad * sn;
    }
}
/* tanh over an array. `ivdep`: y may be x itself (the layers work in
 * place), which would otherwise send gcc's runtime overlap check to the
 * scalar loop; element i reads and writes only index i, so in place is safe. */
static void mg_tanh_array_base(const float *x, float *y, long n) {
#pragma GCC ivdep
    for (long i = 0; i < n; i++) y[i] = mg_tanhf(x[i]);
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__)
/* With AVX2 and FMA the same tanh runs 7x faster (measured: 47 against 344
 * us for 78,400 values), but only written with floorf, which SSE4.1 has as
 * one instruction: gcc 12 leaves the compare-and-step floor of
 * mg_exp_nonpositive as branches for that target, and the loop scalar. The
 * baseline keeps that floor, since floorf without SSE4.1 is a libm call.
 * Both floors are exact: the results differ only by FMA rounding. */
static inline float mg_tanhf_floor(float x) {
    float xe = -2.0f * fabsf(x);
    xe = xe < -87.0f ? -87.0f : xe;
    float t = xe * 1.4426950408889634f;
    return mg_tanh_from(x, mg_exp2_parts(t, __builtin_floorf(t)));
}

__attribute__((target("avx2,fma")))
static void mg_tanh_array_v3(const float *x, float *y, long n) {
#pragma GCC ivdep
    for (long i = 0; i < n; i++) y[i] = mg_tanhf_floor(x[i]);
}

static void mg_tanh_array_f(const float *x, float *y, long n) {
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        mg_tanh_array_v3(x, y, n);
    else
        mg_tanh_array_base(x, y, n);
}
#else
static void mg_tanh_array_f(const float *x, float *y, long n) { mg_tanh_array_base(x, y, n); }
#endif

/* Adam, built twice like the normal draws (AVX2 + FMA, and the baseline),
 * in PyTorch's update (single-tensor order): m = b1 m + (1 - b1) g,
 * v = b2 v + (1 - b2) g^2, p -= step_size m / (sqrt(v) inv_sqrt_bc2 + eps).
 * PyTorch divides sqrt(v) by sqrt(bc2); the multiply by its reciprocal is
 * the same to within one rounding and leaves one division per parameter,
 * which with the square root is what this loop's time is made of. */
#define MG_ADAM_BODY(T, SQRT)                                               \
    for (long i = 0; i < n; i++) {                                          \
        T gi = g[i];                                                        \
        T mi = b1 * m[i] + one_b1 * gi;                                     \
        T vi = b2 * v[i] + one_b2 * gi * gi;                                \
        m[i] = mi;                                                          \
        v[i] = vi;                                                          \
        p[i] -= step_size * mi / (SQRT(vi) * inv_sqrt_bc2 + eps);           \
    }

MG_CLONES static void mg_adam_f(float *p, const float *g, float *m, float *v, long n,
                                float step_size, float inv_sqrt_bc2, float b1, float b2,
                                float one_b1, float one_b2, float eps) {
    MG_ADAM_BODY(float, sqrtf)
}

MG_CLONES static void mg_adam_d(double *p, const double *g, double *m, double *v, long n,
                                double step_size, double inv_sqrt_bc2, double b1, double b2,
                                double one_b1, double one_b2, double eps) {
    MG_ADAM_BODY(double, sqrt)
}
#endif
