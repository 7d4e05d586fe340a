/* float32 products as three bfloat16 products on AMX tiles ("bf16x3", matmul_precision="high").
 *
 * Each float32 value v is split into hi = bf16(v) (round to nearest even) and lo = bf16(v - hi), 16 of its 24
 * mantissa bits, and x W^T is computed as x_hi W_hi^T + x_lo W_hi^T + x_hi W_lo^T (the x_lo W_lo^T term, about
 * 2^-16 of each product, is dropped), each a TDPBF16PS tile product with float32 accumulation. torch calls
 * this precision "high" (torch.set_float32_matmul_precision); on CPU torch itself keeps IEEE products.
 * Error: about 1e-6 of the sum of the products' magnitudes, against about 3e-8 for float32 (tests/
 * test_amx_bf16x3.py measures both against float64).
 *
 * The weights are packed once: W [N, K] -> P [N/32][K/32][4][16][32] bf16, per 32 outputs and 32 inputs
 * four 1 KiB B tiles (hi of outputs 0-15 and 16-31, then lo), each in the tiles' pair-interleaved layout
 * (row r holds inputs 2r and 2r+1 of 16 outputs); N and K are padded to 32 with zeros. The token rows are
 * split into a scratch [2][Mp][Kp] (hi plane, lo plane; Mp = M rounded up to 16, zero rows past M).
 * A block is 32 token rows x 32 outputs in four float32 C tiles (16 rows x 16 outputs each), the other four
 * tiles holding two A (token) and two B (weight) tiles: per 32 inputs, 10 tile loads and 12 products.
 * Threads take contiguous ranges of blocks of 32 outputs, all of a chunk's token rows each, so that a block's
 * weights are read once per chunk of X3_MCHUNK rows. (bench/cpu_gemm.py on the 2-core Xeon, weights cold, 32
 * tokens: contiguous ranges ran 5-15% faster than blocks taken two at a time; software prefetch 8-128 KiB
 * ahead changed nothing: the weights stream at about 19 GB/s either way, as the float32 panels do.)
 */
#include "amx_bf16x3.h"

#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#include <immintrin.h>
#define HAVE_AMX 1
#endif

#define X3_MCHUNK 256 /* token rows whose scratch stays in L2 while the weight blocks pass over them */


static inline int up32(int v) { return (v + 31) / 32 * 32; }
static inline int up16(int v) { return (v + 15) / 16 * 16; }

int x3_min_rows(void) { return X3_MIN_M; }
int64_t x3_packed_elems(int N, int K) { return (int64_t)up32(N) * up32(K) * 2; }
int64_t x3_scratch_elems(int M, int K) { return (int64_t)up16(M) * up32(K) * 2; }

static inline uint16_t bf16_rne(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

void x3_pack(const float *w, uint16_t *p, int N, int K, int nthreads) {
    const int NB = up32(N) / 32, KC = up32(K) / 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int nb = 0; nb < NB; nb++)
        for (int kc = 0; kc < KC; kc++) {
            uint16_t *t = p + ((int64_t)nb * KC + kc) * 2048;
            for (int j = 0; j < 32; j++)
                for (int k = 0; k < 32; k++) {
                    const int n = nb * 32 + j, kk = kc * 32 + k;
                    const float v = (n < N && kk < K) ? w[(int64_t)n * K + kk] : 0.f;
                    const uint16_t hi = bf16_rne(v), lo = bf16_rne(v - bf16_f32(hi));
                    const int at = (j / 16) * 512 + (k / 2) * 32 + (j % 16) * 2 + (k & 1);
                    t[at] = hi;
                    t[1024 + at] = lo;
                }
        }
}

#if defined(HAVE_AMX)
int x3_available(void) {
    static int state = -1; /* asked once per process: the kernel's permission covers all its threads */
    if (state < 0)
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
    return state;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static void load_tiles(void) {
    tile_config c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.rows[i] = 16;
        c.colsb[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* the first n of 16 lanes (none for n <= 0, all for n >= 16) */
static inline __mmask16 first_n(int n) { return n >= 16 ? 0xffff : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* round to nearest even at bit 16: the bf16 bits in the upper half */
static inline __m512i rne_bits(__m512i u) {
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
}

/* one token row -> its hi and lo bf16 rows of Kp elements (zeros past K; all zeros when x is NULL) */
static void split_row(const float *x, uint16_t *hi, uint16_t *lo, int K, int Kp) {
    for (int k = 0; k < Kp; k += 16) {
        const __mmask16 m = x == NULL ? 0 : first_n(K - k);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
        const __m512i h = rne_bits(_mm512_castps_si512(v));
        const __m512 rest = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32((int)0xffff0000u))));
        const __m512i l = rne_bits(_mm512_castps_si512(rest));
        _mm256_storeu_si256((__m256i *)(hi + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16)));
        _mm256_storeu_si256((__m256i *)(lo + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(l, 16)));
    }
}

/* C tiles 0-3 = 32 token rows (ah/al, row stride sa bytes) x 32 outputs of the packed block p, over KC steps */
static inline void block32(const uint16_t *ah, const uint16_t *al, int64_t sa, int Kp, const uint16_t *p, int KC) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const uint16_t *ah1 = ah + 16 * (int64_t)Kp, *al1 = al + 16 * (int64_t)Kp;
    for (int kc = 0; kc < KC; kc++, p += 2048) {
        const int k = kc * 32;
        _tile_loadd(6, p, 64); _tile_loadd(7, p + 512, 64);            /* W hi */
        _tile_loadd(4, ah + k, sa); _tile_loadd(5, ah1 + k, sa);       /* x hi */
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(4, al + k, sa); _tile_loadd(5, al1 + k, sa);       /* x lo */
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, p + 1024, 64); _tile_loadd(7, p + 1536, 64);    /* W lo */
        _tile_loadd(4, ah + k, sa); _tile_loadd(5, ah1 + k, sa);       /* x hi */
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
}

/* C tiles 0-1 = 16 token rows x 32 outputs */
static inline void block16(const uint16_t *ah, const uint16_t *al, int64_t sa, const uint16_t *p, int KC) {
    _tile_zero(0); _tile_zero(1);
    for (int kc = 0; kc < KC; kc++, p += 2048) {
        const int k = kc * 32;
        _tile_loadd(6, p, 64); _tile_loadd(7, p + 512, 64);
        _tile_loadd(4, ah + k, sa); _tile_loadd(5, al + k, sa);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(0, 5, 6); _tile_dpbf16ps(1, 5, 7);
        _tile_loadd(6, p + 1024, 64); _tile_loadd(7, p + 1536, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    }
}

/* the C tiles (rows of 32 floats in c) into y's rows m0.. (those below M) and outputs n0.. (below N) */
static inline void epilogue(const float *c, int rows, float *y, int M, int N, int m0, int n0, const float *b,
                            int accumulate) {
    const __mmask16 m_lo = first_n(N - n0), m_hi = first_n(N - n0 - 16);
    const __m512 b0 = b ? _mm512_maskz_loadu_ps(m_lo, b + n0) : _mm512_setzero_ps();
    const __m512 b1 = b ? _mm512_maskz_loadu_ps(m_hi, b + n0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows && m0 + r < M; r++) {
        float *yr = y + (int64_t)(m0 + r) * N + n0;
        __m512 v0 = _mm512_add_ps(_mm512_loadu_ps(c + r * 32), b0);
        __m512 v1 = _mm512_add_ps(_mm512_loadu_ps(c + r * 32 + 16), b1);
        if (accumulate) {
            v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m_lo, yr));
            v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m_hi, yr + 16));
        }
        _mm512_mask_storeu_ps(yr, m_lo, v0);
        _mm512_mask_storeu_ps(yr + 16, m_hi, v1);
    }
}

void x3_rows(const float *x, const uint16_t *p, const float *b, float *y, int M, int N, int K, int accumulate,
             uint16_t *a) {
    const int Kp = up32(K), Mp = up16(M), KC = Kp / 32, NB = up32(N) / 32;
    uint16_t *ah = a, *al = a + (int64_t)Mp * Kp;
    const int64_t sa = (int64_t)Kp * 2;
    #pragma omp for schedule(static)
    for (int m = 0; m < Mp; m++)
        split_row(m < M ? x + (int64_t)m * K : NULL, ah + (int64_t)m * Kp, al + (int64_t)m * Kp, K, Kp);
    load_tiles();
    float c[32 * 32] __attribute__((aligned(64)));
    for (int m0 = 0; m0 < Mp; m0 += X3_MCHUNK) {
        const int m1 = Mp - m0 > X3_MCHUNK ? m0 + X3_MCHUNK : Mp;
        #pragma omp for schedule(static) nowait
        for (int nb = 0; nb < NB; nb++) {
            const uint16_t *pb = p + (int64_t)nb * KC * 2048;
            for (int mb = m0; mb < m1; mb += 32) {
                const uint16_t *h = ah + (int64_t)mb * Kp, *l = al + (int64_t)mb * Kp;
                if (m1 - mb >= 32) {
                    block32(h, l, sa, Kp, pb, KC);
                    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
                    _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
                    epilogue(c, 32, y, M, N, mb, nb * 32, b, accumulate);
                } else {
                    block16(h, l, sa, pb, KC);
                    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128);
                    epilogue(c, 16, y, M, N, mb, nb * 32, b, accumulate);
                }
            }
        }
    }
    _tile_release();
    #pragma omp barrier
}
#else
int x3_available(void) { return 0; }

void x3_rows(const float *x, const uint16_t *p, const float *b, float *y, int M, int N, int K, int accumulate,
             uint16_t *a) {
    (void)x; (void)p; (void)b; (void)y; (void)M; (void)N; (void)K; (void)accumulate; (void)a;
}
#endif

void x3_linear(const float *x, const uint16_t *p, const float *b, float *y, int M, int N, int K, int nthreads) {
    uint16_t *a = aligned_alloc(64, (size_t)x3_scratch_elems(M, K) * 2);
    if (a == NULL) abort();
    #pragma omp parallel num_threads(nthreads)
    x3_rows(x, p, b, y, M, N, K, 0, a);
    free(a);
}
