/*
 * The linear-attention (Gated DeltaNet) layers' CPU kernels:
 *   gated_delta        the delta rule token by token, IN PLACE on states in the engine's
 *                      state pool (rows `slots[n]`, distinct): a decode step (one token per
 *                      sequence) or a prefill (packed sequences). The torch decode form
 *                      gathers the rows, computes new states and scatters them back (six
 *                      passes over a few MB per layer and step); here each state is read
 *                      and written once, and stays in cache across a prefill's tokens.
 *   conv1d_step        a decode step of the causal conv, in place in its pool.
 *   conv1d_prefill     the causal conv over packed sequences, from their states.
 * Math as kernels/gated_delta.py and kernels/conv1d.py (their pure-torch forms are the
 * reference). float32 math; `is_bf16` selects bf16 or float32 storage of the activations.
 * Parallel with OpenMP (torch's runtime). The Python wrappers check every shape and index.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#if defined(__SSE__)
#include <xmmintrin.h>
/* Flush-to-zero and denormals-are-zero on this thread; returns the previous MXCSR. */
static inline unsigned denormals_off(void) {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
    return csr;
}
static inline void denormals_restore(unsigned csr) { _mm_setcsr(csr); }
#else
static inline unsigned denormals_off(void) { return 0; }
static inline void denormals_restore(unsigned csr) { (void)csr; }
#endif

#define MAX_HEAD_DIM 512 /* = _MAX_HEAD_DIM in kernels/gated_delta.py */

/* The gated delta rule for value head h of sequence s, token by token over its tokens
   t0 .. t1 of the packed inputs, on its state S = pool[slots[s], h] (dk, dv) float32,
   updated in place. Per token:
       S *= exp(g);  mem = k^T S;  delta = beta * (v - mem);  S += k delta^T;  o = (scale q)^T S
   q, k (T, hk, dk) and v (T, hv, dv): tokens `*_stride` elements apart, heads contiguous
   within a token; value head h reads key head h / (hv / hk). q and k are float32 or bf16
   (`qk_bf16`), v and out (T, hv, dv) contiguous in the activations' dtype. g, beta (T, hv)
   float32 contiguous. The state stays in cache across the tokens (16 KB for 64 x 64 heads,
   64 KB for Qwen3.5's 128 x 128). */
static inline __attribute__((always_inline)) void delta_rule_span(
    const void *q, const void *k, const void *v, const float *g, const float *beta, float *S, void *out, int64_t t0,
    int64_t t1, int64_t h, int64_t kh, int64_t hv, int64_t dk, int64_t dv, int64_t q_stride, int64_t k_stride,
    int64_t v_stride, float scale, int qk_bf16, const int is_bf16) {
    float qq[MAX_HEAD_DIM], kk[MAX_HEAD_DIM], vv[MAX_HEAD_DIM], mem[MAX_HEAD_DIM], o[MAX_HEAD_DIM];
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t i = 0; i < dk; i++) {
            const int64_t qi = t * q_stride + kh * dk + i, ki = t * k_stride + kh * dk + i;
            qq[i] = (qk_bf16 ? bf16_to_f32(((const uint16_t *)q)[qi]) : ((const float *)q)[qi]) * scale;
            kk[i] = qk_bf16 ? bf16_to_f32(((const uint16_t *)k)[ki]) : ((const float *)k)[ki];
        }
        for (int64_t j = 0; j < dv; j++) {
            vv[j] = LD(v, t * v_stride + h * dv + j);
            mem[j] = 0.f;
            o[j] = 0.f;
        }
        const float decay = expf(g[t * hv + h]), b = beta[t * hv + h];
        for (int64_t i = 0; i < dk; i++) {
            float *row = S + i * dv;
            const float ki = kk[i];
            for (int64_t j = 0; j < dv; j++) {
                row[j] *= decay;
                mem[j] += ki * row[j];
            }
        }
        for (int64_t j = 0; j < dv; j++) vv[j] = b * (vv[j] - mem[j]); /* delta */
        for (int64_t i = 0; i < dk; i++) {
            float *row = S + i * dv;
            const float ki = kk[i], qi = qq[i];
            for (int64_t j = 0; j < dv; j++) {
                row[j] += ki * vv[j];
                o[j] += qi * row[j];
            }
        }
        for (int64_t j = 0; j < dv; j++) ST(out, (t * hv + h) * dv + j, o[j]);
    }
}

/* N sequences, sequence s spanning tokens cu[s] .. cu[s+1] (cu NULL: one token each, token s,
   the decode step). Parallel over (sequence, value head). */
static inline __attribute__((always_inline)) void gated_delta_impl(
    const void *q, const void *k, const void *v, const float *g, const float *beta, float *pool,
    const int64_t *slots, const int64_t *cu, void *out, int64_t n, int64_t hk, int64_t hv, int64_t dk, int64_t dv,
    int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale, int qk_bf16, int threads, const int is_bf16) {
    const int64_t heads_per_key = hv / hk;
#pragma omp parallel num_threads(threads)
    {
        /* A head that forgets fast (g < -87) decays its state by a denormal factor, and
           denormal arithmetic is ~40x slower: flush to zero here, whatever the caller's
           thread (and its OpenMP workers, which copy it only when created) has set. */
        const unsigned csr = denormals_off();
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < n * hv; item++) {
            const int64_t s = item / hv, h = item % hv;
            const int64_t t0 = cu ? cu[s] : s, t1 = cu ? cu[s + 1] : s + 1;
            delta_rule_span(q, k, v, g, beta, pool + (slots[s] * hv + h) * dk * dv, out, t0, t1, h, h / heads_per_key,
                            hv, dk, dv, q_stride, k_stride, v_stride, scale, qk_bf16, is_bf16);
        }
        denormals_restore(csr);
    }
}

void gated_delta(const void *q, const void *k, const void *v, const float *g, const float *beta, float *pool,
                 const int64_t *slots, const int64_t *cu, void *out, int64_t n, int64_t hk, int64_t hv, int64_t dk,
                 int64_t dv, int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale, int qk_bf16,
                 int is_bf16, int threads) {
    if (is_bf16)
        gated_delta_impl(q, k, v, g, beta, pool, slots, cu, out, n, hk, hv, dk, dv, q_stride, k_stride, v_stride,
                         scale, qk_bf16, threads, 1);
    else
        gated_delta_impl(q, k, v, g, beta, pool, slots, cu, out, n, hk, hv, dk, dv, q_stride, k_stride, v_stride,
                         scale, qk_bf16, threads, 0);
}

/* One causal depthwise conv step per sequence n and channel c, window state
   W = pool[slots[n], c] (K-1 previous inputs, oldest first), updated in place:
       y = sum_t w[c, t] * [W, x][t];  W = [W, x][1:];  out = silu(y) if `silu` else y
   x (N, C) rows `x_stride` apart; w (C, K) contiguous; pool (slots, C, K-1); out (N, C)
   contiguous. x, w, pool and out share the activations' dtype. */
static inline __attribute__((always_inline)) void conv1d_step_impl(const void *x, const void *w, void *pool,
                                                                   const int64_t *slots, void *out, int64_t n,
                                                                   int64_t channels, int64_t kw, int64_t x_stride,
                                                                   int silu, int threads, const int is_bf16) {
    const int64_t hist = kw - 1, block = 64;
    const int64_t blocks = (channels + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < n * blocks; item++) {
        const int64_t s = item / blocks, c0 = (item % blocks) * block;
        const int64_t c1 = c0 + block < channels ? c0 + block : channels;
        for (int64_t c = c0; c < c1; c++) {
            const int64_t base = (slots[s] * channels + c) * hist;
            const float xc = LD(x, s * x_stride + c);
            float y = LD(w, c * kw + hist) * xc;
            for (int64_t t = 0; t < hist; t++) y += LD(w, c * kw + t) * LD(pool, base + t);
            for (int64_t t = 0; t + 1 < hist; t++) {
                const float next = LD(pool, base + t + 1);
                ST(pool, base + t, next);
            }
            if (hist > 0) ST(pool, base + hist - 1, xc);
            if (silu) y = y / (1.f + expf(-y));
            ST(out, s * channels + c, y);
        }
    }
}

void conv1d_step(const void *x, const void *w, void *pool, const int64_t *slots, void *out, int64_t n,
                 int64_t channels, int64_t kw, int64_t x_stride, int silu, int is_bf16, int threads) {
    if (is_bf16) conv1d_step_impl(x, w, pool, slots, out, n, channels, kw, x_stride, silu, threads, 1);
    else conv1d_step_impl(x, w, pool, slots, out, n, channels, kw, x_stride, silu, threads, 0);
}

/* Prefill: the causal depthwise conv over N packed sequences, each continuing from its state.
   For token i of sequence s (tokens cu[s] .. cu[s+1]) and channel c, with the K-1 inputs
   before it read from the state where i < K-1:
       y = sum_t wt[t, c] * in(i - (K-1) + t),   out = silu(y) if `silu` else y
   x (T, C) rows `x_stride` apart; wt (K, C) the weight transposed, contiguous; state
   (N, C, K-1) or NULL for zeros; cu (N+1,) int64; out (T, C) contiguous; final (N, C, K-1)
   receives the last K-1 inputs of each sequence. All in the activations' dtype. */
static inline __attribute__((always_inline)) void conv1d_prefill_impl(const void *x, const void *wt,
                                                                      const void *state, const int64_t *cu,
                                                                      void *out, void *final, int64_t n,
                                                                      int64_t channels, int64_t kw, int64_t x_stride,
                                                                      int silu, int threads, const int is_bf16) {
    const int64_t hist = kw - 1, total = cu[n];
#pragma omp parallel num_threads(threads)
    {
        float acc[256];
        int64_t s = 0;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < total; t++) {
            while (cu[s + 1] <= t) s++; /* tokens are visited in order within a thread */
            const int64_t i = t - cu[s];
            for (int64_t c0 = 0; c0 < channels; c0 += 256) {
                const int64_t width = channels - c0 < 256 ? channels - c0 : 256;
                for (int64_t c = 0; c < width; c++) acc[c] = 0.f;
                for (int64_t tap = 0; tap < kw; tap++) {
                    const int64_t p = i - hist + tap; /* input position within the sequence */
                    const int64_t wrow = tap * channels + c0;
                    if (p >= 0) {
                        const int64_t xrow = (cu[s] + p) * x_stride + c0;
                        for (int64_t c = 0; c < width; c++) acc[c] += LD(wt, wrow + c) * LD(x, xrow + c);
                    } else if (state) {
                        const int64_t srow = (s * channels + c0) * hist + (hist + p);
                        for (int64_t c = 0; c < width; c++) acc[c] += LD(wt, wrow + c) * LD(state, srow + c * hist);
                    }
                }
                for (int64_t c = 0; c < width; c++) {
                    float y = acc[c];
                    if (silu) y = y / (1.f + expf(-y));
                    ST(out, t * channels + c0 + c, y);
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t sc = 0; sc < n * channels; sc++) {
            const int64_t seq = sc / channels, c = sc % channels, len = cu[seq + 1] - cu[seq];
            for (int64_t j = 0; j < hist; j++) {
                const int64_t p = len - hist + j;
                float v = 0.f;
                if (p >= 0) v = LD(x, (cu[seq] + p) * x_stride + c);
                else if (state) v = LD(state, sc * hist + (hist + p));
                ST(final, sc * hist + j, v);
            }
        }
    }
}

void conv1d_prefill(const void *x, const void *wt, const void *state, const int64_t *cu, void *out, void *final,
                    int64_t n, int64_t channels, int64_t kw, int64_t x_stride, int silu, int is_bf16, int threads) {
    if (is_bf16) conv1d_prefill_impl(x, wt, state, cu, out, final, n, channels, kw, x_stride, silu, threads, 1);
    else conv1d_prefill_impl(x, wt, state, cu, out, final, n, channels, kw, x_stride, silu, threads, 0);
}
