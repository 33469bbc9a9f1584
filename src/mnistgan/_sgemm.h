/* float32 products of the dense layers with AVX-512, our own kernels for
 * the shapes where they beat BLAS here: the forward Y = bias + X W (X: a
 * batch of 25-100 rows), the weight gradient dW = X^T G (a sum over the
 * batch), both row-major with wide outputs, and the input gradient G W^T
 * when its sums are long (mg_sgemm_nt, below).
 *
 * Why not BLAS: OpenBLAS packs W into a buffer on every call, and here W is
 * cold (the training state outgrows the cache, see README "Speed"); this
 * kernel reads W once per 64-column strip, straight into registers, and
 * keeps the strip in L2 for all row blocks. Measured on the step's shapes
 * (1 thread, cold W): 11-35% faster than OpenBLAS 0.3.30's sgemm.
 *
 * Each y[r][c] is bias[c] followed by the multiply-adds over k in order, one
 * fused multiply-add each: the result does not depend on how the columns
 * are cut (a ForwardPlan's halves) or which thread runs them.
 *
 * Register tile: 6 rows x 4 vectors of 16 columns (24 accumulators); the
 * last vector of a strip is masked for n not a multiple of 16, and masked
 * lanes are neither read nor written. Built where GCC or Clang can target
 * AVX-512 on x86-64 Linux (not under AddressSanitizer, which does not know
 * masked loads); chosen at run time only if the CPU has AVX-512F. */
#ifndef MNISTGAN_SGEMM_H
#define MNISTGAN_SGEMM_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__) \
    && !defined(__SANITIZE_ADDRESS__)
#include <immintrin.h>
#include <stddef.h>
#define MG_OWN_SGEMM 1

#define MG_AVX512 __attribute__((target("avx512f")))

/* The loops over rows and vectors are unrolled (R and NV are constants at
 * every call), so that the accumulators live in registers: without the
 * pragmas GCC keeps the array in memory and stores it every iteration. */
static inline __attribute__((always_inline)) MG_AVX512
void mg_tile(const int R, const int NV, __mmask16 last, long k, const float *x, long sxr, long sxk,
             const float *w, long ldw, const float *bias, float *y, long ldy) {
    __m512 acc[6][4], wv[4];
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) {
        __m512 b = bias == NULL ? _mm512_setzero_ps()
                   : j == NV - 1 ? _mm512_maskz_loadu_ps(last, bias + 16 * j) : _mm512_loadu_ps(bias + 16 * j);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) acc[r][j] = b;
    }
    for (long kk = 0; kk < k; kk++) {
        const float *wk = w + kk * ldw;
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++)
            wv[j] = j == NV - 1 ? _mm512_maskz_loadu_ps(last, wk + 16 * j) : _mm512_loadu_ps(wk + 16 * j);
#pragma GCC unroll 6
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_set1_ps(x[r * sxr + kk * sxk]);
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) acc[r][j] = _mm512_fmadd_ps(a, wv[j], acc[r][j]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
        for (int j = 0; j < NV; j++) {
            if (j == NV - 1) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, last, acc[r][j]);
            else _mm512_storeu_ps(y + r * ldy + 16 * j, acc[r][j]);
        }
    }
}

#define MG_TILE_NV(R)                                                                   \
    switch (nv) {                                                                       \
    case 1: mg_tile(R, 1, last, k, x, sxr, sxk, w, ldw, bias, y, ldy); break;                \
    case 2: mg_tile(R, 2, last, k, x, sxr, sxk, w, ldw, bias, y, ldy); break;                \
    case 3: mg_tile(R, 3, last, k, x, sxr, sxk, w, ldw, bias, y, ldy); break;                \
    default: mg_tile(R, 4, last, k, x, sxr, sxk, w, ldw, bias, y, ldy); break;               \
    }

/* One tile of up to 6 rows and up to 64 columns (nv vectors, the last one masked). */
static MG_AVX512 void mg_tile_any(int rows, int nv, __mmask16 last, long k, const float *x, long sxr,
                                  long sxk, const float *w, long ldw, const float *bias, float *y,
                                  long ldy) {
    switch (rows) {
    case 1: MG_TILE_NV(1) break;
    case 2: MG_TILE_NV(2) break;
    case 3: MG_TILE_NV(3) break;
    case 4: MG_TILE_NV(4) break;
    case 5: MG_TILE_NV(5) break;
    default: MG_TILE_NV(6) break;
    }
}

/* y (m x n, rows ldy apart) = bias (n, or zeros if NULL) + x w, where
 * x (m x k) has element (i, kk) at x[i sxr + kk sxk]: sxr = ldx, sxk = 1
 * for x itself, sxr = 1, sxk = ldx for the transpose of a stored (k x m)
 * matrix (the weight gradient X^T G); w (k x n) rows ldw apart. */
static MG_AVX512 void mg_sgemm(long m, long n, long k, const float *x, long sxr, long sxk,
                               const float *w, long ldw, const float *bias, float *y, long ldy) {
    for (long c0 = 0; c0 < n; c0 += 64) {
        long cols = n - c0 < 64 ? n - c0 : 64;
        int nv = (int)((cols + 15) / 16);
        int tail = (int)(cols - 16 * (nv - 1));
        __mmask16 last = (__mmask16)(tail == 16 ? 0xFFFF : (1u << tail) - 1);
        for (long r0 = 0; r0 < m; r0 += 6) {
            int rows = m - r0 < 6 ? (int)(m - r0) : 6;
            mg_tile_any(rows, nv, last, k, x + r0 * sxr, sxr, sxk, w + c0, ldw, bias ? bias + c0 : NULL,
                        y + r0 * ldy + c0, ldy);
        }
    }
}

/* The input gradient G W^T: y[r][c] = sum_j g[r][j] w[c][j], both operands
 * read along their rows. Dot products: a tile of R rows of g and C rows of
 * w keeps R x C vector accumulators over 16-wide chunks of j (the last one
 * masked), then sums each accumulator's lanes. */
static inline __attribute__((always_inline)) MG_AVX512
void mg_dot_tile(const int R, const int C, long k, const float *g, long ldg, const float *w, long ldw,
                 float *y, long ldy) {
    __m512 acc[4][6], gv[4], wv;
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    long j = 0;
    for (; j + 16 <= k; j += 16) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) gv[r] = _mm512_loadu_ps(g + r * ldg + j);
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            wv = _mm512_loadu_ps(w + c * ldw + j);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(gv[r], wv, acc[r][c]);
        }
    }
    if (j < k) {
        __mmask16 m = (__mmask16)((1u << (k - j)) - 1);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) gv[r] = _mm512_maskz_loadu_ps(m, g + r * ldg + j);
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) {
            wv = _mm512_maskz_loadu_ps(m, w + c * ldw + j);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(gv[r], wv, acc[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 6
        for (int c = 0; c < C; c++) y[r * ldy + c] = _mm512_reduce_add_ps(acc[r][c]);
}

#define MG_DOT_C(R)                                                                     \
    switch (cs) {                                                                       \
    case 1: mg_dot_tile(R, 1, k, g, ldg, w, ldw, y, ldy); break;                        \
    case 2: mg_dot_tile(R, 2, k, g, ldg, w, ldw, y, ldy); break;                        \
    case 3: mg_dot_tile(R, 3, k, g, ldg, w, ldw, y, ldy); break;                        \
    case 4: mg_dot_tile(R, 4, k, g, ldg, w, ldw, y, ldy); break;                        \
    case 5: mg_dot_tile(R, 5, k, g, ldg, w, ldw, y, ldy); break;                        \
    default: mg_dot_tile(R, 6, k, g, ldg, w, ldw, y, ldy); break;                       \
    }

static MG_AVX512 void mg_dot_tile_any(int rs, int cs, long k, const float *g, long ldg, const float *w,
                                      long ldw, float *y, long ldy) {
    switch (rs) {
    case 1: MG_DOT_C(1) break;
    case 2: MG_DOT_C(2) break;
    case 3: MG_DOT_C(3) break;
    default: MG_DOT_C(4) break;
    }
}

/* y (m x n, rows ldy apart) = g (m x k, ldg) w^T, w (n x k, ldw). */
static MG_AVX512 void mg_sgemm_nt(long m, long n, long k, const float *g, long ldg, const float *w,
                                  long ldw, float *y, long ldy) {
    for (long c0 = 0; c0 < n; c0 += 6) {
        int cs = n - c0 < 6 ? (int)(n - c0) : 6;
        for (long r0 = 0; r0 < m; r0 += 4) {
            int rs = m - r0 < 4 ? (int)(m - r0) : 4;
            mg_dot_tile_any(rs, cs, k, g + r0 * ldg, ldg, w + c0 * ldw, ldw, y + r0 * ldy + c0, ldy);
        }
    }
}

static int mg_own_sgemm_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

#else
#define MG_OWN_SGEMM 0
static void mg_sgemm(long m, long n, long k, const float *x, long sxr, long sxk, const float *w,
                     long ldw, const float *bias, float *y, long ldy) {
    (void)m; (void)n; (void)k; (void)x; (void)sxr; (void)sxk; (void)w; (void)ldw; (void)bias; (void)y;
    (void)ldy;
}
static void mg_sgemm_nt(long m, long n, long k, const float *g, long ldg, const float *w, long ldw,
                        float *y, long ldy) {
    (void)m; (void)n; (void)k; (void)g; (void)ldg; (void)w; (void)ldw; (void)y; (void)ldy;
}
static int mg_own_sgemm_available(void) { return 0; }
#endif

#endif
