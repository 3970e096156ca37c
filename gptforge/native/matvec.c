/* Matrix-vector products for CPU inference: y = x W^T + b for a few rows of x (decoding feeds one token
 * per sequence), with W held as float32, bfloat16 or blockwise int8. Built and loaded by
 * gptforge/native/__init__.py (plain C, no Python or torch headers; called through ctypes).
 *
 * Why our own: at batch 1 every step streams all weights from memory once, so what counts is reading them
 * at the machine's bandwidth on every core. torch's float32 product runs on one core for these shapes and
 * its int8 kernels are GEMM kernels; these loops read each weight row once, front to back, with x in L1.
 *
 * int8 layout (one scale per QB weights of a row, one per QB activations of a row of x), rows in groups of 16:
 *   w  (N16 / 16, Kp / QB, QB / 4, 16, 4) uint8: for a group of 16 rows and a block of QB columns, 4
 *      consecutive weights of each of the 16 rows, then the next 4 columns; q = round(W / sw) + 128, padding
 *      128 (zero); N16 = N rounded up to 16, Kp = K rounded up to QB
 *   sw (N16 / 16, Kp / QB, 16) float32
 *   x is quantized per call per QB values of a row to two int8 digits, q1 = round(x / sx) and
 *   q2 = round((x / sx - q1) * XL), so x ~ (XL q1 + q2) sx / XL (~15 bits; one digit, Q8_0's way, flips
 *   more greedy tokens). Each block's dot products are exact in int32:
 *   y[m, j] = sum_b sw[j, b] * sx[m, b] / XL * (XL * sum_{k in b} q_w[j, k] q1[m, k] + sum_{k in b} q_w[j, k] q2[m, k])
 *   With this layout one VPDPBUSD (u8 x s8) multiplies 4 columns of 16 rows by the same 4 activations
 *   (broadcast), each 32-bit lane accumulating its own row: no horizontal sums, one load and two instructions
 *   (one a digit) per 64 weights, still bound by reading the weights. The +128 makes w unsigned; the extra
 *   128 * (XL sum(q1) + sum(q2)) of a block is the same for every row and is subtracted once per block (nc).
 *
 * Threads: a small pool of our own. The caller and the workers claim chunks of rows from one counter and
 * the caller waits only for chunks already claimed: a worker the OS has not scheduled (a busy machine)
 * costs nothing, where a static split (OpenMP's) would wait for it at every product.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "matvec.h"

#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GF_AVX512 1
#if defined(__AVX512VNNI__)
#define GF_VNNI 1
#endif
#endif

#define QB 64            /* int8 block along K */
#define XL 254           /* x's second int8 digit counts in steps of 1/XL of the first's */
#define MB 4             /* rows of x per pass over a weight row */
#define JB 32            /* weight rows per sub-block when x has more than MB rows (kept in L2) */
#define MAX_THREADS 64
#define SPIN_NS 200000   /* an idle worker spins this long before sleeping (decode steps come ~every ms) */


typedef struct {
    int kind, M, N, K;           /* K: row length of w as stored (Kp for int8) */
    const float *x;              /* (M, K) float32; int8: unused */
    const void *w;
    const float *sw, *b;         /* int8 scales (N, K / QB); bias (N) or NULL */
    const int8_t *xq, *xl;       /* int8: x's two int8 digits (M, Kp), scales sx (M, Kp / QB), nc (M, Kp / QB) */
    const float *sx;
    const int32_t *nc;
    float *y;                    /* (M, N) */
    int chunk;                   /* rows per claimed chunk */
} job_t;

/* ---- kernels over weight rows [j0, j1) and x rows [m0, m0 + mm), mm <= MB ----------------------------- */
#ifdef GF_AVX512
static inline __mmask16 tail_mask(int K) { return (__mmask16)((1u << (K & 15)) - 1); }

static void f32_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    const float *w = (const float *)t->w;
    int K = t->K, kv = K & ~15;
    __mmask16 tail = tail_mask(K);
    for (int j = j0; j < j1; j++) {
        const float *wr = w + (size_t)j * K;
        __m512 acc[MB], acc2 = _mm512_setzero_ps();
        for (int m = 0; m < mm; m++) acc[m] = _mm512_setzero_ps();
        int k = 0;
        if (mm == 1) {  /* two chains: one x row alone would wait on the FMA latency */
            const float *xr = t->x + (size_t)m0 * K;
            for (; k + 32 <= kv; k += 32) {
                acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(xr + k), acc[0]);
                acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 16), _mm512_loadu_ps(xr + k + 16), acc2);
            }
        }
        for (; k < kv; k += 16) {
            __m512 wv = _mm512_loadu_ps(wr + k);
            for (int m = 0; m < mm; m++)
                acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(t->x + (size_t)(m0 + m) * K + k), acc[m]);
        }
        if (tail) {
            __m512 wv = _mm512_maskz_loadu_ps(tail, wr + kv);
            for (int m = 0; m < mm; m++)
                acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, t->x + (size_t)(m0 + m) * K + kv), acc[m]);
        }
        acc[0] = _mm512_add_ps(acc[0], acc2);
        for (int m = 0; m < mm; m++)
            t->y[(size_t)(m0 + m) * t->N + j] = _mm512_reduce_add_ps(acc[m]) + (t->b ? t->b[j] : 0.f);
    }
}

static inline __m512 bf16_load(const uint16_t *p) {  /* 16 bfloat16 -> float32: the high half of a float */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

static inline __m512 bf16_load_tail(const uint16_t *p, __mmask16 tail) {
    __m256i h = _mm256_maskz_loadu_epi16(tail, (const void *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static void bf16_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    const uint16_t *w = (const uint16_t *)t->w;
    int K = t->K, kv = K & ~15;
    __mmask16 tail = tail_mask(K);
    for (int j = j0; j < j1; j++) {
        const uint16_t *wr = w + (size_t)j * K;
        _mm_prefetch((const char *)(wr + K) + 2048, _MM_HINT_T0);
        __m512 acc[MB];
        for (int m = 0; m < mm; m++) acc[m] = _mm512_setzero_ps();
        for (int k = 0; k < kv; k += 16) {
            if ((k & 31) == 0) _mm_prefetch((const char *)(wr + k) + 4096, _MM_HINT_T0);
            __m512 wv = bf16_load(wr + k);
            for (int m = 0; m < mm; m++)
                acc[m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(t->x + (size_t)(m0 + m) * K + k), acc[m]);
        }
        if (tail) {
            __m512 wv = bf16_load_tail(wr + kv, tail);
            for (int m = 0; m < mm; m++)
                acc[m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, t->x + (size_t)(m0 + m) * K + kv), acc[m]);
        }
        for (int m = 0; m < mm; m++)
            t->y[(size_t)(m0 + m) * t->N + j] = _mm512_reduce_add_ps(acc[m]) + (t->b ? t->b[j] : 0.f);
    }
}
#endif

#ifdef GF_VNNI
#define CH 2  /* independent VPDPBUSD chains per digit and row of x: one chain would wait on the latency */

/* One block's dot products of a 16-row group, both digits summed (h: first digit, l: second), scaled and
 * added to acc: acc + cvt(XL h + l + nc) * sw * sx (nc: the +128 offset's correction, see the top). */
static inline __m512 q8_block_done(__m512 acc, __m512i h, __m512i l, int32_t nc, __m512 sw, float sx) {
    __m512i d = _mm512_add_epi32(_mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(XL)), l), _mm512_set1_epi32(nc));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_set1_ps(sx)), acc);
}

/* y[m, j .. j + 16) = acc + bias, the rows past N left alone. */
static inline void q8_store(const job_t *t, int m, int j, __m512 acc) {
    __mmask16 live = t->N - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (t->N - j)) - 1);
    __m512 bias = t->b ? _mm512_maskz_loadu_ps(live, t->b + j) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(t->y + (size_t)m * t->N + j, live, _mm512_add_ps(acc, bias));
}

/* Rows [j0, j1) of W, j0 a multiple of 16: one group of 16 rows at a time, one 32-bit lane per row; each
 * weight load serves both digits of every row of x. Inlined for each count of x rows (mm), so that the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) void q8_groups(const job_t *t, int m0, const int mm, int j0, int j1) {
    const uint8_t *w = (const uint8_t *)t->w;
    int Kp = t->K, nb = Kp / QB;
    for (int j = j0; j < j1; j += 16) {
        const uint8_t *wg = w + (size_t)(j / 16) * nb * 16 * QB;
        const float *sg = t->sw + (size_t)(j / 16) * nb * 16;
        __m512 acc[MB];
        for (int m = 0; m < mm; m++) acc[m] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *wb = wg + (size_t)b * 16 * QB;
            __m512i hi[MB][CH], lo[MB][CH];
            for (int m = 0; m < mm; m++)
                for (int c = 0; c < CH; c++) hi[m][c] = lo[m][c] = _mm512_setzero_si512();
            for (int k4 = 0; k4 < QB / 4; k4 += CH) {
                for (int c = 0; c < CH; c++) {
                    __m512i wv = _mm512_loadu_si512((const void *)(wb + (k4 + c) * 64));
                    for (int m = 0; m < mm; m++) {
                        size_t at = (size_t)(m0 + m) * Kp + b * QB;
                        const int32_t *xh = (const int32_t *)(t->xq + at), *xl = (const int32_t *)(t->xl + at);
                        hi[m][c] = _mm512_dpbusd_epi32(hi[m][c], wv, _mm512_set1_epi32(xh[k4 + c]));
                        lo[m][c] = _mm512_dpbusd_epi32(lo[m][c], wv, _mm512_set1_epi32(xl[k4 + c]));
                    }
                }
            }
            __m512 sw = _mm512_loadu_ps(sg + b * 16);
            for (int m = 0; m < mm; m++) {
                size_t mb = (size_t)(m0 + m) * nb + b;
                acc[m] = q8_block_done(acc[m], _mm512_add_epi32(hi[m][0], hi[m][1]),
                                       _mm512_add_epi32(lo[m][0], lo[m][1]), t->nc[mb], sw, t->sx[mb]);
            }
        }
        for (int m = 0; m < mm; m++) q8_store(t, m0 + m, j, acc[m]);
    }
}

_Static_assert(QB == 64, "q8_groups_one is written out for 16 steps of 4 columns");

/* One row of x (batch-1 decoding), written out: four chains per digit, all in registers. */
static void q8_groups_one(const job_t *t, int m, int j0, int j1) {
    const uint8_t *w = (const uint8_t *)t->w;
    int Kp = t->K, nb = Kp / QB;
    const int32_t *xh = (const int32_t *)(t->xq + (size_t)m * Kp), *xl = (const int32_t *)(t->xl + (size_t)m * Kp);
    const float *sx = t->sx + (size_t)m * nb;
    const int32_t *nc = t->nc + (size_t)m * nb;
    for (int j = j0; j < j1; j += 16) {
        const uint8_t *wg = w + (size_t)(j / 16) * nb * 16 * QB;
        const float *sg = t->sw + (size_t)(j / 16) * nb * 16;
        __m512 acc = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *wb = wg + (size_t)b * 16 * QB;
            const int32_t *h = xh + b * (QB / 4), *l = xl + b * (QB / 4);
            __m512i h0 = _mm512_setzero_si512(), h1 = h0, h2 = h0, h3 = h0, l0 = h0, l1 = h0, l2 = h0, l3 = h0;
#define GF_STEP(k, H, L) { __m512i wv = _mm512_loadu_si512((const void *)(wb + (k) * 64)); \
                           H = _mm512_dpbusd_epi32(H, wv, _mm512_set1_epi32(h[k])); \
                           L = _mm512_dpbusd_epi32(L, wv, _mm512_set1_epi32(l[k])); }
            GF_STEP(0, h0, l0) GF_STEP(1, h1, l1) GF_STEP(2, h2, l2) GF_STEP(3, h3, l3)
            GF_STEP(4, h0, l0) GF_STEP(5, h1, l1) GF_STEP(6, h2, l2) GF_STEP(7, h3, l3)
            GF_STEP(8, h0, l0) GF_STEP(9, h1, l1) GF_STEP(10, h2, l2) GF_STEP(11, h3, l3)
            GF_STEP(12, h0, l0) GF_STEP(13, h1, l1) GF_STEP(14, h2, l2) GF_STEP(15, h3, l3)
#undef GF_STEP
            acc = q8_block_done(acc, _mm512_add_epi32(_mm512_add_epi32(h0, h1), _mm512_add_epi32(h2, h3)),
                                _mm512_add_epi32(_mm512_add_epi32(l0, l1), _mm512_add_epi32(l2, l3)), nc[b],
                                _mm512_loadu_ps(sg + b * 16), sx[b]);
        }
        q8_store(t, m, j, acc);
    }
}

static void q8_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    switch (mm) {
    case 1: q8_groups_one(t, m0, j0, j1); break;
    case 2: q8_groups(t, m0, 2, j0, j1); break;
    case 3: q8_groups(t, m0, 3, j0, j1); break;
    default: q8_groups(t, m0, 4, j0, j1); break;
    }
}
#endif

/* Portable versions (any CPU; the compiler vectorizes what it can). Same arithmetic as above. */
#ifndef GF_AVX512
static void f32_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    const float *w = (const float *)t->w;
    int K = t->K;
    for (int j = j0; j < j1; j++)
        for (int m = m0; m < m0 + mm; m++) {
            const float *wr = w + (size_t)j * K, *xr = t->x + (size_t)m * K;
            float acc[16] = {0};
            int k = 0;
            for (; k + 16 <= K; k += 16)
                for (int l = 0; l < 16; l++) acc[l] += wr[k + l] * xr[k + l];
            for (; k < K; k++) acc[0] += wr[k] * xr[k];
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += acc[l];
            t->y[(size_t)m * t->N + j] = s + (t->b ? t->b[j] : 0.f);
        }
}

static void bf16_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    const uint16_t *w = (const uint16_t *)t->w;
    int K = t->K;
    for (int j = j0; j < j1; j++)
        for (int m = m0; m < m0 + mm; m++) {
            const uint16_t *wr = w + (size_t)j * K;
            const float *xr = t->x + (size_t)m * K;
            float acc[16] = {0};
            int k = 0;
            for (; k < K; k++) {
                uint32_t bits = (uint32_t)wr[k] << 16;
                float wv;
                memcpy(&wv, &bits, sizeof wv);
                acc[k & 15] += wv * xr[k];
            }
            float s = 0.f;
            for (int l = 0; l < 16; l++) s += acc[l];
            t->y[(size_t)m * t->N + j] = s + (t->b ? t->b[j] : 0.f);
        }
}
#endif

#ifndef GF_VNNI
static void q8_rows(const job_t *t, int m0, int mm, int j0, int j1) {
    const uint8_t *w = (const uint8_t *)t->w;
    int Kp = t->K, nb = Kp / QB;
    for (int j = j0; j < j1; j++) {
        const uint8_t *wg = w + (size_t)(j / 16) * nb * 16 * QB;
        int lane = j % 16;
        for (int m = m0; m < m0 + mm; m++) {
            const int8_t *xh = t->xq + (size_t)m * Kp, *xl = t->xl + (size_t)m * Kp;
            float s = 0.f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *wb = wg + (size_t)b * 16 * QB;
                int32_t hi = 0, lo = 0;
                for (int k4 = 0; k4 < QB / 4; k4++)
                    for (int i = 0; i < 4; i++) {
                        int32_t wv = wb[k4 * 64 + lane * 4 + i];
                        hi += wv * xh[b * QB + k4 * 4 + i];
                        lo += wv * xl[b * QB + k4 * 4 + i];
                    }
                int32_t d = hi * XL + lo + t->nc[(size_t)m * nb + b];
                s += (float)d * (t->sw[((size_t)(j / 16) * nb + b) * 16 + lane] * t->sx[(size_t)m * nb + b]);
            }
            t->y[(size_t)m * t->N + j] = s + (t->b ? t->b[j] : 0.f);
        }
    }
}
#endif

static void run_rows(const job_t *t, int j0, int j1) {
    void (*rows)(const job_t *, int, int, int, int) = t->kind == F32 ? f32_rows : t->kind == BF16 ? bf16_rows : q8_rows;
    if (t->M <= MB) {
        rows(t, 0, t->M, j0, j1);
        return;
    }
    for (int jb = j0; jb < j1; jb += JB) {  /* many rows of x: a sub-block of W stays in cache across them */
        int je = jb + JB < j1 ? jb + JB : j1;
        for (int m0 = 0; m0 < t->M; m0 += MB) rows(t, m0, t->M - m0 < MB ? t->M - m0 : MB, jb, je);
    }
}

/* ---- the pool ---------------------------------------------------------------------------------------- */
static struct {
    pthread_mutex_t call;          /* one product at a time */
    pthread_mutex_t mu;            /* sleeping workers */
    pthread_cond_t cv;
    int threads;                   /* wanted, caller included */
    int started;                   /* workers created */
    int sleeping;
    _Atomic uint64_t state;        /* (generation << 32) | next chunk to claim */
    _Atomic int done;              /* chunks finished in the current generation */
    int nchunks;
    job_t job;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1};

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Claim and run chunks of generation `gen` until none is left (or a newer job replaced it). */
static void work(uint32_t gen) {
    for (;;) {
        uint64_t s = atomic_load(&pool.state);
        uint32_t c = (uint32_t)s;
        if ((uint32_t)(s >> 32) != gen || c >= (uint32_t)pool.nchunks) return;
        if (!atomic_compare_exchange_weak(&pool.state, &s, s + 1)) continue;
        /* A claimed chunk keeps its job current: the caller waits for it before publishing another. */
        const job_t *t = &pool.job;
        int j0 = (int)c * t->chunk, j1 = j0 + t->chunk < t->N ? j0 + t->chunk : t->N;
        run_rows(t, j0, j1);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker(void *arg) {
    int index = (int)(intptr_t)arg;  /* 1-based: the caller is thread 0 */
    uint32_t seen = 0;
    for (;;) {
        uint64_t start = now_ns();
        uint32_t gen;
        int spins = 0;
        while ((gen = (uint32_t)(atomic_load(&pool.state) >> 32)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&pool.mu);
                pool.sleeping++;
                while ((gen = (uint32_t)(atomic_load(&pool.state) >> 32)) == seen) pthread_cond_wait(&pool.cv, &pool.mu);
                pool.sleeping--;
                pthread_mutex_unlock(&pool.mu);
                break;
            }
        }
        seen = gen;
        if (index < pool.threads) work(gen);
    }
    return NULL;
}

static void run(job_t *t) {
    int threads = pool.threads;
    if (threads <= 1 || (size_t)t->N * t->K < 65536) {  /* too small to share */
        run_rows(t, 0, t->N);
        return;
    }
    while (pool.started < threads - 1 && pool.started < MAX_THREADS - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&th, &attr, worker, (void *)(intptr_t)(pool.started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool.started++;
    }
    /* ~8 chunks per thread, at least 16 rows each: claims are cheap next to a chunk's work, and a chunk
     * left to a thread that gets descheduled is small */
    int chunk = t->N / (threads * 8);
    chunk = chunk < 16 ? 16 : chunk / 16 * 16;  /* int8 rows come in groups of 16 */
    t->chunk = chunk;
    pool.job = *t;
    pool.nchunks = (t->N + chunk - 1) / chunk;
    atomic_store(&pool.done, 0);
    uint32_t gen = (uint32_t)(atomic_load(&pool.state) >> 32) + 1;
    atomic_store(&pool.state, (uint64_t)gen << 32);
    if (pool.sleeping) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    work(gen);
    while (atomic_load(&pool.done) < pool.nchunks) cpu_relax();
}

static void reset_after_fork(void) {  /* the child has no workers; locks may have been held by other threads */
    pthread_mutex_init(&pool.call, NULL);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.started = 0;
    pool.sleeping = 0;
}

/* ---- int8 activations: the caller quantizes x once per product ---------------------------------------- */
static struct { int8_t *xq, *xl; float *sx; int32_t *nc; size_t cap; } scratch;

static int quantize_x(const float *x, int M, int K, int Kp) {
    size_t need = (size_t)M * Kp;
    if (need > scratch.cap) {
        free(scratch.xq); free(scratch.xl); free(scratch.sx); free(scratch.nc);
        scratch.xq = malloc(need);
        scratch.xl = malloc(need);
        scratch.sx = malloc(need / QB * sizeof(float));
        scratch.nc = malloc(need / QB * sizeof(int32_t));
        scratch.cap = scratch.xq && scratch.xl && scratch.sx && scratch.nc ? need : 0;
        if (!scratch.cap) return -1;
    }
    int nb = Kp / QB;
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        int8_t *q = scratch.xq + (size_t)m * Kp, *ql = scratch.xl + (size_t)m * Kp;
        for (int b = 0; b < nb; b++) {
            int k0 = b * QB, k1 = k0 + QB < K ? k0 + QB : K;
#ifdef GF_AVX512
            if (k1 - k0 == QB) {  /* a whole block: the same arithmetic, 16 values an instruction */
                __m512 v[QB / 16], top = _mm512_setzero_ps();
                for (int i = 0; i < QB / 16; i++) {
                    v[i] = _mm512_loadu_ps(xr + k0 + 16 * i);
                    top = _mm512_max_ps(top, _mm512_abs_ps(v[i]));
                }
                float amax = _mm512_reduce_max_ps(top);
                float inv = amax > 0.f ? 127.f / amax : 0.f;
                scratch.sx[(size_t)m * nb + b] = amax / 127.f / XL;
                __m512i total = _mm512_setzero_si512();
                for (int i = 0; i < QB / 16; i++) {  /* cvtps rounds to nearest even, as lrintf */
                    __m512 u = _mm512_mul_ps(v[i], _mm512_set1_ps(inv));
                    __m512i h = _mm512_cvtps_epi32(u);
                    __m512i l = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(u, _mm512_cvtepi32_ps(h)), _mm512_set1_ps(XL)));
                    total = _mm512_add_epi32(total, _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(XL)), l));
                    _mm_storeu_si128((__m128i *)(q + k0 + 16 * i), _mm512_cvtepi32_epi8(h));
                    _mm_storeu_si128((__m128i *)(ql + k0 + 16 * i), _mm512_cvtepi32_epi8(l));
                }
                scratch.nc[(size_t)m * nb + b] = -128 * _mm512_reduce_add_epi32(total);
                continue;
            }
#endif
            float amax = 0.f;
            for (int k = k0; k < k1; k++) amax = fmaxf(amax, fabsf(xr[k]));
            float inv = amax > 0.f ? 127.f / amax : 0.f;
            scratch.sx[(size_t)m * nb + b] = amax / 127.f / XL;
            int32_t sum = 0;
            for (int k = k0; k < k0 + QB; k++) {
                float u = k < k1 ? xr[k] * inv : 0.f;
                q[k] = (int8_t)lrintf(u);
                ql[k] = (int8_t)lrintf((u - q[k]) * XL);
                sum += q[k] * XL + ql[k];
            }
            scratch.nc[(size_t)m * nb + b] = -128 * sum;
        }
    }
    return 0;
}

/* ---- entry points ----------------------------------------------------------------------------------- */
int gf_abi(void) { return GF_ABI; }

/* Bit 0: AVX-512 float32/bfloat16 loops; bit 1: AVX-512 VNNI int8 loop (else portable C). */
int gf_features(void) {
    int f = 0;
#ifdef GF_AVX512
    f |= 1;
#endif
#ifdef GF_VNNI
    f |= 2;
#endif
    return f;
}

int gf_qblock(void) { return QB; }

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, reset_after_fork); }

void gf_set_threads(int n) {
    pthread_once(&fork_once, install_fork_handler);
    pool.threads = n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

void gf_lock(void) { pthread_mutex_lock(&pool.call); }
void gf_unlock(void) { pthread_mutex_unlock(&pool.call); }

int gf_product(int kind, const float *x, const void *w, const float *sw, const float *b, float *y, int M, int N, int K) {
    job_t t = {kind, M, N, K, x, w, sw, b, NULL, NULL, NULL, NULL, y, 0};
    if (kind == Q8) {
        int Kp = (K + QB - 1) / QB * QB;
        if (quantize_x(x, M, K, Kp) != 0) return -1;
        t.K = Kp;
        t.xq = scratch.xq; t.xl = scratch.xl; t.sx = scratch.sx; t.nc = scratch.nc;
    }
    run(&t);
    return 0;
}

int gf_matvec(int kind, const float *x, const void *w, const float *sw, const float *b, float *y, int M, int N, int K) {
    gf_lock();
    int rc = gf_product(kind, x, w, sw, b, y, M, N, K);
    gf_unlock();
    return rc;
}
