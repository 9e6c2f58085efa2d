/*
 * Fused elementwise ops for the CPU decode path. Each replaces several small torch ops (each
 * of which costs ~5-10 us of dispatch on its own), and works in place where the caller no
 * longer needs its input. float32 math; `is_bf16` selects bf16 or float32 storage.
 * Rows may be strided (a view into a fused projection): `stride` is in elements.
 * Parallel over rows with OpenMP (torch's runtime, see cpu_ext.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* The residual stream is float32 (massive activations of a few channels reach ~1e4, where
   bf16 keeps 3 significant digits): residual += x (if x is non-NULL), then
   out = rms_norm(residual) * weight, rounded to storage. x rows are `stride` apart; residual
   and out are contiguous (rows, dim); out may alias a contiguous x. weight is float32. */
static inline __attribute__((always_inline)) void add_rms_norm_impl(const void *x, float *residual, void *out,
                                                                    const float *w, int64_t rows, int64_t dim,
                                                                    int64_t stride, float eps, int threads,
                                                                    const int is_bf16) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float *res = residual + r * dim;
        float sumsq = 0.f;
        for (int64_t i = 0; i < dim; i++) {
            const float h = x ? res[i] + LD(x, r * stride + i) : res[i];
            res[i] = h;
            sumsq += h * h;
        }
        const float inv = 1.f / sqrtf(sumsq / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) ST(out, r * dim + i, res[i] * inv * w[i]);
    }
}

void add_rms_norm(const void *x, float *residual, void *out, const float *w, int64_t rows, int64_t dim, int64_t stride,
                  float eps, int is_bf16, int threads) {
    if (is_bf16) add_rms_norm_impl(x, residual, out, w, rows, dim, stride, eps, threads, 1);
    else add_rms_norm_impl(x, residual, out, w, rows, dim, stride, eps, threads, 0);
}

/* out[r, :] = silu(gate_up[r, :inter]) * gate_up[r, inter:] */
static inline __attribute__((always_inline)) void silu_mul_impl(const void *gu, void *out, int64_t rows, int64_t inter,
                                                                int threads, const int is_bf16) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < inter; i++) {
            const float g = LD(gu, r * 2 * inter + i), u = LD(gu, r * 2 * inter + inter + i);
            ST(out, r * inter + i, g / (1.f + expf(-g)) * u);
        }
    }
}

void silu_mul(const void *gu, void *out, int64_t rows, int64_t inter, int is_bf16, int threads) {
    if (is_bf16) silu_mul_impl(gu, out, rows, inter, threads, 1);
    else silu_mul_impl(gu, out, rows, inter, threads, 0);
}

/* Rotate-half RoPE in place on the first `rot` dims of every head of q and k.
   cos_sin: (max_positions, rot) float32 rows of [cos(p f_0..f_{rot/2-1}) | sin(...)]. The
   cos/sin factors are rounded to storage first, as the torch reference does. */
static inline __attribute__((always_inline)) void rope_impl(void *q, void *k, const int64_t *positions,
                                                            const float *cos_sin, int64_t tokens, int64_t hq,
                                                            int64_t hk, int64_t head_dim, int64_t rot, int64_t stride_q,
                                                            int64_t stride_k, int threads, const int is_bf16) {
    const int64_t half = rot / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *cs = cos_sin + positions[t] * rot;
        for (int64_t h = 0; h < hq + hk; h++) {
            void *base = h < hq ? q : k;
            const int64_t off = h < hq ? t * stride_q + h * head_dim : t * stride_k + (h - hq) * head_dim;
            for (int64_t i = 0; i < half; i++) {
                const float c = ROUND(cs[i]), s = ROUND(cs[half + i]);
                const float x1 = LD(base, off + i), x2 = LD(base, off + half + i);
                ST(base, off + i, x1 * c - x2 * s);
                ST(base, off + half + i, x2 * c + x1 * s);
            }
        }
    }
}

void rope(void *q, void *k, const int64_t *positions, const float *cos_sin, int64_t tokens, int64_t hq, int64_t hk,
          int64_t head_dim, int64_t rot, int64_t stride_q, int64_t stride_k, int is_bf16, int threads) {
    if (is_bf16) rope_impl(q, k, positions, cos_sin, tokens, hq, hk, head_dim, rot, stride_q, stride_k, threads, 1);
    else rope_impl(q, k, positions, cos_sin, tokens, hq, hk, head_dim, rot, stride_q, stride_k, threads, 0);
}

/* k_cache/v_cache rows at `slots` = this step's k/v rows (same dtype, rows of hk*head_dim). */
void write_kv(const void *k, const void *v, void *k_cache, void *v_cache, const int64_t *slots, int64_t tokens,
              int64_t width, int64_t stride_k, int64_t stride_v, int64_t elem_size, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (tokens > 64)
    for (int64_t t = 0; t < tokens; t++) {
        memcpy((char *)k_cache + slots[t] * width * elem_size, (const char *)k + t * stride_k * elem_size,
               (size_t)(width * elem_size));
        memcpy((char *)v_cache + slots[t] * width * elem_size, (const char *)v + t * stride_v * elem_size,
               (size_t)(width * elem_size));
    }
}

/* out[r] = the index of the largest value of row r of x (rows, cols), the first one on ties,
   like torch.argmax; NaNs are skipped (a row of only NaNs or -inf gives 0). */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
static inline __attribute__((always_inline)) int64_t argmax_row(const void *x, int64_t cols, const int is_bf16) {
    int64_t i = 0, best_i = 0;
    float best = -INFINITY;
#if defined(__AVX512F__)
    if (cols >= 16) {
        __m512 vbest = _mm512_set1_ps(-INFINITY);
        __m512i vbest_i = _mm512_setzero_si512(), vi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (; i + 16 <= cols; i += 16) {
            const __m512 v = is_bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                           _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i))), 16))
                                     : _mm512_loadu_ps((const float *)x + i);
            const __mmask16 greater = _mm512_cmp_ps_mask(v, vbest, _CMP_GT_OQ);
            vbest = _mm512_mask_mov_ps(vbest, greater, v);
            vbest_i = _mm512_mask_mov_epi32(vbest_i, greater, vi);
            vi = _mm512_add_epi32(vi, step);
        }
        float lanes[16];
        int32_t lane_i[16];
        _mm512_storeu_ps(lanes, vbest);
        _mm512_storeu_si512(lane_i, vbest_i);
        best_i = cols;
        for (int l = 0; l < 16; l++)
            if (lanes[l] > best || (lanes[l] == best && lane_i[l] < best_i)) best = lanes[l], best_i = lane_i[l];
        if (best_i == cols) best_i = 0;
    }
#endif
    for (; i < cols; i++) {
        const float v = LD(x, i);
        if (v > best) best = v, best_i = i;
    }
    return best_i;
}

void argmax_rows(const void *x, int64_t *out, int64_t rows, int64_t cols, int is_bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows > 1)
    for (int64_t r = 0; r < rows; r++)
        out[r] = is_bf16 ? argmax_row((const uint16_t *)x + r * cols, cols, 1) : argmax_row((const float *)x + r * cols, cols, 0);
}
