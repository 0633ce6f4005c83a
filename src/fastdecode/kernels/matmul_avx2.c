/* The products on AVX2 (x86 CPUs without AVX-512: AMD Zen 1-3, Intel Haswell to Alder Lake).
 *
 * Same weight layout as matmul.c (kernels.h) and the same operations as its portable path, one
 * output per vector lane: a 256-bit vector holds 8 float32 lanes, so a group of 16 outputs is two
 * halves. Each lane computes exactly the portable path's sequence for its (output, row):
 *     per block:  acc = 0; acc = fma(w_i, x_i, acc) over the block's inputs
 *                 (bfloat16 activations with integer or bfloat16 weights take each input pair
 *                 second first, as the portable path does)
 *                 t = fma(acc, s, t), then t = fma(m, xsum, t) where there is a minimum
 *     at the end: y = t (or y + t)
 * so a row's result is the same bits whichever rows share the call and whatever the tile shape,
 * and the same bits as the portable path (tests/test_kernels.py builds both and compares).
 *
 * Weights are expanded to float32 (integers and bfloat16 are exact there). Up to 4 rows, a tile
 * expands them in registers and keeps 8 to 16 sums in flight to cover the FMA latency: 4 groups of
 * one row (a decode step), 3 groups of 2 rows, or 2 groups of 3 or 4 rows; its activations are
 * converted to float32 once per 32 inputs, element by element (vector stores read back by scalar
 * broadcasts stall store forwarding: a quarter slower). More rows (draft trees, prompts) go group
 * by group: each 32 inputs' weights are expanded once into a buffer and serve every row, 6 rows
 * (12 sums) at a time, over activations converted to float32 once per call: on a 2-core Zen 3 a
 * product of 16 rows went from about 36 to 48 GMAC/s.
 */
#include "kernels.h"

#ifdef KERNELS_AVX2

#define MAXG 4
#define MAXR 4
#define SUB 6   /* rows per register tile in group_rows */
#define PASS 48 /* rows whose sums group_rows keeps while a group's blocks pass */
#define CHUNK 32

/* Weights of inputs 2p and 2p+1 (within the cell) for outputs 8h .. 8h+7 of one cell. Q4: word j
 * of vector v holds output j / 2, input 8v + 2c + j % 2 in nibble c (c = p % 4). */
static inline __attribute__((always_inline)) void pair_weights(const uint8_t *cell, const int fmt, int signed_q4,
                                                               long p, long h, __m256 *even, __m256 *odd) {
    if (fmt == FMT_Q4) {
        const int c = (int)(p % 4);
        __m256i raw = _mm256_loadu_si256((const __m256i *)(cell + 64 * (p / 4) + 32 * h)), nibble = _mm256_set1_epi32(15);
        __m256i e = _mm256_and_si256(_mm256_srli_epi32(raw, 4 * c), nibble);
        __m256i o = _mm256_and_si256(_mm256_srli_epi32(raw, 4 * c + 16), nibble);
        if (signed_q4) {
            e = _mm256_sub_epi32(e, _mm256_set1_epi32(8));
            o = _mm256_sub_epi32(o, _mm256_set1_epi32(8));
        }
        *even = _mm256_cvtepi32_ps(e);
        *odd = _mm256_cvtepi32_ps(o);
    } else if (fmt == FMT_Q8) { /* byte j: output j / 2, input 2p + j % 2 */
        __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(cell + 32 * p + 16 * h)));
        *even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
        *odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8));
    } else { /* bfloat16 pairs: [16 outputs][2 inputs] */
        __m256i v = _mm256_loadu_si256((const __m256i *)(cell + 64 * p + 32 * h));
        *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000)));
    }
}

static inline __m256 load_scales8(const uint8_t *p, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}

/* Groups [g0, g0 + ng) x rows of x (nr of them). */
static inline __attribute__((always_inline)) void tile(const Matrix *W, const int fmt, const void *x, const int x_bf16,
                                                       long ldx, const float *xsum, long ldsum, float *y, long ldy,
                                                       int add, long g0, const long ng, const long nr) {
    const long cells = cells_per_group(W), cb = cell_bytes(W), wb = cell_weight_bytes(W);
    const long sb = W->half_scales ? 32 : 64, hb = W->half_scales ? 16 : 32; /* scale bytes: all, a half's */
    const int second_first = x_bf16 && fmt != FMT_F32, dense = fmt == FMT_F32 || fmt == FMT_BF16;
    __m256 total[MAXG][2][MAXR], acc[MAXG][2][MAXR];
    float xf[MAXR][CHUNK];
    for (long u = 0; u < ng; u++)
        for (long h = 0; h < 2; h++)
            for (long r = 0; r < nr; r++)
                total[u][h][r] = _mm256_setzero_ps();
    for (long b = 0; b < cells; b++) {
        const uint8_t *cell[MAXG];
        for (long u = 0; u < ng; u++) {
            cell[u] = W->data + ((g0 + u) * cells + b) * cb;
            for (long h = 0; h < 2; h++)
                for (long r = 0; r < nr; r++)
                    acc[u][h][r] = _mm256_setzero_ps();
        }
        for (long k0 = 0; k0 < W->block; k0 += CHUNK) {
            const long n = W->block - k0 < CHUNK ? W->block - k0 : CHUNK, i0 = b * W->block + k0;
            for (long r = 0; r < nr; r++)
                for (long k = 0; k < n; k++)
                    xf[r][k] = act_at(x, r * ldx + i0 + k, x_bf16);
            if (fmt == FMT_F32) {
                for (long k = 0; k < n; k++)
                    for (long u = 0; u < ng; u++)
                        for (long h = 0; h < 2; h++) {
                            __m256 w = _mm256_loadu_ps((const float *)(cell[u] + 64 * (k0 + k) + 32 * h));
                            for (long r = 0; r < nr; r++)
                                acc[u][h][r] = _mm256_fmadd_ps(w, _mm256_broadcast_ss(&xf[r][k]), acc[u][h][r]);
                        }
                continue;
            }
            for (long k = 0; k < n; k += 2)
                for (long u = 0; u < ng; u++)
                    for (long h = 0; h < 2; h++) {
                        __m256 we, wo;
                        pair_weights(cell[u], fmt, W->signed_q4, (k0 + k) / 2, h, &we, &wo);
                        __m256 w1 = second_first ? wo : we, w2 = second_first ? we : wo;
                        for (long r = 0; r < nr; r++) {
                            const float *x1 = &xf[r][k + second_first], *x2 = &xf[r][k + !second_first];
                            acc[u][h][r] = _mm256_fmadd_ps(w1, _mm256_broadcast_ss(x1), acc[u][h][r]);
                            acc[u][h][r] = _mm256_fmadd_ps(w2, _mm256_broadcast_ss(x2), acc[u][h][r]);
                        }
                    }
        }
        for (long u = 0; u < ng; u++)
            for (long h = 0; h < 2; h++) {
                if (dense) {
                    for (long r = 0; r < nr; r++)
                        total[u][h][r] = acc[u][h][r];
                    continue;
                }
                __m256 s = load_scales8(cell[u] + wb + h * hb, W->half_scales);
                for (long r = 0; r < nr; r++)
                    total[u][h][r] = _mm256_fmadd_ps(acc[u][h][r], s, total[u][h][r]);
                if (W->has_min) {
                    __m256 m = load_scales8(cell[u] + wb + sb + h * hb, W->half_scales);
                    for (long r = 0; r < nr; r++)
                        total[u][h][r] = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[r * ldsum + b]), total[u][h][r]);
                }
            }
    }
    for (long u = 0; u < ng; u++)
        for (long h = 0; h < 2; h++) {
            const long o = (g0 + u) * 16 + 8 * h, left = W->out - o;
            if (left <= 0)
                continue;
            for (long r = 0; r < nr; r++) {
                float *dst = y + r * ldy + o, v[8];
                if (left >= 8) {
                    __m256 t = add ? _mm256_add_ps(_mm256_loadu_ps(dst), total[u][h][r]) : total[u][h][r];
                    _mm256_storeu_ps(dst, t);
                    continue;
                }
                _mm256_storeu_ps(v, total[u][h][r]);
                for (long j = 0; j < left; j++)
                    dst[j] = add ? dst[j] + v[j] : v[j];
            }
        }
}

/* Rows 0 .. nr-1 (a constant where inlined, at most SUB) of one chunk: sums[r] += w[j] * x[r][j]
 * over the chunk's inputs in order; 12 sums in registers keep both FMA units busy. */
static inline __attribute__((always_inline)) void chunk_rows(const float (*w)[16], const float *x, long ldx, long n,
                                                             int second_first, int fresh, float (*sums)[16],
                                                             const long nr) {
    __m256 acc[SUB][2];
    for (long r = 0; r < nr; r++)
        for (long h = 0; h < 2; h++)
            acc[r][h] = fresh ? _mm256_setzero_ps() : _mm256_load_ps(&sums[r][8 * h]);
    for (long j = 0; j < n; j++) {
        const __m256 w0 = _mm256_load_ps(&w[j][0]), w1 = _mm256_load_ps(&w[j][8]);
        const long k = j ^ second_first;
        for (long r = 0; r < nr; r++) {
            const __m256 xb = _mm256_broadcast_ss(&x[r * ldx + k]);
            acc[r][0] = _mm256_fmadd_ps(w0, xb, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, xb, acc[r][1]);
        }
    }
    for (long r = 0; r < nr; r++)
        for (long h = 0; h < 2; h++)
            _mm256_store_ps(&sums[r][8 * h], acc[r][h]);
}

/* Group g (16 outputs) for nr <= PASS rows of float32 activations: a chunk's weights are expanded
 * to float32 once, into a buffer in processing order (each input pair swapped where the portable
 * path swaps it), and every row takes them from there. Each lane runs the sequence at the top. */
static inline __attribute__((always_inline)) void group_rows(const Matrix *W, const int fmt, const float *x, long ldx,
                                                             int second_first, const float *xsum, long ldsum, float *y,
                                                             long ldy, int add, long g, long nr) {
    const long cells = cells_per_group(W), cb = cell_bytes(W), wb = cell_weight_bytes(W);
    const long sb = W->half_scales ? 32 : 64, hb = W->half_scales ? 16 : 32;
    const int dense = fmt == FMT_F32 || fmt == FMT_BF16;
    float w[CHUNK][16] __attribute__((aligned(32)));
    float sums[PASS][16] __attribute__((aligned(32))), totals[PASS][16] __attribute__((aligned(32)));
    memset(totals, 0, nr * sizeof totals[0]);
    for (long b = 0; b < cells; b++) {
        const uint8_t *cell = W->data + (g * cells + b) * cb;
        for (long k0 = 0; k0 < W->block; k0 += CHUNK) {
            const long n = W->block - k0 < CHUNK ? W->block - k0 : CHUNK;
            for (long k = 0; k < n; k += 2)
                for (long h = 0; h < 2; h++) {
                    __m256 we, wo = _mm256_setzero_ps();
                    if (fmt == FMT_F32) {
                        we = _mm256_loadu_ps((const float *)(cell + 64 * (k0 + k) + 32 * h));
                        if (k + 1 < n)
                            wo = _mm256_loadu_ps((const float *)(cell + 64 * (k0 + k + 1) + 32 * h));
                    } else
                        pair_weights(cell, fmt, W->signed_q4, (k0 + k) / 2, h, &we, &wo);
                    _mm256_store_ps(&w[k ^ second_first][8 * h], we);
                    _mm256_store_ps(&w[(k + 1) ^ second_first][8 * h], wo);
                }
            const float *xc = x + b * W->block + k0;
            long r = 0;
            for (; r + SUB <= nr; r += SUB)
                chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, SUB);
            switch (nr - r) { /* the rest, with constant counts too */
            case 5: chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, 5); break;
            case 4: chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, 4); break;
            case 3: chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, 3); break;
            case 2: chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, 2); break;
            case 1: chunk_rows(w, xc + r * ldx, ldx, n, second_first, k0 == 0, sums + r, 1); break;
            }
        }
        for (long h = 0; h < 2; h++) {
            const __m256 s = dense ? _mm256_setzero_ps() : load_scales8(cell + wb + h * hb, W->half_scales);
            const __m256 m = W->has_min ? load_scales8(cell + wb + sb + h * hb, W->half_scales) : s;
            for (long r = 0; r < nr; r++) {
                __m256 t = _mm256_load_ps(&sums[r][8 * h]);
                if (!dense) {
                    t = _mm256_fmadd_ps(t, s, _mm256_load_ps(&totals[r][8 * h]));
                    if (W->has_min)
                        t = _mm256_fmadd_ps(m, _mm256_set1_ps(xsum[r * ldsum + b]), t);
                }
                _mm256_store_ps(&totals[r][8 * h], t);
            }
        }
    }
    for (long h = 0; h < 2; h++) {
        const long o = g * 16 + 8 * h, left = W->out - o < 8 ? W->out - o : 8;
        for (long r = 0; r < nr; r++)
            for (long j = 0; j < left; j++)
                y[r * ldy + o + j] = add ? y[r * ldy + o + j] + totals[r][8 * h + j] : totals[r][8 * h + j];
    }
}

/* Rows lo .. lo+n-1 of x as float32 (a buffer per thread, kept between calls), or x itself. */
static const float *float_rows(const void *x, int x_bf16, long ldx, long lo, long n, long width, long *ld) {
    static __thread float *buffer;
    static __thread long size;
    if (!x_bf16) {
        *ld = ldx;
        return (const float *)x + lo * ldx;
    }
    if (size < n * width + 8) { /* + 8: a row's last vector store may pass its end by up to 7 */
        free(buffer);
        buffer = malloc((n * width + 8) * sizeof(float));
        size = buffer ? n * width + 8 : 0;
        if (!buffer) /* a few kilobytes a row: without them the process has no memory left anyway */
            abort();
    }
    for (long r = 0; r < n; r++)
        for (long i = 0; i < width; i += 8)
            _mm256_storeu_ps(buffer + r * width + i, act_load8(x, (lo + r) * ldx + i, 1, width - i));
    *ld = width;
    return buffer;
}

/* Many rows: group by group, PASS rows at a time (see group_rows). */
static void many_rows(const Matrix *W, const void *x, int x_bf16, long ldx, long rows, const float *xsum, long ldsum,
                      float *y, long ldy, int add, long lo, long hi) {
    const int second_first = x_bf16 && W->format != FMT_F32;
    for (long p0 = 0; p0 < rows; p0 += PASS) {
        const long nr = rows - p0 < PASS ? rows - p0 : PASS;
        long ld;
        const float *xs = float_rows(x, x_bf16, ldx, p0, nr, W->in, &ld), *ss = xsum ? xsum + p0 * ldsum : NULL;
        float *yr = y + p0 * ldy;
        for (long g = lo; g < hi; g++) {
            if (W->format == FMT_Q4) group_rows(W, FMT_Q4, xs, ld, second_first, ss, ldsum, yr, ldy, add, g, nr);
            else if (W->format == FMT_Q8) group_rows(W, FMT_Q8, xs, ld, second_first, ss, ldsum, yr, ldy, add, g, nr);
            else if (W->format == FMT_BF16) group_rows(W, FMT_BF16, xs, ld, second_first, ss, ldsum, yr, ldy, add, g, nr);
            else group_rows(W, FMT_F32, xs, ld, second_first, ss, ldsum, yr, ldy, add, g, nr);
        }
    }
}

/* int8 activations (kernels.h): integer products on the packed weights as they are, 32 bits a lane.
 * A Q4 word's bytes, masked to their low nibbles, hold inputs 0 4 1 5 of 8 for one output, their
 * high nibbles inputs 2 6 3 7: the order of the row's stored integers, so one 4-byte broadcast of
 * them meets 8 outputs in vpmaddubsw (unsigned 4-bit weight times signed 8-bit input, pairs
 * added to 16 bits). A block's 8 such products fit 16 bits (16 x 15 x 127 < 2^15); vpmaddwd adds
 * the pairs to 32 bits (Q4_0's q - 8 then takes 8 times the block's sum of integers). Q8's 32-byte input pairs interleave to the same order (bytes of pairs 0
 * and 2, then 1 and 3), lanes holding outputs 0-3 and 8-11, or 4-7 and 12-15; a signed weight
 * meets the input as |w| times x with w's sign. Then per block, as the portable path:
 *     a = sum * d_x,  t = fma(a, s, t)  (t = fma(m, the block's sum of x, t) with a minimum). */
#define I8H 4 /* halves (8 outputs) per tile of a one-row call */
#define I8R 2 /* rows per tile of a call of more rows, a whole group */

static inline __m256i broadcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* Halves h0 .. h0+nh-1 (8 outputs each; half h is half h % 2 of group h / 2) x rows 0 .. nr-1. A
 * broadcast serves every half of a one-row tile; with more rows each is used once and loaded
 * where it is used, so that the sums stay in registers. */
static inline __attribute__((always_inline)) void tile_int8(const Matrix *W, const int fmt, const float *prep,
                                                            long ldp, float *y, long ldy, int add, long h0,
                                                            const long nh, const long nr) {
    const long cells = cells_per_group(W), cb = cell_bytes(W), wb = cell_weight_bytes(W), nb = W->in / 32;
    const long sb = W->half_scales ? 32 : 64, hb = W->half_scales ? 16 : 32;
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const int8_t *q[I8R];
    for (long r = 0; r < nr; r++)
        q[r] = (const int8_t *)(prep + r * ldp + 3 * nb);
    __m256 total[I8H][I8R];
    for (long u = 0; u < nh; u++)
        for (long r = 0; r < nr; r++)
            total[u][r] = _mm256_setzero_ps();
    for (long b = 0; b < cells; b++) {
        const long i0 = b * W->block;
        const uint8_t *cell[I8H];
        __m256i sum[I8H][I8R];
        for (long u = 0; u < nh; u++) {
            cell[u] = W->data + (((h0 + u) / 2) * cells + b) * cb;
            for (long r = 0; r < nr; r++)
                sum[u][r] = _mm256_setzero_si256();
        }
        if (fmt == FMT_Q4) {
            for (long v = 0; v < 4; v++)
                for (long u = 0; u < nh; u++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(cell[u] + 64 * v + 32 * ((h0 + u) % 2)));
                    const __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
                    for (long r = 0; r < nr; r++) {
                        sum[u][r] = _mm256_add_epi16(sum[u][r], _mm256_maddubs_epi16(lo, broadcast4(q[r] + i0 + 8 * v)));
                        sum[u][r] = _mm256_add_epi16(sum[u][r], _mm256_maddubs_epi16(hi, broadcast4(q[r] + i0 + 8 * v + 4)));
                    }
                }
            for (long u = 0; u < nh; u++)
                for (long r = 0; r < nr; r++) {
                    sum[u][r] = _mm256_madd_epi16(sum[u][r], ones);
                    if (W->signed_q4) /* q - 8 */
                        sum[u][r] = _mm256_sub_epi32(sum[u][r], _mm256_set1_epi32(8 * ((const int32_t *)(prep + r * ldp + 2 * nb))[b]));
                }
        } else {
            for (long k = 0; k < W->block; k += 8)
                for (long u = 0; u < nh; u++) {
                    const uint8_t *c = cell[u] + 16 * k; /* input pairs k/2 .. k/2 + 3, 32 bytes each */
                    const __m256i p0 = _mm256_loadu_si256((const __m256i *)c), p1 = _mm256_loadu_si256((const __m256i *)(c + 32));
                    const __m256i p2 = _mm256_loadu_si256((const __m256i *)(c + 64)), p3 = _mm256_loadu_si256((const __m256i *)(c + 96));
                    const int high = (h0 + u) % 2;
                    const __m256i wa = high ? _mm256_unpackhi_epi8(p0, p2) : _mm256_unpacklo_epi8(p0, p2);
                    const __m256i wb = high ? _mm256_unpackhi_epi8(p1, p3) : _mm256_unpacklo_epi8(p1, p3);
                    const __m256i aa = _mm256_abs_epi8(wa), ab = _mm256_abs_epi8(wb);
                    for (long r = 0; r < nr; r++) {
                        const __m256i pa = _mm256_maddubs_epi16(aa, _mm256_sign_epi8(broadcast4(q[r] + i0 + k), wa));
                        const __m256i pb = _mm256_maddubs_epi16(ab, _mm256_sign_epi8(broadcast4(q[r] + i0 + k + 4), wb));
                        sum[u][r] = _mm256_add_epi32(sum[u][r], _mm256_madd_epi16(pa, ones));
                        sum[u][r] = _mm256_add_epi32(sum[u][r], _mm256_madd_epi16(pb, ones));
                    }
                }
        }
        for (long u = 0; u < nh; u++) {
            const int high = (h0 + u) % 2;
            __m256 s, m;
            if (fmt == FMT_Q8) { /* lanes: outputs 0-3 and 8-11 (low), 4-7 and 12-15 (high) */
                const __m256 s0 = load_scales8(cell[u] + wb, W->half_scales), s1 = load_scales8(cell[u] + wb + hb, W->half_scales);
                s = high ? _mm256_permute2f128_ps(s0, s1, 0x31) : _mm256_permute2f128_ps(s0, s1, 0x20);
                m = s; /* no Q8 format has minimums */
            } else {
                s = load_scales8(cell[u] + wb + high * hb, W->half_scales);
                m = W->has_min ? load_scales8(cell[u] + wb + sb + high * hb, W->half_scales) : s;
            }
            for (long r = 0; r < nr; r++) {
                const float *p = prep + r * ldp;
                const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(sum[u][r]), _mm256_set1_ps(p[nb + i0 / 32]));
                total[u][r] = _mm256_fmadd_ps(a, s, total[u][r]);
                if (fmt == FMT_Q4 && W->has_min)
                    total[u][r] = _mm256_fmadd_ps(m, _mm256_set1_ps(p[b]), total[u][r]);
            }
        }
    }
    for (long u = 0; u < nh; u++)
        for (long r = 0; r < nr; r++) {
            float v[8];
            _mm256_storeu_ps(v, total[u][r]);
            const long h = h0 + u, o = (h / 2) * 16;
            for (long j = 0; j < 8; j++) { /* output of lane j */
                const long at = o + (fmt == FMT_Q8 ? (j < 4 ? 4 * (h % 2) + j : 8 + 4 * (h % 2) + j - 4) : 8 * (h % 2) + j);
                if (at < W->out)
                    y[r * ldy + at] = add ? y[r * ldy + at] + v[j] : v[j];
            }
        }
}

static void int8_run(const Matrix *W, const float *prep, long ldp, float *y, long ldy, int add, long rows, long lo,
                     long hi) {
    const long halves = 2 * ((W->out + 15) / 16);
    for (long t = lo; t < hi; t++) {
        if (rows == 1) {
            const long h0 = t * I8H, nh = halves - h0 < I8H ? halves - h0 : I8H;
            if (nh == I8H)
                W->format == FMT_Q4 ? tile_int8(W, FMT_Q4, prep, ldp, y, ldy, add, h0, I8H, 1)
                                    : tile_int8(W, FMT_Q8, prep, ldp, y, ldy, add, h0, I8H, 1);
            else
                for (long h = h0; h < h0 + nh; h++)
                    W->format == FMT_Q4 ? tile_int8(W, FMT_Q4, prep, ldp, y, ldy, add, h, 1, 1)
                                        : tile_int8(W, FMT_Q8, prep, ldp, y, ldy, add, h, 1, 1);
            continue;
        }
        for (long r0 = 0; r0 < rows; r0 += I8R) {
            const long nr = rows - r0 < I8R ? rows - r0 : I8R;
            const float *p = prep + r0 * ldp;
            float *yr = y + r0 * ldy;
#define RUN(f)                                                                                       \
    (nr == 3 ? tile_int8(W, f, p, ldp, yr, ldy, add, 2 * t, 2, 3)                                    \
     : nr == 2 ? tile_int8(W, f, p, ldp, yr, ldy, add, 2 * t, 2, 2) : tile_int8(W, f, p, ldp, yr, ldy, add, 2 * t, 2, 1))
            if (W->format == FMT_Q4)
                RUN(FMT_Q4);
            else
                RUN(FMT_Q8);
#undef RUN
        }
    }
}

/* Groups per tile by the call's rows: 8 to 16 sums in flight (see the top); on a 2-core Zen 3 the
 * 2-row products of a forward took 16% less time in 3-group tiles than in 2-group ones, the 3- and
 * 4-row ones 10% less in 2-group tiles than in 1-group ones. */
static long tile_groups(long rows) { return rows == 1 ? 4 : rows == 2 ? 3 : rows <= 4 ? 2 : 1; }

long matmul_tiles(const Matrix *W, int x_bf16, int prompt, long rows) {
    (void)prompt;
    long groups = (W->out + 15) / 16, width = int8_applies(W, x_bf16) ? (rows == 1 ? I8H / 2 : 1) : tile_groups(rows);
    return (groups + width - 1) / width;
}

void matmul_run(const Matrix *W, const void *x, int x_bf16, int prompt, long ldx, long rows, const float *xsum,
                long ldsum, float *y, long ldy, int add, long lo, long hi) {
    (void)prompt;
    const long groups = (W->out + 15) / 16, width = tile_groups(rows), per_tile = rows == 2 ? 2 : MAXR;
    const long xsize = x_bf16 ? 2 : 4, fmt = W->format;
    if (int8_applies(W, x_bf16)) { /* xsum: the rows' prep */
        int8_run(W, xsum, ldsum, y, ldy, add, rows, lo, hi);
        return;
    }
    if (rows > MAXR) { /* one group a tile */
        many_rows(W, x, x_bf16, ldx, rows, xsum, ldsum, y, ldy, add, lo, hi);
        return;
    }
    for (long t = lo; t < hi; t++) {
        const long g0 = t * width, ng = groups - g0 < width ? groups - g0 : width;
        for (long r0 = 0; r0 < rows; r0 += per_tile) {
            const long nr = rows - r0 < per_tile ? rows - r0 : per_tile;
            const void *xr = (const char *)x + r0 * ldx * xsize;
            const float *sr = xsum ? xsum + r0 * ldsum : NULL;
            float *yr = y + r0 * ldy;
/* Tile shapes, formats and the activations' type as constants, so that the sums stay in registers
 * (a run-time type cost 3- and 4-row products a fifth of their speed). */
#define ACTS(f, g, r) (x_bf16 ? tile(W, f, xr, 1, ldx, sr, ldsum, yr, ldy, add, g0, g, r)                 \
                             : tile(W, f, xr, 0, ldx, sr, ldsum, yr, ldy, add, g0, g, r))
#define SHAPE(g, r)                                                                                     \
    (fmt == FMT_Q4 ? ACTS(FMT_Q4, g, r) : fmt == FMT_Q8 ? ACTS(FMT_Q8, g, r)                            \
     : fmt == FMT_BF16 ? ACTS(FMT_BF16, g, r) : ACTS(FMT_F32, g, r))
            if (ng == 4 && nr == 1) SHAPE(4, 1);
            else if (ng == 3 && nr == 2) SHAPE(3, 2);
            else if (ng == 2 && nr == 4) SHAPE(2, 4);
            else if (ng == 2 && nr == 3) SHAPE(2, 3);
            else if (ng == 2 && nr == 2) SHAPE(2, 2);
            else if (ng == 1 && nr == 4) SHAPE(1, 4);
            else if (ng == 1 && nr == 3) SHAPE(1, 3);
            else if (ng == 1 && nr == 2) SHAPE(1, 2);
            else if (ng == 1 && nr == 1) SHAPE(1, 1);
            else SHAPE(ng, nr);
#undef SHAPE
#undef ACTS
        }
    }
}

#endif
