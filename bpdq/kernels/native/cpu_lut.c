/* Native CPU kernels for bit-plane weights (loaded by bpdq/kernels/cpu_lut.py through ctypes).
 *
 * Planes are read in the "column-major" layout planes[i][col][r] (uint8, k x C x N with C = in/8 byte
 * columns and N = out rows): the bytes of one byte column of all rows are contiguous, so one vector load
 * fetches the same byte column of 32 or 64 consecutive rows. Python keeps the layer's `planes` buffer as a
 * [k, out, in/8] tensor with strides (C*N, 1, N) that stores exactly this layout (see cpu_lut.py).
 * Coefficients are the canonical fp16 [groups][k+1][N].
 *
 * bpdq_lut_gemv: y[m, r] = sum_G ( sum_i c_i[G, r] * (B_i x_m)_G  +  c_0[G, r] * sum(x_m over G) ) + bias[r]
 * Per token and per chunk of 4 inputs a 16-entry fp32 table of subset sums is built (T-MAC style); a plane
 * byte holds two 4-bit indices (inputs 8c..8c+3 and 8c+4..8c+7). The portable path looks the exact fp32
 * tables up, one row at a time, in one pass over a chunk of rows per group and plane through an array of
 * plane sums (plane sums over byte columns, then c_i times each, then c_0 times the group's input sum).
 * AVX2 and AVX-512 round the tables to int16 with one scale per token and group, split into two byte
 * tables, and look 32 (AVX2) or 64 (AVX-512 BW) rows up per vpshufb, summing in int16 (T-MAC's approach;
 * the error bound is derived at block_lut_avx2); both give bit-identical results. Groups and planes are
 * their outer loops, row blocks the inner one, so each byte column is read as a sequential, prefetched
 * stream. Tail rows (past the last multiple of 32) go through scalar code on the exact fp32 tables that
 * sums per group first.
 *
 * bpdq_dequant: rows [r0, r1) of W_hat into a dense row-major fp32/bf16 tile (the large-M path multiplies
 * such tiles with torch).
 *
 * Threads: the caller passes a thread count; rows are split into contiguous ranges, the caller runs the
 * first and persistent pool workers the others (only when the call is large enough to pay for it).
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime under -std=c11 */
#include <float.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define BPDQ_X86 1
#include <immintrin.h>
#endif

#define ISA_PORTABLE 0
#define ISA_AVX2 1
#define ISA_AVX512 2

/* dtype codes shared with cpu_lut.py */
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

/* Row block: threads get whole blocks of RB rows; the vector paths process multiples of RB rows and the
 * remaining tail rows go through the scalar code. */
#define RB 32

/* ---------------------------------------------------------------------------------------------------- */
/* scalar conversions                                                                                    */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_val(const void *p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    if (dt == DT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return f16_to_f32(((const uint16_t *)p)[i]);
}

static inline void store_val(void *p, int dt, int64_t i, float v) {
    if (dt == DT_F32)
        ((float *)p)[i] = v;
    else
        ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* ---------------------------------------------------------------------------------------------------- */
/* threads                                                                                               */

typedef void (*range_fn)(void *ctx, int64_t begin, int64_t end);

/* A persistent pool of worker threads. Creating threads per call cost more than a large layer's whole GEMV
 * at two threads (clone, and waking the other core: on a VM a halted vCPU takes tens of microseconds to
 * wake), so the second thread started late and 4096x4096 gained nothing. Workers are created on first use
 * and kept; after a job they spin for BPDQ_CPU_SPIN_US microseconds (default 100; decode calls arrive
 * back to back) and then sleep on a condition variable. One job runs at a time: a call that finds the
 * pool busy (another caller thread) runs its ranges on fresh threads as before. The result never depends on
 * the thread count or on which thread runs a range. A forked child starts with an empty pool. */
#define POOL_MAX 63

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t n;
    int threads; /* ranges of the current job; worker w runs range w + 1 when w + 1 < threads */
} pool_job;

static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER; /* held by the caller of a pool job */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* guards sleeping workers and pool_size */
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static pool_job job;
static struct {
    _Atomic uint64_t go; /* bumped (release) when worker w has a range of the published job */
    char pad[56];
} pool_slot[POOL_MAX];
static _Atomic int pool_pending;    /* workers of the current job not yet done */
static int pool_size;               /* workers started */
static int64_t pool_spin_ns = -1;   /* read once from BPDQ_CPU_SPIN_US */
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#ifdef BPDQ_X86
    _mm_pause();
#endif
}

static void pool_after_fork(void) { /* the child has none of the parent's workers */
    pthread_mutex_init(&pool_busy, NULL);
    pthread_mutex_init(&pool_mu, NULL);
    pthread_cond_init(&pool_cv, NULL);
    pool_size = 0;
    atomic_store(&pool_pending, 0);
    for (int w = 0; w < POOL_MAX; w++) atomic_store(&pool_slot[w].go, 0);
}

static void pool_init(void) {
    const char *env = getenv("BPDQ_CPU_SPIN_US");
    long us = env && *env ? strtol(env, NULL, 10) : 100;
    pool_spin_ns = (us < 0 ? 0 : us > 100000 ? 100000 : us) * 1000;
    pthread_atfork(NULL, NULL, pool_after_fork);
}

static void *pool_worker(void *arg) {
    const int w = (int)(intptr_t)arg;
    _Atomic uint64_t *go = &pool_slot[w].go;
    uint64_t seen = 0; /* slots start at 0 (also after a fork): a job published before this thread ran counts */
    for (;;) {
        uint64_t g = atomic_load_explicit(go, memory_order_acquire);
        if (g == seen) { /* spin a while, then sleep until the next job */
            const int64_t until = now_ns() + pool_spin_ns;
            for (int i = 0; (g = atomic_load_explicit(go, memory_order_acquire)) == seen; i++) {
                cpu_relax();
                if ((i & 63) == 63 && now_ns() >= until) break;
            }
            if (g == seen) {
                pthread_mutex_lock(&pool_mu);
                while ((g = atomic_load_explicit(go, memory_order_acquire)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
                pthread_mutex_unlock(&pool_mu);
            }
        }
        seen = g;
        const pool_job j = job; /* published before go was bumped; not rewritten until every range is done */
        j.fn(j.ctx, j.n * (w + 1) / j.threads, j.n * (w + 2) / j.threads);
        atomic_fetch_sub_explicit(&pool_pending, 1, memory_order_acq_rel);
    }
    return NULL;
}

/* Start workers until there are `want`; returns how many there are. Called with pool_busy held. */
static int pool_grow(int want) {
    pthread_mutex_lock(&pool_mu);
    while (pool_size < want) {
        pthread_t id;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int ok = pthread_create(&id, &attr, pool_worker, (void *)(intptr_t)pool_size) == 0;
        pthread_attr_destroy(&attr);
        if (!ok) break;
        pool_size++;
    }
    const int have = pool_size;
    pthread_mutex_unlock(&pool_mu);
    return have;
}

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t begin, end;
} range_task;

static void *run_range(void *arg) {
    range_task *t = (range_task *)arg;
    t->fn(t->ctx, t->begin, t->end);
    return NULL;
}

/* The fallback when the pool is busy: one fresh thread per range but the first, which the caller runs; a
 * range whose thread cannot be created runs on the caller. */
static void spawn_for(int threads, int64_t n, range_fn fn, void *ctx) {
    range_task tasks[POOL_MAX + 1];
    pthread_t ids[POOL_MAX + 1];
    int started[POOL_MAX + 1];
    for (int t = 0; t < threads; t++) {
        tasks[t] = (range_task){fn, ctx, n * t / threads, n * (t + 1) / threads};
        started[t] = 0;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run_range, &tasks[t]) == 0;
    fn(ctx, tasks[0].begin, tasks[0].end);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            fn(ctx, tasks[t].begin, tasks[t].end);
    }
}

/* Split [0, n) into `threads` contiguous ranges; the calling thread runs the first, pool workers the rest. */
static void parallel_for(int threads, int64_t n, range_fn fn, void *ctx) {
    if (threads > n) threads = (int)n;
    if (threads <= 1) {
        if (n > 0) fn(ctx, 0, n);
        return;
    }
    if (threads > POOL_MAX + 1) threads = POOL_MAX + 1;
    pthread_once(&pool_once, pool_init);
    if (pthread_mutex_trylock(&pool_busy) != 0) {
        spawn_for(threads, n, fn, ctx);
        return;
    }
    const int have = pool_grow(threads - 1);
    if (have < threads - 1) threads = have + 1; /* fewer workers than asked: fewer, longer ranges */
    if (threads <= 1) {
        pthread_mutex_unlock(&pool_busy);
        fn(ctx, 0, n);
        return;
    }
    job = (pool_job){fn, ctx, n, threads};
    atomic_store_explicit(&pool_pending, threads - 1, memory_order_relaxed);
    pthread_mutex_lock(&pool_mu); /* a worker going to sleep checks its slot under this lock: no lost wake-up */
    for (int w = 0; w < threads - 1; w++) atomic_fetch_add_explicit(&pool_slot[w].go, 1, memory_order_release);
    pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    fn(ctx, 0, n / threads);
    while (atomic_load_explicit(&pool_pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool_busy);
}

/* ---------------------------------------------------------------------------------------------------- */
/* lookup-table GEMV                                                                                     */

typedef struct {
    const float *tables; /* [M][C*2][16] */
    const float *xsum;   /* [M][G] */
    const uint8_t *qtables; /* integer-table paths: [M][C][4][16] byte tables */
    const float *qscale;    /* integer-table paths: [M][G] */
    const uint8_t *planes;
    const uint16_t *coeffs;
    const void *bias;
    void *y;
    int64_t M, N, C, k, cpg, groups, y_stride;
    int bias_dt, y_dt, isa;
} gemv_ctx;

/* Scalar rows [r0, r1) on the exact fp32 tables: the tail rows (fewer than RB) of every path. */
static void gemv_rows_scalar(const gemv_ctx *c, int64_t r0, int64_t r1) {
    const int64_t N = c->N, C = c->C, k = c->k, cpg = c->cpg;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t m = 0; m < c->M; m++) {
            const float *tab = c->tables + m * C * 32;
            const float *xs = c->xsum + m * c->groups;
            float y = 0.0f;
            for (int64_t g = 0; g < c->groups; g++) {
                const uint16_t *cg = c->coeffs + g * (k + 1) * N + r;
                float acc_g = f16_to_f32(cg[k * N]) * xs[g];
                for (int64_t i = 0; i < k; i++) {
                    const uint8_t *p = c->planes + (i * C + g * cpg) * N + r;
                    const float *t = tab + g * cpg * 32;
                    float s = 0.0f;
                    for (int64_t cc = 0; cc < cpg; cc++) {
                        uint8_t b = p[cc * N];
                        s += t[cc * 32 + (b & 15)] + t[cc * 32 + 16 + (b >> 4)];
                    }
                    acc_g += f16_to_f32(cg[i * N]) * s;
                }
                y += acc_g;
            }
            if (c->bias) y += load_val(c->bias, c->bias_dt, r);
            store_val(c->y, c->y_dt, m * c->y_stride + r, y);
        }
    }
}

/* The pass kernels of the portable path work on n consecutive rows (n a multiple of RB) and M
 * tokens at once:
 *   lut_pass:  s[m][r] += sum over the cpg byte columns of table lookups   (one plane of one group)
 *   combine:   y[m][r] += c[r] * s[m][r]                                    (c fp16: a plane coefficient)
 *   offset:    y[m][r] += c[r] * xs[m * xs_stride]                           (c fp16: the offset c_0)
 * Byte column cc of the plane is p[cc * N + r]: n contiguous bytes, so memory is streamed. */

static void lut_pass_portable(const float *tab, int64_t ts, int64_t M, const uint8_t *p, int64_t N, int64_t cpg,
                              int64_t n, float *s) {
    for (int64_t cc = 0; cc < cpg; cc++) {
        const uint8_t *pb = p + cc * N;
        for (int64_t m = 0; m < M; m++) {
            const float *t = tab + m * ts + cc * 32;
            float *sm = s + m * n;
            for (int64_t r = 0; r < n; r++) sm[r] += t[pb[r] & 15] + t[16 + (pb[r] >> 4)];
        }
    }
}

static void combine_portable(const uint16_t *c16, const float *s, float *y, int64_t M, int64_t n) {
    for (int64_t r = 0; r < n; r++) {
        float cf = f16_to_f32(c16[r]);
        for (int64_t m = 0; m < M; m++) y[m * n + r] += cf * s[m * n + r];
    }
}

static void offset_portable(const uint16_t *c16, const float *xs, int64_t xs_stride, float *y, int64_t M, int64_t n) {
    for (int64_t r = 0; r < n; r++) {
        float cf = f16_to_f32(c16[r]);
        for (int64_t m = 0; m < M; m++) y[m * n + r] += cf * xs[m * xs_stride];
    }
}

#ifdef BPDQ_X86

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

/* AVX2: integer tables and vpshufb (the T-MAC approach, with two bytes per entry). Per token and group G the
 * tables of G's chunks are centred, t'[j] = t[j] - t[15] / 2 (t[15] = the chunk's input sum S; t' is the sum
 * of +-x_b / 2, so max |t'| = sum |x_b| / 2), and rounded to int16 with one scale per token and group,
 * s_G = max over G's chunks of |t'| / 32767: v = rint(t' / s_G) (tables_i16_avx2). Each entry is stored as
 * two byte tables, its low byte (unsigned, 0..255) and its high byte (signed, -128..127), v = 256 hi + lo.
 * A plane's exact sum over G is sum t = sum t' + X_G / 2 (X_G: the group's exact fp32 input sum), computed
 * as s_G * P + X_G / 2 with P = 256 * (sum of hi) + (sum of lo) the integer sum of the looked-up v.
 *
 * One byte column of 32 rows is one 32-byte load (planes are column-major); one vpshufb per nibble and byte
 * table looks the 32 rows up (16-entry tables broadcast to both 128-bit lanes). Interleaving the low- and
 * high-nibble results (vpunpck{l,h}bw) and vpmaddubsw by 1 adds the two per row in int16 ([rows 0-7 | 16-23]
 * and [rows 8-15 | 24-31]): per column lo_L + lo_H <= 510 and |hi_L + hi_H| <= 256, so int16 accumulators
 * take up to LUT_SPAN = 64 columns (64 * 510 = 32640 <= 32767) without overflow. Larger groups (over 512
 * inputs) are split into spans of at most 64 columns, each folded into the fp32 row accumulators on its own.
 * Per 32 rows and column: 1 load, 3 and/shift, 4 vpshufb, 4 unpacks, 4 vpmaddubsw, 4 adds (256 weights).
 * A block of nb x 32 rows (nb <= LUT_MAX_NB) keeps its 4 nb accumulators in registers over a span's columns;
 * then per 8 rows: y += c_i * (s_G * P + X_G / 2) (two FMAs, c_i fp16 through F16C), and after the group's
 * last plane y += c_0 * X_G.
 *
 * Why two bytes: one byte (int8 tables, s_G = max |t'| / 127) costs half the lookups, but with a scale shared
 * by a group's 16 chunks the activations' outliers make it coarse: on SmolLM2's layers it left 0.4-2.5%
 * relative error per linear output, which compounds over 210 linears.
 *
 * Error (per output y[m, r], against exact arithmetic): each looked-up entry is off by at most s_G / 2
 * (rounding to nearest) plus the fp32 roundoff of the table, of t' and of t' / s_G (below 0.02 s_G: about
 * 10 * 2^-24 * 32767), and a plane's sum over G has 2 cpg = g / 4 entries, so
 *     |y - y_exact| <= sum_G  (g / 4) * (1/2 + 1/32) * s_G * sum_{i >= 1} |c_i[G, r]|  +  fp32 roundoff,
 * s_G = max over G's chunks of (sum of |x| over the chunk's 4 inputs) / 65534. The c_0 and X_G / 2 terms use
 * the exact fp32 input sums; the integer sums are exact (no overflow, see above). cpu_lut.py's
 * lut_error_bound computes this bound (with the roundoff of the fp32 fold); the tests hold AVX2 to it. */
#define LUT_MAX_NB 2
#define LUT_SPAN 64
/* Software prefetch distance along a byte column and the coefficient rows (bytes). */
#define AVX2_PREFETCH 128

/* 8 rows' plane sums P = 256 hi + lo: y += c_i * (s * P + hx), then y += c_0 * xg when c0 is given. */
AVX2_TARGET static inline __attribute__((always_inline)) void fold8_avx2(__m128i lo16, __m128i hi16,
                                                                         const uint16_t *ci, const uint16_t *c0,
                                                                         __m256 s, __m256 hx, __m256 xg, float *y) {
    const __m256i p = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi16_epi32(hi16), 8), _mm256_cvtepi16_epi32(lo16));
    const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, hx);
    const __m256 cf = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)ci));
    __m256 out = _mm256_fmadd_ps(cf, v, _mm256_loadu_ps(y));
    if (c0) out = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)c0)), xg, out);
    _mm256_storeu_ps(y, out);
}

/* nb x 32 rows, ncols (<= LUT_SPAN) byte columns of one plane: tq the columns' byte tables ([ncols][4][16]:
 * low nibble's lo and hi bytes, high nibble's lo and hi bytes), p the first column's bytes of the block's
 * first row (columns N apart). */
AVX2_TARGET static inline __attribute__((always_inline)) void block_lut_avx2(const uint8_t *tq, const uint8_t *p,
                                                                             int64_t N, int64_t ncols,
                                                                             const uint16_t *ci, const uint16_t *c0,
                                                                             float s, float hx, float xg, float *y,
                                                                             const int nb) {
    const __m256i nib = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256i a[4 * LUT_MAX_NB]; /* per 32 rows: lo sums [0-7|16-23], [8-15|24-31], then hi sums likewise */
    for (int j = 0; j < 4 * nb; j++) a[j] = _mm256_setzero_si256();
    for (int64_t cc = 0; cc < ncols; cc++, p += N, tq += 64) {
        _mm_prefetch((const char *)p + AVX2_PREFETCH, _MM_HINT_T0);
        const __m256i l0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tq));
        const __m256i l1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tq + 16)));
        const __m256i h0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tq + 32)));
        const __m256i h1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tq + 48)));
        for (int j = 0; j < nb; j++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(p + 32 * j));
            const __m256i il = _mm256_and_si256(b, nib), ih = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
            const __m256i lo_l = _mm256_shuffle_epi8(l0, il), lo_h = _mm256_shuffle_epi8(h0, ih);
            const __m256i hi_l = _mm256_shuffle_epi8(l1, il), hi_h = _mm256_shuffle_epi8(h1, ih);
            /* vpmaddubsw: first operand unsigned, second signed */
            a[4 * j] = _mm256_add_epi16(a[4 * j], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(lo_l, lo_h), one));
            a[4 * j + 1] = _mm256_add_epi16(a[4 * j + 1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(lo_l, lo_h), one));
            a[4 * j + 2] = _mm256_add_epi16(a[4 * j + 2], _mm256_maddubs_epi16(one, _mm256_unpacklo_epi8(hi_l, hi_h)));
            a[4 * j + 3] = _mm256_add_epi16(a[4 * j + 3], _mm256_maddubs_epi16(one, _mm256_unpackhi_epi8(hi_l, hi_h)));
        }
    }
    _mm_prefetch((const char *)ci + AVX2_PREFETCH * 2, _MM_HINT_T0); /* fp16: 2 bytes a row */
    if (c0) _mm_prefetch((const char *)c0 + AVX2_PREFETCH * 2, _MM_HINT_T0);
    const __m256 sv = _mm256_set1_ps(s), hv = _mm256_set1_ps(hx), xv = _mm256_set1_ps(xg);
    for (int j = 0; j < nb; j++) {
        const __m256i *q = a + 4 * j;
        const int64_t o = 32 * j;
        const uint16_t *c0j = c0 ? c0 + o : NULL;
        fold8_avx2(_mm256_castsi256_si128(q[0]), _mm256_castsi256_si128(q[2]), ci + o, c0j, sv, hv, xv, y + o);
        fold8_avx2(_mm256_castsi256_si128(q[1]), _mm256_castsi256_si128(q[3]), ci + o + 8, c0j ? c0j + 8 : NULL, sv,
                   hv, xv, y + o + 8);
        fold8_avx2(_mm256_extracti128_si256(q[0], 1), _mm256_extracti128_si256(q[2], 1), ci + o + 16,
                   c0j ? c0j + 16 : NULL, sv, hv, xv, y + o + 16);
        fold8_avx2(_mm256_extracti128_si256(q[1], 1), _mm256_extracti128_si256(q[3], 1), ci + o + 24,
                   c0j ? c0j + 24 : NULL, sv, hv, xv, y + o + 24);
    }
}

/* Rows [r0, r0 + n) (n a multiple of 32) of every token into yacc [M][n] (zeroed by the caller). Groups and
 * planes are the outer loops and row blocks the inner one, so one group's plane is read as cpg sequential
 * streams (a byte column each; a block-outer order would read one line per byte column at a stride of N
 * bytes, which for N a multiple of 4096 maps every line to the same cache set) and its tables stay in L1.
 * Tokens are the innermost loop: a block's plane bytes are loaded from memory once and reused from L1. */
AVX2_TARGET static void rows_lut_avx2(const gemv_ctx *c, int64_t r0, int64_t n, float *yacc) {
    const int64_t M = c->M, N = c->N, C = c->C, k = c->k, cpg = c->cpg, groups = c->groups;
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *cg = c->coeffs + g * (k + 1) * N + r0;
        for (int64_t i = 0; i < k; i++) {
            for (int64_t c1 = 0; c1 < cpg; c1 += LUT_SPAN) {
                const int64_t ncols = cpg - c1 < LUT_SPAN ? cpg - c1 : LUT_SPAN;
                const int first = c1 == 0, last = i == k - 1 && c1 + ncols == cpg;
                const uint8_t *p = c->planes + (i * C + g * cpg + c1) * N + r0;
                const uint16_t *c0 = last ? cg + k * N : NULL;
                for (int64_t b = 0; b < n; b += 32 * LUT_MAX_NB) {
                    const int nb = n - b < 32 * LUT_MAX_NB ? (int)((n - b) / 32) : LUT_MAX_NB;
                    for (int64_t m = 0; m < M; m++) {
                        const uint8_t *tq = c->qtables + (m * C + g * cpg + c1) * 64;
                        const float xg = c->xsum[m * groups + g], s = c->qscale[m * groups + g];
                        const float hx = first ? 0.5f * xg : 0.0f;
                        const uint16_t *cb = c0 ? c0 + b : NULL;
                        float *y = yacc + m * n + b;
                        if (nb == LUT_MAX_NB) /* constant block widths: the accumulators stay in registers */
                            block_lut_avx2(tq, p + b, N, ncols, cg + i * N + b, cb, s, hx, xg, y, LUT_MAX_NB);
                        else
                            block_lut_avx2(tq, p + b, N, ncols, cg + i * N + b, cb, s, hx, xg, y, 1);
                    }
                }
            }
        }
    }
}

/* The byte tables of one token (qt [C][4][16], scales qs [groups]) from its fp32 tables tm [2C][16]: per
 * group the scale s = max |t'| / 32767 over its chunks, t' = t - t[15] / 2, then v = rint(t' / s) (the
 * default rounding mode: to nearest even), split into its low and high bytes. An all-zero group gets s = 0,
 * v = 0. */
AVX2_TARGET static void tables_i16_avx2(const float *tm, int64_t C, int64_t cpg, uint8_t *qt, float *qs) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m128i low = _mm_set1_epi16(0xff);
    for (int64_t g0 = 0; g0 < 2 * C; g0 += 2 * cpg) {
        __m256 amax = _mm256_setzero_ps();
        for (int64_t q = g0; q < g0 + 2 * cpg; q++) {
            const __m256 h = _mm256_set1_ps(0.5f * tm[16 * q + 15]);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_loadu_ps(tm + 16 * q), h)));
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_loadu_ps(tm + 16 * q + 8), h)));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float mx = _mm_cvtss_f32(m4);
        float r = 32767.0f / mx;
        if (!(r <= FLT_MAX)) r = 0.0f; /* all zero (or below 32767 / FLT_MAX, ~1e-34): the entries are 0 */
        qs[g0 / (2 * cpg)] = r > 0.0f ? mx / 32767.0f : 0.0f;
        const __m256 inv = _mm256_set1_ps(r);
        for (int64_t q = g0; q < g0 + 2 * cpg; q++) {
            const __m256 h = _mm256_set1_ps(0.5f * tm[16 * q + 15]);
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(tm + 16 * q), h), inv));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(tm + 16 * q + 8), h), inv));
            const __m128i a16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            const __m128i b16 = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
            /* chunk q = 2 cc + h: column cc's tables at qt + 64 cc, the high nibble's 32 bytes after the low's */
            uint8_t *o = qt + 64 * (q >> 1) + 32 * (q & 1);
            _mm_storeu_si128((__m128i *)o, _mm_packus_epi16(_mm_and_si128(a16, low), _mm_and_si128(b16, low)));
            _mm_storeu_si128((__m128i *)(o + 16), _mm_packs_epi16(_mm_srai_epi16(a16, 8), _mm_srai_epi16(b16, 8)));
        }
    }
}

/* The tables of one token (tm [2C][16]) from its inputs x[off + 0 .. 8C): entries 0..7 of chunk q as one
 * vector, ((0 + x0 [lanes with bit 0]) + x1 [bit 1]) + x2 [bit 2], the lanes without an input adding +0,
 * which changes nothing (an entry is never -0), then entries 8..15 = entries 0..7 + x3: the same fp32
 * additions in the same order as the scalar build t[2^b + j] = t[j] + x_b in bpdq_lut_gemv. */
AVX2_TARGET static void tables_avx2(const void *x, int x_dt, int64_t off, int64_t C, float *tm) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t q = 0; q < 2 * C; q++) {
        __m256 v[4];
        for (int b = 0; b < 4; b++) {
            const int64_t i = off + 4 * q + b;
            v[b] = _mm256_set1_ps(x_dt == DT_F32 ? ((const float *)x)[i] : load_val(x, x_dt, i));
        }
        __m256 t = _mm256_add_ps(zero, _mm256_blend_ps(zero, v[0], 0xaa));
        t = _mm256_add_ps(t, _mm256_blend_ps(zero, v[1], 0xcc));
        t = _mm256_add_ps(t, _mm256_blend_ps(zero, v[2], 0xf0));
        _mm256_storeu_ps(tm + 16 * q, t);
        _mm256_storeu_ps(tm + 16 * q + 8, _mm256_add_ps(t, v[3]));
    }
}

/* AVX-512 (BW): the AVX2 integer-table kernel at twice the width: one 64-byte load and one vpshufb per nibble
 * and byte table look 64 rows up (tables broadcast to the four 128-bit lanes), in blocks of nb x 64 rows
 * (nb <= LUT512_MAX_NB; 32 zmm registers hold the 4 nb accumulators). The same tables, spans, integer sums
 * and error bound as AVX2; a chunk's last 32 rows, when its row count is an odd multiple of 32, take the AVX2
 * block. The fold puts the accumulators' lanes back in row order with two 2-source permutes per 32 rows. */
#define LUT512_MAX_NB 2

/* 16 rows' plane sums P = 256 hi + lo (int16, in row order): y += c_i * (s * P + hx), then y += c_0 * xg. */
AVX512_TARGET static inline __attribute__((always_inline)) void fold16_avx512(__m256i lo16, __m256i hi16,
                                                                              const uint16_t *ci,
                                                                              const uint16_t *c0, __m512 s,
                                                                              __m512 hx, __m512 xg, float *y) {
    const __m512i p = _mm512_add_epi32(_mm512_slli_epi32(_mm512_cvtepi16_epi32(hi16), 8), _mm512_cvtepi16_epi32(lo16));
    const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, hx);
    const __m512 cf = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)ci));
    __m512 out = _mm512_fmadd_ps(cf, v, _mm512_loadu_ps(y));
    if (c0) out = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)c0)), xg, out);
    _mm512_storeu_ps(y, out);
}

AVX512_TARGET static inline __attribute__((always_inline)) void block_lut_avx512(const uint8_t *tq, const uint8_t *p,
                                                                                 int64_t N, int64_t ncols,
                                                                                 const uint16_t *ci,
                                                                                 const uint16_t *c0, float s,
                                                                                 float hx, float xg, float *y,
                                                                                 const int nb) {
    const __m512i nib = _mm512_set1_epi8(0x0f), one = _mm512_set1_epi8(1);
    __m512i a[4 * LUT512_MAX_NB]; /* per 64 rows: lo sums (unpacklo, unpackhi), then hi sums likewise */
    for (int j = 0; j < 4 * nb; j++) a[j] = _mm512_setzero_si512();
    for (int64_t cc = 0; cc < ncols; cc++, p += N, tq += 64) {
        _mm_prefetch((const char *)p + AVX2_PREFETCH, _MM_HINT_T0);
        const __m512i l0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)tq));
        const __m512i l1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tq + 16)));
        const __m512i h0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tq + 32)));
        const __m512i h1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tq + 48)));
        for (int j = 0; j < nb; j++) {
            const __m512i b = _mm512_loadu_si512((const void *)(p + 64 * j));
            const __m512i il = _mm512_and_si512(b, nib), ih = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
            const __m512i lo_l = _mm512_shuffle_epi8(l0, il), lo_h = _mm512_shuffle_epi8(h0, ih);
            const __m512i hi_l = _mm512_shuffle_epi8(l1, il), hi_h = _mm512_shuffle_epi8(h1, ih);
            a[4 * j] = _mm512_add_epi16(a[4 * j], _mm512_maddubs_epi16(_mm512_unpacklo_epi8(lo_l, lo_h), one));
            a[4 * j + 1] = _mm512_add_epi16(a[4 * j + 1], _mm512_maddubs_epi16(_mm512_unpackhi_epi8(lo_l, lo_h), one));
            a[4 * j + 2] = _mm512_add_epi16(a[4 * j + 2], _mm512_maddubs_epi16(one, _mm512_unpacklo_epi8(hi_l, hi_h)));
            a[4 * j + 3] = _mm512_add_epi16(a[4 * j + 3], _mm512_maddubs_epi16(one, _mm512_unpackhi_epi8(hi_l, hi_h)));
        }
    }
    _mm_prefetch((const char *)ci + AVX2_PREFETCH * 2, _MM_HINT_T0);
    if (c0) _mm_prefetch((const char *)c0 + AVX2_PREFETCH * 2, _MM_HINT_T0);
    /* unpacklo holds rows [0-7 | 16-23 | 32-39 | 48-55], unpackhi [8-15 | 24-31 | 40-47 | 56-63] */
    const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
    const __m512 sv = _mm512_set1_ps(s), hv = _mm512_set1_ps(hx), xv = _mm512_set1_ps(xg);
    for (int j = 0; j < nb; j++) {
        const __m512i *q = a + 4 * j;
        for (int half = 0; half < 2; half++) { /* rows 64 j + 32 half + 0..31 */
            const __m512i idx = half ? second : first;
            const __m512i lo = _mm512_permutex2var_epi64(q[0], idx, q[1]), hi = _mm512_permutex2var_epi64(q[2], idx, q[3]);
            const int64_t o = 64 * j + 32 * half;
            fold16_avx512(_mm512_castsi512_si256(lo), _mm512_castsi512_si256(hi), ci + o, c0 ? c0 + o : NULL, sv, hv, xv,
                          y + o);
            fold16_avx512(_mm512_extracti64x4_epi64(lo, 1), _mm512_extracti64x4_epi64(hi, 1), ci + o + 16,
                          c0 ? c0 + o + 16 : NULL, sv, hv, xv, y + o + 16);
        }
    }
}

/* rows_lut_avx2's loops with 64-row steps (see there). */
AVX512_TARGET static void rows_lut_avx512(const gemv_ctx *c, int64_t r0, int64_t n, float *yacc) {
    const int64_t M = c->M, N = c->N, C = c->C, k = c->k, cpg = c->cpg, groups = c->groups;
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *cg = c->coeffs + g * (k + 1) * N + r0;
        for (int64_t i = 0; i < k; i++) {
            for (int64_t c1 = 0; c1 < cpg; c1 += LUT_SPAN) {
                const int64_t ncols = cpg - c1 < LUT_SPAN ? cpg - c1 : LUT_SPAN;
                const int first = c1 == 0, last = i == k - 1 && c1 + ncols == cpg;
                const uint8_t *p = c->planes + (i * C + g * cpg + c1) * N + r0;
                const uint16_t *c0 = last ? cg + k * N : NULL;
                for (int64_t b = 0; b < n; b += 64 * LUT512_MAX_NB) {
                    const int64_t left = n - b < 64 * LUT512_MAX_NB ? n - b : 64 * LUT512_MAX_NB;
                    for (int64_t m = 0; m < M; m++) {
                        const uint8_t *tq = c->qtables + (m * C + g * cpg + c1) * 64;
                        const float xg = c->xsum[m * groups + g], s = c->qscale[m * groups + g];
                        const float hx = first ? 0.5f * xg : 0.0f;
                        const uint16_t *cb = c0 ? c0 + b : NULL;
                        const uint16_t *ci = cg + i * N + b;
                        float *y = yacc + m * n + b;
                        if (left == 64 * LUT512_MAX_NB) { /* constant block widths: accumulators in registers */
                            block_lut_avx512(tq, p + b, N, ncols, ci, cb, s, hx, xg, y, LUT512_MAX_NB);
                            continue;
                        }
                        int64_t d = 0;
                        for (; d + 64 <= left; d += 64)
                            block_lut_avx512(tq, p + b + d, N, ncols, ci + d, cb ? cb + d : NULL, s, hx, xg, y + d, 1);
                        if (d < left) block_lut_avx2(tq, p + b + d, N, ncols, ci + d, cb ? cb + d : NULL, s, hx, xg, y + d, 1);
                    }
                }
            }
        }
    }
}

#endif /* BPDQ_X86 */

/* Accumulators of one chunk of rows: ACC floats, [M][n] with n = (ACC / M) rounded down to RB. */
#define ACC 8192

/* The portable path: rows [r0, r0 + n) (n a multiple of RB) into yacc [M][n] (zeroed), one
 * pass over the chunk's rows per group and plane (the plane sums go through the array s). */
static void rows_passes(const gemv_ctx *c, int64_t r0, int64_t n, float *yacc) {
    const int64_t N = c->N, C = c->C, k = c->k, cpg = c->cpg, M = c->M;
    float s[ACC] __attribute__((aligned(64))); /* 32 KiB on the stack */
    for (int64_t g = 0; g < c->groups; g++) {
        const uint16_t *cg = c->coeffs + g * (k + 1) * N + r0;
        for (int64_t i = 0; i < k; i++) {
            memset(s, 0, (size_t)(M * n) * sizeof(float));
            lut_pass_portable(c->tables + g * cpg * 32, C * 32, M, c->planes + (i * C + g * cpg) * N + r0, N, cpg, n, s);
            combine_portable(cg + i * N, s, yacc, M, n);
        }
        offset_portable(cg + k * N, c->xsum + g, c->groups, yacc, M, n);
    }
}

/* Rows of row blocks [b0, b1) (RB rows each; the last block may be short), in chunks of at most ACC / M
 * rows: accumulated in yacc, then bias added and y written once. Rows past the last multiple of RB go through
 * the scalar code (exact fp32 tables on every path). */
static void gemv_range(void *ctx, int64_t b0, int64_t b1) {
    const gemv_ctx *c = (const gemv_ctx *)ctx;
    const int64_t N = c->N, M = c->M;
    const int64_t rb = b0 * RB, re = b1 * RB < N ? b1 * RB : N;
    const int64_t step = RB;
    const int64_t rv = rb + (re - rb) / step * step; /* rows [rb, rv) in vector chunks, [rv, re) scalar */
    const int64_t R = ACC / M / RB * RB;
    float yacc[ACC] __attribute__((aligned(64))); /* 32 KiB on the stack */
    for (int64_t r0 = rb; r0 < rv; r0 += R) {
        const int64_t n = R < rv - r0 ? R : rv - r0;
        memset(yacc, 0, (size_t)(M * n) * sizeof(float));
#ifdef BPDQ_X86
        if (c->isa == ISA_AVX512)
            rows_lut_avx512(c, r0, n, yacc);
        else if (c->isa == ISA_AVX2)
            rows_lut_avx2(c, r0, n, yacc);
        else
#endif
            rows_passes(c, r0, n, yacc);
        for (int64_t m = 0; m < M; m++)
            for (int64_t r = 0; r < n; r++) {
                float v = yacc[m * n + r];
                if (c->bias) v += load_val(c->bias, c->bias_dt, r0 + r);
                store_val(c->y, c->y_dt, m * c->y_stride + r0 + r, v);
            }
    }
    gemv_rows_scalar(c, rv, re);
}

/* ---------------------------------------------------------------------------------------------------- */
/* public entry points                                                                                   */

/* Bumped whenever an entry point is added or its signature changes; cpu_lut.py refuses a library built from another. */
int bpdq_abi_version(void) { return 2; }

/* Best path this CPU and the compiler support: 0 portable, 1 AVX2 (+FMA, F16C), 2 AVX-512 (F, BW, VL). */
int bpdq_best_isa(void) {
#ifdef BPDQ_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return ISA_AVX512;
    if (avx2) return ISA_AVX2;
#endif
    return ISA_PORTABLE;
}

/* Per-thread scratch for tables, grown on demand and kept for the next call of the same thread. A thread
 * key's destructor frees it when the thread exits (a server with a thread per request would otherwise leak
 * one scratch per thread); bpdq_release_scratch frees the calling thread's at once. scratch_live counts the
 * bytes held by all threads (bpdq_scratch_bytes). */
static __thread float *scratch = NULL;
static __thread size_t scratch_len = 0;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_key_ok = 0;
static atomic_llong scratch_live = 0;

static void scratch_free(void) {
    if (scratch) atomic_fetch_sub(&scratch_live, (long long)(scratch_len * sizeof(float)));
    free(scratch);
    scratch = NULL;
    scratch_len = 0;
}

static void scratch_at_exit(void *value) { /* the thread's TLS is still valid while key destructors run */
    (void)value;
    scratch_free();
}

static void scratch_key_init(void) { scratch_key_ok = pthread_key_create(&scratch_key, scratch_at_exit) == 0; }

static float *get_scratch(size_t n) {
    if (n > scratch_len) {
        pthread_once(&scratch_once, scratch_key_init);
        if (!scratch_key_ok) return NULL; /* without the destructor the buffer would outlive its thread */
        scratch_free();
        scratch = (float *)malloc(n * sizeof(float));
        if (!scratch) return NULL;
        scratch_len = n;
        atomic_fetch_add(&scratch_live, (long long)(n * sizeof(float)));
        pthread_setspecific(scratch_key, scratch); /* non-NULL: the destructor runs at thread exit */
    }
    return scratch;
}

/* Free the calling thread's table scratch (the next call allocates it again). */
void bpdq_release_scratch(void) {
    scratch_free();
    if (scratch_key_ok) pthread_setspecific(scratch_key, NULL);
}

/* Bytes of table scratch held by all threads together. */
int64_t bpdq_scratch_bytes(void) { return (int64_t)atomic_load(&scratch_live); }

/* y[M, N] (row stride y_stride, dtype y_dt) = x[M, K] (row stride x_stride, dtype x_dt) @ W_hat^T + bias.
 * Returns 0, or -1 when out of memory / bad arguments. */
int bpdq_lut_gemv(const void *x, int x_dt, int64_t x_stride, int64_t M, int64_t K, const uint8_t *planes,
                  const uint16_t *coeffs, int64_t k, int64_t N, int64_t group_size, const void *bias, int bias_dt,
                  void *y, int y_dt, int64_t y_stride, int isa, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (M > ACC / RB) return -1; /* a chunk of accumulators must hold RB rows of every token */
    if (K <= 0 || K % 8 || group_size <= 0 || group_size % 8 || K % group_size || k < 1) return -1;
    const int64_t C = K / 8, groups = K / group_size, cpg = group_size / 8;
    int best = bpdq_best_isa();
    if (isa > best) isa = best;
    const int itab = isa >= ISA_AVX2;
    /* fp32 tables [M][2C][16], input sums [M][groups]; integer tables: scales [M][groups], bytes [M][C][4][16] */
    float *tables = get_scratch((size_t)(M * C * 32 + M * groups + (itab ? M * groups + M * C * 16 : 0)));
    if (!tables) return -1;
    float *xsum = tables + M * C * 32;
    float *qscale = itab ? xsum + M * groups : NULL;
    uint8_t *qtables = itab ? (uint8_t *)(qscale + M * groups) : NULL;
    for (int64_t m = 0; m < M; m++) {
        float *tm = tables + m * C * 32;
#ifdef BPDQ_X86
        if (isa >= ISA_AVX2)
            tables_avx2(x, x_dt, m * x_stride, C, tm);
        else
#endif
            for (int64_t q = 0; q < 2 * C; q++) { /* chunk q: inputs 4q..4q+3 */
                float *t = tm + q * 16;
                t[0] = 0.0f;
                for (int b = 0; b < 4; b++) {
                    float v = load_val(x, x_dt, m * x_stride + 4 * q + b);
                    int half = 1 << b;
                    for (int j = 0; j < half; j++) t[half + j] = t[j] + v;
                }
            }
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.0f;
            for (int64_t q = 2 * g * cpg; q < 2 * (g + 1) * cpg; q++) s += tm[q * 16 + 15];
            xsum[m * groups + g] = s;
        }
#ifdef BPDQ_X86
        if (itab) tables_i16_avx2(tm, C, cpg, qtables + m * C * 64, qscale + m * groups);
#endif
    }
    gemv_ctx c = {tables, xsum, qtables, qscale, planes, coeffs, bias, y, M, N,
                  C, k, cpg, groups, y_stride, bias_dt, y_dt, isa};
    /* threads only pay off past ~1M lookups per thread */
    int64_t work = M * N * C * k;
    int64_t useful = work / (1 << 20);
    if (threads > useful) threads = useful > 1 ? (int)useful : 1;
    parallel_for(threads, (N + RB - 1) / RB, gemv_range, &c);
    return 0;
}

typedef struct {
    const uint8_t *planes;
    const uint16_t *coeffs;
    void *out;
    int64_t N, C, k, cpg, r0;
    int out_dt;
} dequant_ctx;

/* spread[b]: byte b's 8 bits as 8 bytes of 0/1 (bit j -> byte j), so the k plane bytes of 8 columns combine
 * into 8 codes with k shifts and ors. */
static uint64_t spread[256];
static pthread_once_t spread_once = PTHREAD_ONCE_INIT;

static void init_spread(void) {
    for (int b = 0; b < 256; b++) {
        uint64_t v = 0;
        for (int j = 0; j < 8; j++) v |= (uint64_t)((b >> j) & 1) << (8 * j);
        spread[b] = v;
    }
}

/* Rows [r0 + a, r0 + b) of the tile, in chunks of DQ_ROWS rows: per group the 2^k levels of every row of the
 * chunk, then per byte column the chunk's contiguous plane bytes (memory is streamed). */
#define DQ_ROWS 64

static void dequant_rows(void *ctx, int64_t a, int64_t b) {
    const dequant_ctx *d = (const dequant_ctx *)ctx;
    const int64_t N = d->N, C = d->C, k = d->k, K = C * 8, L = (int64_t)1 << k;
    float lv[DQ_ROWS * 256]; /* 64 KiB on the stack */
    for (int64_t c0 = a; c0 < b; c0 += DQ_ROWS) {
        const int64_t c1 = c0 + DQ_ROWS < b ? c0 + DQ_ROWS : b;
        for (int64_t g = 0; g < C / d->cpg; g++) {
            for (int64_t rr = c0; rr < c1; rr++) {
                const uint16_t *cg = d->coeffs + g * (k + 1) * N + d->r0 + rr;
                float cf[8];
                for (int64_t i = 0; i < k; i++) cf[i] = f16_to_f32(cg[i * N]);
                /* levels in code order: c_0, then the plane terms added in plane order (as dequantize_packed) */
                float *l = lv + (rr - c0) * L;
                for (int64_t q = 0; q < L; q++) {
                    float v = f16_to_f32(cg[k * N]);
                    for (int64_t i = 0; i < k; i++)
                        if ((q >> i) & 1) v += cf[i];
                    l[q] = v;
                }
            }
            for (int64_t cc = g * d->cpg; cc < (g + 1) * d->cpg; cc++) {
                for (int64_t rr = c0; rr < c1; rr++) {
                    const uint8_t *pb = d->planes + cc * N + d->r0 + rr;
                    uint64_t codes = 0;
                    for (int64_t i = 0; i < k; i++) codes |= spread[pb[i * C * N]] << i;
                    const float *l = lv + (rr - c0) * L;
                    const int64_t o = rr * K + cc * 8;
                    if (d->out_dt == DT_F32) {
                        float *out = (float *)d->out + o;
                        for (int j = 0; j < 8; j++) out[j] = l[(codes >> (8 * j)) & 0xff];
                    } else {
                        uint16_t *out = (uint16_t *)d->out + o;
                        for (int j = 0; j < 8; j++) out[j] = f32_to_bf16(l[(codes >> (8 * j)) & 0xff]);
                    }
                }
            }
        }
    }
}

/* Rows [r0, r1) of W_hat as a dense row-major [r1 - r0, K] tile of dtype out_dt (fp32 or bf16). */
int bpdq_dequant(const uint8_t *planes, const uint16_t *coeffs, int64_t k, int64_t N, int64_t K, int64_t group_size,
                 int64_t r0, int64_t r1, void *out, int out_dt, int threads) {
    if (K <= 0 || K % 8 || group_size <= 0 || group_size % 8 || K % group_size || k < 1 || k > 8) return -1;
    if (r0 < 0 || r1 > N || r0 > r1) return -1;
    pthread_once(&spread_once, init_spread);
    dequant_ctx d = {planes, coeffs, out, N, K / 8, k, group_size / 8, r0, out_dt};
    int64_t useful = (r1 - r0) * K / (1 << 16);
    if (threads > useful) threads = useful > 1 ? (int)useful : 1;
    parallel_for(threads, r1 - r0, dequant_rows, &d);
    return 0;
}
