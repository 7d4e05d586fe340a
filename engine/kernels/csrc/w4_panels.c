/* W4A16 products on CPU: y = x W^T (+ b) with W held as 4-bit codes, dequantized inside the product.
 *
 * Layout (engine/kernels/w4_cpu.py packs it from AutoAWQ's tensors at load):
 *   p  uint8 [T][K/2][16]: T = N/16 panels of 16 outputs (N padded to a multiple of W4_BLOCK with zero codes);
 *      byte j of row pair kk holds output j's code of input row 2kk (low nibble) and of row 2kk+1 (high).
 *   sm float [T][G][2][16]: per group of `group` input rows and output, the scale s and the minimum
 *      mn = -z s, so that w = q s + mn.
 * A 16-byte load is two input rows of one panel; pmovzx spreads it over the 16 lanes, AND and shift split
 * the rows. Within a group the products sum x * q; at the group's end y += s * sum(x q) + mn * sum(x), the
 * row sums of x computed once per call.
 *
 * Up to W4_DIRECT_MAX token rows (decode) read the codes straight into the FMAs, W4_MR rows at a time.
 * More rows (prefill, large decode batches) dequantize a block of W4_BLOCK outputs once into a per-thread
 * float32 buffer (L2-sized) and run an 8-row register tile over it, so the FMAs see float32 weights.
 * Without AVX-512 the same kernels run in 256-bit vectors (AVX2 and FMA); with neither, w4_available() is 0
 * and the layers keep the torch path. Both forms are checked against the dequantizing torch reference in
 * tests/test_w4_cpu.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "tile_store.h"
#include "w4_panels.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#define W4_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define W4_AVX2 1
#endif

#define W4_NV 2            /* 16-output panels per block */
#define W4_BLOCK (16 * W4_NV)
#define W4_DIRECT_MAX 8    /* up to this many rows: the direct kernel */
#define W4_TILE_MR 8       /* token rows per register tile over dequantized weights */

#if defined(W4_AVX512)
#define W4_MR 4            /* token rows per pass of the direct kernel */

/* One block (W4_NV panels) against MR token rows, every group, codes straight into the FMAs. */
static inline __attribute__((always_inline)) void w4_direct(const float *x, int K, const float *xs, int G, int group,
                                                            const uint8_t *pb, const float *smb, const float *b,
                                                            float *y, int64_t ldy, int ncols, int accumulate,
                                                            const int MR) {
    const int64_t ps = (int64_t)K * 8, ss = (int64_t)G * 32; /* a panel's bytes, its (s, mn) floats */
    const __m512i lo4 = _mm512_set1_epi32(0xF);
    __m512 out[W4_MR][W4_NV];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < W4_NV; v++) out[m][v] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512 al[W4_MR][W4_NV], ah[W4_MR][W4_NV]; /* even and odd rows: two FMA chains per output vector */
        for (int m = 0; m < MR; m++)
            for (int v = 0; v < W4_NV; v++) al[m][v] = ah[m][v] = _mm512_setzero_ps();
        const int k0 = g * group;
        for (int k = k0; k < k0 + group; k += 2) {
            __m512 wl[W4_NV], wh[W4_NV];
            for (int v = 0; v < W4_NV; v++) {
                const __m512i q = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(pb + v * ps + (int64_t)k * 8)));
                wl[v] = _mm512_cvtepi32_ps(_mm512_and_si512(q, lo4));
                wh[v] = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
            }
            for (int m = 0; m < MR; m++) {
                const __m512 xl = _mm512_set1_ps(x[(int64_t)m * K + k]), xh = _mm512_set1_ps(x[(int64_t)m * K + k + 1]);
                for (int v = 0; v < W4_NV; v++) {
                    al[m][v] = _mm512_fmadd_ps(xl, wl[v], al[m][v]);
                    ah[m][v] = _mm512_fmadd_ps(xh, wh[v], ah[m][v]);
                }
            }
        }
        for (int v = 0; v < W4_NV; v++) {
            const __m512 s = _mm512_load_ps(smb + v * ss + g * 32), mn = _mm512_load_ps(smb + v * ss + g * 32 + 16);
            for (int m = 0; m < MR; m++) {
                out[m][v] = _mm512_fmadd_ps(s, _mm512_add_ps(al[m][v], ah[m][v]), out[m][v]);
                out[m][v] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[(int64_t)m * G + g]), out[m][v]);
            }
        }
    }
    tile_store(&out[0][0], W4_NV, MR, W4_NV, b, y, ldy, ncols, accumulate);
}

/* A block's weights as float32, [W4_NV][K][16] (the panel products' layout). */
static void w4_dequant_block(const uint8_t *pb, const float *smb, int K, int G, int group, float *w) {
    const int64_t ps = (int64_t)K * 8, ss = (int64_t)G * 32;
    const __m512i lo4 = _mm512_set1_epi32(0xF);
    for (int v = 0; v < W4_NV; v++)
        for (int g = 0; g < G; g++) {
            const __m512 s = _mm512_load_ps(smb + v * ss + g * 32), mn = _mm512_load_ps(smb + v * ss + g * 32 + 16);
            for (int k = g * group; k < (g + 1) * group; k += 2) {
                const __m512i q = _mm512_cvtepu8_epi32(_mm_load_si128((const __m128i *)(pb + v * ps + (int64_t)k * 8)));
                float *wk = w + ((int64_t)v * K + k) * 16;
                _mm512_store_ps(wk, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, lo4)), s, mn));
                _mm512_store_ps(wk + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), s, mn));
            }
        }
}

/* MR token rows against a dequantized block w [W4_NV][K][16]. */
static inline __attribute__((always_inline)) void w4_tile(const float *x, int K, const float *w, const float *b,
                                                          float *y, int64_t ldy, int ncols, int accumulate,
                                                          const int MR) {
    __m512 acc[W4_TILE_MR][W4_NV];
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < W4_NV; v++) acc[m][v] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 wv[W4_NV];
        for (int v = 0; v < W4_NV; v++) wv[v] = _mm512_load_ps(w + ((int64_t)v * K + k) * 16);
        for (int m = 0; m < MR; m++) {
            const __m512 xb = _mm512_set1_ps(x[(int64_t)m * K + k]);
            for (int v = 0; v < W4_NV; v++) acc[m][v] = _mm512_fmadd_ps(xb, wv[v], acc[m][v]);
        }
    }
    tile_store(&acc[0][0], W4_NV, MR, W4_NV, b, y, ldy, ncols, accumulate);
}

#elif defined(W4_AVX2)
/* The same kernels in 256-bit vectors (AVX2 and FMA, without AVX-512): a panel row is two of them. */
typedef __m256 v8f;
#define W4_NH (2 * W4_NV) /* 8-float vectors per block row */
#define W4_MR 2            /* token rows per pass of the direct kernel (16 vector registers) */

static inline __attribute__((always_inline)) v8f load8(const float *p) { return _mm256_loadu_ps(p); }

static inline __attribute__((always_inline)) __m256i codes8(const uint8_t *p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

static inline __attribute__((always_inline)) v8f low4(__m256i q) {
    return _mm256_cvtepi32_ps(_mm256_and_si256(q, _mm256_set1_epi32(15)));
}

static inline __attribute__((always_inline)) v8f high4(__m256i q) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(q, 4)); }

/* the 8-float vector h of a block's row k: panel h / 2, outputs 8 (h % 2).. */
static inline __attribute__((always_inline)) const uint8_t *codes_at(const uint8_t *pb, int64_t ps, int k, int h) {
    return pb + (h / 2) * ps + (int64_t)k * 8 + 8 * (h % 2);
}

static inline __attribute__((always_inline)) void tile_store_v(const v8f *acc, int MR, const float *b, float *y,
                                                               int64_t ldy, int ncols, int accumulate) {
    for (int m = 0; m < MR; m++)
        for (int h = 0; h < W4_NH; h++) {
            const int n = ncols - 8 * h < 8 ? ncols - 8 * h : 8;
            float r[8];
            _mm256_storeu_ps(r, acc[m * W4_NH + h]);
            float *yr = y + (int64_t)m * ldy + 8 * h;
            for (int j = 0; j < n; j++) {
                const float o = r[j] + (b ? b[8 * h + j] : 0.f);
                yr[j] = accumulate ? yr[j] + o : o;
            }
        }
}

static inline __attribute__((always_inline)) void w4_direct(const float *x, int K, const float *xs, int G, int group,
                                                            const uint8_t *pb, const float *smb, const float *b,
                                                            float *y, int64_t ldy, int ncols, int accumulate,
                                                            const int MR) {
    const int64_t ps = (int64_t)K * 8, ss = (int64_t)G * 32;
    v8f out[W4_MR][W4_NH];
    for (int m = 0; m < MR; m++)
        for (int h = 0; h < W4_NH; h++) out[m][h] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        v8f al[W4_MR][W4_NH], ah[W4_MR][W4_NH]; /* even and odd rows: two FMA chains per output vector */
        for (int m = 0; m < MR; m++)
            for (int h = 0; h < W4_NH; h++) al[m][h] = ah[m][h] = _mm256_setzero_ps();
        for (int k = g * group; k < (g + 1) * group; k += 2)
            for (int h = 0; h < W4_NH; h++) {
                const __m256i q = codes8(codes_at(pb, ps, k, h));
                const v8f wl = low4(q), wh = high4(q);
                for (int m = 0; m < MR; m++) {
                    al[m][h] = _mm256_fmadd_ps(_mm256_set1_ps(x[(int64_t)m * K + k]), wl, al[m][h]);
                    ah[m][h] = _mm256_fmadd_ps(_mm256_set1_ps(x[(int64_t)m * K + k + 1]), wh, ah[m][h]);
                }
            }
        for (int h = 0; h < W4_NH; h++) {
            const float *sp = smb + (h / 2) * ss + g * 32 + 8 * (h % 2);
            const v8f s = load8(sp), mn = load8(sp + 16);
            for (int m = 0; m < MR; m++) {
                out[m][h] = _mm256_fmadd_ps(s, _mm256_add_ps(al[m][h], ah[m][h]), out[m][h]);
                out[m][h] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[(int64_t)m * G + g]), out[m][h]);
            }
        }
    }
    tile_store_v(&out[0][0], MR, b, y, ldy, ncols, accumulate);
}

static void w4_dequant_block(const uint8_t *pb, const float *smb, int K, int G, int group, float *w) {
    const int64_t ps = (int64_t)K * 8, ss = (int64_t)G * 32;
    for (int h = 0; h < W4_NH; h++)
        for (int g = 0; g < G; g++) {
            const float *sp = smb + (h / 2) * ss + g * 32 + 8 * (h % 2);
            const v8f s = load8(sp), mn = load8(sp + 16);
            for (int k = g * group; k < (g + 1) * group; k += 2) {
                const __m256i q = codes8(codes_at(pb, ps, k, h));
                float *wk = w + ((int64_t)(h / 2) * K + k) * 16 + 8 * (h % 2);  /* [W4_NV][K][16], as on AVX-512 */
                _mm256_storeu_ps(wk, _mm256_fmadd_ps(low4(q), s, mn));
                _mm256_storeu_ps(wk + 16, _mm256_fmadd_ps(high4(q), s, mn));
            }
        }
}

static inline __attribute__((always_inline)) void w4_tile(const float *x, int K, const float *w, const float *b,
                                                          float *y, int64_t ldy, int ncols, int accumulate,
                                                          const int MR) {
    v8f acc[W4_TILE_MR][W4_NH];
    for (int m = 0; m < MR; m++)
        for (int h = 0; h < W4_NH; h++) acc[m][h] = _mm256_setzero_ps();
    for (int k = 0; k < K; k++) {
        v8f wv[W4_NH];
        for (int h = 0; h < W4_NH; h++) wv[h] = load8(w + ((int64_t)(h / 2) * K + k) * 16 + 8 * (h % 2));
        for (int m = 0; m < MR; m++) {
            const v8f xv = _mm256_set1_ps(x[(int64_t)m * K + k]);
            for (int h = 0; h < W4_NH; h++) acc[m][h] = _mm256_fmadd_ps(xv, wv[h], acc[m][h]);
        }
    }
    tile_store_v(&acc[0][0], MR, b, y, ldy, ncols, accumulate);
}
#endif

/* 512 or 256: the vector width of the kernels built; 0: none (no AVX2, the torch path runs instead) */
#if defined(W4_AVX512)
int w4_available(void) { return 512; }
#elif defined(W4_AVX2)
int w4_available(void) { return 256; }
#else
int w4_available(void) { return 0; }
#endif

#if defined(W4_AVX512) || defined(W4_AVX2)
/* Row sums of x over each group, xs [M][G]: 16 partial sums a group (independent lanes, which the compiler
 * vectorizes for either form), then theirs. */
static void w4_group_sums(const float *x, int M, int K, int group, float *xs) {
    const int G = K / group;
    for (int m = 0; m < M; m++)
        for (int g = 0; g < G; g++) {
            const float *xg = x + (int64_t)m * K + (int64_t)g * group;
            float lanes[16] = {0};
            int i = 0;
            for (; i + 16 <= group; i += 16)
                for (int j = 0; j < 16; j++) lanes[j] += xg[i + j];
            float r = 0.f;
            for (int j = 0; j < 16; j++) r += lanes[j];
            for (; i < group; i++) r += xg[i];
            xs[(int64_t)m * G + g] = r;
        }
}

/* each thread's dequantized block, kept between calls (grown as needed, never freed) */
static __thread float *w4_buf;
static __thread int64_t w4_buf_len;

static float *w4_block_buffer(int K) {
    const int64_t need = (int64_t)W4_NV * K * 16;
    if (need > w4_buf_len) {
        free(w4_buf);
        w4_buf = aligned_alloc(64, (size_t)need * sizeof(float));
        w4_buf_len = w4_buf ? need : 0;
    }
    return w4_buf;
}

#define W4_DIRECT_CASE(R) case R: w4_direct(xm, K, xs + (int64_t)m0 * G, G, group, pb, smb, bb, ym, N, ncols, \
                                            accumulate, R); break;
#define W4_TILE_CASE(R) case R: w4_tile(xm, K, w, bb, ym, N, ncols, accumulate, R); break;

void w4_rows(const float *x, const uint8_t *p, const float *sm, const float *b, float *y, int M, int N, int K,
             int group, int accumulate) {
    const int G = K / group, nblock = (N + W4_BLOCK - 1) / W4_BLOCK;
    const int64_t ps = (int64_t)K * 8, ss = (int64_t)G * 32;
    if (M <= W4_DIRECT_MAX) {
        float xs[W4_DIRECT_MAX * G];
        w4_group_sums(x, M, K, group, xs);  /* every thread its own copy: M * K additions */
        #pragma omp for schedule(static)
        for (int t = 0; t < nblock; t++) {
            const int n0 = t * W4_BLOCK, ncols = N - n0 < W4_BLOCK ? N - n0 : W4_BLOCK;
            const uint8_t *pb = p + (int64_t)t * W4_NV * ps;
            const float *smb = sm + (int64_t)t * W4_NV * ss, *bb = b ? b + n0 : NULL;
            for (int m0 = 0; m0 < M; m0 += W4_MR) {
                const float *xm = x + (int64_t)m0 * K;
                float *ym = y + (int64_t)m0 * N + n0;
                switch (M - m0 < W4_MR ? M - m0 : W4_MR) {
                    W4_DIRECT_CASE(1) W4_DIRECT_CASE(2)
#if W4_MR > 2
                    W4_DIRECT_CASE(3) W4_DIRECT_CASE(4)
#endif
                }
            }
        }
        return;
    }
    float *w = w4_block_buffer(K);
    #pragma omp for schedule(static)
    for (int t = 0; t < nblock; t++) {
        const int n0 = t * W4_BLOCK, ncols = N - n0 < W4_BLOCK ? N - n0 : W4_BLOCK;
        const float *bb = b ? b + n0 : NULL;
        w4_dequant_block(p + (int64_t)t * W4_NV * ps, sm + (int64_t)t * W4_NV * ss, K, G, group, w);
        for (int m0 = 0; m0 < M; m0 += W4_TILE_MR) {
            const float *xm = x + (int64_t)m0 * K;
            float *ym = y + (int64_t)m0 * N + n0;
            switch (M - m0 < W4_TILE_MR ? M - m0 : W4_TILE_MR) {
                W4_TILE_CASE(1) W4_TILE_CASE(2) W4_TILE_CASE(3) W4_TILE_CASE(4)
                W4_TILE_CASE(5) W4_TILE_CASE(6) W4_TILE_CASE(7) W4_TILE_CASE(8)
            }
        }
    }
}
#else
void w4_rows(const float *x, const uint8_t *p, const float *sm, const float *b, float *y, int M, int N, int K,
             int group, int accumulate) {
    (void)x; (void)p; (void)sm; (void)b; (void)y; (void)M; (void)N; (void)K; (void)group; (void)accumulate;
}
#endif

int w4_block(void) { return W4_BLOCK; }

void w4_linear(const float *x, const uint8_t *p, const float *sm, const float *b, float *y, int M, int N, int K,
               int group, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    w4_rows(x, p, sm, b, y, M, N, K, group, 0);
}
