/* One decoding step of a GPT-2 block in C, for M rows of one new token each: what gptforge.model.Block
 * computes (pre-LayerNorm attention over the key/value cache, then the MLP with tanh GELU), with the weight
 * products through matvec.c's kernels. Called through ctypes by gptforge/quantize.py (PackedBlock).
 *
 * Why: the block's own arithmetic at one token is tiny (a LayerNorm of 768 values, attention over at most
 * block_size cached positions), but run as ~15 torch operations it costs ~0.25 ms a block in dispatch, a
 * quarter of an int8 step of GPT-2 124M; here it costs a few microseconds.
 *
 * Cache: element (m, h, t, d) of this layer's keys at k[m * sm + h * sh + t * st + d]; the new key and value
 * are written at slot `pos`, and row m attends the slots t <= pos where mask[m * mask_stride + t] is
 * nonzero (mask NULL: all of them), as the model's attention mask says.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "matvec.h"

typedef struct {
    int kind, N, K;       /* matvec.h's kinds; y (M, N) = x (M, K) W^T + b */
    const void *w;
    const float *sw, *b;  /* int8 scales; bias or NULL */
} gf_linear;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  /* LayerNorm biases may be NULL */
    float eps;
    gf_linear qkv, proj, fc, out;  /* c_attn (3C), attn.c_proj (C), c_fc (4C), mlp.c_proj (C) */
} gf_block;

static struct { float *h, *qkv, *att, *fc, *scores; size_t cap_rows, cap_keys; int C, F; } scratch;

static int reserve(int M, int C, int F, int keys) {
    if ((size_t)M > scratch.cap_rows || C != scratch.C || F != scratch.F) {
        free(scratch.h); free(scratch.qkv); free(scratch.att); free(scratch.fc);
        scratch.h = malloc((size_t)M * C * sizeof(float));
        scratch.qkv = malloc((size_t)M * 3 * C * sizeof(float));
        scratch.att = malloc((size_t)M * C * sizeof(float));
        scratch.fc = malloc((size_t)M * F * sizeof(float));
        int ok = scratch.h && scratch.qkv && scratch.att && scratch.fc;
        scratch.cap_rows = ok ? (size_t)M : 0;
        scratch.C = C, scratch.F = F;
        if (!ok) return -1;
    }
    if ((size_t)keys > scratch.cap_keys) {
        free(scratch.scores);
        scratch.scores = malloc((size_t)keys * sizeof(float));
        scratch.cap_keys = scratch.scores ? (size_t)keys : 0;
        if (!scratch.scores) return -1;
    }
    return 0;
}

#define LANES 16  /* partial sums side by side: the compiler keeps them in one vector register */

static inline float lanes_total(float *acc) {  /* a tree, not a chain of LANES dependent additions */
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) acc[l] += acc[l + width];
    return acc[0];
}

/* sum of a[i] * b[i]: LANES partial sums (one long chain of float additions would not vectorize) */
static inline float dot(const float *a, const float *b, int n) {
    float acc[LANES] = {0}, s = 0.f;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    return s + lanes_total(acc);
}

static inline float sum(const float *a, int n) {
    float acc[LANES] = {0}, s = 0.f;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l];
    for (; i < n; i++) s += a[i];
    return s + lanes_total(acc);
}

static void layer_norm(const float *x, const float *w, const float *b, float eps, float *y, int C) {
    float mean = sum(x, C) / C;
    for (int k = 0; k < C; k++) y[k] = x[k] - mean;  /* two passes: the variance of centred values */
    float r = 1.f / sqrtf(dot(y, y, C) / C + eps);
    for (int k = 0; k < C; k++) y[k] = y[k] * r * w[k] + (b ? b[k] : 0.f);
}

/* exp(x) to ~2e-7 relative, in plain arithmetic the compiler vectorizes (libm's expf is one call a value):
 * x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to r^7, times 2^n through the exponent bits. */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : x > 88.f ? 88.f : x;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;  /* ln2 in two parts: r stays exact */
    float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r * (1.f / 5040)))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* GPT-2's GELU, 0.5 u (1 + tanh(z)) with z = sqrt(2 / pi) (u + 0.044715 u^3), written as u / (1 + exp(-2z)). */
static void gelu(float *v, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float u = v[i], z = 0.7978845608028654f * (u + 0.044715f * u * u * u);
        v[i] = u / (1.f + exp_approx(-2.f * z));
    }
}

/* softmax(q . k_t / sqrt(D)) over the allowed slots, times v: one head of one row -> y (D). */
static void attend(const float *q, const float *k, const float *v, long st, int n_keys, const uint8_t *mask,
                   int D, float *y, float *scores) {
    float scale = 1.f / sqrtf((float)D), top = -INFINITY;
    for (int t = 0; t < n_keys; t++) {
        scores[t] = dot(q, k + (size_t)t * st, D) * scale;
        if ((!mask || mask[t]) && scores[t] > top) top = scores[t];
    }
    for (int t = 0; t < n_keys; t++) scores[t] = exp_approx(scores[t] - top);
    if (mask)
        for (int t = 0; t < n_keys; t++) scores[t] = mask[t] ? scores[t] : 0.f;
    float total = sum(scores, n_keys);
    for (int d = 0; d < D; d++) y[d] = 0.f;
    for (int t = 0; t < n_keys; t++) {
        const float *vt = v + (size_t)t * st;
        float p = scores[t] / total;
        for (int d = 0; d < D; d++) y[d] += p * vt[d];
    }
}

static int product(const gf_linear *l, const float *x, float *y, int M) {
    return gf_product(l->kind, x, l->w, l->sw, l->b, y, M, l->N, l->K);
}

int gf_block_step(const gf_block *blk, float *x, int M, int C, int H, float *kc, float *vc, long sm, long sh,
                  long st, int pos, const uint8_t *mask, long mask_stride) {
    int D = C / H, F = blk->fc.N, n_keys = pos + 1;
    gf_lock();
    int rc = reserve(M, C, F, n_keys);
    float *h = scratch.h, *qkv = scratch.qkv, *att = scratch.att, *fc = scratch.fc;
    for (int m = 0; rc == 0 && m < M; m++) layer_norm(x + (size_t)m * C, blk->ln1_w, blk->ln1_b, blk->eps, h + (size_t)m * C, C);
    if (rc == 0) rc = product(&blk->qkv, h, qkv, M);
    for (int m = 0; rc == 0 && m < M; m++) {
        for (int hd = 0; hd < H; hd++) {
            const float *row = qkv + (size_t)m * 3 * C + (size_t)hd * D;  /* q; k at +C; v at +2C */
            float *kh = kc + m * sm + hd * sh, *vh = vc + m * sm + hd * sh;
            for (int d = 0; d < D; d++) {
                kh[pos * st + d] = row[C + d];
                vh[pos * st + d] = row[2 * C + d];
            }
            attend(row, kh, vh, st, n_keys, mask ? mask + m * mask_stride : NULL, D, att + (size_t)m * C + (size_t)hd * D,
                   scratch.scores);
        }
    }
    if (rc == 0) rc = product(&blk->proj, att, h, M);
    for (size_t i = 0; rc == 0 && i < (size_t)M * C; i++) x[i] += h[i];
    for (int m = 0; rc == 0 && m < M; m++) layer_norm(x + (size_t)m * C, blk->ln2_w, blk->ln2_b, blk->eps, h + (size_t)m * C, C);
    if (rc == 0) rc = product(&blk->fc, h, fc, M);
    if (rc == 0) gelu(fc, (size_t)M * F);
    if (rc == 0) rc = product(&blk->out, fc, h, M);
    for (size_t i = 0; rc == 0 && i < (size_t)M * C; i++) x[i] += h[i];
    gf_unlock();
    return rc;
}
