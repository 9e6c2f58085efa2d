/*
 * y = x W^T (+ bias) in bf16 on Intel AMX, reading the weight W (N, K) in its plain row-major
 * layout exactly as the model stores it (and shares it with the trainer): no packed copy.
 * float32 accumulation, one rounding to bf16 at the end (round to nearest even, as torch).
 *
 * AMX computes C (16 x n) fp32 += A (16 x 32) bf16 . B (16 x 2n) bf16, where A is plain
 * row-major and B must hold pairs of k interleaved ("VNNI"). W is the big operand and is plain,
 * so it plays A: a 16 x 32 tile of W is loaded straight from W with stride K. x (small) plays
 * B as x^T, repacked once per call into VNNI tiles. A C tile is then 16 output features x 16
 * tokens; it is transposed on the way out.
 *
 *   W (N, K), A tiles in place          xp: x repacked, one 16 x 64-byte tile per
 *        k: 0    32   64                   (token tile j, k chunk c), tiles of one j contiguous
 *   n:  0 ┌────┬────┬──      row q of tile (j, c):
 *         │ A  │ A  │          x[16j][32c+2q] x[16j][32c+2q+1] x[16j+1][32c+2q] ... x[16j+15][32c+2q+1]
 *      16 ├────┼────┼──      (tokens past T are zero)
 *         │ A  │ A  │
 *
 *   C tile (16 features x 16 tokens) -> + bias -> transpose -> bf16 rows of y (T, N).
 *
 * Tails without reading outside W: the last k chunk starts at K - 32 and overlaps the one
 * before it; the overlapped k of its xp tile are zero, so they add nothing. Likewise the last
 * row tile starts at N - 16 and writes only its new rows. Only N < 16 (tiles of N rows) and
 * K < 32 (chunks of K columns, K even) shrink the tiles. T < 16 shrinks the token columns.
 *
 * Blocking: threads (OpenMP, torch's runtime: see cpu_ext.py) take contiguous ranges of row
 * tiles, so W is streamed once, in order, split between threads. At one token tile (T <= 16,
 * decode) a step is 4 row tiles x 1 token tile and the next 64 rows of W are prefetched
 * while this block computes: the call is bound by reading W. At more tokens a step is 2 row
 * tiles x 2 token tiles, and each 32-row block of W is reused from cache for every token tile
 * of a "token panel" (as many tokens as keep ~768 KB of xp in L2).
 *
 * The only scratch is xp, in per-thread buffers grown on demand (no allocation per call once
 * they have reached their size).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__linux__)
#define HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { AMX_OK = 0, AMX_UNAVAILABLE = -1, AMX_UNSUPPORTED_SHAPE = -2, AMX_NO_MEMORY = -3 };

#ifdef HAVE_AMX

#define ALWAYS static inline __attribute__((always_inline))
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define PANEL_BYTES (768 * 1024) /* xp bytes of one token panel (fits L2 beside a W block) */

static int amx_status = AMX_UNAVAILABLE;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

/* Linux hands out the (8 KB) tile state only to processes that ask for it; once per process. */
static void request_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return; /* TILE, BF16 */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
    unsigned long granted = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &granted) != 0) return;
    if (granted & (1ul << XFEATURE_XTILEDATA)) amx_status = AMX_OK;
}

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Tiles: 0-3 accumulators C, 4-5 weight tiles A, 6-7 token tiles B. */
typedef struct {
    const uint16_t *w, *bias;
    uint16_t *y;
    const uint8_t *xp;
    int64_t T, K, N, ldw;
    int64_t row_tiles, tok_tiles, chunks;
    int rows;           /* rows of an A / C tile: min(N, 16) */
    int kc;             /* k of an A tile: min(K, 32), even */
    int tc;             /* tokens of a B / C tile: min(T, 16) */
    int64_t tile_bytes; /* one xp tile: kc/2 rows of 4*tc bytes */
} Plan;

ALWAYS int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
ALWAYS int64_t row_start(const Plan *p, int64_t i) { return min64(16 * i, p->N - p->rows); }
ALWAYS int64_t k_start(const Plan *p, int64_t c) { return min64(32 * c, p->K - p->kc); }
ALWAYS uint32_t low_bits(int n) { return n >= 32 ? ~0u : (1u << n) - 1; }

/* In-register transpose of a 16 x 16 matrix of 32-bit lanes: r[i][j] -> r[j][i]. */
ALWAYS void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

/* xp tile (j, c) from x rows 16j.. (row stride ldx elements). */
static void pack_tile(const Plan *p, const uint16_t *x, int64_t ldx, int64_t j, int64_t c) {
    uint8_t *dst = (uint8_t *)p->xp + (j * p->chunks + c) * p->tile_bytes;
    const int64_t k0 = k_start(p, c), seen = 32 * c - k0; /* k already covered by chunk c - 1 */
    const __mmask32 keep = low_bits(p->kc) & ~low_bits((int)seen);
    if (p->tc == 1) { /* one token: the VNNI tile is the row itself */
        _mm512_mask_storeu_epi16(dst, low_bits(p->kc), _mm512_maskz_loadu_epi16(keep, x + k0));
        return;
    }
    __m512 r[16];
    for (int t = 0; t < 16; t++) {
        const int64_t tok = 16 * j + t;
        r[t] = tok < p->T ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(keep, x + tok * ldx + k0)) : _mm512_setzero_ps();
    }
    transpose16(r); /* r[q] = pair q of every token */
    const __mmask16 cols = (__mmask16)low_bits(p->tc);
    for (int q = 0; q < p->kc / 2; q++) _mm512_mask_storeu_ps(dst + q * 4 * p->tc, cols, r[q]);
}

/* 16 x 16 transposes of 16-bit words, one in each 256-bit half: in[m] = [a_m | b_m] (16 words
   each) -> out[t] = [a_0[t] .. a_15[t] | b_0[t] .. b_15[t]]. An 8 x 8 transpose within each
   128-bit lane (three unpack stages over in[0..7] and in[8..15]), then the lanes regrouped. */
ALWAYS void transpose_words(__m512i in[16], __m512i out[16]) {
    __m512i d[2][8];
    for (int g = 0; g < 2; g++) {
        const __m512i *a = in + 8 * g;
        __m512i b[8], c[8];
        for (int q = 0; q < 4; q++) {
            b[2 * q] = _mm512_unpacklo_epi16(a[2 * q], a[2 * q + 1]);
            b[2 * q + 1] = _mm512_unpackhi_epi16(a[2 * q], a[2 * q + 1]);
        }
        for (int h = 0; h < 8; h += 4) {
            c[h] = _mm512_unpacklo_epi32(b[h], b[h + 2]);
            c[h + 1] = _mm512_unpackhi_epi32(b[h], b[h + 2]);
            c[h + 2] = _mm512_unpacklo_epi32(b[h + 1], b[h + 3]);
            c[h + 3] = _mm512_unpackhi_epi32(b[h + 1], b[h + 3]);
        }
        for (int q = 0; q < 4; q++) { /* d[g][r]: word r of every lane of a_0..a_7 */
            d[g][2 * q] = _mm512_unpacklo_epi64(c[q], c[q + 4]);
            d[g][2 * q + 1] = _mm512_unpackhi_epi64(c[q], c[q + 4]);
        }
    }
    const __m512i first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int r = 0; r < 8; r++) {
        out[r] = _mm512_permutex2var_epi64(d[0][r], first, d[1][r]);
        out[8 + r] = _mm512_permutex2var_epi64(d[0][r], second, d[1][r]);
    }
}

ALWAYS float bf16_to_f32(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Row m of an accumulator (16 tokens, + the bias of its feature). */
ALWAYS __m512 acc_row(const Plan *p, const float *c, int64_t r0, int m) {
    if (!c || m >= p->rows) return _mm512_setzero_ps();
    const __m512 v = _mm512_load_ps(c + 16 * m);
    return p->bias ? _mm512_add_ps(v, _mm512_set1_ps(bf16_to_f32(p->bias[r0 + m]))) : v;
}

/* Accumulators of row tiles i (lo) and i + 1 (hi, or NULL), token tile j, each stored with a
   64-byte row stride -> y: 32 features of a token are one 64-byte store. */
static void write_tiles(const Plan *p, const float *lo, const float *hi, int64_t i, int64_t j) {
    const int64_t r0 = row_start(p, i);
    if (hi && row_start(p, i + 1) != r0 + 16) { /* hi is the overlapped last tile: apart */
        write_tiles(p, lo, NULL, i, j);
        write_tiles(p, hi, NULL, i + 1, j);
        return;
    }
    const uint32_t rows = low_bits(p->rows);
    const __mmask32 fresh = (rows & ~low_bits((int)(16 * i - r0))) | (hi ? rows << 16 : 0); /* skip overlapped rows */
    const int nt = (int)min64(16, p->T - 16 * j);
    uint16_t *y = p->y + 16 * j * p->N + r0;
    if (nt >= 4) {
        __m512i in[16], out[16];
        for (int m = 0; m < 16; m++)
            in[m] = (__m512i)_mm512_cvtne2ps_pbh(acc_row(p, hi, r0 + 16, m), acc_row(p, lo, r0, m));
        transpose_words(in, out);
        for (int t = 0; t < nt; t++) _mm512_mask_storeu_epi16(y + t * p->N, fresh, out[t]);
        return;
    }
    /* a few tokens: gather their columns instead */
    const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(16));
    __m512 bias_lo = _mm512_setzero_ps(), bias_hi = _mm512_setzero_ps();
    if (p->bias) {
        bias_lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(rows, p->bias + r0)), 16));
        if (hi)
            bias_hi = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(rows, p->bias + r0 + 16)), 16));
    }
    for (int t = 0; t < nt; t++) {
        const __m512i at = _mm512_add_epi32(col, _mm512_set1_epi32(t));
        const __m512 vlo = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, at, lo, 4), bias_lo);
        const __m512 vhi = hi ? _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), rows, at, hi, 4), bias_hi)
                              : _mm512_setzero_ps();
        _mm512_mask_storeu_epi16(y + t * p->N, fresh, (__m512i)_mm512_cvtne2ps_pbh(vhi, vlo));
    }
}

/* Hint the next `rows` rows of W after row `n` into L2 (they are contiguous). */
ALWAYS void prefetch_rows(const Plan *p, int64_t n, int64_t rows, int64_t part, int64_t parts) {
    if (n >= p->N) return;
    rows = min64(rows, p->N - n);
    const char *base = (const char *)(p->w + n * p->ldw);
    const int64_t bytes = rows * p->ldw * 2, lo = bytes * part / parts, hi = bytes * (part + 1) / parts;
    for (int64_t o = lo; o < hi; o += 64) _mm_prefetch(base + o, _MM_HINT_T1);
}

/* Accumulators stored by the last block (row tiles i.. x token tiles j.., as in `block`),
   written out to y during the next one. */
typedef struct {
    float c[4][256] __attribute__((aligned(64)));
    int64_t i, j;
    int mr, nr;
} Pending;

static void flush(const Plan *p, Pending *out) {
    for (int n = 0; n < out->nr; n++)
        for (int m = 0; m < out->mr; m += 2)
            write_tiles(p, out->c[m * out->nr + n], m + 1 < out->mr ? out->c[(m + 1) * out->nr + n] : NULL, out->i + m,
                        out->j + n);
    out->mr = out->nr = 0;
}

/* Row tiles i..i+MR-1 times token tiles j..j+NR-1 over all of K; MR x NR <= 4, NR == 2 only
   with MR <= 2. Accumulator (row tile m, token tile n) is tile m with one token tile, 2m + n
   with two. The previous block's outputs are written after this block's tile instructions are
   issued, so that vector work overlaps the tile unit's instead of idling it. */
ALWAYS void block(const Plan *p, Pending *out, int64_t i, int64_t j, const int MR, const int NR, const int prefetch) {
    const char *a0 = (const char *)(p->w + row_start(p, i) * p->ldw);
    const char *a1 = MR > 1 ? (const char *)(p->w + row_start(p, i + 1) * p->ldw) : a0;
    const char *a2 = MR > 2 ? (const char *)(p->w + row_start(p, i + 2) * p->ldw) : a0;
    const char *a3 = MR > 3 ? (const char *)(p->w + row_start(p, i + 3) * p->ldw) : a0;
    const int64_t lda = 2 * p->ldw, ldb = 4 * p->tc;
    const uint8_t *b0 = p->xp + j * p->chunks * p->tile_bytes, *b1 = b0 + p->chunks * p->tile_bytes;
    _tile_zero(0);
    if (MR * NR > 1) _tile_zero(1);
    if (MR * NR > 2) _tile_zero(2);
    if (MR * NR > 3) _tile_zero(3);
    for (int64_t c = 0; c < p->chunks; c++) {
        const int64_t ko = 2 * k_start(p, c), bo = c * p->tile_bytes;
        if (prefetch) prefetch_rows(p, 16 * (i + MR), 16 * MR, c, p->chunks);
        if (NR == 1) {
            _tile_loadd(6, b0 + bo, ldb);
            _tile_loadd(4, a0 + ko, lda);
            _tile_dpbf16ps(0, 4, 6);
            if (MR > 1) {
                _tile_loadd(5, a1 + ko, lda);
                _tile_dpbf16ps(1, 5, 6);
            }
            if (MR > 2) {
                _tile_loadd(4, a2 + ko, lda);
                _tile_dpbf16ps(2, 4, 6);
            }
            if (MR > 3) {
                _tile_loadd(5, a3 + ko, lda);
                _tile_dpbf16ps(3, 5, 6);
            }
        } else {
            _tile_loadd(6, b0 + bo, ldb);
            _tile_loadd(7, b1 + bo, ldb);
            _tile_loadd(4, a0 + ko, lda);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (MR > 1) {
                _tile_loadd(5, a1 + ko, lda);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
    }
    flush(p, out);
    out->i = i, out->j = j, out->mr = MR, out->nr = NR;
    _tile_stored(0, out->c[0], 64);
    if (MR * NR > 1) _tile_stored(1, out->c[1], 64);
    if (MR * NR > 2) _tile_stored(2, out->c[2], 64);
    if (MR * NR > 3) _tile_stored(3, out->c[3], 64);
}

/* Row tiles [i_begin, i_end) for every token. */
static void compute(const Plan *p, int64_t i_begin, int64_t i_end) {
    Pending out;
    out.mr = out.nr = 0;
    if (p->tok_tiles == 1) {
        int64_t i = i_begin;
        for (; i + 4 <= i_end; i += 4) block(p, &out, i, 0, 4, 1, 1);
        switch (i_end - i) {
        case 3: block(p, &out, i, 0, 3, 1, 0); break;
        case 2: block(p, &out, i, 0, 2, 1, 0); break;
        case 1: block(p, &out, i, 0, 1, 1, 0); break;
        }
        flush(p, &out);
        return;
    }
    int64_t panel = PANEL_BYTES / (p->chunks * p->tile_bytes) / 2 * 2;
    panel = panel < 2 ? 2 : panel;
    for (int64_t js = 0; js < p->tok_tiles; js += panel) {
        const int64_t je = min64(js + panel, p->tok_tiles);
        for (int64_t i = i_begin; i < i_end; i += 2) {
            const int two_rows = i + 1 < i_end;
            int64_t j = js;
            for (; j + 2 <= je; j += 2) {
                if (two_rows) block(p, &out, i, j, 2, 2, 0);
                else block(p, &out, i, j, 1, 2, 0);
            }
            if (j < je) {
                if (two_rows) block(p, &out, i, j, 2, 1, 0);
                else block(p, &out, i, j, 1, 1, 0);
            }
        }
    }
    flush(p, &out);
}

static __thread uint8_t *xp_buf; /* this thread's xp scratch, grown on demand, never shrunk */
static __thread size_t xp_cap;

static uint8_t *xp_scratch(size_t bytes) {
    if (bytes > xp_cap) {
        const size_t cap = (bytes + 65535) & ~(size_t)65535;
        uint8_t *buf = aligned_alloc(64, cap);
        if (!buf) return NULL;
        free(xp_buf);
        xp_buf = buf;
        xp_cap = cap;
    }
    return xp_buf;
}

static void pack_all(const Plan *p, const uint16_t *x, int64_t ldx) {
    for (int64_t j = 0; j < p->tok_tiles; j++)
        for (int64_t c = 0; c < p->chunks; c++) pack_tile(p, x, ldx, j, c);
}

#endif /* HAVE_AMX */

/* 0 when this process may use AMX (the CPU has it and Linux granted the tile state), else < 0.
   Asks Linux once per process; safe to call from any thread, any number of times. */
int amx_linear_init(void) {
#ifdef HAVE_AMX
    pthread_once(&amx_once, request_amx);
    return amx_status;
#else
    return AMX_UNAVAILABLE;
#endif
}

/* y (T, N) = x (T, K; rows ldx elements apart) . W^T (W (N, K), rows ldw apart) + bias (N, or
   NULL); all bf16, y contiguous and not aliasing x. Returns 0, or < 0 when the kernel cannot
   run (y is then undefined): AMX unavailable, K < 32 and odd, or no memory for the xp scratch. */
int amx_linear(const void *x, int64_t ldx, const void *w, int64_t ldw, const void *bias, void *y, int64_t T,
               int64_t K, int64_t N, int num_threads) {
#ifdef HAVE_AMX
    if (amx_linear_init() != AMX_OK) return AMX_UNAVAILABLE;
    if (K < 1 || N < 1 || (K < 32 && K % 2)) return AMX_UNSUPPORTED_SHAPE;
    if (T < 1) return AMX_OK;
    Plan p = {w, bias, y, NULL, T, K, N, ldw, (N + 15) / 16, (T + 15) / 16, (K + 31) / 32,
              (int)min64(N, 16), (int)min64(K, 32), (int)min64(T, 16), 0};
    p.tile_bytes = (int64_t)(p.kc / 2) * 4 * p.tc;
    const size_t xp_bytes = (size_t)(p.tok_tiles * p.chunks * p.tile_bytes);
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) cfg.rows[t] = (uint8_t)p.rows, cfg.colsb[t] = (uint16_t)(4 * p.tc);
    for (int t = 4; t < 6; t++) cfg.rows[t] = (uint8_t)p.rows, cfg.colsb[t] = (uint16_t)(2 * p.kc);
    for (int t = 6; t < 8; t++) cfg.rows[t] = (uint8_t)(p.kc / 2), cfg.colsb[t] = (uint16_t)(4 * p.tc);
    if (num_threads < 1) num_threads = 1;
    if (num_threads > p.row_tiles) num_threads = (int)p.row_tiles;
    /* Up to 4 token tiles (decode) every thread packs all of x for itself: a few KB, and no
       barrier between packing and computing. More tokens: the threads share the packing into
       the calling thread's buffer, then wait for each other once. */
    const int shared = p.tok_tiles > 4;
    if (shared && !(p.xp = xp_scratch(xp_bytes))) return AMX_NO_MEMORY;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        Plan mine = p;
        if (shared) {
#pragma omp for schedule(static)
            for (int64_t job = 0; job < p.tok_tiles * p.chunks; job++) pack_tile(&p, x, ldx, job / p.chunks, job % p.chunks);
        } else if ((mine.xp = xp_scratch(xp_bytes))) {
            pack_all(&mine, x, ldx);
        }
        /* Row tiles go out in blocks, about four per thread, to whichever thread is free: a
           thread the OS runs late (another process busy on its core) takes fewer of them and
           the others do not wait for a fixed half. Every thread meets the loop (an OpenMP
           rule); one without scratch takes no part in the result, which is then discarded. */
        const int64_t nth = omp_get_num_threads();
        int64_t grain = (p.row_tiles + 4 * nth - 1) / (4 * nth);
        grain = (grain + 3) / 4 * 4;
        const int64_t blocks = (p.row_tiles + grain - 1) / grain;
        if (mine.xp) _tile_loadconfig(&cfg);
        else failed = 1;
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t b = 0; b < blocks; b++)
            if (mine.xp) compute(&mine, b * grain, min64(p.row_tiles, (b + 1) * grain));
        if (mine.xp) _tile_release();
    }
    if (failed) return AMX_NO_MEMORY;
    return AMX_OK;
#else
    (void)x, (void)ldx, (void)w, (void)ldw, (void)bias, (void)y, (void)T, (void)K, (void)N, (void)num_threads;
    return AMX_UNAVAILABLE;
#endif
}
