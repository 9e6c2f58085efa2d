/*
 * y = x W^T (+ bias) in bf16 with AVX512-BF16 dot products (vdpbf16ps) on the plain row-major
 * weight W (N, K): the path for CPUs that have AVX512-BF16 but no AMX (AMD Zen 4, Intel Cooper
 * Lake). Same contract and signature as amx_linear.c; float32 accumulation, one rounding.
 *
 * A step computes a block of RN weight rows x RT tokens (RN x RT = 16 float32 accumulators of
 * 16 lanes): over K, 32 elements at a time (a masked load for the tail), acc[t][r] +=
 * pairwise dots of W[r][k..k+31] and x[t][k..k+31]. One reduction tree then folds the 16
 * accumulators into one vector, lane t * RN + r holding y[t][r], so each token's RN outputs
 * are adjacent:
 *
 *   RN x RT = 16 x 1 (one token), 8 x 2 (two), 4 x 4 (more; the token loop runs inside the
 *   row loop, so the RN rows of W stay in L1 across all tokens)
 *
 * Threads (OpenMP, torch's runtime) take contiguous ranges of row blocks: W is streamed once.
 * Rows past N and tokens past T in a block compute on a valid row and are not stored.
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define HAVE_AVX512_BF16 1
#include <immintrin.h>
#include <omp.h>
#endif

enum { LINEAR_OK = 0, LINEAR_UNAVAILABLE = -1 };

#ifdef HAVE_AVX512_BF16

#define ALWAYS static inline __attribute__((always_inline))

ALWAYS int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* s[q] = sum of the 16 lanes of v[q] (unpack/shuffle tree: 30 shuffles, 15 adds). */
ALWAYS __m512 sum16(const __m512 v[16]) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane L, element e: lane L's part of v[4i + e] */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

typedef struct {
    const uint16_t *x, *w, *bias;
    uint16_t *y;
    int64_t ldx, ldw, T, K, N;
} Args;

/* Rows n0..n0+RN-1 x tokens t0..t0+RT-1. */
ALWAYS void block(const Args *a, int64_t n0, int64_t t0, const int RN, const int RT) {
    const uint16_t *wr[16], *xr[4];
    for (int r = 0; r < RN; r++) wr[r] = a->w + min64(n0 + r, a->N - 1) * a->ldw;
    for (int t = 0; t < RT; t++) xr[t] = a->x + min64(t0 + t, a->T - 1) * a->ldx;
    __m512 acc[16];
    for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();
    for (int64_t k = 0; k < a->K; k += 32) {
        const __mmask32 m = a->K - k >= 32 ? ~0u : (1u << (a->K - k)) - 1;
        __m512bh xv[4];
        for (int t = 0; t < RT; t++) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, xr[t] + k);
        for (int r = 0; r < RN; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, wr[r] + k);
            for (int t = 0; t < RT; t++) acc[t * RN + r] = _mm512_dpbf16_ps(acc[t * RN + r], wv, xv[t]);
        }
    }
    __m512 s = sum16(acc); /* lane t * RN + r = y[t0 + t][n0 + r] */
    const int rows = (int)min64(RN, a->N - n0);
    if (a->bias) {
        const __m512 b = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << rows) - 1), a->bias + n0)), 16));
        s = _mm512_add_ps(s, RN == 16 ? b : _mm512_shuffle_f32x4(b, b, RN == 8 ? 0x44 : 0x00));
    }
    uint16_t out[16];
    _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(s));
    for (int t = 0; t < RT && t0 + t < a->T; t++) memcpy(a->y + (t0 + t) * a->N + n0, out + t * RN, sizeof(uint16_t) * rows);
}

/* Row blocks [b_begin, b_end) of RN rows, every token. */
ALWAYS void row_range(const Args *a, int64_t b_begin, int64_t b_end, const int RN, const int RT) {
    for (int64_t b = b_begin; b < b_end; b++)
        for (int64_t t0 = 0; t0 < a->T; t0 += RT) block(a, b * RN, t0, RN, RT);
}

#endif /* HAVE_AVX512_BF16 */

/* 0 when this build has the AVX512-BF16 kernel (compiled for a CPU that has it), else < 0. */
int avx512_linear_init(void) {
#ifdef HAVE_AVX512_BF16
    return LINEAR_OK;
#else
    return LINEAR_UNAVAILABLE;
#endif
}

/* As amx_linear: y (T, N) = x (T, K; rows ldx apart) . W^T (W (N, K), rows ldw apart) + bias
   (N, or NULL), bf16; y contiguous. Returns 0, or < 0 (y untouched) without AVX512-BF16. */
int avx512_linear(const void *x, int64_t ldx, const void *w, int64_t ldw, const void *bias, void *y, int64_t T,
                  int64_t K, int64_t N, int num_threads) {
#ifdef HAVE_AVX512_BF16
    if (T < 1 || N < 1) return LINEAR_OK;
    const Args a = {x, w, bias, y, ldx, ldw, T, K, N};
    const int RN = T == 1 ? 16 : T == 2 ? 8 : 4;
    const int64_t blocks = (N + RN - 1) / RN;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > blocks) num_threads = (int)blocks;
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
        const int64_t b_begin = blocks * tid / nth, b_end = blocks * (tid + 1) / nth;
        if (RN == 16) row_range(&a, b_begin, b_end, 16, 1);
        else if (RN == 8) row_range(&a, b_begin, b_end, 8, 2);
        else row_range(&a, b_begin, b_end, 4, 4);
    }
    return LINEAR_OK;
#else
    (void)x, (void)ldx, (void)w, (void)ldw, (void)bias, (void)y, (void)T, (void)K, (void)N, (void)num_threads;
    return LINEAR_UNAVAILABLE;
#endif
}
