/* CPU kernels for the decode hot path, float32, built on first use with the system C compiler.
 *
 *   skinny_linear: y = x W^T (+ b) for a few token rows, W [N, K] row-major, y written feature-major
 *                  ([N, M]); weights stream once from memory, split over threads by output rows.
 *   paged_decode:  one query token per sequence against its paged K/V context, two passes (scores then
 *                  values), reading each cached K and V row exactly once. Cache layout per layer:
 *                  [num_blocks, kv_heads, block_size, head_dim].
 *
 * Both are checked against torch references in tests/test_cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
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

/* One (sequence, KV head): G query heads against ctx cached positions; writes G output rows. */
static void attend_kv_head(const float *qh, float *oh, const float *k_cache, const float *v_cache,
                           const int32_t *bt, int ctx, int kh, int G, int D, int BS, int64_t block_stride,
                           int64_t head_stride, float scale) {
    float *scores = (float *)malloc(sizeof(float) * (size_t)G * (ctx > 0 ? ctx : 1));
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
        float s = 0.f, *sc = scores + (int64_t)g * ctx;
        for (int t = 0; t < ctx; t++) { sc[t] = expf(sc[t] - mx[g]); s += sc[t]; }
        sum[g] = s;
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

void paged_decode(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                  const int32_t *ctx_lens, float *out, int B, int H, int KVH, int D, int BS, int max_blocks,
                  float scale, int nthreads) {
    const int G = H / KVH;
    const int64_t block_stride = (int64_t)KVH * BS * D, head_stride = (int64_t)BS * D;
    #pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int task = 0; task < B * KVH; task++) {
        const int b = task / KVH, kh = task % KVH;
        attend_kv_head(q + ((int64_t)b * H + (int64_t)kh * G) * D, out + ((int64_t)b * H + (int64_t)kh * G) * D,
                       k_cache, v_cache, block_tables + (int64_t)b * max_blocks, ctx_lens[b], kh, G, D, BS,
                       block_stride, head_stride, scale);
    }
}

/* ---- fused decode layer ------------------------------------------------------------------------
 * One Llama-family decoder layer for a few decode tokens (one per sequence), in one parallel region:
 * RMSNorm -> qkv -> RoPE (rotate-half) -> K/V cache write -> paged attention -> o -> residual ->
 * RMSNorm -> gate/up -> SiLU * up -> down -> residual. x [M, H] is updated in place.
 * At batch 1 the per-op overhead of ~35 torch calls per layer costs as much as the weights' streaming.
 */
typedef struct {
    const float *in_norm, *post_norm, *w_qkv, *b_qkv, *w_o, *b_o, *w_gu, *b_gu, *w_down, *b_down;
    float eps;
    int H, NH, KVH, D, I;
} layer_weights;

static void rmsnorm_rows(const float *x, const float *w, float *y, int M, int H, float eps) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (int64_t)m * H;
        float *yr = y + (int64_t)m * H;
        float ss = 0.f;
        for (int i = 0; i < H; i++) ss += xr[i] * xr[i];
        float r = 1.f / sqrtf(ss / H + eps);
        for (int i = 0; i < H; i++) yr[i] = w[i] * (xr[i] * r);
    }
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
static void rotate_write_attend(float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                                const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *block_tables,
                                const int32_t *ctx_lens, int max_blocks, int M, int NH, int KVH, int D, int BS,
                                float scale, float *att) {
    const int G = NH / KVH, QKV = (NH + 2 * KVH) * D;
    const int64_t block_stride = (int64_t)KVH * BS * D, head_stride = (int64_t)BS * D;
    #pragma omp for schedule(static)
    for (int t = 0; t < M * (NH + KVH); t++) {
        int m = t / (NH + KVH), hd = t % (NH + KVH);
        float *v = qkv + (int64_t)m * QKV + (int64_t)hd * D;
        rope_inplace(v, cos + (int64_t)m * D, sin + (int64_t)m * D, D);
        if (hd >= NH) {
            int kh = hd - NH;
            int64_t off = slot_blocks[m] * block_stride + kh * head_stride + (int64_t)slot_offsets[m] * D;
            memcpy(k_cache + off, v, sizeof(float) * D);
            memcpy(v_cache + off, v + (int64_t)KVH * D, sizeof(float) * D);
        }
    }
    #pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < M * KVH; task++) {
        int m = task / KVH, kh = task % KVH;
        attend_kv_head(qkv + (int64_t)m * QKV + (int64_t)kh * G * D, att + (int64_t)m * NH * D + (int64_t)kh * G * D,
                       k_cache, v_cache, block_tables + (int64_t)m * max_blocks, ctx_lens[m], kh, G, D, BS,
                       block_stride, head_stride, scale);
    }
}

void decode_layer(float *x, const layer_weights *L, const float *cos, const float *sin,
                  float *k_cache, float *v_cache, const int32_t *slot_blocks, const int32_t *slot_offsets,
                  const int32_t *block_tables, const int32_t *ctx_lens, int max_blocks, int M, int BS,
                  float scale, float *scratch, int nthreads) {
    const int H = L->H, NH = L->NH, KVH = L->KVH, D = L->D, I = L->I;
    const int QKV = (NH + 2 * KVH) * D;
    float *h = scratch;                      /* [M, H]   normed input */
    float *qkv = h + (int64_t)M * H;         /* [M, QKV] */
    float *att = qkv + (int64_t)M * QKV;     /* [M, NH*D] */
    float *gu = att + (int64_t)M * NH * D;   /* [M, 2I] */
    float *act = gu + (int64_t)M * 2 * I;    /* [M, I] */
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp single
        rmsnorm_rows(x, L->in_norm, h, M, H, L->eps);
        gemv_rows(h, L->w_qkv, L->b_qkv, qkv, M, QKV, H, 0);
        rotate_write_attend(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, block_tables, ctx_lens,
                            max_blocks, M, NH, KVH, D, BS, scale, att);
        gemv_rows(att, L->w_o, L->b_o, x, M, H, NH * D, 1);  /* x += o(att) */
        #pragma omp single
        rmsnorm_rows(x, L->post_norm, h, M, H, L->eps);
        gemv_rows(h, L->w_gu, L->b_gu, gu, M, 2 * I, H, 0);
        #pragma omp for schedule(static)
        for (int t = 0; t < M * I; t++) {
            int m = t / I, i = t % I;
            float g = gu[(int64_t)m * 2 * I + i], u = gu[(int64_t)m * 2 * I + I + i];
            act[t] = g / (1.f + expf(-g)) * u;
        }
        gemv_rows(act, L->w_down, L->b_down, x, M, H, I, 1);  /* x += down(act) */
    }
}

/* ---- Phases of a decode layer for larger batches, between MKL matrix products ---------------------
 * The products run as W @ h^T and leave feature-major results [N, M]; these phases read them in that
 * layout. Checked against the torch layers in tests/test_cpu_kernels.py.
 */

/* x[m, :] += addT[:, m] (when addT is given), then h[m, :] = rmsnorm(x[m, :]) * w */
void hy_add_norm(float *x, const float *addT, const float *w, float *h, int M, int H, float eps, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int m = 0; m < M; m++) {
        float *xr = x + (int64_t)m * H;
        if (addT)
            for (int i = 0; i < H; i++) xr[i] += addT[(int64_t)i * M + m];
        float ss = 0.f;
        for (int i = 0; i < H; i++) ss += xr[i] * xr[i];
        float r = 1.f / sqrtf(ss / H + eps);
        float *hr = h + (int64_t)m * H;
        for (int i = 0; i < H; i++) hr[i] = w[i] * (xr[i] * r);
    }
}

/* qkvT [QKV, M] (bias added) -> rotate q and k, write k and v to their cache slots, attend over each
 * sequence's context; att [M, NH*D]. qkv is scratch [M, QKV]. */
void hy_attention(const float *qkvT, float *qkv, const float *cos, const float *sin, float *k_cache, float *v_cache,
                  const int32_t *slot_blocks, const int32_t *slot_offsets, const int32_t *block_tables,
                  const int32_t *ctx_lens, int max_blocks, int M, int NH, int KVH, int D, int BS, float scale,
                  float *att, int nthreads) {
    const int QKV = (NH + 2 * KVH) * D;
    #pragma omp parallel num_threads(nthreads)
    {
        #pragma omp for schedule(static)
        for (int j = 0; j < QKV; j++)
            for (int m = 0; m < M; m++) qkv[(int64_t)m * QKV + j] = qkvT[(int64_t)j * M + m];
        rotate_write_attend(qkv, cos, sin, k_cache, v_cache, slot_blocks, slot_offsets, block_tables, ctx_lens,
                            max_blocks, M, NH, KVH, D, BS, scale, att);
    }
}

/* guT [2I, M] (gate rows, then up rows) -> actT [I, M] = silu(gate) * up */
void hy_silu_mul(const float *guT, float *actT, int M, int I, int nthreads) {
    const int64_t n = (int64_t)I * M;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t t = 0; t < n; t++) {
        float g = guT[t];
        actT[t] = g / (1.f + expf(-g)) * guT[n + t];
    }
}
