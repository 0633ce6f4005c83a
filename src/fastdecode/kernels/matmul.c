/* y[r, o] = sum_i x[r, i] * W[o, i] (or y += that) for 1 row (a decode step) up to hundreds (a
 * prefill chunk), W in its stored format (kernels.h), x in the activation dtype, y float32.
 *
 * The weights keep their exact values and the activations stay floating point: integer quants
 * (-128..127) are exact in bfloat16, so a 4-bit or 8-bit weight is expanded in registers to
 * bfloat16 (4-bit: a table lookup, vpermw; 8-bit: int -> float -> bfloat16) and meets bfloat16
 * activations in the AVX-512 BF16 dot product (vdpbf16ps, float32 sums). With float32
 * activations, or float32 weights, the weights are expanded to float32 and summed with float32
 * FMAs. Either way, for each output of each row:
 *     block sum   a_b   = the dot products over the block's inputs, in input order, from 0
 *     total       t     = t + a_b * s_b  (then + m_b * sum of the block's x, where there is a minimum)
 * over the blocks in order, then y = t (or y + t). That is a fixed sequence of operations in one
 * vector lane, whatever the tile and however many rows share the call: a row's result does not
 * depend on the other rows (bitwise), which is what keeps speculative decoding exact.
 *
 * A tile of up to NB groups x NR rows keeps its sums in registers while it streams its groups'
 * cells once; each expanded weight vector serves every row of the tile. One-row calls (plain
 * decoding, bound by memory bandwidth) use wider tiles of NB1 groups to keep more sums in flight.
 * Tiles of groups are shared among the threads; rows never are.
 */
#include <pthread.h>

#include "kernels.h"

#define NB 2  /* groups per tile */
#define NR 6  /* rows per tile */
#define NB1 4 /* groups per tile of a one-row call */
#define NBMAX 4

/* (the vector path adds the two halves of a block lane by lane, then the 16 lanes in a fixed tree) */
static void row_block_sums(const void *x, int x_bf16, long n, float *out) {
    for (long b = 0; b < n / 32; b++) {
#ifdef __AVX512F__
        __m512 s = _mm512_add_ps(act_load16(x, 32 * b, x_bf16, 0xffff), act_load16(x, 32 * b + 16, x_bf16, 0xffff));
        out[b] = _mm512_reduce_add_ps(s);
#else
        float s = 0.0f;
        for (long i = 0; i < 32; i++)
            s += act_at(x, 32 * b + i, x_bf16);
        out[b] = s;
#endif
    }
}

/* FASTDECODE_INT8=1 turns int8 activations on (kernels.h); a CPU with AVX-512 keeps its own path. */
static pthread_once_t int8_once = PTHREAD_ONCE_INIT;
static int int8_mode;

static void int8_init(void) {
#ifndef __AVX512F__
    const char *env = getenv("FASTDECODE_INT8");
    int8_mode = env && !strcmp(env, "1");
#endif
}

int kernel_int8(void) {
    pthread_once(&int8_once, int8_init);
    return int8_mode;
}

/* prep_floats for the callers that allocate the prep (models/decoder.py). */
long row_prep_floats(long n) { return prep_floats(n); }

/* Each block: d = max|x| / 127 and q = round(x * (127 / max|x|)) to nearest even, NaN ignored in the
 * maximum; the AVX2 loop does exactly these operations 8 lanes at a time. */
void row_prep(const void *x, int x_bf16, long n, int quantize, float *out) {
    static const int order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    const long nb = n / 32;
    row_block_sums(x, x_bf16, n, out);
    if (!quantize)
        return;
    float *d = out + nb;
    int32_t *qsum = (int32_t *)(out + 2 * nb);
    int8_t *q = (int8_t *)(out + 3 * nb);
    for (long b = 0; b < nb; b++) {
#ifdef KERNELS_AVX2
        __m256 v[4], most = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (long j = 0; j < 4; j++) {
            v[j] = act_load8(x, 32 * b + 8 * j, x_bf16, 8);
            most = _mm256_max_ps(_mm256_andnot_ps(sign, v[j]), most); /* the second operand where NaN */
        }
        most = _mm256_max_ps(most, _mm256_permute2f128_ps(most, most, 1));
        most = _mm256_max_ps(most, _mm256_shuffle_ps(most, most, 0x4e));
        most = _mm256_max_ps(most, _mm256_shuffle_ps(most, most, 0xb1));
        const float top = _mm_cvtss_f32(_mm256_castps256_ps128(most)), inv = top > 0.0f ? 127.0f / top : 0.0f;
        const __m256i by = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i k[4], total = _mm256_setzero_si256();
        for (long j = 0; j < 4; j++) {
            k[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_permutevar8x32_ps(v[j], by), _mm256_set1_ps(inv)));
            total = _mm256_add_epi32(total, k[j]);
        }
        /* packing interleaves 128-bit lanes: dwords 0 4 1 5 2 6 3 7 put them back in order */
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(k[0], k[1]), _mm256_packs_epi32(k[2], k[3]));
        _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_permutevar8x32_epi32(bytes, by));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        d[b] = top / 127.0f;
        qsum[b] = _mm_cvtsi128_si32(t);
#else
        float v[32], most = 0.0f;
        for (long i = 0; i < 32; i++) {
            v[i] = act_at(x, 32 * b + i, x_bf16);
            const float a = fabsf(v[i]);
            most = a > most ? a : most;
        }
        const float inv = most > 0.0f ? 127.0f / most : 0.0f;
        int32_t s = 0;
        for (long i = 0; i < 32; i++) {
            const int k = (int)nearbyintf(v[(i & ~7L) + order[i & 7]] * inv);
            q[32 * b + i] = (int8_t)k;
            s += k;
        }
        d[b] = most / 127.0f;
        qsum[b] = s;
#endif
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

static inline __m512 load_scales(const uint8_t *p, int half) {
    return half ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps(p);
}

/* Fold a block's sums into the totals: t = t + a * s (+ m * xsum). */
static inline __attribute__((always_inline)) void fold(const Matrix *W, const int fmt, const uint8_t *const *cell,
                                                       __m512 total[NBMAX][NR], __m512 acc[NBMAX][NR],
                                                       const float *xsum, long ldsum, long b, const long nb, const long nr) {
    const long wb = cell_weight_bytes(W), sb = W->half_scales ? 32 : 64;
    for (long u = 0; u < nb; u++) {
        if (fmt == FMT_F32 || fmt == FMT_BF16) {
            for (long r = 0; r < nr; r++)
                total[u][r] = acc[u][r];
            continue;
        }
        __m512 s = load_scales(cell[u] + wb, W->half_scales);
        for (long r = 0; r < nr; r++)
            total[u][r] = _mm512_fmadd_ps(acc[u][r], s, total[u][r]);
        if (W->has_min) {
            __m512 m = load_scales(cell[u] + wb + sb, W->half_scales);
            for (long r = 0; r < nr; r++)
                total[u][r] = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[r * ldsum + b]), total[u][r]);
        }
    }
}

static inline __attribute__((always_inline)) void store(const Matrix *W, __m512 total[NBMAX][NR], float *y, long ldy,
                                                        int add, long g0, const long nb, const long nr) {
    for (long u = 0; u < nb; u++) {
        long o = (g0 + u) * 16;
        __mmask16 m = lanes(W->out - o);
        for (long r = 0; r < nr; r++) {
            float *dst = y + r * ldy + o;
            __m512 v = add ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, dst), total[u][r]) : total[u][r];
            _mm512_mask_storeu_ps(dst, m, v);
        }
    }
}

#if defined(__AVX512BF16__)
/* The 32 bfloat16 values of input pair p of a Q8 cell: bytes 32p .. 32p+31, in lane order. */
static inline __m512bh q8_pair_bf16(const uint8_t *cell, long p) {
    const __m128i *b = (const __m128i *)(cell + 32 * p);
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(b + 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

/* acc[u][r] += w[u] . (x[r, i], x[r, i+1]) for every row and group of the tile. */
#define DOT_PAIR(i)                                                                                  \
    for (long r = 0; r < nr; r++) {                                                                  \
        uint32_t pair;                                                                               \
        memcpy(&pair, x + r * ldx + (i), 4);                                                         \
        __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);                                        \
        for (long u = 0; u < nb; u++)                                                                \
            acc[u][r] = _mm512_dpbf16_ps(acc[u][r], w[u], xv);                                      \
    }

/* Groups [g0, g0 + nb) x rows of x (nr of them) with bfloat16 activations and bfloat16-exact weights. */
static inline __attribute__((always_inline)) void tile_bf16(const Matrix *W, const int fmt, __m512i table,
                                                            const uint16_t *x, long ldx, const float *xsum, long ldsum,
                                                            float *y, long ldy, int add, long g0, const long nb,
                                                            const long nr) {
    const long cells = cells_per_group(W), cb = cell_bytes(W);
    const long pairs = (fmt == FMT_Q4 ? 32 : W->block) / 2;
    __m512 total[NBMAX][NR], acc[NBMAX][NR];
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++)
            total[u][r] = _mm512_setzero_ps();
    for (long b = 0; b < cells; b++) {
        const uint8_t *cell[NBMAX];
        for (long u = 0; u < nb; u++) {
            cell[u] = W->data + ((g0 + u) * cells + b) * cb;
            for (long r = 0; r < nr; r++)
                acc[u][r] = _mm512_setzero_ps();
        }
        const long i0 = b * W->block;
        if (fmt == FMT_Q4) {
            for (long v = 0; v < 4; v++) {
                __m512i raw[NBMAX];
                for (long u = 0; u < nb; u++)
                    raw[u] = _mm512_loadu_si512(cell[u] + 64 * v);
#pragma GCC unroll 4
                for (int c = 0; c < 4; c++) {
                    __m512bh w[NBMAX];
                    for (long u = 0; u < nb; u++)
                        w[u] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(raw[u], 4 * c), table);
                    DOT_PAIR(i0 + 8 * v + 2 * c)
                }
            }
        } else {
            for (long p = 0; p < pairs; p++) {
                __m512bh w[NBMAX];
                for (long u = 0; u < nb; u++)
                    w[u] = fmt == FMT_Q8 ? q8_pair_bf16(cell[u], p) : (__m512bh)_mm512_loadu_si512(cell[u] + 64 * p);
                DOT_PAIR(i0 + 2 * p)
            }
        }
        fold(W, fmt, cell, total, acc, xsum, ldsum, b, nb, nr);
    }
    store(W, total, y, ldy, add, g0, nb, nr);
}
#undef DOT_PAIR

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
/* With AMX (Intel Sapphire Rapids and later), bfloat16 products run on the tile unit: a tile
 * product C[m, n] += sum over 32 inputs of A[m, i] * B[i, n] does 16 x 16 x 32 multiply-adds at
 * once, in float32, each row of C from its own row of A. The weights of a block are expanded into
 * a tile (B) exactly as for vdpbf16ps, the block's product lands in C, and the scales are folded in
 * with the same float32 operations as above: t = t + c * s (+ m * xsum), block after block. Every
 * row of every call goes this way, so results stay independent of the other rows.
 *
 * Costs measured here: 8 rows of a decode step cost 1.5x one row, against 3.3x on the vector path,
 * while one row costs about 1.4x the vector path's (the expanded weights go through memory to reach
 * a tile). Speculation, batches and prompts live on extra rows: the best methods tie with the
 * vector path's on free text and win on structured output and under concurrent load, so every
 * row comes here by default (FASTDECODE_AMX below). */
#include <sys/syscall.h>
#include <unistd.h>
#define AMX_NB 3    /* groups per tile: C tiles 0-2, A tile 3, B tiles 4-6 */
#define AMX_ROWS 16 /* rows of A and C */
#define AMX_CHUNKS 4 /* row tiles per call: a block's expanded weights serve all of them */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

enum { AMX_OFF, AMX_PROMPTS, AMX_ALL };
static int amx_mode;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

/* FASTDECODE_AMX: unset or "1", every row on AMX; "prompts", a prompt's rows on AMX and every other
 * row on the vector path (plain decoding about 1.3x faster, draft trees and batches far dearer);
 * "0", none. Linux lets a process use the tile registers once it asks (ARCH_REQ_XCOMP_PERM,
 * XTILEDATA). */
static void amx_init(void) {
    const char *env = getenv("FASTDECODE_AMX");
    int want = !env || !env[0] || !strcmp(env, "1") ? AMX_ALL : !strcmp(env, "prompts") ? AMX_PROMPTS : AMX_OFF;
    amx_mode = want != AMX_OFF && syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? want : AMX_OFF;
}

int kernel_amx(void) {
    pthread_once(&amx_once, amx_init);
    return amx_mode;
}

/* A row's product runs on AMX or on the vector path by what the row is (a prompt row or not), never
 * by how many rows share the call: either way its result is the same whatever its neighbours. */
static int amx_for(const Matrix *W, int x_bf16, int prompt) {
    if (!x_bf16 || W->format == FMT_F32 || (W->format == FMT_BF16 && W->in % 32))
        return 0;
    int mode = kernel_amx();
    return mode == AMX_ALL || (mode == AMX_PROMPTS && prompt);
}

/* Tile numbers are immediates: group u of a tile uses C tile u and B tile 4 + u. */
#define FOR_TILE(u, stmt0, stmt1, stmt2) \
    do {                                 \
        if ((u) == 0) {                  \
            stmt0;                       \
        } else if ((u) == 1) {           \
            stmt1;                       \
        } else {                         \
            stmt2;                       \
        }                                \
    } while (0)
#define LOAD_B(u, p) FOR_TILE(u, _tile_loadd(4, p, 64), _tile_loadd(5, p, 64), _tile_loadd(6, p, 64))
#define DOT(u) FOR_TILE(u, _tile_dpbf16ps(0, 3, 4), _tile_dpbf16ps(1, 3, 5), _tile_dpbf16ps(2, 3, 6))
#define STORE_C(u, p) FOR_TILE(u, _tile_stored(0, p, 64), _tile_stored(1, p, 64), _tile_stored(2, p, 64))
#define ZERO_C(u) FOR_TILE(u, _tile_zero(0), _tile_zero(1), _tile_zero(2))

/* Block b's weights of groups [g0, g0 + nb), expanded to bfloat16 in B's layout (as for vdpbf16ps). */
static inline void expand_cells(const Matrix *W, const int fmt, __m512i table, long b, long g0, long nb, long k,
                                uint16_t buf[AMX_NB][16 * 32]) {
    const long cells = cells_per_group(W), cb = cell_bytes(W);
    for (long u = 0; u < nb; u++) {
        const uint8_t *cell = W->data + ((g0 + u) * cells + b) * cb;
        for (long l = 0; l < cb; l += 64) /* 16 blocks on: the hardware prefetchers lag this loop */
            _mm_prefetch((const char *)cell + 16 * cb + l, _MM_HINT_T0);
        if (fmt == FMT_Q4)
            for (long v = 0; v < 4; v++) {
                __m512i raw = _mm512_loadu_si512(cell + 64 * v);
                for (int q = 0; q < 4; q++)
                    _mm512_store_si512(buf[u] + 32 * (4 * v + q),
                                       _mm512_permutexvar_epi16(_mm512_srli_epi16(raw, 4 * q), table));
            }
        else
            for (long p = 0; p < k / 2; p++)
                _mm512_store_si512(buf[u] + 32 * p, (__m512i)q8_pair_bf16(cell, p));
    }
}

/* t = t + c * s (+ m * xsum) for block b of groups [g0, g0 + nb) and `rows` rows, c their tile
 * products, t their totals (float32 in memory: 16 lanes a row), the rows from row r0 of x. */
static inline void fold_block(const Matrix *W, long b, long g0, long nb, long rows, const float c[AMX_NB][AMX_ROWS * 16],
                              const float *xsum, long ldsum, long r0, float total[AMX_NB][AMX_ROWS * 16]) {
    const long cells = cells_per_group(W), cb = cell_bytes(W), wb = cell_weight_bytes(W), sb = W->half_scales ? 32 : 64;
    for (long u = 0; u < nb; u++) {
        const uint8_t *cell = W->data + ((g0 + u) * cells + b) * cb;
        __m512 s = load_scales(cell + wb, W->half_scales);
        __m512 mn = W->has_min ? load_scales(cell + wb + sb, W->half_scales) : _mm512_setzero_ps();
        for (long r = 0; r < rows; r++) {
            __m512 t = _mm512_fmadd_ps(_mm512_load_ps(c[u] + 16 * r), s, _mm512_load_ps(total[u] + 16 * r));
            if (W->has_min)
                t = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[(r0 + r) * ldsum + b]), t);
            _mm512_store_ps(total[u] + 16 * r, t);
        }
    }
}

/* Row tile j of an m-row call starts here. When m > 16 every row tile has 16 rows: the last one
 * ends at row m and overlaps the one before, whose rows it computes again (to the same bits). */
static inline long chunk_start(long j, long m) { return j * AMX_ROWS + AMX_ROWS > m && m > AMX_ROWS ? m - AMX_ROWS : j * AMX_ROWS; }

/* Groups [g0, g0 + nb) x m rows of x (nb <= AMX_NB, m <= AMX_ROWS * AMX_CHUNKS). */
static void amx_tile(const Matrix *W, const int fmt, __m512i table, const uint16_t *x, long ldx, const float *xsum,
                     long ldsum, float *y, long ldy, int add, long g0, long nb, long m) {
    const long k = fmt == FMT_Q8 ? W->block : 32; /* inputs per tile product */
    const long cells = cells_per_group(W), cb = cell_bytes(W);
    const long rows = m < AMX_ROWS ? m : AMX_ROWS, chunks = (m + AMX_ROWS - 1) / AMX_ROWS;
    TileConfig cfg = {.palette = 1};
    for (int t = 0; t < 3; t++)
        cfg.rows[t] = (uint8_t)rows, cfg.colsb[t] = 64, cfg.rows[4 + t] = (uint8_t)(k / 2), cfg.colsb[4 + t] = 64;
    cfg.rows[3] = (uint8_t)rows, cfg.colsb[3] = (uint16_t)(2 * k);
    TileConfig now; /* loading a configuration costs more than a block's product: only when it changes */
    _tile_storeconfig(&now);
    if (memcmp(&now, &cfg, sizeof cfg))
        _tile_loadconfig(&cfg);
    uint16_t buf[2][AMX_NB][16 * 32] __attribute__((aligned(64)));
    float c[2][AMX_NB][AMX_ROWS * 16] __attribute__((aligned(64)));
    float total[AMX_CHUNKS][AMX_NB][AMX_ROWS * 16] __attribute__((aligned(64)));
    if (fmt == FMT_BF16) { /* no scales: C sums every input */
        for (long j = 0; j < chunks; j++) {
            const uint16_t *xj = x + chunk_start(j, m) * ldx;
            for (long u = 0; u < nb; u++)
                ZERO_C(u);
            for (long i = 0; i < W->in; i += 32) {
                _tile_loadd(3, xj + i, ldx * 2);
                for (long u = 0; u < nb; u++) {
                    LOAD_B(u, W->data + (g0 + u) * cb + i * 32);
                    DOT(u);
                }
            }
            for (long u = 0; u < nb; u++)
                STORE_C(u, total[j][u]);
        }
    } else {
        /* Software-pipelined, because a tile reads memory only after the stores before it have
         * landed: block b + 1's weights are expanded while block b's are on the tile unit, and
         * each row tile's sums are folded in after the next product was issued. Block b's expanded
         * weights serve every row tile. The folds keep their order (block after block for each
         * row), so the bits are those of a plain loop over one row tile at a time. */
        for (long j = 0; j < chunks; j++)
            for (long u = 0; u < nb; u++)
                memset(total[j][u], 0, sizeof(float) * 16 * rows);
        expand_cells(W, fmt, table, 0, g0, nb, k, buf[0]);
        long pending = -1; /* the (block, row tile) whose products wait in c, as b * chunks + j */
        for (long b = 0; b < cells; b++) {
            if (b + 1 < cells)
                expand_cells(W, fmt, table, b + 1, g0, nb, k, buf[(b + 1) & 1]);
            for (long u = 0; u < nb; u++)
                LOAD_B(u, buf[b & 1][u]);
            for (long j = 0; j < chunks; j++) {
                const long item = b * chunks + j, r0 = chunk_start(j, m);
                _tile_loadd(3, x + r0 * ldx + b * k, ldx * 2);
                for (long u = 0; u < nb; u++) { /* the products in flight together, then stored */
                    ZERO_C(u);
                    DOT(u);
                }
                for (long u = 0; u < nb; u++)
                    STORE_C(u, c[item & 1][u]);
                if (pending >= 0) {
                    const long pb = pending / chunks, pj = pending % chunks;
                    fold_block(W, pb, g0, nb, rows, c[pending & 1], xsum, ldsum, chunk_start(pj, m), total[pj]);
                }
                pending = item;
            }
        }
        const long pj = pending % chunks;
        fold_block(W, cells - 1, g0, nb, rows, c[pending & 1], xsum, ldsum, chunk_start(pj, m), total[pj]);
    }
    for (long j = 0; j < chunks; j++)
        for (long u = 0; u < nb; u++) {
            long o = (g0 + u) * 16;
            __mmask16 mask = lanes(W->out - o);
            for (long r = j * AMX_ROWS - chunk_start(j, m); r < rows; r++) { /* an overlap's rows once */
                float *dst = y + (chunk_start(j, m) + r) * ldy + o;
                __m512 v = _mm512_load_ps(total[j][u] + 16 * r);
                _mm512_mask_storeu_ps(dst, mask, add ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), v) : v);
            }
        }
}
#endif
#endif

/* acc[u][r] += w[u] * x[r, i] for every row and group of the tile. */
#define FMA_INPUT(i)                                                                                         \
    for (long r = 0; r < nr; r++) {                                                                          \
        __m512 xv = _mm512_set1_ps(x_bf16 ? bf16_to_f32(((const uint16_t *)x)[r * ldx + (i)])                \
                                          : ((const float *)x)[r * ldx + (i)]);                              \
        for (long u = 0; u < nb; u++)                                                                        \
            acc[u][r] = _mm512_fmadd_ps(w[u], xv, acc[u][r]);                                                \
    }

/* The same with float32 sums of float32 products: float32 activations, or float32 weights. */
static inline __attribute__((always_inline)) void tile_f32(const Matrix *W, const int fmt, __m512 table,
                                                           const void *x, const int x_bf16, long ldx, const float *xsum,
                                                           long ldsum, float *y, long ldy, int add, long g0,
                                                           const long nb, const long nr) {
    const long cells = cells_per_group(W), cb = cell_bytes(W);
    __m512 total[NBMAX][NR], acc[NBMAX][NR];
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++)
            total[u][r] = _mm512_setzero_ps();
    for (long b = 0; b < cells; b++) {
        const uint8_t *cell[NBMAX];
        for (long u = 0; u < nb; u++) {
            cell[u] = W->data + ((g0 + u) * cells + b) * cb;
            for (long r = 0; r < nr; r++)
                acc[u][r] = _mm512_setzero_ps();
        }
        const long i0 = b * W->block;
        __m512 w[NBMAX];
        if (fmt == FMT_Q4) {
            for (long v = 0; v < 4; v++) {
                __m512i raw[NBMAX];
                for (long u = 0; u < nb; u++)
                    raw[u] = _mm512_loadu_si512(cell[u] + 64 * v);
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) { /* input 8v + k: nibble c = k / 2 of word member k % 2 */
                    for (long u = 0; u < nb; u++)
                        w[u] = _mm512_permutexvar_ps(_mm512_srli_epi32(raw[u], 4 * (k / 2) + 16 * (k % 2)), table);
                    FMA_INPUT(i0 + 8 * v + k)
                }
            }
        } else if (fmt == FMT_Q8) {
            for (long p = 0; p < W->block / 2; p++) {
                __m512i wd[NBMAX];
                for (long u = 0; u < nb; u++) {
                    wd[u] = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i *)(cell[u] + 32 * p)));
                    w[u] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(wd[u], 24), 24));
                }
                FMA_INPUT(i0 + 2 * p)
                for (long u = 0; u < nb; u++)
                    w[u] = _mm512_cvtepi32_ps(_mm512_srai_epi32(wd[u], 8));
                FMA_INPUT(i0 + 2 * p + 1)
            }
        } else if (fmt == FMT_BF16) {
            for (long p = 0; p < W->in / 2; p++) {
                __m512i raw[NBMAX];
                for (long u = 0; u < nb; u++) {
                    raw[u] = _mm512_loadu_si512(cell[u] + 64 * p);
                    w[u] = _mm512_castsi512_ps(_mm512_slli_epi32(raw[u], 16));
                }
                FMA_INPUT(2 * p)
                for (long u = 0; u < nb; u++)
                    w[u] = _mm512_castsi512_ps(_mm512_and_si512(raw[u], _mm512_set1_epi32((int)0xffff0000)));
                FMA_INPUT(2 * p + 1)
            }
        } else {
            for (long i = 0; i < W->in; i++) {
                for (long u = 0; u < nb; u++)
                    w[u] = _mm512_loadu_ps(cell[u] + 64 * i);
                FMA_INPUT(i)
            }
        }
        fold(W, fmt, cell, total, acc, xsum, ldsum, b, nb, nr);
    }
    store(W, total, y, ldy, add, g0, nb, nr);
}
#undef FMA_INPUT

/* Tile shapes as constants, so that the sums stay in registers. */
#define SHAPES(CALL)                                                                                 \
    do {                                                                                             \
        if (nb == NB1 && nr == 1) CALL(NB1, 1);                                                      \
        else if (nb == NB && nr == NR) CALL(NB, NR);                                                 \
        else if (nb == NB && nr == 1) CALL(NB, 1);                                                   \
        else if (nb == NB && nr == 2) CALL(NB, 2);                                                   \
        else if (nb == NB && nr == 3) CALL(NB, 3);                                                   \
        else if (nb == NB && nr == 4) CALL(NB, 4);                                                   \
        else if (nb == NB && nr == 5) CALL(NB, 5);                                                   \
        else CALL(nb, nr);                                                                           \
    } while (0)

static void run_tile(const Matrix *W, const void *x, int x_bf16, int prompt, long ldx, const float *xsum, long ldsum,
                     float *y, long ldy, int add, long g0, long nb, long nr) {
    const int fmt = W->format;
#if defined(__AVX512BF16__)
    if (x_bf16 && fmt != FMT_F32) {
        static const uint16_t u4[16] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                        0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
        static const uint16_t s4[16] = {0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80,
                                        0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0};
        /* bfloat16 of each nibble value, twice: vpermw reads 5 index bits */
        __m256i half = _mm256_loadu_si256((const __m256i *)(W->signed_q4 ? s4 : u4));
        __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
        const uint16_t *xb = x;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
        if (amx_for(W, x_bf16, prompt)) {
            amx_tile(W, fmt, table, xb, ldx, xsum, ldsum, y, ldy, add, g0, nb, nr);
            return;
        }
#endif
#define CALL(n, r) (fmt == FMT_Q4   ? tile_bf16(W, FMT_Q4, table, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r)      \
                    : fmt == FMT_Q8 ? tile_bf16(W, FMT_Q8, table, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r)      \
                                    : tile_bf16(W, FMT_BF16, table, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r))
        SHAPES(CALL);
#undef CALL
        return;
    }
#endif
    __m512 table = _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                 _mm512_set1_ps(W->signed_q4 ? 8.0f : 0.0f));
#define CALL1(n, r, xb)                                                                                       \
    (fmt == FMT_Q4   ? tile_f32(W, FMT_Q4, table, x, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r)                   \
     : fmt == FMT_Q8 ? tile_f32(W, FMT_Q8, table, x, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r)                   \
     : fmt == FMT_BF16 ? tile_f32(W, FMT_BF16, table, x, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r)               \
                       : tile_f32(W, FMT_F32, table, x, xb, ldx, xsum, ldsum, y, ldy, add, g0, n, r))
#define CALL(n, r) (x_bf16 ? CALL1(n, r, 1) : CALL1(n, r, 0))
    SHAPES(CALL);
#undef CALL
#undef CALL1
}

/* Groups per tile, and rows per tile. */
static long tile_width(const Matrix *W, int x_bf16, int prompt, long rows) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (amx_for(W, x_bf16, prompt))
        return AMX_NB;
#endif
    return rows == 1 ? NB1 : NB;
}

static long tile_rows(const Matrix *W, int x_bf16, int prompt) {
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
    if (amx_for(W, x_bf16, prompt))
        return AMX_ROWS * AMX_CHUNKS;
#endif
    return NR;
}

long matmul_tiles(const Matrix *W, int x_bf16, int prompt, long rows) {
    long groups = (W->out + 15) / 16, width = tile_width(W, x_bf16, prompt, rows);
    return (groups + width - 1) / width;
}

void matmul_run(const Matrix *W, const void *x, int x_bf16, int prompt, long ldx, long rows, const float *xsum,
                long ldsum, float *y, long ldy, int add, long lo, long hi) {
    const long groups = (W->out + 15) / 16, width = tile_width(W, x_bf16, prompt, rows), xsize = x_bf16 ? 2 : 4;
    const long per_tile = tile_rows(W, x_bf16, prompt);
    for (long t = lo; t < hi; t++) {
        long g0 = t * width, nb = groups - g0 < width ? groups - g0 : width;
        for (long r0 = 0; r0 < rows; r0 += per_tile) {
            long nr = rows - r0 < per_tile ? rows - r0 : per_tile;
            run_tile(W, (const char *)x + r0 * ldx * xsize, x_bf16, prompt, ldx, xsum ? xsum + r0 * ldsum : NULL, ldsum,
                     y + r0 * ldy, ldy, add, g0, nb, nr);
        }
    }
}

#elif !defined(KERNELS_AVX2) /* portable: the same layout and the same order of operations, one output at a time */

/* The value of W[o, i] (the weight itself for the dense formats, the integer q for Q4 / Q8). */
static float weight_at(const Matrix *W, long o, long i, const uint8_t **cell_out) {
    const long cells = cells_per_group(W), k = i % W->block;
    const uint8_t *cell = W->data + ((o / 16) * cells + i / W->block) * cell_bytes(W);
    *cell_out = cell;
    long j = o % 16;
    switch (W->format) {
    case FMT_F32: {
        float f;
        memcpy(&f, cell + (k * 16 + j) * 4, 4);
        return f;
    }
    case FMT_BF16: {
        uint16_t h;
        memcpy(&h, cell + ((k / 2) * 32 + j * 2 + k % 2) * 2, 2);
        return bf16_to_f32(h);
    }
    case FMT_Q4: {
        long v = k / 8, c = (k % 8) / 2, member = k % 2;
        const uint8_t *word = cell + 64 * v + 2 * (2 * j + member);
        int q = ((word[0] | word[1] << 8) >> (4 * c)) & 15;
        return (float)(W->signed_q4 ? q - 8 : q);
    }
    default:
        return (float)(int8_t)cell[32 * (k / 2) + 2 * j + k % 2];
    }
}

static float scale_at(const Matrix *W, const uint8_t *cell, long o, int which) {
    const uint8_t *p = cell + cell_weight_bytes(W) + which * 16 * (W->half_scales ? 2 : 4);
    if (W->half_scales) {
        uint16_t h;
        memcpy(&h, p + 2 * (o % 16), 2);
        return half_to_f32(h);
    }
    float f;
    memcpy(&f, p + 4 * (o % 16), 4);
    return f;
}

long matmul_tiles(const Matrix *W, int x_bf16, int prompt, long rows) {
    (void)rows, (void)x_bf16, (void)prompt;
    return (W->out + 15) / 16;
}

/* int8 activations: per block, the integer sum of q_w * q_x (exact in any order), then
 * a = sum * d_x, t = t + a * s (+ m * the block's sum of x). */
static void int8_run(const Matrix *W, const float *prep, long ldp, float *y, long ldy, int add, long rows, long lo,
                     long hi) {
    static const int position[8] = {0, 2, 4, 6, 1, 3, 5, 7}; /* of input i % 8 among the stored q */
    const long nb = W->in / 32;
    for (long o = lo * 16; o < hi * 16 && o < W->out; o++)
        for (long r = 0; r < rows; r++) {
            const float *p = prep + r * ldp;
            const int8_t *q = (const int8_t *)(p + 3 * nb);
            float total = 0.0f;
            for (long b = 0; b < W->in / W->block; b++) {
                const uint8_t *cell = NULL;
                int32_t sum = 0;
                for (long i = b * W->block; i < (b + 1) * W->block; i++)
                    sum += (int32_t)weight_at(W, o, i, &cell) * q[(i & ~7L) + position[i & 7]];
                const float a = (float)sum * p[nb + b * W->block / 32];
                total = fmaf(a, scale_at(W, cell, o, 0), total);
                if (W->has_min)
                    total = fmaf(scale_at(W, cell, o, 1), p[b], total);
            }
            float *dst = y + r * ldy + o;
            *dst = add ? *dst + total : total;
        }
}

void matmul_run(const Matrix *W, const void *x, int x_bf16, int prompt, long ldx, long rows, const float *xsum,
                long ldsum, float *y, long ldy, int add, long lo, long hi) {
    (void)prompt;
    if (int8_applies(W, x_bf16)) {
        int8_run(W, xsum, ldsum, y, ldy, add, rows, lo, hi);
        return;
    }
    const int dense = W->format == FMT_F32 || W->format == FMT_BF16;
    /* bfloat16 pairs as vdpbf16ps takes them (the second product first) where the vector path would */
    const int pairs = x_bf16 && W->format != FMT_F32;
    for (long o = lo * 16; o < hi * 16 && o < W->out; o++)
        for (long r = 0; r < rows; r++) {
            const char *xr = (const char *)x + r * ldx * (x_bf16 ? 2 : 4);
            float total = 0.0f;
            for (long b = 0; b < W->in / W->block; b++) {
                const uint8_t *cell = NULL;
                float acc = 0.0f;
                for (long i = b * W->block; i < (b + 1) * W->block; i += 1 + pairs) {
                    if (pairs)
                        acc = fmaf(weight_at(W, o, i + 1, &cell), act_at(xr, i + 1, 1), acc);
                    acc = fmaf(weight_at(W, o, i, &cell), act_at(xr, i, x_bf16), acc);
                }
                if (dense) {
                    total = acc;
                    continue;
                }
                total = fmaf(acc, scale_at(W, cell, o, 0), total);
                if (W->has_min)
                    total = fmaf(scale_at(W, cell, o, 1), xsum[r * ldsum + b], total);
            }
            float *dst = y + r * ldy + o;
            *dst = add ? *dst + total : total;
        }
}
#endif

typedef struct {
    const Matrix *W;
    const void *x;
    int x_bf16, add;
    long rows;
    float *xsum, *y;
} MatmulCall;

static void prep_items(void *arg, long lo, long hi) {
    const MatmulCall *c = arg;
    for (long r = lo; r < hi; r++)
        row_prep((const char *)c->x + r * c->W->in * (c->x_bf16 ? 2 : 4), c->x_bf16, c->W->in,
                 int8_applies(c->W, c->x_bf16), c->xsum + r * prep_floats(c->W->in));
}

static void product_items(void *arg, long lo, long hi) {
    const MatmulCall *c = arg;
    matmul_run(c->W, c->x, c->x_bf16, 0, c->W->in, c->rows, c->xsum, prep_floats(c->W->in), c->y, c->W->out, c->add,
               lo, hi);
}

/* y = x @ W.T (add: y += x @ W.T) as one call: the product alone, outside a decoder layer. */
void matmul(const Matrix *W, const void *x, int x_bf16, long rows, float *y, int add) {
    const int prep = W->has_min || int8_applies(W, x_bf16);
    MatmulCall c = {W, x, x_bf16, add, rows, prep ? malloc(sizeof(float) * rows * prep_floats(W->in)) : NULL, y};
    if (c.xsum)
        run_items(prep_items, &c, rows, 8);
    run_items(product_items, &c, matmul_tiles(W, x_bf16, 0, rows), 1);
    free(c.xsum);
}

#if !(defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__AVX512BW__))
int kernel_amx(void) { return 0; }
#endif

/* out[r] = W[ids[r]] in float32: rows of a packed matrix, dequantized (the embedding lookup). The
 * same float32 operations as models/quant.py, so the same bits: w = s * t(q), then + m. */
void matrix_rows(const Matrix *W, const long *ids, long n, float *out) {
    const long cells = cells_per_group(W), cb = cell_bytes(W), wb = cell_weight_bytes(W);
    const long half = W->half_scales, sb = 16 * (half ? 2 : 4), in = W->format == FMT_Q4 || W->format == FMT_Q8 ? W->in : W->block;
    for (long r = 0; r < n; r++) {
        const long g = ids[r] / 16, j = ids[r] % 16;
        float *dst = out + r * in;
        for (long b = 0; b < cells; b++) {
            const uint8_t *cell = W->data + (g * cells + b) * cb;
            float s = 1.0f, m = 0.0f;
            if (W->format == FMT_Q4 || W->format == FMT_Q8) {
                uint16_t h;
                memcpy(&h, cell + wb + j * (half ? 2 : 4), 2);
                if (half)
                    s = half_to_f32(h);
                else
                    memcpy(&s, cell + wb + j * 4, 4);
                if (W->has_min) {
                    memcpy(&h, cell + wb + sb + j * 2, 2);
                    if (half)
                        m = half_to_f32(h);
                    else
                        memcpy(&m, cell + wb + sb + j * 4, 4);
                }
            }
            for (long k = 0; k < W->block; k++) {
                float w;
                if (W->format == FMT_F32) {
                    memcpy(&w, cell + (k * 16 + j) * 4, 4);
                } else if (W->format == FMT_BF16) {
                    uint16_t h;
                    memcpy(&h, cell + ((k / 2) * 32 + j * 2 + k % 2) * 2, 2);
                    w = bf16_to_f32(h);
                } else if (W->format == FMT_Q4) {
                    const uint8_t *word = cell + 64 * (k / 8) + 2 * (2 * j + k % 2);
                    int q = ((word[0] | word[1] << 8) >> (4 * ((k % 8) / 2))) & 15;
                    w = s * (float)(W->signed_q4 ? q - 8 : q);
                } else {
                    w = s * (float)(int8_t)cell[32 * (k / 2) + 2 * j + k % 2];
                }
                if (W->has_min)
                    w = w + m;
                dst[b * W->block + k] = w;
            }
        }
    }
}

/* Which instructions the products run on, for the reports. */
const char *kernel_isa(void) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    static const char *paths[] = {"AVX-512 BF16", "AVX-512 BF16, AMX-BF16 for prompts", "AVX-512 BF16 and AMX-BF16"};
    return paths[kernel_amx()];
#elif defined(__AVX512F__) && defined(__AVX512BW__)
    return "AVX-512";
#elif defined(KERNELS_AVX2)
    return kernel_int8() ? "AVX2, int8 activations" : "AVX2";
#else
    return kernel_int8() ? "portable C, int8 activations" : "portable C";
#endif
}
