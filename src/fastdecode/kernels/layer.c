/* One decoder layer of the Llama family and its relatives as one native call, for every row of a
 * batched forward:
 *
 *   h = rms_norm(x) * attn_norm               (rounded to the activation dtype: the products' input)
 *   q, k, v = h @ Wqkv.T (+ qkv_bias)         (float32; biases: Qwen2)
 *   q, k = rms_norm(q) * q_norm, ... per head (QK-norm: Qwen3, Gemma-3)
 *   q, k = rotary(q, k); cache[slot] = k, v   (in the cache's dtype; the layer's own rotary tables)
 *   a = attention(q, cache)                   (attention.c; within the layer's sliding window)
 *   x = x + a @ Wo.T                          (Gemma: x + rms_norm(a @ Wo.T) * post_attn_norm)
 *   h = rms_norm(x) * mlp_norm
 *   g, u = h @ Wgate_up.T
 *   x = x + (act(g) * u) @ Wdown.T            (act: SiLU, or GELU with the tanh approximation;
 *                                              Gemma: x + rms_norm(...) * post_mlp_norm)
 *
 * The options are per layer in LayerWeights (NULL / 0 when the family has no such part), so every
 * family runs this one layer rather than a copy of its own: what differs between families is
 * which weights they bring, not how a row goes through them.
 *
 * x, the residual stream, stays float32 [rows, hidden] from the embedding to the final norm. The
 * phases run one after another, each shared among the kernel threads (threads.c) as items: rows
 * for the norms, the rotary embedding and the SiLU product; tiles of output rows for a product
 * (matmul.c); (sequence, kv head) for attention. Every row goes through the same operations in
 * the same order whatever the other rows are and whichever thread computes it, so the layer is
 * batch-invariant like its parts.
 */
#include "kernels.h"

typedef struct {
    long hidden, q_size, kv_size, inter, heads, kv_heads, head_dim, block_shift;
    float eps, scale;
    int act_bf16; /* the products' inputs and the KV cache in bfloat16, else float32 */
    int gelu;     /* the gate's activation: 0 SiLU (SwiGLU), 1 GELU with the tanh approximation (GeGLU) */
} Dims;

/* A product whose output rows come in up to 3 parts, each in its own format (q, k, v of a file
 * that stores them differently), at columns `at` of the output. */
typedef struct {
    Matrix part[3];
    long at[3];
    long parts;
} Product;

typedef struct {
    const float *attn_norm, *mlp_norm;
    Product qkv, o, gate_up, down;
    const float *qkv_bias;                      /* [q_size + 2 kv_size] or NULL */
    const float *q_norm, *k_norm;               /* [head_dim] or NULL: QK-norm */
    const float *post_attn_norm, *post_mlp_norm; /* [hidden] or NULL: norms of the sublayers' outputs */
    const float *cos, *sin; /* the layer's rotary tables [positions, head_dim]; sin's first half negated */
    long window;            /* a row at position p sees keys at positions > p - window; 0: every key */
} LayerWeights;

/* One forward's rows: where they go in the cache, whom they attend, and scratch space. */
typedef struct {
    long rows;
    const long *positions, *slot_block, *slot_offset;
    long nseg;
    const long *seg, *tables; /* attention.c's description of the sequences */
    const uint8_t *masks;
    void *h;     /* [rows, W] in the activation dtype, W = max(hidden, inter, q_size) rounded up to 32 */
    float *xsum; /* [rows, W / 32] */
    float *qkv;  /* [rows, q_size + 2 kv_size] */
    float *att;  /* [rows, q_size] */
    float *gu;   /* [rows, 2 inter] */
    float *y;    /* [rows, hidden]: a sublayer's output before its post-norm */
    const uint8_t *prompt; /* [rows]: 1 for a prompt's row (its products may run on AMX tiles), or NULL */
} Step;

/* Whether the product reads its rows' prep (kernels.h): 1 for the block sums, 2 for the int8 rows too. */
static int needs_prep(const Product *p, int act_bf16) {
    int need = 0;
    for (long i = 0; i < p->parts; i++) {
        if (int8_applies(&p->part[i], act_bf16))
            return 2;
        need |= p->part[i].has_min;
    }
    return need;
}

static void prep_row(const void *x, const Product *next, int act_bf16, long n, float *out) {
    const int need = needs_prep(next, act_bf16);
    if (need)
        row_prep(x, act_bf16, n, need == 2, out);
}

/* out[i] = x[i] * w[i] / sqrt(mean(x^2) + eps), in the activation dtype. */
static void rms_norm_row(const float *x, long n, const float *w, float eps, void *out, int bf16) {
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16) {
        __m512 v = _mm512_maskz_loadu_ps(lanes(n - i), x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / n + eps);
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_set1_ps(inv)),
                                 _mm512_maskz_loadu_ps(m, w + i));
        act_store16(out, i, v, bf16, m);
    }
#else
    float ss = 0.0f;
    for (long i = 0; i < n; i++)
        ss = fmaf(x[i], x[i], ss);
    float inv = 1.0f / sqrtf(ss / n + eps);
    for (long i = 0; i < n; i++)
        act_store(out, i, x[i] * inv * w[i], bf16);
#endif
}

/* float32 -> the activation dtype, n values. */
static void to_act(const float *x, long n, void *out, int bf16) {
#ifdef __AVX512F__
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        act_store16(out, i, _mm512_maskz_loadu_ps(m, x + i), bf16, m);
    }
#else
    for (long i = 0; i < n; i++)
        act_store(out, i, x[i], bf16);
#endif
}

/* out[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u, in the activation dtype. */
static void silu_mul(const float *g, const float *u, long n, void *out, int bf16) {
#ifdef __AVX512F__
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        __m512 v = _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_maskz_loadu_ps(m, u + i));
        act_store16(out, i, v, bf16, m);
    }
#else
    long i = 0;
#ifdef KERNELS_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i), e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        act_store8(out, i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_loadu_ps(u + i)), bf16);
    }
#endif
    for (; i < n; i++)
        act_store(out, i, g[i] / (1.0f + exp_scalar(-g[i])) * u[i], bf16);
#endif
}

/* out[i] = gelu(g[i]) * u[i], gelu(g) = g / 2 * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 g^3))) and
 * tanh(t) = 1 - 2 / (exp(2 t) + 1), in the activation dtype. */
static void gelu_mul(const float *g, const float *u, long n, void *out, int bf16) {
    const float c = 0.7978845608028654f, k = 0.044715f;
#ifdef __AVX512F__
    for (long i = 0; i < n; i += 16) {
        __mmask16 m = lanes(n - i);
        __m512 gv = _mm512_maskz_loadu_ps(m, g + i);
        __m512 t = _mm512_mul_ps(_mm512_set1_ps(c), _mm512_add_ps(gv, _mm512_mul_ps(_mm512_set1_ps(k), _mm512_mul_ps(gv, _mm512_mul_ps(gv, gv)))));
        __m512 e = exp16(_mm512_add_ps(t, t));
        __m512 th = _mm512_sub_ps(_mm512_set1_ps(1.0f), _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, _mm512_set1_ps(1.0f))));
        __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), gv), _mm512_add_ps(_mm512_set1_ps(1.0f), th)),
                                 _mm512_maskz_loadu_ps(m, u + i));
        act_store16(out, i, v, bf16, m);
    }
#else
    long i = 0;
#ifdef KERNELS_AVX2
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 t = _mm256_mul_ps(_mm256_set1_ps(c), _mm256_add_ps(gv, _mm256_mul_ps(_mm256_set1_ps(k), _mm256_mul_ps(gv, _mm256_mul_ps(gv, gv)))));
        __m256 e = exp8(_mm256_add_ps(t, t));
        __m256 th = _mm256_sub_ps(_mm256_set1_ps(1.0f), _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
        act_store8(out, i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), gv), _mm256_add_ps(_mm256_set1_ps(1.0f), th)),
                                         _mm256_loadu_ps(u + i)), bf16);
    }
#endif
    for (; i < n; i++) {
        float t = c * (g[i] + k * (g[i] * (g[i] * g[i])));
        float th = 1.0f - 2.0f / (exp_scalar(t + t) + 1.0f);
        act_store(out, i, 0.5f * g[i] * (1.0f + th) * u[i], bf16);
    }
#endif
}

/* x += y, n values. */
static void add_into(float *x, const float *y, long n) {
    for (long i = 0; i < n; i++)
        x[i] += y[i];
}

/* Rotary embedding of one head in place: x * cos + cat(x2, x1) * sin (sin's first half negated). */
static void rotate(float *x, const float *cos, const float *sin, long D) {
    float t[D];
    long half = D / 2;
    for (long d = 0; d < D; d++)
        t[d] = x[d] * cos[d] + x[d < half ? d + half : d - half] * sin[d];
    memcpy(x, t, sizeof(float) * D);
}

/* One forward's phases over one layer; each is a function over a range of items. */
typedef struct {
    const Dims *c;
    const LayerWeights *w;
    const Step *s;
    void *kpool, *vpool;
    float *x;
    long width, width_h, nsum; /* qkv's row; h's row; its prep's (kernels.h) */
    const Product *product;    /* of the product phase */
    const void *in;
    float *out;
    long ldout;
    int add;
    long first, rows; /* the rows of the product's run */
    int prompt;       /* whether they are prompt rows */
    long tiles[4];    /* tiles of each of the product's parts */
    const float *post_norm; /* of the post-norm phase */
} Layer;

static void *h_row(const Layer *L, long r) { return (char *)L->s->h + r * L->width_h * (L->c->act_bf16 ? 2 : 4); }

/* items: rows. h = norm(x) * weight, and h's block sums where the next product has minimums. */
static void norm_rows(const Layer *L, const float *weight, const Product *next, long lo, long hi) {
    for (long r = lo; r < hi; r++) {
        rms_norm_row(L->x + r * L->c->hidden, L->c->hidden, weight, L->c->eps, h_row(L, r), L->c->act_bf16);
        prep_row(h_row(L, r), next, L->c->act_bf16, L->c->hidden, L->s->xsum + r * L->nsum);
    }
}

static void attn_norm_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    norm_rows(L, L->w->attn_norm, &L->w->qkv, lo, hi);
}

static void mlp_norm_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    norm_rows(L, L->w->mlp_norm, &L->w->gate_up, lo, hi);
}

/* items: tiles of the product's parts, one after another, for the rows of one run. */
static void product_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    const Product *p = L->product;
    const long r0 = L->first, xsize = L->c->act_bf16 ? 2 : 4;
    long first = 0;
    for (long i = 0; i < p->parts; first += L->tiles[i++]) {
        long a = lo > first ? lo - first : 0, b = hi - first < L->tiles[i] ? hi - first : L->tiles[i];
        if (a < b) /* xsum rows are as far apart as h's, / 32 */
            matmul_run(&p->part[i], (const char *)L->in + r0 * L->width_h * xsize, L->c->act_bf16, L->prompt,
                       L->width_h, L->rows, L->s->xsum + r0 * L->nsum, L->nsum, L->out + r0 * L->ldout + p->at[i],
                       L->ldout, L->add, a, b);
    }
}

/* The product over every row, one run of rows at a time: prompt rows and the others may take
 * different paths (kernel_amx), so each run is a product of its own. */
static void product(Layer *L, const Product *p, float *out, long ldout, int add) {
    const uint8_t *prompt = L->s->prompt;
    L->product = p, L->in = L->s->h, L->out = out, L->ldout = ldout, L->add = add;
    for (long r0 = 0, r1; r0 < L->s->rows; r0 = r1) {
        const int kind = prompt ? prompt[r0] : 0;
        for (r1 = r0 + 1; r1 < L->s->rows && (prompt ? prompt[r1] : 0) == kind; r1++)
            ;
        L->first = r0, L->rows = r1 - r0, L->prompt = kind;
        long tiles = 0;
        for (long i = 0; i < p->parts; i++)
            tiles += L->tiles[i] = matmul_tiles(&p->part[i], L->c->act_bf16, kind, L->rows);
        run_items(product_items, L, tiles, 1);
    }
}

/* items: rows. Rotary embedding of q and k; the new keys and values into their cache slots. */
static void rotary_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    const Dims *c = L->c;
    const Step *s = L->s;
    const long D = c->head_dim, Q = c->q_size, KV = c->kv_size, B = 1L << c->block_shift;
    const LayerWeights *w = L->w;
    for (long r = lo; r < hi; r++) {
        float *row = s->qkv + r * L->width;
        if (w->qkv_bias)
            add_into(row, w->qkv_bias, L->width);
        for (long h = 0; h < c->heads + c->kv_heads; h++) {
            const float *norm = h < c->heads ? w->q_norm : w->k_norm;
            if (norm) /* in place, float32 */
                rms_norm_row(row + h * D, D, norm, c->eps, row + h * D, 0);
        }
        const float *cos = w->cos + s->positions[r] * D, *sin = w->sin + s->positions[r] * D;
        for (long h = 0; h < c->heads + c->kv_heads; h++)
            rotate(row + h * D, cos, sin, D);
        long blk = s->slot_block[r], off = s->slot_offset[r];
        for (long g = 0; g < c->kv_heads; g++)
            for (long d = 0; d < D; d++) {
                act_store(L->kpool, ((blk * c->kv_heads + g) * D + d) * B + off, row[Q + g * D + d], c->act_bf16);
                act_store(L->vpool, ((blk * c->kv_heads + g) * B + off) * D + d, row[Q + KV + g * D + d], c->act_bf16);
            }
    }
}

/* items: rows. The attention's output in the activation dtype (o's input). */
static void attention_out_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    for (long r = lo; r < hi; r++) {
        to_act(L->s->att + r * L->c->q_size, L->c->q_size, h_row(L, r), L->c->act_bf16);
        prep_row(h_row(L, r), &L->w->o, L->c->act_bf16, L->c->q_size, L->s->xsum + r * L->nsum);
    }
}

/* items: rows. act(g) * u in the activation dtype (down's input). */
static void gate_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    const long I = L->c->inter;
    for (long r = lo; r < hi; r++) {
        if (L->c->gelu)
            gelu_mul(L->s->gu + r * 2 * I, L->s->gu + r * 2 * I + I, I, h_row(L, r), L->c->act_bf16);
        else
            silu_mul(L->s->gu + r * 2 * I, L->s->gu + r * 2 * I + I, I, h_row(L, r), L->c->act_bf16);
        prep_row(h_row(L, r), &L->w->down, L->c->act_bf16, I, L->s->xsum + r * L->nsum);
    }
}

/* items: rows. x += rms_norm(y) * post_norm (the sublayer's output, normed in float32). */
static void post_norm_items(void *arg, long lo, long hi) {
    const Layer *L = arg;
    const long H = L->c->hidden;
    for (long r = lo; r < hi; r++) {
        float *y = L->s->y + r * H;
        rms_norm_row(y, H, L->post_norm, L->c->eps, y, 0);
        add_into(L->x + r * H, y, H);
    }
}

/* x += the product's output: added in place, or through the post-norm where the layer has one. */
static void residual_product(Layer *L, const Product *p, const float *post_norm) {
    if (post_norm == NULL) {
        product(L, p, L->x, L->c->hidden, 1);
        return;
    }
    product(L, p, L->s->y, L->c->hidden, 0);
    L->post_norm = post_norm;
    run_items(post_norm_items, L, L->s->rows, 4);
}

void decoder_layer(const Dims *c, const LayerWeights *w, const Step *s, void *kpool, void *vpool, float *x) {
    const long H = c->hidden, Q = c->q_size, I = c->inter, widest = I > H ? (I > Q ? I : Q) : (H > Q ? H : Q);
    Layer L = {c, w, s, kpool, vpool, x, Q + 2 * c->kv_size, (widest + 31) / 32 * 32, prep_floats((widest + 31) / 32 * 32)};
    const long rows = s->rows, chunk = 4; /* rows per item of a row phase */
    run_items(attn_norm_items, &L, rows, chunk);
    product(&L, &w->qkv, s->qkv, L.width, 0);
    run_items(rotary_items, &L, rows, chunk);
    Attention a = {s->qkv, L.width, kpool, vpool, c->act_bf16, s->nseg, s->seg, s->tables, s->masks, s->att,
                   c->heads, c->kv_heads, c->head_dim, c->block_shift, c->scale, w->window};
    long first_item[s->nseg + 1], qbs[s->nseg];
    run_items(attention_items, &a, attention_plan(&a, first_item, qbs), 1);
    run_items(attention_out_items, &L, rows, chunk);
    residual_product(&L, &w->o, w->post_attn_norm);
    run_items(mlp_norm_items, &L, rows, chunk);
    product(&L, &w->gate_up, s->gu, 2 * I, 0);
    run_items(gate_items, &L, rows, chunk);
    residual_product(&L, &w->down, w->post_mlp_norm);
}

typedef struct {
    const float *x, *w;
    long n;
    float eps;
    void *out;
    int bf16;
} Norm;

static void norm_items(void *arg, long lo, long hi) {
    const Norm *c = arg;
    for (long r = lo; r < hi; r++)
        rms_norm_row(c->x + r * c->n, c->n, c->w, c->eps, (char *)c->out + r * c->n * (c->bf16 ? 2 : 4), c->bf16);
}

/* The final norm: out[r] = rms_norm(x[r]) * w, rows of x [rows, n] float32, out in the activation dtype. */
void rms_norm(const float *x, long rows, long n, const float *w, float eps, void *out, int bf16) {
    Norm c = {x, w, n, eps, out, bf16};
    run_items(norm_items, &c, rows, 4);
}
