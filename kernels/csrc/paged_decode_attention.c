/*
 * Paged decode attention on CPU: one query token per sequence attends over its cached
 * context, read block by block straight from the paged cache (no gather).
 *
 *   q        (num_seqs, num_heads, head_dim)
 *   k_cache  (num_blocks, block_size, num_kv_heads, head_dim)   likewise v_cache
 *   tables   (num_seqs, max_blocks) int64 block ids;  context_lens (num_seqs,) int64
 *   out      (num_seqs, num_heads, head_dim)
 *
 * Query head h reads kv head h / (num_heads / num_kv_heads). For each (sequence, kv head):
 *
 *   pass 1   scores[g, t] = scale * q_g . k_t      for the group's query heads g, tokens t
 *   softmax  per g, over t (max-subtracted, float32)
 *   pass 2   out_g = sum_t p[g, t] * v_t
 *
 * Everything accumulates in float32. With AVX512-BF16 (bf16 caches, head_dim % 32 == 0) the
 * dot products use vdpbf16ps; otherwise portable loops that the compiler vectorises.
 * (sequence, kv head) pairs are shared out over `num_threads` OpenMP threads; the caller
 * (ctypes) has released the Python lock.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

typedef struct {
    const void *q, *k_cache, *v_cache;
    const int64_t *tables, *context_lens;
    void *out;
    int64_t seq_begin, seq_end, max_blocks, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    int is_bf16;
} Job;

/* Row t of a sequence's keys (or values) for kv head `kvh`: an element offset into the cache. */
#define ROW(block, o) ((((block) * bs + (o)) * Hkv + kvh) * D)

static void softmax_rows(float *restrict scores, int64_t group, int64_t ctx) {
    for (int64_t g = 0; g < group; g++) {
        float *restrict sc = scores + g * ctx;
        float m = -FLT_MAX, sum = 0.f;
        for (int64_t t = 0; t < ctx; t++) m = sc[t] > m ? sc[t] : m;
        for (int64_t t = 0; t < ctx; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; t++) sc[t] *= inv;
    }
}

/* Portable path; `is_bf16` is a constant at each call site so each dtype gets its own loops. */
static inline __attribute__((always_inline)) void head_portable(const Job *job, int64_t s, int64_t kvh,
                                                                float *restrict scores, float *restrict qf,
                                                                float *restrict acc, float *restrict row,
                                                                const int is_bf16) {
    const int64_t D = job->head_dim, H = job->num_heads, Hkv = job->num_kv_heads, bs = job->block_size;
    const int64_t group = H / Hkv, ctx = job->context_lens[s];
    const int64_t *table = job->tables + s * job->max_blocks;
#define LOAD(ptr, i) (is_bf16 ? bf16_to_f32(((const uint16_t *)(ptr))[i]) : ((const float *)(ptr))[i])
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++) qf[g * D + d] = LOAD(job->q, (s * H + kvh * group + g) * D + d) * job->scale;
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs], n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int64_t o = 0; o < n; o++) {
            const int64_t base = ROW(block, o);
            for (int64_t d = 0; d < D; d++) row[d] = LOAD(job->k_cache, base + d);
            for (int64_t g = 0; g < group; g++) {
                float dot = 0.f;
                for (int64_t d = 0; d < D; d++) dot += qf[g * D + d] * row[d];
                scores[g * ctx + t0 + o] = dot;
            }
        }
    }
    softmax_rows(scores, group, ctx);
    memset(acc, 0, sizeof(float) * (size_t)(group * D));
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs], n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int64_t o = 0; o < n; o++) {
            const int64_t base = ROW(block, o);
            for (int64_t d = 0; d < D; d++) row[d] = LOAD(job->v_cache, base + d);
            for (int64_t g = 0; g < group; g++) {
                const float p = scores[g * ctx + t0 + o];
                for (int64_t d = 0; d < D; d++) acc[g * D + d] += p * row[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const int64_t o = (s * H + kvh * group + g) * D;
        for (int64_t d = 0; d < D; d++) {
            if (is_bf16) ((uint16_t *)job->out)[o + d] = f32_to_bf16(acc[g * D + d]);
            else ((float *)job->out)[o + d] = acc[g * D + d];
        }
    }
#undef LOAD
}

#if defined(__AVX512BF16__)
/* bf16 with head_dim a multiple of 32, one whole sequence (all heads): each cached row
   (num_kv_heads * head_dim contiguous values) is read once per pass. Pass 1 by vdpbf16ps,
   pass 2 by fp32 FMAs. scores: (num_heads, ctx); acc: (num_heads, head_dim). */
static void seq_avx512bf16(const Job *job, int64_t s, float *restrict scores, float *restrict acc) {
    const int64_t D = job->head_dim, H = job->num_heads, Hkv = job->num_kv_heads, bs = job->block_size;
    const int64_t group = H / Hkv, ctx = job->context_lens[s], chunks = D / 32;
    const int64_t *table = job->tables + s * job->max_blocks;
    const uint16_t *q = (const uint16_t *)job->q + s * H * D;
    const uint16_t *kc = (const uint16_t *)job->k_cache, *vc = (const uint16_t *)job->v_cache;
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs], n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int64_t o = 0; o < n; o++) {
            const uint16_t *row = kc + (block * bs + o) * Hkv * D;
            for (int64_t h = 0; h < H; h++) {
                const uint16_t *kp = row + (h / group) * D, *qp = q + h * D;
                __m512 sum = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++)
                    sum = _mm512_dpbf16_ps(sum, (__m512bh)_mm512_loadu_si512(qp + 32 * c),
                                           (__m512bh)_mm512_loadu_si512(kp + 32 * c));
                scores[h * ctx + t0 + o] = _mm512_reduce_add_ps(sum) * job->scale;
            }
        }
    }
    softmax_rows(scores, H, ctx);
    memset(acc, 0, sizeof(float) * (size_t)(H * D));
    for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t block = table[t0 / bs], n = ctx - t0 < bs ? ctx - t0 : bs;
        for (int64_t o = 0; o < n; o++) {
            const uint16_t *row = vc + (block * bs + o) * Hkv * D;
            for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                for (int64_t j = 0; j < D / 16; j++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + kvh * D + 16 * j));
                    const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
                    for (int64_t g = 0; g < group; g++) {
                        const int64_t h = kvh * group + g;
                        float *a = acc + h * D + 16 * j;
                        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[h * ctx + t0 + o]), v, _mm512_loadu_ps(a)));
                    }
                }
            }
        }
    }
    uint16_t *out = (uint16_t *)job->out + s * H * D;
    for (int64_t i = 0; i < H * D; i++) out[i] = f32_to_bf16(acc[i]);
}
#endif

int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *tables,
                           const int64_t *context_lens, void *out, int64_t num_seqs, int64_t max_blocks,
                           int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                           float scale, int is_bf16, int num_threads) {
    const Job job = {q, k_cache, v_cache, tables, context_lens, out, 0, num_seqs, max_blocks,
                     num_heads, num_kv_heads, head_dim, block_size, scale, is_bf16};
    const int64_t D = head_dim, group = num_heads / num_kv_heads;
    int64_t max_ctx = 1;
    for (int64_t s = 0; s < num_seqs; s++)
        if (context_lens[s] > max_ctx) max_ctx = context_lens[s];
    int failed = 0;
    /* torch's OpenMP runtime is already loaded in the process, so this reuses its threads
       instead of competing with them (two pools spinning on two cores halve both). */
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(num_heads * max_ctx));
        float *qf = malloc(sizeof(float) * (size_t)(group * D));
        float *acc = malloc(sizeof(float) * (size_t)(num_heads * D));
        float *row = malloc(sizeof(float) * (size_t)D);
        if (!scores || !qf || !acc || !row) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < num_seqs; s++) {
            if (failed) continue;
#if defined(__AVX512BF16__)
            if (is_bf16 && D % 32 == 0) {
                seq_avx512bf16(&job, s, scores, acc);
                continue;
            }
#endif
            for (int64_t kvh = 0; kvh < num_kv_heads; kvh++) {
                if (is_bf16) head_portable(&job, s, kvh, scores, qf, acc, row, 1);
                else head_portable(&job, s, kvh, scores, qf, acc, row, 0);
            }
        }
        free(scores);
        free(qf);
        free(acc);
        free(row);
    }
    return failed ? -1 : 0;
}
