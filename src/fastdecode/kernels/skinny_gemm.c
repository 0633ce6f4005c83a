/* y[r, o] = sum_i x[r, i] * W[o, i] for a few rows r: the matrix products of a decode step.
 *
 * One pass over W (row-major [out, in]) serves every row of x: a block of 4 weight rows is read
 * from memory once and stays in L1 while each x row is multiplied by it. Each output is summed
 * in the same order whatever the number of rows, so a token's result does not depend on how many
 * other tokens share the call. Float32, and bfloat16 with float32 accumulation; AVX-512 (and its
 * BF16 dot products) when the compiler targets them, plain C otherwise.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 4 /* weight rows per block: 4 x 576 floats stay in L1 across the x rows */

static inline float dot_f32(const float *w, const float *x, long in) {
    long i = 0;
    float acc = 0.0f;
#ifdef __AVX512F__
    __m512 a = _mm512_setzero_ps();
    for (; i + 16 <= in; i += 16)
        a = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a);
    acc = _mm512_reduce_add_ps(a);
#endif
    for (; i < in; i++)
        acc += w[i] * x[i];
    return acc;
}

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

static inline float dot_bf16(const uint16_t *w, const uint16_t *x, long in) {
    long i = 0;
    float acc = 0.0f;
#ifdef __AVX512BF16__
    __m512 a = _mm512_setzero_ps();
    for (; i + 32 <= in; i += 32)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(x + i));
    acc = _mm512_reduce_add_ps(a);
#endif
    for (; i < in; i++)
        acc += bf16_to_f32(w[i]) * bf16_to_f32(x[i]);
    return acc;
}

/* The AVX-512 paths compute a tile of BLOCK weight rows x TILE x rows per pass over the inputs,
 * each output in its own accumulator with the same chunk order as dot_f32 / dot_bf16 (and the same
 * final reduction), so tiling changes the speed, never a bit of the result. */
#define TILE 4

#ifdef __AVX512F__
static inline __attribute__((always_inline)) void tile_f32(const float *W, const float *x, float *y, long out, long in, long o, long r, long nw, long nx) {
    __m512 acc[BLOCK][TILE];
    for (long a = 0; a < nw; a++)
        for (long b = 0; b < nx; b++)
            acc[a][b] = _mm512_setzero_ps();
    for (long i = 0; i + 16 <= in; i += 16) {
        __m512 xv[TILE];
        for (long b = 0; b < nx; b++)
            xv[b] = _mm512_loadu_ps(x + (r + b) * in + i);
        for (long a = 0; a < nw; a++) {
            __m512 wv = _mm512_loadu_ps(W + (o + a) * in + i);
            for (long b = 0; b < nx; b++)
                acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
        }
    }
    for (long a = 0; a < nw; a++)
        for (long b = 0; b < nx; b++) {
            float s = _mm512_reduce_add_ps(acc[a][b]);
            for (long i = in - in % 16; i < in; i++)
                s += W[(o + a) * in + i] * x[(r + b) * in + i];
            y[(r + b) * out + o + a] = s;
        }
}
#endif

#ifdef __AVX512BF16__
static inline __attribute__((always_inline)) void tile_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, long out, long in, long o, long r, long nw, long nx) {
    __m512 acc[BLOCK][TILE];
    for (long a = 0; a < nw; a++)
        for (long b = 0; b < nx; b++)
            acc[a][b] = _mm512_setzero_ps();
    for (long i = 0; i + 32 <= in; i += 32) {
        __m512bh xv[TILE];
        for (long b = 0; b < nx; b++)
            xv[b] = (__m512bh)_mm512_loadu_si512(x + (r + b) * in + i);
        for (long a = 0; a < nw; a++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(W + (o + a) * in + i);
            for (long b = 0; b < nx; b++)
                acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, xv[b]);
        }
    }
    for (long a = 0; a < nw; a++)
        for (long b = 0; b < nx; b++) {
            float s = _mm512_reduce_add_ps(acc[a][b]);
            for (long i = in - in % 32; i < in; i++)
                s += bf16_to_f32(W[(o + a) * in + i]) * bf16_to_f32(x[(r + b) * in + i]);
            y[(r + b) * out + o + a] = f32_to_bf16(s);
        }
}
#endif

/* Constant tile sizes let the compiler keep the accumulators in registers. */
#define DISPATCH(tile, W, x, y, out, in, o, r, nw, left)                          \
    do {                                                                          \
        if ((nw) == BLOCK) {                                                      \
            if ((left) >= 4) tile(W, x, y, out, in, o, r, BLOCK, 4);               \
            else if ((left) == 3) tile(W, x, y, out, in, o, r, BLOCK, 3);          \
            else if ((left) == 2) tile(W, x, y, out, in, o, r, BLOCK, 2);          \
            else tile(W, x, y, out, in, o, r, BLOCK, 1);                           \
        } else                                                                    \
            tile(W, x, y, out, in, o, r, nw, (left) < TILE ? (left) : TILE);      \
    } while (0)

void skinny_gemm_f32(const float *W, const float *x, float *y, long out, long in, long rows) {
#pragma omp parallel for schedule(static)
    for (long o = 0; o < out; o += BLOCK) {
        long nw = out - o < BLOCK ? out - o : BLOCK;
#ifdef __AVX512F__
        for (long r = 0; r < rows; r += TILE)
            DISPATCH(tile_f32, W, x, y, out, in, o, r, nw, rows - r);
#else
        for (long r = 0; r < rows; r++)
            for (long k = o; k < o + nw; k++)
                y[r * out + k] = dot_f32(W + k * in, x + r * in, in);
#endif
    }
}

void skinny_gemm_bf16(const uint16_t *W, const uint16_t *x, uint16_t *y, long out, long in, long rows) {
#pragma omp parallel for schedule(static)
    for (long o = 0; o < out; o += BLOCK) {
        long nw = out - o < BLOCK ? out - o : BLOCK;
#ifdef __AVX512BF16__
        for (long r = 0; r < rows; r += TILE)
            DISPATCH(tile_bf16, W, x, y, out, in, o, r, nw, rows - r);
#else
        for (long r = 0; r < rows; r++)
            for (long k = o; k < o + nw; k++)
                y[r * out + k] = f32_to_bf16(dot_bf16(W + k * in, x + r * in, in));
#endif
    }
}
