/* CPU kernels for the decode hot path, float32, built on first use with the system C compiler.
 *
 *   skinny_linear: y = x W^T (+ b) for a few token rows, W [N, K] row-major, y written feature-major
 *                  ([N, M]); weights stream once from memory, split over threads by output rows.
 *   panel_linear:  y = x W^T (+ b) for any number of token rows on weights packed into 16-output panels
 *                  (AVX-512): register tiles of 8 rows x 48 outputs, the next tile's weights prefetched.
 *   paged_decode:  one query token per sequence against its paged K/V context, two passes (scores then
 *                  values), reading each cached K and V row exactly once, behind a read-ahead cursor.
 *                  Cache layout per layer: [num_blocks, kv_heads, block_size, head_dim].
 *
 * All are checked against torch references in tests/test_cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "amx_bf16x3.h"
#include "greedy_head.h"
#include "tile_store.h"
#include "w4_panels.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

static inline float dot_f32(const float *a, const float *b, int n) {
    int k = 0;
    float s = 0.f;
#ifdef HAVE_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; k + 16 <= n; k += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
    }
    for (; k + 8 <= n; k += 8)
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    s = _mm_cvtss_f32(h);
#endif
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

/* y += p * v over n floats */
static inline void axpy_f32(float *y, float p, const float *v, int n) {
    int k = 0;
#ifdef HAVE_AVX2
    __m256 pp = _mm256_set1_ps(p);
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(pp, _mm256_loadu_ps(v + k), _mm256_loadu_ps(y + k)));
#endif
    for (; k < n; k++) y[k] += p * v[k];
}

/* ---- read-ahead over decode attention's K/V rows -------------------------------------------------
 * A decode step reads every sequence's cached K and V once, from DRAM (the cache is far larger than L3).
 * A thread's tasks (sequence, KV head) read their rows in a known order: per task its K rows block by block,
 * then its V rows. The cursor walks the same rows in the same order, KV_AHEAD cache lines ahead of the
 * reads, and issues one prefetch per line read, so a steady number of misses is in flight instead of a
 * burst at each block's start. */
#define KV_AHEAD 512
#define KV_HINT 2  /* into L2; into L1 (3), 96 lines ahead, it was slower than no cursor: 17.4 vs 15.8 ms (B32 ctx 192) */
typedef struct {
    const float *k, *v;
    const int32_t *bt, *ctx;     /* block tables [B, max_blocks] and context lengths of the step's sequences */
    int64_t block_stride, head_stride;
    int max_blocks, KVH, D, BS;
    int task, task_end, which, b;  /* the next range: task (sequence * KVH + KV head), K (0) or V (1), block */
    const char *p;                 /* the next line to prefetch, and how many lines its range has left */
    int left, done;
} kv_cursor;

static void kvc_init(kv_cursor *c, const float *k, const float *v, const int32_t *bt, const int32_t *ctx,
                     int max_blocks, int KVH, int D, int BS, int64_t block_stride, int64_t head_stride,
                     int task0, int task1) {
    c->k = k; c->v = v; c->bt = bt; c->ctx = ctx; c->max_blocks = max_blocks; c->KVH = KVH; c->D = D; c->BS = BS;
    c->block_stride = block_stride; c->head_stride = head_stride;
    c->task = task0; c->task_end = task1; c->which = c->b = 0; c->p = NULL; c->left = 0; c->done = 0;
}

static __attribute__((noinline)) void kvc_next_range(kv_cursor *c) {
    while (c->task < c->task_end) {
        const int m = c->task / c->KVH, kh = c->task % c->KVH, ctx = c->ctx[m];
        if (c->b * c->BS >= ctx) {
            if (c->which == 0) c->which = 1;
            else { c->task++; c->which = 0; }
            c->b = 0;
            continue;
        }
        const int nk = ctx - c->b * c->BS < c->BS ? ctx - c->b * c->BS : c->BS;
        c->p = (const char *)((c->which ? c->v : c->k) + c->bt[(int64_t)m * c->max_blocks + c->b] * c->block_stride
                              + kh * c->head_stride);
        c->left = (int)(((int64_t)nk * c->D * (int64_t)sizeof(float) + 63) / 64);
        c->b++;
        return;
    }
    c->done = 1;
}

/* prefetch the cursor's next n lines */
static inline void kvc_ahead(kv_cursor *c, int n) {
    for (; n > 0 && !c->done; n--) {
        if (c->left == 0) {
            kvc_next_range(c);
            if (c->done) return;
        }
        __builtin_prefetch(c->p, 0, KV_HINT);
        c->p += 64;
        c->left--;
    }
}

/* ---- vector exp: exp(x) = 2^n * p(r), r = x - n ln2, a degree-6 polynomial (Cephes' expf); inputs
 * clamped to [-87.3, 88.4] so that 2^n stays a normal float. Relative error ~2e-7. */
#if defined(__AVX512F__)
#define HAVE_AVX512 1
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447505531f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}
#endif
#ifdef HAVE_AVX2
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* s[j] = exp(s[j] - mx) for j < n; returns their sum */
static inline float exp_shift_sum(float *s, int n, float mx) {
    int j = 0;
    float sum = 0.f;
#if defined(HAVE_AVX512)
    __m512 acc = _mm512_setzero_ps(), m = _mm512_set1_ps(mx);
    for (; j + 16 <= n; j += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
        _mm512_storeu_ps(s + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(HAVE_AVX2)
    __m256 acc = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float t[8];
    _mm256_storeu_ps(t, acc);
    for (int i = 0; i < 8; i++) sum += t[i];
#endif
    for (; j < n; j++) { s[j] = expf(s[j] - mx); sum += s[j]; }
    return sum;
}

/* a[i] = silu(g[i]) * u[i] = g / (1 + exp(-g)) * u for i < n */
static inline void silu_mul_f32(const float *g, const float *u, float *a, int64_t n) {
    int64_t i = 0;
#if defined(HAVE_AVX512)
    const __m512 one = _mm512_set1_ps(1.f);
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(g + i);
        __m512 den = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
        _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_div_ps(x, den), _mm512_loadu_ps(u + i)));
    }
#elif defined(HAVE_AVX2)
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(x, den), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) a[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

/* Four dot products of one weight row with four input rows: the row is loaded once. */
static inline void dot4_f32(const float *w, const float *x, int K, float *out) {
    int k = 0;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#ifdef HAVE_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        __m256 wv = _mm256_loadu_ps(w + k);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + K + k), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 2 * K + k), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + 3 * K + k), a3);
    }
    float t[8];
#define HSUM(a, s) _mm256_storeu_ps(t, a); s = ((t[0] + t[4]) + (t[1] + t[5])) + ((t[2] + t[6]) + (t[3] + t[7]));
    HSUM(a0, s0) HSUM(a1, s1) HSUM(a2, s2) HSUM(a3, s3)
#undef HSUM
#endif
    for (; k < K; k++) {
        s0 += w[k] * x[k]; s1 += w[k] * x[K + k]; s2 += w[k] * x[2 * K + k]; s3 += w[k] * x[3 * K + k];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

void skinny_linear(const float *x, const float *w, const float *b, float *y, int M, int N, int K, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const float *wr = w + (int64_t)n * K;
        float bias = b ? b[n] : 0.f;
        int m = 0;
        for (; m + 4 <= M; m += 4) {
            float o[4];
            dot4_f32(wr, x + (int64_t)m * K, K, o);
            for (int j = 0; j < 4; j++) y[(int64_t)n * M + m + j] = o[j] + bias;
        }
        for (; m < M; m++) y[(int64_t)n * M + m] = dot_f32(wr, x + (int64_t)m * K, K) + bias;
    }
}

/* ---- quantized K/V blocks (quant_policy 8 and 4; engine/layers/kv_quant.py) -------------------------
 * A cached vector (one token, one KV head, D values) is stored as unsigned integers q = round((x - min) /
 * scale), scale = (max - min) / (2^bits - 1) (at least 1e-8), with (scale, min) as two float32 beside it
 * ([num_blocks, KVH, block_size, 2]); int4 holds element 2j in the low nibble of byte j, 2j+1 in the high.
 * Written with the same float32 operations as kv_quant.quantize_vectors (the tests compare the bytes). The
 * 512-bit decode attention (attend512) reads a block's integers as floats into an L1 buffer and folds the
 * scale and min into its sums: q . k = (q . k_int) scale + min sum(q) per key; the value weights are
 * multiplied by the scales, and sum(weight * min) is added to every output element. Elsewhere (prefill
 * contexts, other head sizes) the blocks are dequantized first, as q * scale + min like torch's
 * dequantize_vectors (a product, then a sum). */
typedef struct {
    const float *kp, *vp;  /* the K and V (scale, min) pairs; the data pointers travel as k_cache / v_cache */
    int bits;              /* 8 or 4; 0: float32 blocks */
    int fixed;             /* 1: the pairs are given (static per-head parameters, kv_quant.load_kv_qparams) */
} kv_quant;

/* The kv_bits argument of the entry points: the bits, plus KV_FIXED where the pairs are given */
#define KV_FIXED 0x100
#define KV_QUANT(kp, vp, kv_bits) {(kp), (vp), (kv_bits) & 0xFF, ((kv_bits) & KV_FIXED) != 0}

/* One vector into its slot: codes and the (scale, min) pair p, made from the vector's own range; ``fixed``:
 * p holds the pair already and only the codes are written */
static void kvq_write_row(const float *x, int D, int bits, uint8_t *q, float *p, int fixed) {
    const float qmax = (float)((1 << bits) - 1);
    float mn, scale;
    if (fixed) {
        scale = p[0];
        mn = p[1];
    } else {
        float mx = x[0];
        mn = x[0];
        for (int i = 1; i < D; i++) {
            mn = x[i] < mn ? x[i] : mn;
            mx = x[i] > mx ? x[i] : mx;
        }
        scale = (mx - mn) / qmax;
        if (scale < 1e-8f) scale = 1e-8f;
    }
    if (bits == 4) memset(q, 0, (size_t)D / 2);
    for (int i = 0; i < D; i++) {
        float r = nearbyintf((x[i] - mn) / scale);
        r = r < 0.f ? 0.f : (r > qmax ? qmax : r);
        if (bits == 8) q[i] = (uint8_t)r;
        else q[i / 2] |= (uint8_t)((unsigned)r << (4 * (i & 1)));
    }
    if (!fixed) {
        p[0] = scale;
        p[1] = mn;
    }
}

/* rows vectors of D values -> their integers and (scale, min) pairs (tests compare it with kv_quant's) */
void kvq_quantize(const float *x, int rows, int D, int bits, uint8_t *q, float *params) {
    for (int r = 0; r < rows; r++)
        kvq_write_row(x + (int64_t)r * D, D, bits, q + (int64_t)r * (bits == 8 ? D : D / 2), params + 2 * r, 0);
}

/* n consecutive cache slots from slot0 on (one block's rows of one KV head) dequantized into out [n, D];
 * params NULL: the integers themselves as floats (attend512 applies the scales and minimums to its sums) */
static void kvq_dequant_rows(const uint8_t *q, const float *params, int64_t slot0, int n, int D, int bits,
                             float *out) {
    const int Dq = bits == 8 ? D : D / 2;
    for (int t = 0; t < n; t++) {
        const int64_t slot = slot0 + t;
        const uint8_t *row = q + slot * Dq;
        const float s = params ? params[2 * slot] : 1.f, m = params ? params[2 * slot + 1] : 0.f;
        float *o = out + (int64_t)t * D;
        int d = 0;
#if defined(HAVE_AVX512)
        const __m512 sv = _mm512_set1_ps(s), mv = _mm512_set1_ps(m);
        if (bits == 8)
            for (; d + 16 <= D; d += 16) {
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + d))));
                _mm512_storeu_ps(o + d, params ? _mm512_add_ps(_mm512_mul_ps(v, sv), mv) : v);
            }
        else
            for (; d + 16 <= D; d += 16) {  /* 8 bytes: low nibble first, then high, byte by byte */
                const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(row + d / 2)));
                const __m128i lo = _mm_and_si128(b, _mm_set1_epi16(15)), hi = _mm_srli_epi16(b, 4);
                const __m256i w = _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
                const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(w));
                _mm512_storeu_ps(o + d, params ? _mm512_add_ps(_mm512_mul_ps(v, sv), mv) : v);
            }
#endif
        for (; d < D; d++) {
            const int v = bits == 8 ? row[d] : (row[d / 2] >> (4 * (d & 1))) & 15;
            o[d] = params ? (float)v * s + m : (float)v;
        }
    }
}

#if defined(HAVE_AVX512)
/* 16 (scale, min) pairs from p on: the scales and the minimums as two vectors */
static inline void kvq_pairs16(const float *p, __m512 *s, __m512 *m) {
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    *s = _mm512_permutex2var_ps(a, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0), b);
    *m = _mm512_permutex2var_ps(a, _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), b);
}

/* n scores of q against integer keys -> against the keys they stand for: s * scale + min * sum(q) */
static inline void kvq_fix_scores(float *s, const float *p, int n, float qsum) {
    const __m512 qs = _mm512_set1_ps(qsum);
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 sc, mn;
        kvq_pairs16(p + 2 * j, &sc, &mn);
        _mm512_storeu_ps(s + j, _mm512_fmadd_ps(_mm512_loadu_ps(s + j), sc, _mm512_mul_ps(mn, qs)));
    }
    for (; j < n; j++) s[j] = s[j] * p[2 * j] + p[2 * j + 1] * qsum;
}

/* n weights w of value rows: w *= scale (for the integer rows), and returns sum(w * min) (what the
 * minimums add to every output element) */
static inline float kvq_fold_weights(float *w, const float *p, int n) {
    __m512 acc = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        __m512 sc, mn;
        kvq_pairs16(p + 2 * j, &sc, &mn);
        const __m512 x = _mm512_loadu_ps(w + j);
        acc = _mm512_fmadd_ps(x, mn, acc);
        _mm512_storeu_ps(w + j, _mm512_mul_ps(x, sc));
    }
    float c = _mm512_reduce_add_ps(acc);
    for (; j < n; j++) {
        c += w[j] * p[2 * j + 1];
        w[j] *= p[2 * j];
    }
    return c;
}
#endif

/* positions [0, ctx) of one (sequence, KV head) dequantized into out [ctx, D] (contiguous) */
static void kvq_dequant(const uint8_t *q, const float *params, const int32_t *bt, int ctx, int kh, int KVH, int D,
                        int BS, int bits, float *out) {
    for (int b0 = 0; b0 < ctx; b0 += BS)
        kvq_dequant_rows(q, params, ((int64_t)bt[b0 / BS] * KVH + kh) * BS, ctx - b0 < BS ? ctx - b0 : BS, D, bits,
                         out + (int64_t)b0 * D);
}

#if defined(HAVE_AVX512)
/* The slot (row of D values, counted over the whole cache) of block b's first row for KV head kh: the
 * quantized blocks index their integers and (scale, min) pairs by it. */
static inline int64_t kv_slot0(const int32_t *bt, int b, int kh, int64_t block_stride, int64_t head_stride, int D) {
    return (bt[b] * block_stride + kh * head_stride) / D;
}

/* The decode attention of attend_kv_head for head_dim = 16 * NV (NV 4 or 8) with 512-bit vectors: each K and
 * V block is read from memory once (later query heads find it in L1), the next block is prefetched while
 * this one is used, and each group of GN query heads keeps its output rows in registers over all keys.
 * NV and GN are constants after inlining, so the register arrays stay in registers. */
static inline __attribute__((always_inline)) void pv512(const float *sc, float *oh, const float *v_cache,
                                                        const int32_t *bt, int ctx, int kh, int BS, int64_t block_stride,
                                                        int64_t head_stride, const float *inv, kv_cursor *cur,
                                                        const kv_quant *kq, float *qbuf, const int NV, const int GN) {
    const int D = 16 * NV;
    __m512 acc[16];
    for (int a = 0; a < GN * NV; a++) acc[a] = _mm512_setzero_ps();
    for (int b0 = 0, b = 0; b0 < ctx; b0 += BS, b++) {
        const int nk = ctx - b0 < BS ? ctx - b0 : BS;
        const float *vb = v_cache + bt[b] * block_stride + kh * head_stride;
        const float *vn = !cur && b0 + BS < ctx ? v_cache + bt[b + 1] * block_stride + kh * head_stride : NULL;
        if (kq) {  /* quantized: this block's integers as floats in an L1 buffer (element offset / D = slot) */
            kvq_dequant_rows((const uint8_t *)v_cache, NULL, kv_slot0(bt, b, kh, block_stride, head_stride, D), nk,
                             D, kq->bits, qbuf);
            vb = qbuf;
            vn = NULL;
        }
        for (int j = 0; j < nk; j++) {
            const float *vr = vb + (int64_t)j * D;
            if (cur) kvc_ahead(cur, NV);
            else if (vn)
                for (int i = 0; i < NV; i++) _mm_prefetch((const char *)(vn + (int64_t)j * D + 16 * i), _MM_HINT_T0);
            __m512 v[8];
            for (int i = 0; i < NV; i++) v[i] = _mm512_loadu_ps(vr + 16 * i);
            for (int g = 0; g < GN; g++) {
                const __m512 p = _mm512_set1_ps(sc[(int64_t)g * ctx + b0 + j]);
                for (int i = 0; i < NV; i++) acc[g * NV + i] = _mm512_fmadd_ps(p, v[i], acc[g * NV + i]);
            }
        }
    }
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < NV; i++)
            _mm512_storeu_ps(oh + (int64_t)g * D + 16 * i, _mm512_mul_ps(acc[g * NV + i], _mm512_set1_ps(inv[g])));
}

/* Dot products of q (NV vectors, pre-scaled) with 16 consecutive key rows (D = 16 * NV apart): one
 * accumulator per key, then a transpose-and-add tree (pairs within 128-bit lanes, then across lanes) that
 * leaves key t's sum in lane t. */
static inline __attribute__((always_inline)) __m512 scores16(const __m512 *q, const float *kr, const int NV) {
    const int D = 16 * NV;
    __m512 a[16], b[8], c[4];
    for (int t = 0; t < 16; t++) {
        a[t] = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr + (int64_t)t * D));
        for (int i = 1; i < NV; i++) a[t] = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(kr + (int64_t)t * D + 16 * i), a[t]);
    }
    for (int t = 0; t < 8; t++)  /* per 128-bit lane: [a0 02, a1 02, a0 13, a1 13] */
        b[t] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * t], a[2 * t + 1]), _mm512_unpackhi_ps(a[2 * t], a[2 * t + 1]));
    for (int t = 0; t < 4; t++) {  /* per 128-bit lane: keys 4t .. 4t + 3, that lane's share of each */
        const __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * t]), _mm512_castps_pd(b[2 * t + 1]));
        const __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * t]), _mm512_castps_pd(b[2 * t + 1]));
        c[t] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    const __m512 e0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
    const __m512 e1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(e0, e1, 0x88), _mm512_shuffle_f32x4(e0, e1, 0xDD));
}

static inline __attribute__((always_inline)) void attend512(const float *qh, float *oh, const float *k_cache,
                                                            const float *v_cache, const int32_t *bt, int ctx, int kh,
                                                            int G, int BS, int64_t block_stride, int64_t head_stride,
                                                            float scale, float *sc, kv_cursor *cur, const kv_quant *kq,
                                                            float *qbuf, const int NV) {
    const int D = 16 * NV;
    float inv[64];
    for (int b0 = 0, b = 0; b0 < ctx; b0 += BS, b++) {
        const int nk = ctx - b0 < BS ? ctx - b0 : BS;
        const float *kb = k_cache + bt[b] * block_stride + kh * head_stride;
        const int64_t slot0 = kv_slot0(bt, b, kh, block_stride, head_stride, D);
        if (kq) {  /* quantized: this block's integers as floats in an L1 buffer, read by every query head */
            kvq_dequant_rows((const uint8_t *)k_cache, NULL, slot0, nk, D, kq->bits, qbuf);
            kb = qbuf;
        }
        /* without a cursor (prefill steps' decode rows): while this block is scored, prefetch the next
         * block's keys and this block's values for the second pass (one cache line per 16 floats) */
        else if (!cur) {
            const float *kn = b0 + BS < ctx ? k_cache + bt[b + 1] * block_stride + kh * head_stride : NULL;
            const float *vb = v_cache + bt[b] * block_stride + kh * head_stride;
            for (int j = 0; j < nk; j++)
                for (int i = 0; i < NV; i++) {
                    if (kn) _mm_prefetch((const char *)(kn + (int64_t)j * D + 16 * i), _MM_HINT_T0);
                    _mm_prefetch((const char *)(vb + (int64_t)j * D + 16 * i), _MM_HINT_T1);
                }
        }
        for (int g = 0; g < G; g++) {
            __m512 q[8];
            for (int i = 0; i < NV; i++) q[i] = _mm512_mul_ps(_mm512_loadu_ps(qh + (int64_t)g * D + 16 * i), _mm512_set1_ps(scale));
            float *s = sc + (int64_t)g * ctx + b0;
            int j = 0;
            for (; j + 16 <= nk; j += 16) {  /* 16 keys' scores in one vector: no horizontal sum per key */
                if (cur && g == 0) kvc_ahead(cur, 16 * NV);  /* the first head reads the keys from memory */
                _mm512_storeu_ps(s + j, scores16(q, kb + (int64_t)j * D, NV));
            }
            for (; j < nk; j++) {
                if (cur && g == 0) kvc_ahead(cur, NV);
                const float *kr = kb + (int64_t)j * D;
                __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
                for (int i = 1; i < NV; i++) acc = _mm512_fmadd_ps(q[i], _mm512_loadu_ps(kr + 16 * i), acc);
                s[j] = _mm512_reduce_add_ps(acc);
            }
            if (kq) {  /* q . (k * scale + min) = (q . k) * scale + min * sum(q) */
                __m512 qs = q[0];
                for (int i = 1; i < NV; i++) qs = _mm512_add_ps(qs, q[i]);
                kvq_fix_scores(s, kq->kp + 2 * slot0, nk, _mm512_reduce_add_ps(qs));
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float *s = sc + (int64_t)g * ctx;
        __m512 m = _mm512_set1_ps(-INFINITY);
        int j = 0;
        for (; j + 16 <= ctx; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + j));
        float mx = _mm512_reduce_max_ps(m);
        for (; j < ctx; j++) mx = s[j] > mx ? s[j] : mx;
        inv[g] = 1.f / exp_shift_sum(s, ctx, mx);
    }
    float vmin[64];  /* quantized: sum over keys of weight * min, per query head */
    if (kq)
        for (int g = 0; g < G; g++) {
            vmin[g] = 0.f;
            for (int b0 = 0, b = 0; b0 < ctx; b0 += BS, b++) {
                const int64_t slot0 = kv_slot0(bt, b, kh, block_stride, head_stride, D);
                vmin[g] += kvq_fold_weights(sc + (int64_t)g * ctx + b0, kq->vp + 2 * slot0, ctx - b0 < BS ? ctx - b0 : BS);
            }
        }
    /* query heads per pass over V, at most 16 output registers (GN * NV): G = 3 (SmolLM2) takes one pass */
    for (int g = 0, gn; g < G; g += gn) {
        const int rem = G - g;
        gn = NV == 4 ? (rem >= 4 ? 4 : rem) : (rem >= 2 ? 2 : 1);
        const float *sg = sc + (int64_t)g * ctx;
        float *og = oh + (int64_t)g * D;
        /* GN and NV must be constants in each call for the accumulators to stay in registers */
        kv_cursor *c = g == 0 ? cur : NULL;  /* the first pass reads the values from memory */
        if (NV == 4 && gn == 4) pv512(sg, og, v_cache, bt, ctx, kh, BS, block_stride, head_stride, inv + g, c, kq, qbuf, 4, 4);
        else if (NV == 4 && gn == 3) pv512(sg, og, v_cache, bt, ctx, kh, BS, block_stride, head_stride, inv + g, c, kq, qbuf, 4, 3);
        else if (gn == 2) pv512(sg, og, v_cache, bt, ctx, kh, BS, block_stride, head_stride, inv + g, c, kq, qbuf, NV, 2);
        else pv512(sg, og, v_cache, bt, ctx, kh, BS, block_stride, head_stride, inv + g, c, kq, qbuf, NV, 1);
    }
    if (kq)
        for (int g = 0; g < G; g++) {
            const __m512 add = _mm512_set1_ps(vmin[g] * inv[g]);
            for (int i = 0; i < NV; i++)
                _mm512_storeu_ps(oh + (int64_t)g * D + 16 * i, _mm512_add_ps(_mm512_loadu_ps(oh + (int64_t)g * D + 16 * i), add));
        }
}
#endif

/* whether attend_kv_head takes its 512-bit path (attend512) for this context and head size */
static inline int attend512_takes(int ctx, int D) {
#if defined(HAVE_AVX512)
    return ctx > 0 && (D == 64 || D == 128);
#else
    (void)ctx; (void)D;
    return 0;
#endif
}

/* One (sequence, KV head): G query heads against ctx cached positions; writes G output rows.
 * kq (quantized blocks; with qbuf, an L1 buffer of BS rows) only where attend512_takes: elsewhere the caller
 * dequantizes the context first (attend_kv_head_q) */
static void attend_kv_head(const float *qh, float *oh, const float *k_cache, const float *v_cache,
                           const int32_t *bt, int ctx, int kh, int G, int D, int BS, int64_t block_stride,
                           int64_t head_stride, float scale, kv_cursor *cur, const kv_quant *kq, float *qbuf) {
    float *scores = (float *)malloc(sizeof(float) * (size_t)G * (ctx > 0 ? ctx : 1));
#if defined(HAVE_AVX512)
    if (attend512_takes(ctx, D)) {
        if (D == 64)
            attend512(qh, oh, k_cache, v_cache, bt, ctx, kh, G, BS, block_stride, head_stride, scale, scores, cur,
                      kq, qbuf, 4);
        else
            attend512(qh, oh, k_cache, v_cache, bt, ctx, kh, G, BS, block_stride, head_stride, scale, scores, cur,
                      kq, qbuf, 8);
        free(scores);
        return;
    }
#endif
    (void)cur; (void)kq; (void)qbuf;
    float mx[64], sum[64];  /* G <= 64 is checked by the caller */
    for (int g = 0; g < G; g++) mx[g] = -INFINITY;
    for (int t = 0; t < ctx; t++) {
        const float *kr = k_cache + bt[t / BS] * block_stride + kh * head_stride + (int64_t)(t % BS) * D;
        for (int g = 0; g < G; g++) {
            float s = dot_f32(qh + (int64_t)g * D, kr, D) * scale;
            scores[(int64_t)g * ctx + t] = s;
            if (s > mx[g]) mx[g] = s;
        }
    }
    for (int g = 0; g < G; g++) {
        sum[g] = exp_shift_sum(scores + (int64_t)g * ctx, ctx, mx[g]);
        memset(oh + (int64_t)g * D, 0, sizeof(float) * D);
    }
    for (int t = 0; t < ctx; t++) {
        const float *vr = v_cache + bt[t / BS] * block_stride + kh * head_stride + (int64_t)(t % BS) * D;
        for (int g = 0; g < G; g++) axpy_f32(oh + (int64_t)g * D, scores[(int64_t)g * ctx + t], vr, D);
    }
    for (int g = 0; g < G; g++) {
        float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
        for (int d = 0; d < D; d++) oh[(int64_t)g * D + d] *= inv;
    }
    free(scores);
}

/* One (sequence, KV head) over quantized blocks: its K and V context dequantized into kbuf / vbuf [ctx, D]
 * (in cache from then on: the blocks are read from memory once, at a quarter or less of float32's bytes),
 * then attended as one block of ctx rows. */
static void attend_kv_head_q(const float *qh, float *oh, const float *k_cache, const float *v_cache,
                             const kv_quant *kq, const int32_t *bt, int ctx, int kh, int KVH, int G, int D, int BS,
                             float scale, float *kbuf, float *vbuf) {
    static const int32_t one_block = 0;
    if (attend512_takes(ctx, D)) {  /* block by block through an L1 buffer (kbuf: BS rows at least) */
        attend_kv_head(qh, oh, k_cache, v_cache, bt, ctx, kh, G, D, BS, (int64_t)KVH * BS * D, (int64_t)BS * D, scale,
                       NULL, kq, kbuf);
        return;
    }
    kvq_dequant((const uint8_t *)k_cache, kq->kp, bt, ctx, kh, KVH, D, BS, kq->bits, kbuf);
    kvq_dequant((const uint8_t *)v_cache, kq->vp, bt, ctx, kh, KVH, D, BS, kq->bits, vbuf);
    attend_kv_head(qh, oh, kbuf, vbuf, &one_block, ctx, 0, G, D, ctx > 0 ? ctx : 1, 0, 0, scale, NULL, NULL, NULL);
}

/* Decode attention of B sequences, one query row each (q rows q_stride apart, output rows out_stride apart),
 * as an orphaned omp-for: the (sequence, KV head) tasks go out in chunks, dynamically (a descheduled thread's
 * chunks move to the other), and each chunk reads its K/V rows behind a read-ahead cursor. */
static void attend_decode_tasks(const float *q, int64_t q_stride, float *out, int64_t out_stride, const float *k_cache,
                                const float *v_cache, const int32_t *block_tables, const int32_t *ctx_lens,
                                int max_blocks, int B, int KVH, int G, int D, int BS, float scale,
                                const kv_quant *kq) {
    const int64_t block_stride = (int64_t)KVH * BS * D, head_stride = (int64_t)BS * D;
    const int ntask = B * KVH, per = ntask / (4 * omp_get_num_threads()), chunk = per > 1 ? per : 1;
    const int nchunk = (ntask + chunk - 1) / chunk;
    #pragma omp for schedule(dynamic, 1)
    for (int c = 0; c < nchunk; c++) {
        const int t0 = c * chunk, t1 = t0 + chunk < ntask ? t0 + chunk : ntask;
        if (kq && kq->bits) {
            int rows = 1;  /* per buffer: one block where attend512 takes the task, else the whole context */
            for (int task = t0; task < t1; task++) {
                const int ctx = ctx_lens[task / KVH], need = attend512_takes(ctx, D) ? BS : ctx;
                rows = need > rows ? need : rows;
            }
            float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)rows * D);
            for (int task = t0; task < t1; task++) {
                const int b = task / KVH, kh = task % KVH;
                attend_kv_head_q(q + b * q_stride + (int64_t)kh * G * D, out + b * out_stride + (int64_t)kh * G * D,
                                 k_cache, v_cache, kq, block_tables + (int64_t)b * max_blocks, ctx_lens[b], kh, KVH,
                                 G, D, BS, scale, buf, buf + (int64_t)rows * D);
            }
            free(buf);
            continue;
        }
        kv_cursor cur;
        kvc_init(&cur, k_cache, v_cache, block_tables, ctx_lens, max_blocks, KVH, D, BS, block_stride, head_stride,
                 t0, t1);
        kvc_ahead(&cur, KV_AHEAD);
        for (int task = t0; task < t1; task++) {
            const int b = task / KVH, kh = task % KVH;
            attend_kv_head(q + b * q_stride + (int64_t)kh * G * D, out + b * out_stride + (int64_t)kh * G * D,
                           k_cache, v_cache, block_tables + (int64_t)b * max_blocks, ctx_lens[b], kh, G, D, BS,
                           block_stride, head_stride, scale, &cur, NULL, NULL);
        }
    }
}

void paged_decode(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                  const int32_t *ctx_lens, float *out, int B, int H, int KVH, int D, int BS, int max_blocks,
                  float scale, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    attend_decode_tasks(q, (int64_t)H * D, out, (int64_t)H * D, k_cache, v_cache, block_tables, ctx_lens, max_blocks,
                        B, KVH, H / KVH, D, BS, scale, NULL);
}

/* ---- panel products ------------------------------------------------------------------------------
 * y [M, N] (+)= x [M, K] W^T (+ b) on weights packed once into 16-output panels P [ceil(N/16)][K][16]
 * (zero outputs past N; one panel row is one 64-byte cache line). A tile is three panels (48 outputs)
 * against up to 8 token rows: 24 accumulators stay in registers over the whole of K, each weight vector
 * feeds 8 FMAs and each x element is broadcast once per tile. While a tile runs, the next tile's panel rows
 * are prefetched line by line into L2, spread evenly over all of the tile's row blocks (block j of nb takes
 * the j-th nb-th of the rows, one row every nb k steps), so the weights stream from memory at the pace of
 * the arithmetic instead of stalling it. (Prefetching them all during the first row block asked 4x the
 * bandwidth of that block at 32 rows: on a 2-core Xeon reading 33 GB/s, 3072x576 at 32 tokens took 560 us
 * with cold weights against 405 us hot; spread, 452 us.) Threads take contiguous ranges of tiles (and take
 * from each other's when one runs out: see panel_rows), over PANEL_MCHUNK token rows at a time, so that a
 * prefill chunk's rows stay in L2 while every tile passes over them (2048 rows of SmolLM2's four products on
 * that Xeon: 54-64 ms in one pass, 49-53 ms in chunks).
 * One or two token rows read the same tiles panel by panel instead (panel_seq).
 * bench/cpu_gemm.py on the 2-core AVX-512 EPYC, SmolLM2's shapes, weights cold: 1.06-2.2x oneDNN's packed
 * products from 1 to 512 tokens. */
/* one thread's range of a product's tiles; see panel_rows */
typedef struct { uint64_t s; char pad[56]; } __attribute__((aligned(64))) panel_range;
#if defined(HAVE_AVX512)
#define PANEL_MR 8
#ifndef PANEL_MCHUNK
#define PANEL_MCHUNK 256
#endif
#define PANEL_NV 3
static inline __attribute__((always_inline)) void panel_tile(const float *x, int K, const float *p, int64_t ps,
                                                             float *y, int64_t ldy, const float *b, int ncols,
                                                             int accumulate, const float *pf, int npf,
                                                             int pf_row, int pf_end, int pf_every,
                                                             const int MR, const int NV) {
    __m512 acc[PANEL_MR][PANEL_NV];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) acc[m][v] = _mm512_setzero_ps();
    int pf_count = 0;
    for (int k = 0; k < K; k++) {
        __m512 w[PANEL_NV];
        for (int v = 0; v < NV; v++) w[v] = _mm512_load_ps(p + v * ps + (int64_t)k * 16);
        if (pf && ++pf_count == pf_every) {
            pf_count = 0;
            if (pf_row < pf_end) {
                for (int v = 0; v < npf; v++)
                    _mm_prefetch((const char *)(pf + v * ps + (int64_t)pf_row * 16), _MM_HINT_T1);
                pf_row++;
            }
        }
        for (int m = 0; m < MR; m++) {
            const __m512 xb = _mm512_set1_ps(x[(int64_t)m * K + k]);
            for (int v = 0; v < NV; v++) acc[m][v] = _mm512_fmadd_ps(xb, w[v], acc[m][v]);
        }
    }
    tile_store(&acc[0][0], PANEL_NV, MR, NV, b, y, ldy, ncols, accumulate);
}

/* One panel against one or two token rows, its K rows read in order: a single sequential stream, which the
 * hardware prefetchers follow better than a tile's three. Four FMA chains (k split over them) hide the
 * FMA latency that one or two rows alone would expose. */
#define PANEL_SEQ_MAX 2
static inline __attribute__((always_inline)) void panel_seq(const float *x, int K, const float *p, float *y,
                                                            int64_t ldy, const float *b, int ncols, int accumulate,
                                                            const int MR) {
    const int KS = 4 / MR;
    __m512 acc[PANEL_SEQ_MAX][4];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < KS; j++) acc[m][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; j++) {
            const __m512 w = _mm512_load_ps(p + (int64_t)(k + j) * 16);
            for (int m = 0; m < MR; m++)
                acc[m][j % KS] = _mm512_fmadd_ps(_mm512_set1_ps(x[(int64_t)m * K + k + j]), w, acc[m][j % KS]);
        }
    for (; k < K; k++) {
        const __m512 w = _mm512_load_ps(p + (int64_t)k * 16);
        for (int m = 0; m < MR; m++) acc[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[(int64_t)m * K + k]), w, acc[m][0]);
    }
    const __mmask16 mk = ncols >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << ncols) - 1);
    const __m512 bv = b ? _mm512_maskz_loadu_ps(mk, b) : _mm512_setzero_ps();
    for (int m = 0; m < MR; m++) {
        __m512 r = acc[m][0];
        for (int j = 1; j < KS; j++) r = _mm512_add_ps(r, acc[m][j]);
        float *yr = y + (int64_t)m * ldy;
        r = _mm512_add_ps(r, bv);
        if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk, yr));
        _mm512_mask_storeu_ps(yr, mk, r);
    }
}

#define PANEL_CASE(R, V) case (R) * 4 + (V): \
    panel_tile(xm, K, pt, ps, ym, N, bt, ncols, accumulate, pf, npf, pf_row, pf_end, nb, R, V); break;
#define PANEL_ROW(R) PANEL_CASE(R, 1) PANEL_CASE(R, 2) PANEL_CASE(R, 3)

/* One tile (48 outputs) against all M token rows; pf, when given, is the tile whose panel rows to prefetch
 * meanwhile (npf of its panels). */
static void panel_tile_rows(const float *x, const float *p, const float *b, float *y, int M, int N, int K,
                            int accumulate, int t, int t_pf) {
    const int64_t ps = (int64_t)K * 16;
    const int n0 = t * 16 * PANEL_NV, ncols = N - n0 < 16 * PANEL_NV ? N - n0 : 16 * PANEL_NV;
    const float *pt = p + (int64_t)(n0 / 16) * ps, *bt = b ? b + n0 : NULL;
    if (M <= PANEL_SEQ_MAX) {  /* a token or two: panel after panel, each one sequential stream */
        for (int i = 0; i < (ncols + 15) / 16; i++) {
            const int left = ncols - 16 * i, nc = left < 16 ? left : 16;
            const float *bi = bt ? bt + 16 * i : NULL;
            if (M == 1) panel_seq(x, K, pt + i * ps, y + n0 + 16 * i, N, bi, nc, accumulate, 1);
            else panel_seq(x, K, pt + i * ps, y + n0 + 16 * i, N, bi, nc, accumulate, 2);
        }
        return;
    }
    const int nb = (M + PANEL_MR - 1) / PANEL_MR, rows_per_block = (K + nb - 1) / nb;
    const int nv = (ncols + 15) / 16;
    const float *pf = NULL;
    int npf = 0;
    if (t_pf >= 0) {
        const int rest = N - t_pf * 16 * PANEL_NV;
        npf = rest >= 16 * PANEL_NV ? PANEL_NV : (rest + 15) / 16;
        pf = p + (int64_t)t_pf * PANEL_NV * ps;
    }
    for (int m0 = 0; m0 < M; m0 += PANEL_MR) {
        const int mr = M - m0 < PANEL_MR ? M - m0 : PANEL_MR, j = m0 / PANEL_MR;
        const float *xm = x + (int64_t)m0 * K;
        /* this row block's share of the next tile's panel rows, one row every nb k steps */
        const int pf_row = j * rows_per_block, pf_end = pf_row + rows_per_block < K ? pf_row + rows_per_block : K;
        float *ym = y + (int64_t)m0 * N + n0;
        switch (mr * 4 + nv) {
            PANEL_ROW(1) PANEL_ROW(2) PANEL_ROW(3) PANEL_ROW(4)
            PANEL_ROW(5) PANEL_ROW(6) PANEL_ROW(7) PANEL_ROW(8)
        }
    }
}

/* Tiles go to threads in contiguous ranges (each thread prefetches its next tile's weights), and a thread
 * that runs out takes tiles from the far end of the others' ranges. A thread descheduled mid-product (the
 * HTTP proxy or the Serve replicas waking on a 2-core host) then delays the product by at most the tile it
 * holds, not by its whole share. A range's state is one 64-bit word: (epoch, next, end), where the epoch
 * counts the parallel region's products (each of its threads passes the same count), so that a thread
 * still in an earlier product neither takes nor hands out tiles of this one. */
#define PR_PACK(e, n, d) (((uint64_t)(e) << 32) | ((uint64_t)(n) << 16) | (uint64_t)(d))
#define PR_EPOCH(s) ((uint32_t)((s) >> 32))
#define PR_NEXT(s) ((int)(((s) >> 16) & 0xFFFF))
#define PR_END(s) ((int)((s) & 0xFFFF))

/* tile from the front of the own range (-1 when empty), and the tile after it for the prefetch */
static int pr_take_front(panel_range *r, uint32_t e, int *after) {
    uint64_t s = __atomic_load_n(&r->s, __ATOMIC_ACQUIRE);
    for (;;) {
        const int n = PR_NEXT(s), d = PR_END(s);
        /* a later epoch: another thread finished this product (the range was empty) and opened the next */
        if (PR_EPOCH(s) != e || n >= d) return -1;
        if (__atomic_compare_exchange_n(&r->s, &s, PR_PACK(e, n + 1, d), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *after = n + 1 < d ? n + 1 : -1;
            return n;
        }
    }
}

static int64_t panel_tiles_taken;  /* tiles taken from other threads' ranges, since the library loaded */
int64_t panel_steals(void) { return __atomic_load_n(&panel_tiles_taken, __ATOMIC_RELAXED); }

/* tile from the back of another thread's range [r0, r1) (initialising it when that thread has not yet
 * reached this product), or -1 */
static int pr_take_back(panel_range *r, uint32_t e, int r0, int r1, int *after) {
    uint64_t s = __atomic_load_n(&r->s, __ATOMIC_ACQUIRE);
    for (;;) {
        const uint32_t g = PR_EPOCH(s);
        if ((int32_t)(g - e) > 0) return -1;  /* its owner has moved on: the range is done */
        /* an earlier product's range with tiles left (not possible while thieves empty a range before
         * moving on, but cheap to rule out): its owner is not here yet */
        if (g != e && PR_NEXT(s) < PR_END(s)) return -1;
        const int n = g == e ? PR_NEXT(s) : r0, d = g == e ? PR_END(s) : r1;
        if (n >= d) return -1;
        if (__atomic_compare_exchange_n(&r->s, &s, PR_PACK(e, n, d - 1), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *after = d - 2 >= n ? d - 2 : -1;
            __atomic_fetch_add(&panel_tiles_taken, 1, __ATOMIC_RELAXED);
            return d - 1;
        }
    }
}

/* where thread v's share of ntile tiles starts (and, for v + 1, ends) among nt threads */
static inline int pr_bound(int ntile, int v, int nt) { return (int)((int64_t)ntile * v / nt); }

/* this thread's tiles of one product, inside the caller's parallel region (ranges: one per thread, zeroed
 * before the region; epoch: a counter private to each thread, zero at the region's start); ends at a barrier */
static void panel_rows(const float *x, const float *p, const float *b, float *y, int M, int N, int K,
                       int accumulate, panel_range *ranges, uint32_t *epoch) {
    const int ntile = (N + 16 * PANEL_NV - 1) / (16 * PANEL_NV);
    const int me = omp_get_thread_num(), nt = omp_get_num_threads();
    const int r0 = pr_bound(ntile, me, nt), r1 = pr_bound(ntile, me + 1, nt);
    for (int m0 = 0; m0 < M; m0 += PANEL_MCHUNK) {
        const uint32_t e = ++*epoch;
        const int mc = M - m0 < PANEL_MCHUNK ? M - m0 : PANEL_MCHUNK;
        const float *xc = x + (int64_t)m0 * K;
        float *yc = y + (int64_t)m0 * N;
        uint64_t s = __atomic_load_n(&ranges[me].s, __ATOMIC_ACQUIRE);  /* open the own range, unless taken from */
        while (PR_EPOCH(s) != e &&
               !__atomic_compare_exchange_n(&ranges[me].s, &s, PR_PACK(e, r0, r1), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            ;
        int t, after;
        while ((t = pr_take_front(&ranges[me], e, &after)) >= 0)
            panel_tile_rows(xc, p, b, yc, mc, N, K, accumulate, t, after);
        for (int k = 1; k < nt; k++) {
            const int v = (me + k) % nt;
            while ((t = pr_take_back(&ranges[v], e, pr_bound(ntile, v, nt), pr_bound(ntile, v + 1, nt), &after)) >= 0)
                panel_tile_rows(xc, p, b, yc, mc, N, K, accumulate, t, after);
        }
    }
    #pragma omp barrier
}

int panel_available(void) { return 1; }

void panel_linear(const float *x, const float *p, const float *b, float *y, int M, int N, int K, int nthreads) {
    panel_range ranges[nthreads > 0 ? nthreads : 1];
    memset(ranges, 0, sizeof(ranges));
    #pragma omp parallel num_threads(nthreads)
    {
        uint32_t epoch = 0;
        panel_rows(x, p, b, y, M, N, K, 0, ranges, &epoch);
    }
}

/* panel_linear's outputs for M rows in chosen panels only: y [M, 16 n] holds panel idx[i]'s 16 outputs at
 * columns 16 i.. (the greedy head's candidates, greedy_head.c). Each output runs the code panel_linear runs
 * for it at this M (panel_seq for one or two rows, else panel_tile), so the values are the same bit for bit. */
void panel_columns(const float *x, const float *p, int M, int K, const int32_t *idx, int n, float *y, int nthreads) {
    const int64_t ps = (int64_t)K * 16, ldy = (int64_t)16 * n;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int i = 0; i < n; i++) {
        const float *pi = p + idx[i] * ps;
        float *yi = y + 16 * i;
        if (M <= PANEL_SEQ_MAX) {
            if (M == 1) panel_seq(x, K, pi, yi, ldy, NULL, 16, 0, 1);
            else panel_seq(x, K, pi, yi, ldy, NULL, 16, 0, 2);
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += PANEL_MR) {
            const float *xm = x + (int64_t)m0 * K;
            float *ym = yi + m0 * ldy;
            switch (M - m0 < PANEL_MR ? M - m0 : PANEL_MR) {
#define PANEL_COL(R) case R: panel_tile(xm, K, pi, ps, ym, ldy, NULL, 16, 0, NULL, 0, 0, 0, 1, R, 1); break;
                PANEL_COL(1) PANEL_COL(2) PANEL_COL(3) PANEL_COL(4) PANEL_COL(5) PANEL_COL(6) PANEL_COL(7) PANEL_COL(8)
#undef PANEL_COL
            }
        }
    }
}
#else
int panel_available(void) { return 0; }
int64_t panel_steals(void) { return 0; }

void panel_columns(const float *x, const float *p, int M, int K, const int32_t *idx, int n, float *y, int nthreads) {
    (void)x; (void)p; (void)M; (void)K; (void)idx; (void)n; (void)y; (void)nthreads;
}

void panel_linear(const float *x, const float *p, const float *b, float *y, int M, int N, int K, int nthreads) {
    (void)x; (void)p; (void)b; (void)y; (void)M; (void)N; (void)K; (void)nthreads;
}
#endif

/* ---- fused decode layer ------------------------------------------------------------------------
 * One Llama-family decoder layer for a few decode tokens (one per sequence), in one parallel region:
 * RMSNorm -> qkv -> RoPE (rotate-half) -> K/V cache write -> paged attention -> o -> residual ->
 * RMSNorm -> gate/up -> SiLU * up -> down -> residual. x [M, H] is updated in place.
 * At batch 1 the per-op overhead of ~35 torch calls per layer costs as much as the weights' streaming.
 */
#define WEIGHTS_ROWS 0   /* row-major [N, K] */
#define WEIGHTS_PANELS 1 /* panel-packed, panel_linear's layout */
#define WEIGHTS_W4 2     /* 4-bit panels, w4_panels.c (fused_decode.W4) */
typedef struct {
    const float *in_norm, *post_norm, *w_qkv, *b_qkv, *w_o, *b_o, *w_gu, *b_gu, *w_down, *b_down;
    float eps;
    int H, NH, KVH, D, I;
    int panels; /* the float32 w_*' layout: WEIGHTS_ROWS or WEIGHTS_PANELS (WEIGHTS_W4: all are 4-bit) */
    const uint16_t *x_qkv, *x_o, *x_gu, *x_down; /* bf16x3 copies (amx_bf16x3.c), or NULL */
    const float *s_qkv, *s_o, *s_gu, *s_down; /* 4-bit weights: their (scale, min) pairs; NULL: float32 */
    int group; /* 4-bit weights: input rows per (scale, min) pair */
} layer_weights;

/* One row: x += add (when given; its elements add_step apart), then h = rmsnorm(x) * w. */
static inline __attribute__((always_inline)) void add_norm_row(float *xr, const float *add, int64_t add_step,
                                                               const float *w, float *hr, int H, float eps) {
    if (add)
        for (int i = 0; i < H; i++) xr[i] += add[(int64_t)i * add_step];
    float ss = 0.f;
    for (int i = 0; i < H; i++) ss += xr[i] * xr[i];
    float r = 1.f / sqrtf(ss / H + eps);
    for (int i = 0; i < H; i++) hr[i] = w[i] * (xr[i] * r);
}

static void rmsnorm_rows(float *x, const float *w, float *y, int M, int H, float eps) {
    for (int m = 0; m < M; m++) add_norm_row(x + (int64_t)m * H, NULL, 0, w, y + (int64_t)m * H, H, eps);
}

/* y[m, n] (+)= x[m, :] . w[n, :] + b[n]; an orphaned omp-for inside the caller's parallel region */
static void gemv_rows(const float *x, const float *w, const float *b, float *y, int M, int N, int K, int accumulate) {
    #pragma omp for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *wr = w + (int64_t)n * K;
        float bias = b ? b[n] : 0.f;
        int m = 0;
        float o[4];
        for (; m + 4 <= M; m += 4) {
            dot4_f32(wr, x + (int64_t)m * K, K, o);
            for (int j = 0; j < 4; j++) {
                float v = o[j] + bias;
                y[(int64_t)(m + j) * N + n] = accumulate ? y[(int64_t)(m + j) * N + n] + v : v;
            }
        }
        for (; m < M; m++) {
            float v = dot_f32(wr, x + (int64_t)m * K, K) + bias;
            y[(int64_t)m * N + n] = accumulate ? y[(int64_t)m * N + n] + v : v;
        }
    }
}

static void rope_inplace(float *v, const float *cos, const float *sin, int D) {
    int half = D / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* qkv [M, QKV] -> rotate q and k heads, write k and v to their cache slots, attend over each sequence's
 * context into att [M, NH*D]. Orphaned omp-fors: called inside the caller's parallel region. */
/* qkv [M, QKV] -> rotate the q and k heads in place, write k and v to their cache slots. An orphaned omp-for. */
static void rotate_write(float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                         const int32_t *slot_blocks, const int32_t *slot_offsets, int M, int NH, int KVH, int D, int BS,
                         const kv_quant *kq) {
    const int QKV = (NH + 2 * KVH) * D;
    const int64_t block_stride = (int64_t)KVH * BS * D, head_stride = (int64_t)BS * D;
    #pragma omp for schedule(static)
    for (int t = 0; t < M * (NH + KVH); t++) {
        int m = t / (NH + KVH), hd = t % (NH + KVH);
        float *v = qkv + (int64_t)m * QKV + (int64_t)hd * D;
        rope_inplace(v, cos + (int64_t)m * D, sin + (int64_t)m * D, D);
        if (hd >= NH && kq && kq->bits) {
            const int kh = hd - NH, Dq = kq->bits == 8 ? D : D / 2;
            const int64_t slot = ((int64_t)slot_blocks[m] * KVH + kh) * BS + slot_offsets[m];
            kvq_write_row(v, D, kq->bits, (uint8_t *)k_cache + slot * Dq, (float *)kq->kp + 2 * slot, kq->fixed);
            kvq_write_row(v + (int64_t)KVH * D, D, kq->bits, (uint8_t *)v_cache + slot * Dq, (float *)kq->vp + 2 * slot,
                          kq->fixed);
        } else if (hd >= NH) {
            int kh = hd - NH;
            int64_t off = slot_blocks[m] * block_stride + kh * head_stride + (int64_t)slot_offsets[m] * D;
            memcpy(k_cache + off, v, sizeof(float) * D);
            memcpy(v_cache + off, v + (int64_t)KVH * D, sizeof(float) * D);
        }
    }
}

static void rotate_write_attend(float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                                const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *block_tables,
                                const int32_t *ctx_lens, int max_blocks, int M, int NH, int KVH, int D, int BS,
                                float scale, float *att, const kv_quant *kq) {
    const int G = NH / KVH, QKV = (NH + 2 * KVH) * D;
    rotate_write(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, M, NH, KVH, D, BS, kq);
    attend_decode_tasks(qkv, QKV, att, (int64_t)NH * D, k_cache, v_cache, block_tables, ctx_lens, max_blocks, M, KVH,
                        G, D, BS, scale, kq);
}

/* one of a layer's products inside its parallel region, in the layout its weights were given in: 4-bit
 * panels where it has (scale, min) pairs ``sm`` (a layer may mix them with float32 products), else L->panels */
static void layer_product(const layer_weights *L, const float *x, const float *w, const float *b, float *y,
                          int M, int N, int K, int accumulate, panel_range *ranges, uint32_t *epoch,
                          const uint16_t *wx3, uint16_t *x3_scratch, const float *sm) {
    if (sm) {
        w4_rows(x, (const uint8_t *)w, sm, b, y, M, N, K, L->group, accumulate);
        return;
    }
    if (wx3 && x3_scratch) {
        x3_rows(x, wx3, b, y, M, N, K, accumulate, x3_scratch);
        return;
    }
#if defined(HAVE_AVX512)
    if (L->panels == WEIGHTS_PANELS) {
        panel_rows(x, w, b, y, M, N, K, accumulate, ranges, epoch);
        return;
    }
#endif
    (void)L; (void)ranges; (void)epoch;
    gemv_rows(x, w, b, y, M, N, K, accumulate);
}

void decode_layer(float *x, const layer_weights *L, const float *cos, const float *sin,
                  float *k_cache, float *v_cache, const int32_t *slot_blocks, const int32_t *slot_offsets,
                  const int32_t *block_tables, const int32_t *ctx_lens, int max_blocks, int M, int BS,
                  float scale, float *scratch, int nthreads, const float *k_params, const float *v_params,
                  int kv_bits) {
    const kv_quant kq = KV_QUANT(k_params, v_params, kv_bits);
    const int H = L->H, NH = L->NH, KVH = L->KVH, D = L->D, I = L->I;
    const int QKV = (NH + 2 * KVH) * D;
    float *h = scratch;                      /* [M, H]   normed input */
    float *qkv = h + (int64_t)M * H;         /* [M, QKV] */
    float *att = qkv + (int64_t)M * QKV;     /* [M, NH*D] */
    float *gu = att + (int64_t)M * NH * D;   /* [M, 2I] */
    float *act = gu + (int64_t)M * 2 * I;    /* [M, I] */
    panel_range ranges[nthreads > 0 ? nthreads : 1];
    memset(ranges, 0, sizeof(ranges));
    uint16_t *xs = NULL; /* the bf16x3 products' token rows, hi and lo */
    if (L->x_qkv && M >= X3_MIN_M) {
        const int kmax = H > NH * D ? (H > I ? H : I) : (NH * D > I ? NH * D : I);
        xs = aligned_alloc(64, (size_t)x3_scratch_elems(M, kmax) * 2);
    }
    #pragma omp parallel num_threads(nthreads)
    {
        uint32_t epoch = 0;
        #pragma omp single
        rmsnorm_rows(x, L->in_norm, h, M, H, L->eps);
        layer_product(L, h, L->w_qkv, L->b_qkv, qkv, M, QKV, H, 0, ranges, &epoch, L->x_qkv, xs, L->s_qkv);
        rotate_write_attend(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, block_tables, ctx_lens,
                            max_blocks, M, NH, KVH, D, BS, scale, att, &kq);
        layer_product(L, att, L->w_o, L->b_o, x, M, H, NH * D, 1, ranges, &epoch, L->x_o, xs, L->s_o);  /* x += o(att) */
        #pragma omp single
        rmsnorm_rows(x, L->post_norm, h, M, H, L->eps);
        layer_product(L, h, L->w_gu, L->b_gu, gu, M, 2 * I, H, 0, ranges, &epoch, L->x_gu, xs, L->s_gu);
        #pragma omp for schedule(static)
        for (int t = 0; t < M * ((I + 255) / 256); t++) {  /* (row, 256-wide slice) */
            int m = t / ((I + 255) / 256), i = t % ((I + 255) / 256) * 256, n = I - i < 256 ? I - i : 256;
            silu_mul_f32(gu + (int64_t)m * 2 * I + i, gu + (int64_t)m * 2 * I + I + i, act + (int64_t)m * I + i, n);
        }
        layer_product(L, act, L->w_down, L->b_down, x, M, H, I, 1, ranges, &epoch, L->x_down, xs, L->s_down);  /* x += down(act) */
    }
    free(xs);
}

/* Every layer of a decode step with the batch split between threads: thread t takes rows
 * [M t / nt, M (t + 1) / nt) through all nlayers layers on its own (decode_layer's region nested inside is a
 * team of one), so no thread waits for another until the end of the step, and one thread's attention (reads
 * of the KV cache) runs beside the other's products (arithmetic). scratch: per_token floats per row. */
void decode_layers_split(float *x, const layer_weights *Ls, int nlayers, const float *cos, const float *sin,
                         const int64_t *k_caches, const int64_t *v_caches, const int32_t *slot_blocks,
                         const int32_t *slot_offsets, const int32_t *block_tables, const int32_t *ctx_lens,
                         int max_blocks, int M, int BS, float scale, float *scratch, int per_token, int nthreads,
                         const int64_t *k_params, const int64_t *v_params, int kv_bits) {
    const int H = Ls[0].H, D = Ls[0].D;
    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int m0 = (int)((int64_t)M * t / nt), m1 = (int)((int64_t)M * (t + 1) / nt);
        if (m1 > m0)
            for (int l = 0; l < nlayers; l++)
                decode_layer(x + (int64_t)m0 * H, &Ls[l], cos + (int64_t)m0 * D, sin + (int64_t)m0 * D,
                             (float *)(intptr_t)k_caches[l], (float *)(intptr_t)v_caches[l], slot_blocks + m0,
                             slot_offsets + m0, block_tables + (int64_t)m0 * max_blocks, ctx_lens + m0, max_blocks,
                             m1 - m0, BS, scale, scratch + (int64_t)m0 * per_token, 1,
                             kv_bits ? (const float *)(intptr_t)k_params[l] : NULL,
                             kv_bits ? (const float *)(intptr_t)v_params[l] : NULL, kv_bits);
    }
}

/* ---- Phases of a decode layer for larger batches, between MKL matrix products ---------------------
 * The products run as W @ h^T and leave feature-major results [N, M]; these phases read them in that
 * layout. Checked against the torch layers in tests/test_cpu_kernels.py.
 */

/* x[m, :] += addT[:, m] (when addT is given), then h[m, :] = rmsnorm(x[m, :]) * w */
void hy_add_norm(float *x, const float *addT, const float *w, float *h, int M, int H, float eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int m = 0; m < M; m++)
        add_norm_row(x + (int64_t)m * H, addT ? addT + m : NULL, M, w, h + (int64_t)m * H, H, eps);
}

/* qkvT [QKV, M] (bias added) -> rotate q and k, write k and v to their cache slots, attend over each
 * sequence's context; att [M, NH*D]. qkv is scratch [M, QKV]. */
void hy_attention(const float *qkvT, float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                  const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *block_tables,
                  const int32_t *ctx_lens, int max_blocks, int M, int NH, int KVH, int D, int BS, float scale,
                  float *att, int nthreads,
                  const float *k_params, const float *v_params, int kv_bits) {
    const int QKV = (NH + 2 * KVH) * D;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int j = 0; j < QKV; j++)
            for (int m = 0; m < M; m++) qkv[(int64_t)m * QKV + j] = qkvT[(int64_t)j * M + m];
        const kv_quant kq = KV_QUANT(k_params, v_params, kv_bits);
        rotate_write_attend(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, block_tables, ctx_lens,
                            max_blocks, M, NH, KVH, D, BS, scale, att, &kq);
    }
}

/* guT [2I, M] (gate rows, then up rows) -> actT [I, M] = silu(gate) * up */
void hy_silu_mul(const float *guT, float *actT, int M, int I, int nthreads) {
    const int64_t n = (int64_t)I * M, per = (n + nthreads - 1) / nthreads;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int c = 0; c < nthreads; c++) {
        int64_t a = c * per, b = a + per < n ? a + per : n;
        if (a < b) silu_mul_f32(guT + a, guT + n + a, actT + a, b - a);
    }
}

/* ---- Token-major phases for any step (decode tokens and prefill chunks together) ----------------
 * The products (oneDNN or MKL) leave token-major results [T, N]; these phases read and write that layout.
 * A step is a list of spans, one per sequence: its tokens' rows in the batch (start, len) and the position
 * of its first token (pos0). Every token's K/V is written to its cache slot first, so a prefill chunk
 * attends to its own tokens and to the cached prefix through the same block table.
 */

/* x += add (when given, [M, H]); h = rmsnorm(x) * w */
void tm_add_norm(float *x, const float *add, const float *w, float *h, int M, int H, float eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int m = 0; m < M; m++)
        add_norm_row(x + (int64_t)m * H, add ? add + (int64_t)m * H : NULL, 1, w, h + (int64_t)m * H, H, eps);
}

/* gu [M, 2I] (gate columns, then up) -> act [M, I] = silu(gate) * up */
void tm_silu_mul(const float *gu, float *act, int M, int I, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int m = 0; m < M; m++)
        silu_mul_f32(gu + (int64_t)m * 2 * I, gu + (int64_t)m * 2 * I + I, act + (int64_t)m * I, I);
}

#define TILE_ROWS 16 /* query tokens of one prefill chunk attended together */

#if defined(HAVE_AVX512)
/* attend_tile with 512-bit vectors for head_dim = 16 * NV. The tile's nq = R * G query vectors are scaled and
 * transposed once (qt [D][nqp]), so the scores of 16 queries against one key are a vector, computed for 8
 * keys at a time from broadcast K elements: K rows are read in place, never transposed. Scores sit key-major
 * (st [ctx][nqp]); the causal softmax runs down the keys 16 queries at a time, and values are added 64 keys
 * at a time for GN queries whose output rows stay in registers. */
static inline __attribute__((always_inline)) void tile_pv512(const float *st, int nqp, const float *vrow0[],
                                                             int nk, float *const orow[], const int NV, const int GN) {
    __m512 acc[16];
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < NV; i++) acc[g * NV + i] = _mm512_loadu_ps(orow[g] + 16 * i);
    for (int j = 0; j < nk; j++) {
        __m512 v[8];
        for (int i = 0; i < NV; i++) v[i] = _mm512_loadu_ps(vrow0[j] + 16 * i);
        for (int g = 0; g < GN; g++) {
            const __m512 p = _mm512_set1_ps(st[(int64_t)j * nqp + g]);
            for (int i = 0; i < NV; i++) acc[g * NV + i] = _mm512_fmadd_ps(p, v[i], acc[g * NV + i]);
        }
    }
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(orow[g] + 16 * i, acc[g * NV + i]);
}

static inline __attribute__((always_inline)) void attend_tile512(const float *q, int64_t qstride, float *out,
        int64_t ostride, const float *k_cache, const float *v_cache, const int32_t *bt, int pos0, int R, int kh,
        int G, int BS, int64_t block_stride, int64_t head_stride, float scale, const int NV) {
    const int D = 16 * NV, nq = R * G, nqp = (nq + 15) / 16 * 16, nqv = nqp / 16, ctx = pos0 + R;
    float *qt = (float *)aligned_alloc(64, sizeof(float) * (size_t)D * nqp);
    float *st = (float *)aligned_alloc(64, sizeof(float) * (size_t)(ctx + 8) * nqp);
    int32_t lim[nqp];
    for (int x = 0; x < nqp; x++) lim[x] = x < nq ? pos0 + x / G : -1;  /* last key each query sees */
    for (int x = 0; x < nqp; x++)
        for (int d = 0; d < D; d++)
            qt[(int64_t)d * nqp + x] = x < nq ? q[(int64_t)(x / G) * qstride + (int64_t)(x % G) * D + d] * scale : 0.f;
    /* scores: 8 keys x 16 queries per pass over d */
    for (int t0 = 0; t0 < ctx; t0 += 8) {
        const int nk = ctx - t0 < 8 ? ctx - t0 : 8;
        const float *kr[8];
        for (int j = 0; j < 8; j++) {
            const int t = t0 + (j < nk ? j : 0);
            kr[j] = k_cache + bt[t / BS] * block_stride + kh * head_stride + (int64_t)(t % BS) * D;
        }
        for (int c = 0; c < nqv; c++) {
            __m512 acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm512_setzero_ps();
            for (int d = 0; d < D; d++) {
                const __m512 qv = _mm512_load_ps(qt + (int64_t)d * nqp + 16 * c);
                for (int j = 0; j < 8; j++) acc[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(kr[j][d]), acc[j]);
            }
            for (int j = 0; j < 8; j++) _mm512_store_ps(st + (int64_t)(t0 + j) * nqp + 16 * c, acc[j]);
        }
    }
    /* causal softmax down the keys, 16 queries at a time; masked entries become 0 */
    float inv[nqp];
    for (int c = 0; c < nqv; c++) {
        const __m512i lv = _mm512_loadu_si512((const void *)(lim + 16 * c));
        __m512 m = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int t = 0; t < ctx; t++) {
            const __mmask16 ok = _mm512_cmp_epi32_mask(_mm512_set1_epi32(t), lv, _MM_CMPINT_LE);
            m = _mm512_mask_max_ps(m, ok, m, _mm512_load_ps(st + (int64_t)t * nqp + 16 * c));
        }
        for (int t = 0; t < ctx; t++) {
            const __mmask16 ok = _mm512_cmp_epi32_mask(_mm512_set1_epi32(t), lv, _MM_CMPINT_LE);
            float *sp = st + (int64_t)t * nqp + 16 * c;
            const __m512 e = _mm512_maskz_mov_ps(ok, exp512(_mm512_sub_ps(_mm512_load_ps(sp), m)));
            _mm512_store_ps(sp, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_storeu_ps(inv + 16 * c, _mm512_div_ps(_mm512_set1_ps(1.f), sum));  /* padded lanes: inf, unused */
    }
    for (int x = 0; x < nq; x++) memset(out + (int64_t)(x / G) * ostride + (int64_t)(x % G) * D, 0, sizeof(float) * D);
    /* values: 64 keys at a time, GN queries' outputs in registers */
    const int GN = NV == 4 ? 4 : 2;
    for (int t0 = 0; t0 < ctx; t0 += 64) {
        const int nk = ctx - t0 < 64 ? ctx - t0 : 64;
        const float *vr[64];
        for (int j = 0; j < nk; j++) {
            const int t = t0 + j;
            vr[j] = v_cache + bt[t / BS] * block_stride + kh * head_stride + (int64_t)(t % BS) * D;
        }
        int x = 0;
        for (; x < nq; x += GN) {
            const int n = nq - x < GN ? nq - x : GN;
            float *orow[4];
            for (int g = 0; g < n; g++) orow[g] = out + (int64_t)((x + g) / G) * ostride + (int64_t)((x + g) % G) * D;
            const float *sp = st + (int64_t)t0 * nqp + x;
            if (n == GN && NV == 4) tile_pv512(sp, nqp, vr, nk, orow, 4, 4);
            else if (n == GN) tile_pv512(sp, nqp, vr, nk, orow, 8, 2);
            else for (int g = 0; g < n; g++) tile_pv512(sp + g, nqp, vr, nk, orow + g, NV, 1);
        }
    }
    for (int x = 0; x < nq; x++) {
        float *o = out + (int64_t)(x / G) * ostride + (int64_t)(x % G) * D;
        const __m512 s = _mm512_set1_ps(inv[x]);
        for (int i = 0; i < NV; i++) _mm512_storeu_ps(o + 16 * i, _mm512_mul_ps(_mm512_loadu_ps(o + 16 * i), s));
    }
    free(st);
    free(qt);
}
#endif

/* R consecutive query tokens of one sequence (the first at position pos0) and the G query heads of KV head
 * kh: causal attention over the sequence's cached positions 0 .. pos0 + R - 1. q rows are qstride apart;
 * out rows ostride apart. Scores come from each K block transposed into Kt, so that one key block's
 * scores for a query are a vector loop over keys; values are added key by key into the outputs. */
static void attend_tile(const float *q, int64_t qstride, float *out, int64_t ostride, const float *k_cache,
                        const float *v_cache, const int32_t *bt, int pos0, int R, int kh, int G, int D, int BS,
                        int64_t block_stride, int64_t head_stride, float scale) {
#if defined(HAVE_AVX512)
    if (G * R <= 1024 && (D == 64 || D == 128)) {
        if (D == 64)
            attend_tile512(q, qstride, out, ostride, k_cache, v_cache, bt, pos0, R, kh, G, BS, block_stride, head_stride, scale, 4);
        else
            attend_tile512(q, qstride, out, ostride, k_cache, v_cache, bt, pos0, R, kh, G, BS, block_stride, head_stride, scale, 8);
        return;
    }
#endif
    const int nq = R * G, ctx = pos0 + R;
    float *scores = (float *)malloc(sizeof(float) * (size_t)nq * ctx);
    float *kt = (float *)malloc(sizeof(float) * (size_t)D * BS);
    for (int b0 = 0; b0 < ctx; b0 += BS) {
        const int nk = ctx - b0 < BS ? ctx - b0 : BS;
        const float *kb = k_cache + bt[b0 / BS] * block_stride + kh * head_stride;
        for (int j = 0; j < nk; j++)
            for (int d = 0; d < D; d++) kt[(int64_t)d * BS + j] = kb[(int64_t)j * D + d];
        for (int r = 0; r < R; r++) {
            const int lim = pos0 + r + 1 - b0; /* keys of this block row r may see */
            if (lim <= 0) continue;
            const int n = lim < nk ? lim : nk;
            for (int g = 0; g < G; g++) {
                const float *qv = q + (int64_t)r * qstride + (int64_t)g * D;
                float *s = scores + ((int64_t)r * G + g) * ctx + b0;
                for (int j = 0; j < n; j++) s[j] = 0.f;
                for (int d = 0; d < D; d++) {
                    const float qd = qv[d] * scale, *kr = kt + (int64_t)d * BS;
                    for (int j = 0; j < n; j++) s[j] += qd * kr[j];
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        const int lim = pos0 + r + 1;
        for (int g = 0; g < G; g++) {
            float *s = scores + ((int64_t)r * G + g) * ctx, mx = -INFINITY, sum = 0.f;
            for (int j = 0; j < lim; j++) mx = s[j] > mx ? s[j] : mx;
            sum = exp_shift_sum(s, lim, mx);
            const float inv = 1.f / sum;
            for (int j = 0; j < lim; j++) s[j] *= inv;
            memset(out + (int64_t)r * ostride + (int64_t)g * D, 0, sizeof(float) * D);
        }
    }
    for (int t = 0; t < ctx; t++) {
        const float *vr = v_cache + bt[t / BS] * block_stride + kh * head_stride + (int64_t)(t % BS) * D;
        for (int r = t > pos0 ? t - pos0 : 0; r < R; r++)
            for (int g = 0; g < G; g++)
                axpy_f32(out + (int64_t)r * ostride + (int64_t)g * D, scores[((int64_t)r * G + g) * ctx + t], vr, D);
    }
    free(kt);
    free(scores);
}

/* tm_attention over int8 / int4 blocks, as the module path attends: a fresh prompt's chunk (nothing cached
 * before it) over its own float32 K/V, every other row over the dequantized cache, its own new tokens
 * included. One task per (sequence, KV head): its context is made float32 once (dequantized, or copied out
 * of qkv) into a contiguous buffer, then attended tile by tile as one block. */
static void tm_attention_q(float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                           const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *spans,
                           const int32_t *block_tables, int S, int max_blocks, int T, int NH, int KVH, int D, int BS,
                           float scale, float *att, int nthreads, const kv_quant *kq) {
    static const int32_t one_block = 0;
    const int G = NH / KVH, QKV = (NH + 2 * KVH) * D;
    #pragma omp parallel num_threads(nthreads)
    {
        rotate_write(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, T, NH, KVH, D, BS, kq);
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < S * KVH; i++) {
            const int s = S - 1 - i / KVH, kh = i % KVH;  /* prefill chunks (last) first */
            const int start = spans[3 * s], len = spans[3 * s + 1], pos0 = spans[3 * s + 2], ctx = pos0 + len;
            float *kbuf = (float *)malloc(sizeof(float) * 2 * (size_t)ctx * D), *vbuf = kbuf + (int64_t)ctx * D;
            if (pos0 == 0)
                for (int r = 0; r < len; r++) {
                    const float *src = qkv + (int64_t)(start + r) * QKV + (int64_t)(NH + kh) * D;
                    memcpy(kbuf + (int64_t)r * D, src, sizeof(float) * D);
                    memcpy(vbuf + (int64_t)r * D, src + (int64_t)KVH * D, sizeof(float) * D);
                }
            else {
                const int32_t *bt = block_tables + (int64_t)s * max_blocks;
                kvq_dequant((const uint8_t *)k_cache, kq->kp, bt, ctx, kh, KVH, D, BS, kq->bits, kbuf);
                kvq_dequant((const uint8_t *)v_cache, kq->vp, bt, ctx, kh, KVH, D, BS, kq->bits, vbuf);
            }
            for (int r0 = 0; r0 < len; r0 += TILE_ROWS) {
                const int R = len - r0 < TILE_ROWS ? len - r0 : TILE_ROWS, row = start + r0;
                float *q = qkv + (int64_t)row * QKV + (int64_t)kh * G * D;
                float *o = att + (int64_t)row * NH * D + (int64_t)kh * G * D;
                if (R == 1)
                    attend_kv_head(q, o, kbuf, vbuf, &one_block, pos0 + r0 + 1, 0, G, D, ctx, 0, 0, scale, NULL, NULL,
                                   NULL);
                else
                    attend_tile(q, QKV, o, (int64_t)NH * D, kbuf, vbuf, &one_block, pos0 + r0, R, 0, G, D, ctx, 0, 0,
                                scale);
            }
            free(kbuf);
        }
    }
}

/* qkv [T, QKV] (bias added; rotated in place) -> K/V written to their slots, then att [T, NH*D].
 * spans [S, 3]: (first row, rows, position of the first row) per sequence; block_tables [S, max_blocks]. */
void tm_attention(float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                  const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *spans,
                  const int32_t *block_tables, int S, int max_blocks, int T, int NH, int KVH, int D, int BS,
                  float scale, float *att, int nthreads, const float *k_params, const float *v_params, int kv_bits) {
    const int G = NH / KVH, QKV = (NH + 2 * KVH) * D;
    if (kv_bits) {
        const kv_quant kq = KV_QUANT(k_params, v_params, kv_bits);
        tm_attention_q(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, spans, block_tables, S, max_blocks,
                       T, NH, KVH, D, BS, scale, att, nthreads, &kq);
        return;
    }
    const int64_t block_stride = (int64_t)KVH * BS * D, head_stride = (int64_t)BS * D;
    /* tasks: (span, tile of TILE_ROWS rows, kv head); prefill tiles first, largest context first */
    int ntask = 0;
    for (int s = 0; s < S; s++) ntask += (spans[3 * s + 1] + TILE_ROWS - 1) / TILE_ROWS * KVH;
    int *tasks = (int *)malloc(sizeof(int) * 3 * (size_t)(ntask > 0 ? ntask : 1));
    int n = 0;
    for (int s = S - 1; s >= 0; s--)
        for (int r0 = ((spans[3 * s + 1] - 1) / TILE_ROWS) * TILE_ROWS; r0 >= 0; r0 -= TILE_ROWS)
            for (int kh = 0; kh < KVH; kh++) { tasks[3 * n] = s; tasks[3 * n + 1] = r0; tasks[3 * n + 2] = kh; n++; }
    #pragma omp parallel num_threads(nthreads)
    {
        rotate_write(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, T, NH, KVH, D, BS, NULL);
        #pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < ntask; i++) {
            const int s = tasks[3 * i], r0 = tasks[3 * i + 1], kh = tasks[3 * i + 2];
            const int start = spans[3 * s], len = spans[3 * s + 1], pos0 = spans[3 * s + 2];
            const int R = len - r0 < TILE_ROWS ? len - r0 : TILE_ROWS;
            const int row = start + r0;
            const int32_t *bt = block_tables + (int64_t)s * max_blocks;
            float *q = qkv + (int64_t)row * QKV + (int64_t)kh * G * D;
            float *o = att + (int64_t)row * NH * D + (int64_t)kh * G * D;
            if (R == 1)
                attend_kv_head(q, o, k_cache, v_cache, bt, pos0 + r0 + 1, kh, G, D, BS, block_stride, head_stride, scale,
                               NULL, NULL, NULL);
            else
                attend_tile(q, QKV, o, (int64_t)NH * D, k_cache, v_cache, bt, pos0 + r0, R, kh, G, D, BS,
                            block_stride, head_stride, scale);
        }
    }
    free(tasks);
}
