/* Attention of n new query rows over a KV cache, with a result for each row that does not depend
 * on the other rows: the same token gets the same bits alone, in a chain or inside a draft tree.
 *
 * Row r (one query head) sees the committed keys [0, start) and the new rows its mask allows
 * (itself and its tree ancestors; causal when mask is NULL). Its visible keys are ranked in
 * order, 0 .. count-1, and every reduction runs over ranks, never over storage slots: a tree node
 * whose ancestors sit in scattered cache slots sums exactly as the same token does when decoded
 * one at a time, where those keys are contiguous.
 *   score[k] = sum_d q[d] * key[d]          (a fused multiply-add chain over d = 0 .. D-1)
 *   p[k]     = exp(score[k] * scale - max)  (one vector exp for every element)
 *   out      = (sum_k p[k] * value[k]) / sum_k p[k]   (in rank order)
 *
 * Keys are stored transposed, [kv_heads, D, capacity], so that 16 consecutive keys are one vector
 * load per d; values row-major [kv_heads, capacity, D]. float32 or bfloat16 storage, float32 math.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline float load_scalar(const void *base, long i, int bf16) {
    if (!bf16)
        return ((const float *)base)[i];
    uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef __AVX512F__
static inline __m512 load16(const void *base, long i, int bf16, __mmask16 m) {
    if (!bf16)
        return _mm512_maskz_loadu_ps(m, (const float *)base + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* exp(x) for 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2; ~2 ulp, -inf -> 0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* score of query q against key slot j: the same fma chain as one lane of the vector path. */
static inline float score_one(const float *q, const void *kt, long cap, long D, long j, int bf16) {
    float acc = 0.0f;
    for (long d = 0; d < D; d++)
        acc = fmaf(q[d], load_scalar(kt, d * cap + j, bf16), acc);
    return acc;
}

static void attend_row(const float *q, const void *kt, const void *v, int bf16, long D, long cap, long start,
                       const long *slots, long count, float scale, float *score, float *out) {
    /* scores by rank; ranks < start are slots < start */
#ifdef __AVX512F__
    for (long j = 0; j < start; j += 16) {
        __mmask16 m = start - j >= 16 ? 0xffff : (__mmask16)((1u << (start - j)) - 1);
        __m512 acc = _mm512_setzero_ps();
        for (long d = 0; d < D; d++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), load16(kt, d * cap + j, bf16, m), acc);
        _mm512_mask_storeu_ps(score + j, m, acc);
    }
#else
    for (long j = 0; j < start; j++)
        score[j] = score_one(q, kt, cap, D, j, bf16);
#endif
    for (long k = start; k < count; k++)
        score[k] = score_one(q, kt, cap, D, slots[k - start], bf16);

    float max = -INFINITY;
    for (long k = 0; k < count; k++)
        max = score[k] * scale > max ? score[k] * scale : max;
    float sum;
#ifdef __AVX512F__
    __m512 vsum = _mm512_setzero_ps();
    for (long k = 0; k < count; k += 16) {
        __mmask16 m = count - k >= 16 ? 0xffff : (__mmask16)((1u << (count - k)) - 1);
        __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, score + k);
        __m512 p = exp16(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_set1_ps(scale)), _mm512_set1_ps(max)));
        p = _mm512_maskz_mov_ps(m, p);
        _mm512_mask_storeu_ps(score + k, m, p);
        vsum = _mm512_add_ps(vsum, p);
    }
    sum = _mm512_reduce_add_ps(vsum);
#else
    sum = 0.0f;
    for (long k = 0; k < count; k++) {
        score[k] = expf(score[k] * scale - max);
        sum += score[k];
    }
#endif
    for (long d = 0; d < D; d++)
        out[d] = 0.0f;
    for (long k = 0; k < count; k++) {
        long slot = k < start ? k : slots[k - start];
        float p = score[k];
#ifdef __AVX512F__
        for (long d = 0; d < D; d += 16) {
            __m512 o = _mm512_loadu_ps(out + d);
            o = _mm512_fmadd_ps(_mm512_set1_ps(p), load16(v, slot * D + d, bf16, 0xffff), o);
            _mm512_storeu_ps(out + d, o);
        }
#else
        for (long d = 0; d < D; d++)
            out[d] = fmaf(p, load_scalar(v, slot * D + d, bf16), out[d]);
#endif
    }
    float inv = 1.0f / sum;
    for (long d = 0; d < D; d++)
        out[d] *= inv;
}

/* q, out: [n, heads, D] float32; kt: [kv_heads, D, cap]; v: [kv_heads, cap, D] (bf16 when bf16 != 0);
 * mask: [n, n] bytes (row r may see new row c) or NULL for causal. D must be a multiple of 16. */
void attention(const float *q, const void *kt, const void *v, int bf16, const uint8_t *mask, float *out, long n,
               long heads, long kv_heads, long D, long cap, long start, float scale) {
    long group = heads / kv_heads, elem = bf16 ? 2 : 4;
#pragma omp parallel
    {
        float *score = malloc(sizeof(float) * (start + n + 16));
        long *slots = malloc(sizeof(long) * (n + 1));
#pragma omp for schedule(static)
        for (long item = 0; item < n * heads; item++) {
            long r = item / heads, h = item % heads, g = h / group, count = start;
            for (long c = 0; c <= (mask ? n - 1 : r); c++)
                if (!mask || mask[r * n + c])
                    slots[count++ - start] = start + c;
            const char *kt_g = (const char *)kt + g * D * cap * elem;
            const char *v_g = (const char *)v + g * cap * D * elem;
            attend_row(q + item * D, kt_g, v_g, bf16, D, cap, start, slots, count, scale, score, out + item * D);
        }
        free(score);
        free(slots);
    }
}
