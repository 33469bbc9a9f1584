/* Branch-free float32 helpers that gcc and clang can vectorise (libm's tanhf
 * and expf are calls the compiler cannot vectorise). Used by _kernels.pyx. */
#ifndef MNISTGAN_FASTMATH_H
#define MNISTGAN_FASTMATH_H
#include <stdint.h>
#include <string.h>

/* exp(x) for x in [-87, 0]: x = (k + f) ln 2 with integer k and f in [0, 1);
 * 2^f from its Taylor series to degree 8 (relative error < 1.1e-7, about
 * one float32 ulp); 2^k written straight into the exponent bits. */
static inline float mg_exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.4426950408889634f;
    float k = (float)(int32_t)t;          /* truncates toward zero ... */
    k = k > t ? k - 1.0f : k;             /* ... so step down for negatives: floor */
    float f = (t - k) * 0.6931471805599453f;
    float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f
              + f * (8.3333338e-3f + f * (1.3888889e-3f + f * (1.9841270e-4f + f * 2.4801587e-5f)))))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* tanh(x) to a few float32 ulps. Near 0 an odd Taylor polynomial (no
 * cancellation); elsewhere (1 - e) / (1 + e) with e = exp(-2|x|). */
static inline float mg_tanhf(float x) {
    float a = x < 0 ? -x : x;
    float a2 = a * a;
    float small = a * (1.0f + a2 * (-0.33333334f + a2 * (0.13333334f + a2 * -0.053968254f)));
    float e = mg_exp_nonpositive(-2.0f * a);
    float large = (1.0f - e) / (1.0f + e);
    float r = a < 0.0625f ? small : large;
    return x < 0 ? -r : r;
}
#endif
