/* What the kernels share: the weight formats, small conversions, a vector exp.
 *
 * A weight matrix W [out, in] is packed at load (models/quant.py) into groups of 16 output
 * features, so that one AVX-512 vector holds one value for each of 16 outputs. Within a group the
 * inputs come in blocks (the GGUF block: 32 inputs, 16 for Q6_K), and each (group, block) is one
 * contiguous cell: the 16 x block weights, then 16 scales, then 16 minimums where the format has
 * them. A group's cells follow one another, so one group is one sequential stream of memory.
 *
 *   F32   dense float32: one cell per group, [in][16]
 *   BF16  dense bfloat16: one cell per group, [in/2][16][2] (input pairs, as the BF16 dot product
 *         consumes them)
 *   Q4    4-bit integers q (0..15), w = s * t(q) (+ m): t(q) = q - 8 for Q4_0, q for Q4_1 / Q4_K.
 *         32 inputs per block in 4 vectors of 64 bytes; the 16-bit word j of vector v holds output
 *         j / 2, input 8 v + 2 c + j % 2 in its nibble c (bits 4c .. 4c+3).
 *   Q8    8-bit signed integers (Q8_0; Q5_0 and Q6_K widened to 8 bits), w = s * q. The block's
 *         input pairs one after another, 32 bytes each: byte j is output j / 2, input 2p + j % 2.
 * Scales and minimums are float16 where the file has float16 (Q4_0, Q4_1, Q8_0, Q5_0) and
 * float32 where they are products of the file's numbers (Q4_K: d * sc and -dmin * m; Q6_K:
 * d * sc; both exact in float32). Every weight value is the file's own, exactly.
 */
#ifndef FASTDECODE_KERNELS_H
#define FASTDECODE_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define KERNELS_AVX2 /* matmul_avx2.c: the products on 256-bit vectors */
#endif

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_Q4 = 2, FMT_Q8 = 3 };

typedef struct {
    const uint8_t *data; /* the packed cells */
    long out, in;        /* W is [out, in] */
    long block;          /* inputs per scale: 32, 16 for Q6_K; `in` for the dense formats */
    int format;          /* FMT_* */
    int half_scales;     /* scales and minimums stored as float16, else float32 */
    int has_min;         /* w = s * q + m (Q4_1, Q4_K) */
    int signed_q4;       /* Q4 values are q - 8 (Q4_0) */
} Matrix;

static inline long cell_weight_bytes(const Matrix *W) {
    switch (W->format) {
    case FMT_F32: return 64 * W->in;
    case FMT_BF16: return 32 * W->in;
    case FMT_Q4: return 8 * W->block;
    default: return 16 * W->block;
    }
}

static inline long cell_bytes(const Matrix *W) {
    if (W->format == FMT_F32 || W->format == FMT_BF16)
        return cell_weight_bytes(W);
    return cell_weight_bytes(W) + 16 * (W->half_scales ? 2 : 4) * (1 + W->has_min);
}

static inline long cells_per_group(const Matrix *W) { return W->in / W->block; }

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

static inline float half_to_f32(uint16_t h) { /* exact */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f)
        u = sign | 0x7f800000 | (man << 13);
    else if (exp != 0)
        u = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0)
        u = sign;
    else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* exp(x) = 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, for x >= -87 (exp(-87) below that): the
 * portable path's exp, and lane by lane the AVX2 path's exp8 (the same operations, so the same
 * bits). x is clamped to [-87, 88], where 2^n is a normal float (and NaN becomes -87). The AVX-512
 * path's exp16 is the same polynomial with its own range and scaling. */
static inline float exp_scalar(float x) {
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    float n = rintf(x * 1.44269504f);
    float r = fmaf(-n, 0.693145752f, x);
    r = fmaf(-n, 1.42860677e-6f, r);
    float p = 1.0f / 5040;
    p = fmaf(p, r, 1.0f / 720);
    p = fmaf(p, r, 1.0f / 120);
    p = fmaf(p, r, 1.0f / 24);
    p = fmaf(p, r, 1.0f / 6);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    uint32_t bits = (uint32_t)((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* A value of the activation dtype (bfloat16 or float32) as float32. */
static inline float act_at(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline void act_store(void *x, long i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)x)[i] = f32_to_bf16(v);
    else
        ((float *)x)[i] = v;
}

#ifdef __AVX512F__
static inline __mmask16 lanes(long left) { return left >= 16 ? 0xffff : left <= 0 ? 0 : (__mmask16)((1u << left) - 1); }

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

/* 16 activations (bfloat16 or float32) as float32, masked. */
static inline __m512 act_load16(const void *x, long i, int bf16, __mmask16 m) {
    if (!bf16)
        return _mm512_maskz_loadu_ps(m, (const float *)x + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 float32 values stored as activations (bfloat16 or float32), masked. */
static inline void act_store16(void *x, long i, __m512 v, int bf16, __mmask16 m) {
    if (bf16)
        _mm256_mask_storeu_epi16((uint16_t *)x + i, m, (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_mask_storeu_ps((float *)x + i, m, v);
}
#endif

#ifdef KERNELS_AVX2
/* exp_scalar for 8 lanes. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Values i .. i+7 (bfloat16 or float32) as float32; only the first `left` are read (the rest 0). */
static inline __m256 act_load8(const void *x, long i, int bf16, long left) {
    if (left >= 8)
        return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i))), 16))
                    : _mm256_loadu_ps((const float *)x + i);
    float v[8] = {0};
    for (long j = 0; j < left; j++)
        v[j] = act_at(x, i + j, bf16);
    return _mm256_loadu_ps(v);
}

/* 8 float32 values stored as activations (bfloat16 or float32). */
static inline void act_store8(void *x, long i, __m256 v, int bf16) {
    float t[8];
    _mm256_storeu_ps(t, v);
    for (long j = 0; j < 8; j++)
        act_store(x, i + j, t[j], bf16);
}

/* The first `left` lanes of v to dst. */
static inline void store8(float *dst, __m256 v, long left) {
    if (left >= 8) {
        _mm256_storeu_ps(dst, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    for (long j = 0; j < left; j++)
        dst[j] = t[j];
}
#endif

/* threads.c: run_items(fn, arg, n, chunk) calls fn(arg, lo, hi) on chunks of the items 0 .. n-1
 * (chunk items at a time), shared among the kernel threads, and returns when all are done. */
typedef void (*items_fn)(void *arg, long lo, long hi);
void run_items(items_fn fn, void *arg, long n, long chunk);
int kernel_threads(void);
int kernel_amx(void);          /* matmul.c: which bfloat16 products run on AMX tiles: 0 none, 1 prompt rows, 2 all */
const char *kernel_isa(void);  /* the instructions the products run on, for reports */

/* matmul.c: a product is matmul_tiles(W, rows) items; matmul_run(..., lo, hi) computes items
 * [lo, hi) (each: 16 to 64 output rows of W for every row of x). prompt: the rows are a prompt's
 * (they may take the AMX path, see kernel_amx). */
long matmul_tiles(const Matrix *W, int x_bf16, int prompt, long rows);
void matmul_run(const Matrix *W, const void *x, int x_bf16, int prompt, long ldx, long rows, const float *xsum,
                long ldsum, float *y, long ldy, int add, long lo, long hi);
/* attention.c: attention of one layer's new rows over the paged cache, as items. q: [rows, heads, D]
 * float32, rows ldq floats apart; out: [rows, heads, D] float32. kpool, vpool: one layer's pools,
 * [blocks, kv_heads, D, B] and [blocks, kv_heads, B, D] (bfloat16 when bf16 != 0). Sequence s is
 * seg[5s .. 5s+4] = {first row, n new rows, start (committed rows), offset of its block table in
 * tables, offset of its [n, n] mask in masks or -1 for causal}. window > 0: a sliding window, each
 * query sees only the last `window` of its visible keys (the keys at positions > p - window for a
 * query at position p, as a visible key's rank is its position). */
typedef struct {
    const float *q;
    long ldq;
    const void *kpool, *vpool;
    int bf16;
    long nseg;
    const long *seg, *tables;
    const uint8_t *masks;
    float *out;
    long heads, kv_heads, D, shift;
    float scale;
    long window;
    long *first_item, *qbs, most, most_n; /* the plan: attention_plan fills it */
} Attention;
long attention_plan(Attention *a, long *first_item, long *qbs);
void attention_items(void *a, long lo, long hi);

/* int8 activations (FASTDECODE_INT8=1; the AVX2 and portable paths, bfloat16 activations, 4- and
 * 8-bit weights), as llama.cpp computes on such CPUs: each 32 inputs of a row are rounded to
 * integers q = round(x * 127 / max|x|) with one scale d = max|x| / 127, and a block's dot product
 * becomes an integer sum of q_w * q_x, exact, times d: 32 products per vpmaddubsw instead of a
 * float32 FMA's 8 (on a 2-core Zen 3 an extra row of a forward cost about half as much). The
 * results differ from bfloat16 activations' (a model of its own, as the AMX path is); each row's
 * result is still independent of the other rows (bitwise), so every method stays exact. */
int kernel_int8(void);

static inline int int8_applies(const Matrix *W, int x_bf16) {
    return x_bf16 && W->in % 32 == 0 &&
           ((W->format == FMT_Q4 && W->block == 32) || (W->format == FMT_Q8 && W->block % 8 == 0)) && kernel_int8();
}

/* What a product reads of a row besides the row: `prep_floats(n)` floats, in this order: each
 * block of 32 values' sum (for the minimums' terms, in the activation dtype), and where int8
 * activations apply, each block's scale d (float), the sum of its integers q (int32, for Q4_0's
 * q - 8) and the integers themselves (int8; within each 8 inputs in the order 0 4 1 5 2 6 3 7,
 * the order in which a packed Q4 word holds its nibbles, see matmul_avx2.c). */
static inline long prep_floats(long n) { return 3 * (n / 32) + n / 4; }
void row_prep(const void *x, int x_bf16, long n, int quantize, float *out);

#endif
