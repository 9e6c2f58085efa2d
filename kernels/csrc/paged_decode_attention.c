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
 * Work is shared out over `num_threads` OpenMP threads: whole sequences when there are enough
 * (at least 4 per thread), else (sequence, kv head) pairs. The bf16 passes prefetch the rows
 * they read next, which may lie in another block (the hardware prefetcher stops at block
 * boundaries): with a long context this is bound by memory, ~20-25% faster at 32-64 sequences.
 * The caller (ctypes) has released the Python lock.
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
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < ctx; t++) m = sc[t] > m ? sc[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < ctx; t++) {
            sc[t] = expf(sc[t] - m);
            sum += sc[t];
        }
        const float inv = 1.f / sum;
#pragma omp simd
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
/* bf16 with head_dim a multiple of 32, one (sequence, kv head) pair: the group's G query
   heads against the context's keys, 16 tokens at a time.

   pass 1   per 16-token tile: 16 vdpbf16ps accumulators (one per token), then one transposing
            reduction gives the 16 scores in one vector (no per-token horizontal sum)
   softmax  vectorised (expf through libmvec under -ffast-math)
   pass 2   out_g += p[g, t] * v_t with the (G x D) accumulators held in registers, tiled
            4 heads x 64 dims at a time */

/* Lane i of the result = the sum of v[i]'s 16 lanes (4 levels of shuffles and adds). */
static inline __m512 hsum16(const __m512 v[16]) {
    __m512 w[8], z[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: the lane's partial sums of v[4i .. 4i+3] */
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The cache row of context token t for kv head kvh (bf16 elements). */
static inline const uint16_t *cache_row(const uint16_t *cache, const int64_t *table, int64_t t, int64_t bs,
                                        int64_t Hkv, int64_t kvh, int64_t D) {
    return cache + ((table[t / bs] * bs + t % bs) * Hkv + kvh) * D;
}

/* scores (G, ctx) = scale * q_g . k_t for the group's query heads q (G, D). */
static void group_scores(const Job *job, const uint16_t *q, int64_t G, const int64_t *table, int64_t ctx,
                         int64_t kvh, float *restrict scores) {
    const int64_t D = job->head_dim, Hkv = job->num_kv_heads, bs = job->block_size, chunks = D / 32;
    const uint16_t *kc = (const uint16_t *)job->k_cache;
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
        const int64_t n = ctx - t0 < 16 ? ctx - t0 : 16;
        const uint16_t *rows[16];
        for (int64_t i = 0; i < 16; i++) rows[i] = cache_row(kc, table, t0 + (i < n ? i : 0), bs, Hkv, kvh, D);
        const __mmask16 keep = (__mmask16)((1u << n) - 1u);
        /* The next tile's rows may lie in another block: ask for them now, while this one computes. */
        for (int64_t i = 0; i < 16 && t0 + 16 + i < ctx; i++) {
            const char *next = (const char *)cache_row(kc, table, t0 + 16 + i, bs, Hkv, kvh, D);
            for (int64_t b = 0; b < 2 * D; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
        }
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *qp = q + g * D;
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; c++) {
                const __m512bh qv = (__m512bh)_mm512_loadu_si512(qp + 32 * c);
                for (int i = 0; i < 16; i++)
                    acc[i] = _mm512_dpbf16_ps(acc[i], qv, (__m512bh)_mm512_loadu_si512(rows[i] + 32 * c));
            }
            _mm512_mask_storeu_ps(scores + g * ctx + t0, keep, _mm512_mul_ps(hsum16(acc), scale));
        }
    }
}

/* out (GN heads of the group from g0, dims [16*j0, 16*(j0+JN))) = sum_t p[g, t] v_t.
   GN and JN are constants at every call site, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void group_values_tile(
    const Job *job, const int64_t *table, int64_t ctx, int64_t kvh, const float *restrict scores, int64_t g0,
    int64_t j0, uint16_t *out, const int GN, const int JN) {
    const int64_t D = job->head_dim, Hkv = job->num_kv_heads, bs = job->block_size;
    const uint16_t *vc = (const uint16_t *)job->v_cache;
    __m512 acc[4][4];
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < JN; j++) acc[g][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < ctx; t++) {
        const uint16_t *row = cache_row(vc, table, t, bs, Hkv, kvh, D) + 16 * j0;
        if (t + 8 < ctx) { /* likewise a few rows ahead */
            const char *ahead = (const char *)(cache_row(vc, table, t + 8, bs, Hkv, kvh, D) + 16 * j0);
            for (int b = 0; b < 32 * JN; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        }
        __m512 v[4];
        for (int j = 0; j < JN; j++)
            v[j] = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(row + 16 * j))), 16));
        for (int g = 0; g < GN; g++) {
            const __m512 p = _mm512_set1_ps(scores[(g0 + g) * ctx + t]);
            for (int j = 0; j < JN; j++) acc[g][j] = _mm512_fmadd_ps(p, v[j], acc[g][j]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < JN; j++)
            _mm256_storeu_si256((__m256i *)(out + (g0 + g) * D + 16 * (j0 + j)),
                                (__m256i)_mm512_cvtneps_pbh(acc[g][j]));
}

#define VALUES_TILE(GN, JN) group_values_tile(job, table, ctx, kvh, scores, g0, j0, out, GN, JN)
#define VALUES_TILE_J(GN)                  \
    switch (jn) {                          \
        case 4: VALUES_TILE(GN, 4); break; \
        case 3: VALUES_TILE(GN, 3); break; \
        case 2: VALUES_TILE(GN, 2); break; \
        default: VALUES_TILE(GN, 1); break;\
    }

static void group_avx512bf16(const Job *job, int64_t s, int64_t kvh, float *restrict scores) {
    const int64_t D = job->head_dim, H = job->num_heads, Hkv = job->num_kv_heads;
    const int64_t G = H / Hkv, ctx = job->context_lens[s], nvec = D / 16;
    const int64_t *table = job->tables + s * job->max_blocks;
    const uint16_t *q = (const uint16_t *)job->q + (s * H + kvh * G) * D;
    uint16_t *out = (uint16_t *)job->out + (s * H + kvh * G) * D;
    group_scores(job, q, G, table, ctx, kvh, scores);
    softmax_rows(scores, G, ctx);
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
        const int64_t gn = G - g0 < 4 ? G - g0 : 4;
        for (int64_t j0 = 0; j0 < nvec; j0 += 4) {
            const int64_t jn = nvec - j0 < 4 ? nvec - j0 : 4;
            switch (gn) {
                case 4: VALUES_TILE_J(4); break;
                case 3: VALUES_TILE_J(3); break;
                case 2: VALUES_TILE_J(2); break;
                default: VALUES_TILE_J(1); break;
            }
        }
    }
}
#undef VALUES_TILE_J
#undef VALUES_TILE
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
    /* With sequences enough to keep every thread busy, one thread takes all kv heads of a
       sequence in a row: their rows interleave in each cache block, so the lines one head's
       pass brings in are the next head's, still in L2. Fewer sequences: one (sequence, kv
       head) pair per item, so a single stream still uses every thread. */
    const int64_t per_item = num_seqs >= 4 * (int64_t)num_threads ? num_kv_heads : 1;
    const int64_t num_items = num_seqs * num_kv_heads / per_item;
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
        for (int64_t item = 0; item < num_items; item++) {
            if (failed) continue;
            for (int64_t part = 0; part < per_item; part++) {
                const int64_t pair = item * per_item + part;
                const int64_t s = pair / num_kv_heads, kvh = pair % num_kv_heads;
#if defined(__AVX512BF16__)
                if (is_bf16 && D % 32 == 0) {
                    group_avx512bf16(&job, s, kvh, scores);
                    continue;
                }
#endif
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
