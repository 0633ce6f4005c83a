/* y[r, o] = sum_i x[r, i] * W[o, i] for the rows of a decode step or a draft tree (1 to ~80).
 *
 * W is packed once at load (see pack_weight in __init__.py) so that one vector holds 16 output
 * features: float32 as [out/16][in][16], bfloat16 as [out/16][in/2][16][2] (the pairs the AVX-512
 * BF16 dot product consumes). A tile of UNROLL x 16 outputs times up to ROWS rows of x then lives
 * in registers while the loop runs over the inputs, with no horizontal reductions. Each output is
 * a sum over the inputs in order, in its own vector lane, whatever the tile or the number of rows
 * in the call: a token's result does not depend on the other tokens in the forward (bitwise).
 * The weights are read from memory once per call; more rows reuse them from cache.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define UNROLL 2 /* 16-output vectors per tile */
#define ROWS 6   /* rows of x per tile: UNROLL * ROWS accumulators stay in registers */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

#if defined(__AVX512F__)
/* One tile: outputs [16 * b0, 16 * (b0 + nb)) x rows [r0, r0 + nr), nb <= UNROLL, nr <= ROWS. */
static inline __attribute__((always_inline)) void tile_f32(const float *Wp, const float *x, float *y, long out,
                                                           long in, long b0, long nb, long r0, long nr) {
    __m512 acc[UNROLL][ROWS];
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++)
            acc[u][r] = _mm512_setzero_ps();
    for (long i = 0; i < in; i++) {
        __m512 w[UNROLL];
        for (long u = 0; u < nb; u++)
            w[u] = _mm512_loadu_ps(Wp + ((b0 + u) * in + i) * 16);
        for (long r = 0; r < nr; r++) {
            __m512 xv = _mm512_set1_ps(x[(r0 + r) * in + i]);
            for (long u = 0; u < nb; u++)
                acc[u][r] = _mm512_fmadd_ps(w[u], xv, acc[u][r]);
        }
    }
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++) {
            long o = (b0 + u) * 16, left = out - o;
            __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
            _mm512_mask_storeu_ps(y + (r0 + r) * out + o, m, acc[u][r]);
        }
}
#endif

#if defined(__AVX512BF16__)
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *Wp, const uint16_t *x, uint16_t *y,
                                                            long out, long in, long b0, long nb, long r0, long nr) {
    __m512 acc[UNROLL][ROWS];
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++)
            acc[u][r] = _mm512_setzero_ps();
    for (long i = 0; i < in; i += 2) {
        __m512bh w[UNROLL];
        for (long u = 0; u < nb; u++)
            w[u] = (__m512bh)_mm512_loadu_si512(Wp + ((b0 + u) * in + i) * 16);
        for (long r = 0; r < nr; r++) {
            uint32_t pair;
            memcpy(&pair, x + (r0 + r) * in + i, 4);
            __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
            for (long u = 0; u < nb; u++)
                acc[u][r] = _mm512_dpbf16_ps(acc[u][r], w[u], xv);
        }
    }
    for (long u = 0; u < nb; u++)
        for (long r = 0; r < nr; r++) {
            long o = (b0 + u) * 16, left = out - o;
            __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
            _mm256_mask_storeu_epi16(y + (r0 + r) * out + o, m, (__m256i)_mm512_cvtneps_pbh(acc[u][r]));
        }
}
#endif

/* Constant tile sizes let the compiler keep the accumulators in registers. */
#define FOR_TILES(tile, Wp, x, y, out, in, rows)                                          \
    do {                                                                                  \
        long blocks = (out + 15) / 16;                                                    \
        _Pragma("omp parallel for schedule(static)")                                      \
        for (long b0 = 0; b0 < blocks; b0 += UNROLL) {                                    \
            long nb = blocks - b0 < UNROLL ? blocks - b0 : UNROLL;                         \
            for (long r0 = 0; r0 < rows; r0 += ROWS) {                                    \
                long nr = rows - r0 < ROWS ? rows - r0 : ROWS;                            \
                if (nb == UNROLL && nr == ROWS) tile(Wp, x, y, out, in, b0, UNROLL, r0, ROWS); \
                else if (nb == UNROLL && nr == 1) tile(Wp, x, y, out, in, b0, UNROLL, r0, 1); \
                else tile(Wp, x, y, out, in, b0, nb, r0, nr);                              \
            }                                                                             \
        }                                                                                 \
    } while (0)

/* Portable fallbacks (no AVX-512): the same packed layout and the same summation order. */
void skinny_gemm_f32(const float *Wp, const float *x, float *y, long out, long in, long rows) {
#if defined(__AVX512F__)
    FOR_TILES(tile_f32, Wp, x, y, out, in, rows);
#else
#pragma omp parallel for schedule(static)
    for (long o = 0; o < out; o++)
        for (long r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (long i = 0; i < in; i++)
                acc += Wp[((o / 16) * in + i) * 16 + o % 16] * x[r * in + i];
            y[r * out + o] = acc;
        }
#endif
}

void skinny_gemm_bf16(const uint16_t *Wp, const uint16_t *x, uint16_t *y, long out, long in, long rows) {
#if defined(__AVX512BF16__)
    FOR_TILES(tile_bf16, Wp, x, y, out, in, rows);
#else
#pragma omp parallel for schedule(static)
    for (long o = 0; o < out; o++)
        for (long r = 0; r < rows; r++) {
            float acc = 0.0f;
            for (long i = 0; i < in; i += 2) {
                const uint16_t *w = Wp + ((o / 16) * in + i) * 16 + (o % 16) * 2;
                acc += bf16_to_f32(w[0]) * bf16_to_f32(x[r * in + i]) + bf16_to_f32(w[1]) * bf16_to_f32(x[r * in + i + 1]);
            }
            y[r * out + o] = f32_to_bf16(acc);
        }
#endif
}
