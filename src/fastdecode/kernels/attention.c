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
 * A sliding window (Mistral, Gemma-3's local layers) keeps the last `window` ranks of a row: the
 * ranks below get p[k] = 0 exactly, and a sum that meets them adds an exact zero, so a row sums
 * the same numbers in the same order whichever rows share its block of queries.
 *
 * The cache is paged (runtime/kv_cache.py): a sequence's row j lives in block table[j / B] at
 * offset j % B of a pool shared by every sequence. A block holds keys transposed, [kv_heads, D, B],
 * so that 16 consecutive keys are one vector load per d (B is a multiple of 16, so such a load
 * never straddles two blocks), and values row-major, [kv_heads, B, D]. Storage is float32 or
 * bfloat16, math float32. One call attends every sequence of a batched forward.
 */
#include "kernels.h"

/* One sequence's rows of one layer and key/value head in the paged pool. */
typedef struct {
    const char *k, *v;  /* the layer's pools, at this head: block b starts at b * stride elements */
    const long *table;  /* block of each B rows of the sequence */
    long shift, stride; /* B = 1 << shift rows per block; elements per block of one layer */
    int bf16;
} Paged;

/* Key rows j .. j+15 (j a multiple of 16): element (d, j + i) lies at d * B + i. */
static inline const void *keys_at(const Paged *p, long j) {
    long B = 1L << p->shift;
    return p->k + (p->table[j >> p->shift] * p->stride + (j & (B - 1))) * (p->bf16 ? 2 : 4);
}

/* Value row j: D consecutive elements. */
static inline const void *value_at(const Paged *p, long j, long D) {
    long B = 1L << p->shift;
    return p->v + (p->table[j >> p->shift] * p->stride + (j & (B - 1)) * D) * (p->bf16 ? 2 : 4);
}

/* score of query q against key slot j: the same fma chain as one lane of the vector path. */
static inline float score_one(const float *q, const Paged *p, long D, long j) {
    const void *kt = keys_at(p, j & ~15L);
    long B = 1L << p->shift;
    float acc = 0.0f;
    for (long d = 0; d < D; d++)
        acc = fmaf(q[d], act_at(kt, d * B + (j & 15), p->bf16), acc);
    return acc;
}

#define QB 6 /* queries (rows x heads of one key/value head) sharing each key and value load */
#define VD 4 /* value vectors per query in registers: QB * VD accumulators fit without spilling */

#ifdef KERNELS_AVX2
/* One query's scores against the key slots from j (a multiple of 16) to end (j + a multiple of
 * 64), 64 keys a pass from four blocks' runs of 16. A lane is one key and its fma chain over d is
 * score_one's: the wider pass only puts eight chains in flight instead of two. */
static long one_query_scores(const float *q, const Paged *p, long D, long j, long end, float *score) {
    long B = 1L << p->shift;
    for (; j < end; j += 64) {
        const void *kt[4] = {keys_at(p, j), keys_at(p, j + 16), keys_at(p, j + 32), keys_at(p, j + 48)};
        __m256 acc[8];
        for (long c = 0; c < 8; c++)
            acc[c] = _mm256_setzero_ps();
        for (long d = 0; d < D; d++) {
            __m256 qv = _mm256_broadcast_ss(q + d);
            for (long c = 0; c < 8; c++)
                acc[c] = _mm256_fmadd_ps(qv, act_load8(kt[c / 2], d * B + 8 * (c & 1), p->bf16, 8), acc[c]);
        }
        for (long c = 0; c < 8; c++)
            _mm256_storeu_ps(score + j + 8 * c, acc[c]);
    }
    return j;
}

/* One query's weighted values, 64 dimensions a pass: a lane's chain over the ranks is the
 * portable path's (committed rows, then the query's own new rows), eight chains in flight. */
static void one_query_values(const Paged *pg, long D, long from, long start, const float *p, const long *slots,
                             long count, float *out) {
    for (long d0 = 0; d0 < D; d0 += 64) {
        long left[8];
        __m256 acc[8];
        for (long c = 0; c < 8; c++) {
            left[c] = D - d0 - 8 * c;
            acc[c] = _mm256_setzero_ps();
        }
        for (long k = from; k < count; k++) {
            const void *row = value_at(pg, k < start ? k : slots[k - start], D);
            __m256 w = _mm256_broadcast_ss(p + k);
            for (long c = 0; c < 8; c++)
                acc[c] = _mm256_fmadd_ps(w, act_load8(row, d0 + 8 * c, pg->bf16, left[c]), acc[c]);
        }
        for (long c = 0; c < 8; c++)
            store8(out + d0 + 8 * c, acc[c], left[c]);
    }
}
#endif

/* Scores of nq queries against key slots [0, span): one key vector load serves them all. A lane
 * computes exactly what score_one computes for its slot. */
static inline __attribute__((always_inline)) void slot_scores(const float *const *qs, long nq, const Paged *p,
                                                              long D, long from, long span, float *const *score) {
#ifdef __AVX512F__
    long B = 1L << p->shift;
    for (long j = from & ~15L; j < span; j += 16) {
        __mmask16 m = span - j >= 16 ? 0xffff : (__mmask16)((1u << (span - j)) - 1);
        const void *kt = keys_at(p, j);
        __m512 acc[QB];
        for (long i = 0; i < QB; i++)
            acc[i] = _mm512_setzero_ps();
        for (long d = 0; d < D; d++) {
            __m512 k = act_load16(kt, d * B, p->bf16, m);
            for (long i = 0; i < QB; i++)
                if (i < nq)
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qs[i][d]), k, acc[i]);
        }
        for (long i = 0; i < QB; i++)
            if (i < nq)
                _mm512_mask_storeu_ps(score[i] + j, m, acc[i]);
    }
#elif defined(KERNELS_AVX2)
    long B = 1L << p->shift, j = from & ~15L;
    if (nq == 1) /* one query's 16 keys are two fma chains, each waiting on its last fma: take 64 */
        j = one_query_scores(qs[0], p, D, j, j + (span - j) / 64 * 64, score[0]);
    for (; j < span; j += 16) {
        const void *kt = keys_at(p, j);
        __m256 acc[QB][2];
        for (long i = 0; i < QB; i++)
            acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (long d = 0; d < D; d++) {
            __m256 k0 = act_load8(kt, d * B, p->bf16, 8), k1 = act_load8(kt, d * B + 8, p->bf16, 8);
            for (long i = 0; i < QB; i++)
                if (i < nq) {
                    __m256 qv = _mm256_broadcast_ss(&qs[i][d]);
                    acc[i][0] = _mm256_fmadd_ps(qv, k0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(qv, k1, acc[i][1]);
                }
        }
        for (long i = 0; i < QB; i++)
            if (i < nq) {
                store8(score[i] + j, acc[i][0], span - j);
                store8(score[i] + j + 8, acc[i][1], span - j - 8);
            }
    }
#else
    for (long i = 0; i < nq; i++)
        for (long j = from; j < span; j++)
            score[i][j] = score_one(qs[i], p, D, j);
#endif
}

/* score[k] <- exp(score[k] * scale - max) over the ranks; returns their sum. */
static float softmax_numerators(float *score, long count, float scale) {
#ifdef __AVX512F__
    /* The maximum is exact in any order, so lanes may find it (a scalar loop cost more than the
     * dot products it follows). */
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (long k = 0; k < count; k += 16) {
        __mmask16 m = count - k >= 16 ? 0xffff : (__mmask16)((1u << (count - k)) - 1);
        __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, score + k);
        vmax = _mm512_max_ps(vmax, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
    }
    float max = _mm512_reduce_max_ps(vmax);
    __m512 vsum = _mm512_setzero_ps();
    for (long k = 0; k < count; k += 16) {
        __mmask16 m = count - k >= 16 ? 0xffff : (__mmask16)((1u << (count - k)) - 1);
        __m512 s = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, score + k);
        __m512 p = exp16(_mm512_sub_ps(_mm512_mul_ps(s, _mm512_set1_ps(scale)), _mm512_set1_ps(max)));
        p = _mm512_maskz_mov_ps(m, p);
        _mm512_mask_storeu_ps(score + k, m, p);
        vsum = _mm512_add_ps(vsum, p);
    }
    return _mm512_reduce_add_ps(vsum);
#else
    float max = -INFINITY;
    long k = 0;
#ifdef KERNELS_AVX2
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; k + 8 <= count; k += 8)
        vmax = _mm256_max_ps(vmax, _mm256_mul_ps(_mm256_loadu_ps(score + k), _mm256_set1_ps(scale)));
    float lanes_max[8];
    _mm256_storeu_ps(lanes_max, vmax);
    for (long j = 0; j < 8; j++)
        max = lanes_max[j] > max ? lanes_max[j] : max;
#endif
    for (; k < count; k++)
        max = score[k] * scale > max ? score[k] * scale : max;
    k = 0;
#ifdef KERNELS_AVX2
    for (; k + 8 <= count; k += 8)
        _mm256_storeu_ps(score + k, exp8(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(score + k), _mm256_set1_ps(scale)),
                                                       _mm256_set1_ps(max))));
#endif
    for (; k < count; k++)
        score[k] = exp_scalar(score[k] * scale - max);
    float sum = 0.0f; /* in rank order: lanes would change the bits */
    for (k = 0; k < count; k++)
        sum += score[k];
    return sum;
#endif
}

/* out[i] = sum over ranks of p[i][rank] * value[slot(rank)], in rank order: the committed rows
 * (shared by the nq queries, one value load for all), then each query's own new rows. */
static inline __attribute__((always_inline)) void weighted_values(long nq, const Paged *pg, long D, long from, long start, float *const *p,
                            const long *const *slots, const long *counts, float *const *out) {
    int bf16 = pg->bf16;
#ifdef __AVX512F__
    for (long d0 = 0; d0 < D; d0 += 16 * VD) { /* VD vectors of 16 dims per query stay in registers */
        __mmask16 m[VD];
        for (long c = 0; c < VD; c++) {
            long left = D - d0 - 16 * c;
            m[c] = left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        }
        __m512 acc[QB][VD];
        for (long i = 0; i < QB; i++)
            for (long c = 0; c < VD; c++)
                acc[i][c] = _mm512_setzero_ps();
        for (long k = from; k < start; k++) {
            __m512 val[VD];
            for (long c = 0; c < VD; c++)
                val[c] = act_load16(value_at(pg, k, D), d0 + 16 * c, bf16, m[c]);
            for (long i = 0; i < QB; i++)
                if (i < nq) {
                    __m512 w = _mm512_set1_ps(p[i][k]);
                    for (long c = 0; c < VD; c++)
                        acc[i][c] = _mm512_fmadd_ps(w, val[c], acc[i][c]);
                }
        }
        for (long i = 0; i < QB; i++)
            if (i < nq)
                for (long c = 0; c < VD; c++)
                    _mm512_mask_storeu_ps(out[i] + d0 + 16 * c, m[c], acc[i][c]);
        /* Each query's own new rows continue its sums (a separate loop, so that the accumulators
         * above are never indexed by a run-time query number and stay in registers). */
        for (long i = 0; i < nq; i++) {
            __m512 o[VD];
            for (long c = 0; c < VD; c++)
                o[c] = _mm512_maskz_loadu_ps(m[c], out[i] + d0 + 16 * c);
            for (long k = from > start ? from : start; k < counts[i]; k++) {
                __m512 w = _mm512_set1_ps(p[i][k]);
                for (long c = 0; c < VD; c++)
                    o[c] = _mm512_fmadd_ps(w, act_load16(value_at(pg, slots[i][k - start], D), d0 + 16 * c, bf16, m[c]), o[c]);
            }
            for (long c = 0; c < VD; c++)
                _mm512_mask_storeu_ps(out[i] + d0 + 16 * c, m[c], o[c]);
        }
    }
#elif defined(KERNELS_AVX2)
    if (nq == 1) { /* 16 dimensions are two chains over the ranks: take 64 */
        one_query_values(pg, D, from, start, p[0], slots[0], counts[0], out[0]);
        return;
    }
    for (long d0 = 0; d0 < D; d0 += 16) { /* 16 dims of up to QB queries in registers */
        const long left0 = D - d0, left1 = D - d0 - 8;
        __m256 acc[QB][2];
        for (long i = 0; i < QB; i++)
            acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (long k = from; k < start; k++) {
            const void *row = value_at(pg, k, D);
            __m256 v0 = act_load8(row, d0, bf16, left0), v1 = act_load8(row, d0 + 8, bf16, left1);
            for (long i = 0; i < QB; i++)
                if (i < nq) {
                    __m256 w = _mm256_broadcast_ss(&p[i][k]);
                    acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
                }
        }
        for (long i = 0; i < nq; i++) { /* then each query's own new rows */
            __m256 o0 = acc[i][0], o1 = acc[i][1];
            for (long k = from > start ? from : start; k < counts[i]; k++) {
                const void *row = value_at(pg, slots[i][k - start], D);
                __m256 w = _mm256_broadcast_ss(&p[i][k]);
                o0 = _mm256_fmadd_ps(w, act_load8(row, d0, bf16, left0), o0);
                o1 = _mm256_fmadd_ps(w, act_load8(row, d0 + 8, bf16, left1), o1);
            }
            store8(out[i] + d0, o0, left0);
            store8(out[i] + d0 + 8, o1, left1);
        }
    }
#else
    for (long i = 0; i < nq; i++) {
        for (long d = 0; d < D; d++)
            out[i][d] = 0.0f;
        for (long k = from; k < counts[i]; k++) {
            long slot = k < start ? k : slots[i][k - start];
            for (long d = 0; d < D; d++)
                out[i][d] = fmaf(p[i][k], act_at(value_at(pg, slot, D), d, bf16), out[i][d]);
        }
    }
#endif
}

/* The (sequence, kv head, block of queries) items of one call; first_item and qbs: nseg + 1 and
 * nseg longs of the caller's. Returns the number of items. */
long attention_plan(Attention *a, long *first_item, long *qbs) {
    const long *seg = a->seg, group = a->heads / a->kv_heads;
    long rows = 0;
    a->first_item = first_item, a->qbs = qbs, a->most = 0, a->most_n = 0;
    for (long s = 0; s < a->nseg; s++)
        rows += seg[5 * s + 1];
    first_item[0] = 0;
    for (long s = 0; s < a->nseg; s++) {
        long n = seg[5 * s + 1], start = seg[5 * s + 2];
        /* Queries of one kv head in blocks of qb; a single query each when the whole call has
         * few, so that both cores get work. The block size changes the speed only, never a result. */
        qbs[s] = rows * a->heads >= 4 * QB ? QB : 1;
        first_item[s + 1] = first_item[s] + a->kv_heads * ((n * group + qbs[s] - 1) / qbs[s]);
        a->most = start + n > a->most ? start + n : a->most;
        a->most_n = n > a->most_n ? n : a->most_n;
    }
    return first_item[a->nseg];
}

void attention_items(void *arg, long lo, long hi) {
    const Attention *a = arg;
    const long D = a->D, heads = a->heads, group = heads / a->kv_heads, B = 1L << a->shift;
    const long stride = a->kv_heads * D * B, most = a->most, most_n = a->most_n;
    const long *seg = a->seg;
    const int bf16 = a->bf16;
    float *score_mem = malloc(sizeof(float) * QB * (most + 16));
    long *slot_mem = malloc(sizeof(long) * QB * (most_n + 1));
    for (long item = lo; item < hi; item++) {
        long s = 0;
        while (item >= a->first_item[s + 1])
            s++;
        long row0 = seg[5 * s], n = seg[5 * s + 1], start = seg[5 * s + 2], qb = a->qbs[s];
        const uint8_t *mask = seg[5 * s + 4] < 0 ? NULL : a->masks + seg[5 * s + 4];
        long per_head = n * group, blocks = (per_head + qb - 1) / qb, local = item - a->first_item[s];
        long g = local / blocks, first = (local % blocks) * qb;
        long nq = per_head - first < qb ? per_head - first : qb;
        Paged pg = {(const char *)a->kpool + g * D * B * (bf16 ? 2 : 4), (const char *)a->vpool + g * B * D * (bf16 ? 2 : 4),
                    a->tables + seg[5 * s + 3], a->shift, stride, bf16};
        const float *qs[QB];
        float *score[QB], *outs[QB];
        long *slots[QB], counts[QB];
        for (long i = 0; i < nq; i++) {
            long r = (first + i) / group, h = g * group + (first + i) % group;
            qs[i] = a->q + (row0 + r) * a->ldq + h * D;
            outs[i] = a->out + ((row0 + r) * heads + h) * D;
            score[i] = score_mem + i * (most + 16);
            slots[i] = slot_mem + i * (most_n + 1);
            counts[i] = start;
            for (long c = 0; c <= (mask ? n - 1 : r); c++)
                if (!mask || mask[r * n + c])
                    slots[i][counts[i]++ - start] = start + c;
        }
        /* Scores against every slot the block may see (vectorised, shared loads), then each
         * query's visible new rows moved into rank order (slots only grow, so in place).
         * Constant block sizes let the compiler keep the accumulators in registers. */
        long span = start + (mask ? n : (first + nq - 1) / group + 1);
        /* The window: query i's first rank lo[i]; `from`, the lowest of the block (a visible new
         * row's slot is at least its rank, so every score needed is computed from there). */
        long lo[QB], from = span;
        for (long i = 0; i < nq; i++) {
            lo[i] = a->window > 0 && counts[i] > a->window ? counts[i] - a->window : 0;
            from = lo[i] < from ? lo[i] : from;
        }
        if (nq == QB)
            slot_scores(qs, QB, &pg, D, from, span, score);
        else if (nq == 1)
            slot_scores(qs, 1, &pg, D, from, span, score);
        else
            slot_scores(qs, nq, &pg, D, from, span, score);
        float inv[QB];
        for (long i = 0; i < nq; i++) {
            for (long k = start; k < counts[i]; k++)
                score[i][k] = score[i][slots[i][k - start]];
            inv[i] = 1.0f / softmax_numerators(score[i] + lo[i], counts[i] - lo[i], a->scale);
            for (long k = from; k < lo[i]; k++)
                score[i][k] = 0.0f;
        }
        if (nq == QB)
            weighted_values(QB, &pg, D, from, start, score, (const long *const *)slots, counts, outs);
        else if (nq == 1)
            weighted_values(1, &pg, D, from, start, score, (const long *const *)slots, counts, outs);
        else
            weighted_values(nq, &pg, D, from, start, score, (const long *const *)slots, counts, outs);
        for (long i = 0; i < nq; i++)
            for (long d = 0; d < D; d++)
                outs[i][d] *= inv[i];
    }
    free(score_mem);
    free(slot_mem);
}

/* The same as one call of its own (q rows contiguous), for tests. */
void attention(const float *q, const void *kpool, const void *vpool, int bf16, long nseg, const long *seg,
               const long *tables, const uint8_t *masks, float *out, long heads, long kv_heads, long D,
               long shift, float scale, long window) {
    Attention a = {q, heads * D, kpool, vpool, bf16, nseg, seg, tables, masks, out, heads, kv_heads, D, shift, scale, window};
    long first_item[nseg + 1], qbs[nseg];
    run_items(attention_items, &a, attention_plan(&a, first_item, qbs), 1);
}
