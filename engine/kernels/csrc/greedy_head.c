/* Greedy tokens from the LM head without computing every float32 logit.
 *
 * A greedy step only needs each row's argmax. A screen over an int8 copy of the head (a scale per 32 weights
 * of a row; the hidden state rounded to int8 with a scale per 32 of its elements; AVX-512 VNNI u8 x s8 dot
 * products: four times float32's multiply-adds per instruction, a quarter of the bytes) gives every logit an
 * estimate a and a bound B on |float32 logit - a|. The largest a - B is a floor under the row's largest
 * logit, so only entries whose a + B reaches it can be the argmax. Their panels are then computed as
 * panel_linear computes them (panel_columns, the same arithmetic bit for bit) and the argmax is taken over
 * them, first index on ties as torch.argmax: the token the full head gives.
 *
 * The bound, group by group (32 k): with x = sx hx + dx and w = sw qw + dw, hx and qw integers,
 *     x.w - sx sw (hx.qw) = x.dw + sw (dx.qw),  |x.dw| <= err |x|_1,  |sw dx.qw| <= dx |sw qw|_1,
 * err and dx the largest rounding errors of the group's w and x, measured (about sw / 2 and sx / 2; nil for a
 * head that is int8 on such groups already). float32's own rounding of x.w adds at most K 2^-24 sum|x w|,
 * the estimate's about (groups + 3) 2^-24 sum|x w|; the code takes each term with a margin. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "greedy_head.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define GH_MR 4  /* token rows per tile (gh_greedy's switch has the cases up to 4) */
#define GH_NV 2  /* panels (16 vocabulary rows each) per tile (GH_ROW's cases: 1 and 2) */
#define GH_GQ 8  /* k quads per group: one scale per 32 weights of a row, and per 32 elements of x */
#define GH_GK (GH_GQ * 4)

int gh_available(void) { return 1; }

static inline int gh_groups(int K) { return ((K + 3) / 4 + GH_GQ - 1) / GH_GQ; }

int64_t gh_packed_bytes(int V, int K) { return (int64_t)((V + 15) / 16) * gh_groups(K) * GH_GQ * 64; }

int64_t gh_meta_floats(int V, int K) { return (int64_t)((V + 15) / 16) * (gh_groups(K) * 48 + 16); }

typedef struct {
    float scale, absmax;
    double err;  /* the largest |value - scale v| */
    int bad;     /* values that are not finite */
} gh_group;

/* One group of GH_GK values, `stride` apart, rounded to int8 on its own scale (max |value| / 127; 1 for all
 * zeros): v[i] = round(value / scale) within +-127; positions from `valid` on are zeros. */
static gh_group gh_round(const float *src, int64_t stride, int valid, int v[GH_GK]) {
    gh_group g = {1.f, 0.f, 0., 0};
    for (int i = 0; i < valid; i++) {
        const float a = fabsf(src[i * stride]);
        g.bad += !isfinite(a);
        g.absmax = fmaxf(g.absmax, a);
    }
    if (g.absmax > 0.f) g.scale = g.absmax / 127.f;
    for (int i = 0; i < GH_GK; i++) {
        int q = 0;
        if (i < valid) {
            const float w = src[i * stride];
            q = (int)lrintf(w / g.scale);
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            g.err = fmax(g.err, fabs((double)w - (double)g.scale * q));
        }
        v[i] = q;
    }
    return g;
}

/* values of group g of a K-long vector that lie inside it */
static inline int gh_valid(int K, int g) {
    const int n = K - g * GH_GK;
    return n < 0 ? 0 : n < GH_GK ? n : GH_GK;
}

/* q: per panel of 16 rows, per 4 k, the 16 rows' 4 values as u8 (int8 + 128: vpdpbusd's unsigned operand);
 * meta: per panel, per group of 32 k, the 16 rows' scale, largest rounding error and L1 norm of the scaled
 * int8 values; then the 16 rows' largest |w| */
int gh_pack(const float *panels, int V, int K, uint8_t *q, float *meta, int nthreads) {
    const int NP = (V + 15) / 16, NG = gh_groups(K), KQ = NG * GH_GQ;  /* padded to whole groups */
    int bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int pi = 0; pi < NP; pi++) {
        const float *p = panels + (int64_t)pi * K * 16;
        uint8_t *qp = q + (int64_t)pi * KQ * 64;
        float *mp = meta + (int64_t)pi * (NG * 48 + 16);
        for (int c = 0; c < 16; c++) {
            float wmax = 0.f;
            for (int g = 0; g < NG; g++) {
                int v[GH_GK];
                const gh_group r = gh_round(p + (int64_t)g * GH_GK * 16 + c, 16, gh_valid(K, g), v);
                double l1 = 0.;
                for (int i = 0; i < GH_GK; i++) {
                    const int k = g * GH_GK + i;
                    qp[(int64_t)(k / 4) * 64 + c * 4 + k % 4] = (uint8_t)(v[i] + 128);
                    l1 += fabs((double)r.scale * v[i]);
                }
                bad += r.bad;
                mp[g * 48 + c] = r.scale;
                mp[g * 48 + 16 + c] = (float)(r.err * (1 + 1e-6));  /* rounded up past float's own rounding */
                mp[g * 48 + 32 + c] = (float)(l1 * (1 + 1e-6));
                wmax = fmaxf(wmax, r.absmax);
            }
            mp[NG * 48 + c] = wmax;
        }
    }
    return bad;
}

/* estimates and error bounds of MR x NV tiles of logits, over all K, group by group:
 *   a += (sum over the group of q x8 - 128 sum x8) sx sw,   b += err |x|_1 + dx l1   (per group)
 * xb: the row block's int8 quads [KQ][GH_MR]; xs: its per-group sx, |x|_1 and dx [NG][3][GH_MR]; xc: 128 times
 * its per-group int8 sums [NG][GH_MR] (rows past MR are zeros) */
static inline __attribute__((always_inline)) void gh_tile(const uint32_t *xb, const float *xs, const int32_t *xc,
                                                          int NG, const uint8_t *q, int64_t ps, const float *meta,
                                                          int64_t ms, __m512 a[GH_MR][GH_NV],
                                                          __m512 b[GH_MR][GH_NV], const int MR, const int NV) {
    const uint8_t *qv[GH_NV];
    const float *mv[GH_NV];
    for (int v = 0; v < NV; v++) {
        qv[v] = q + v * ps;
        mv[v] = meta + v * ms;
    }
    for (int m = 0; m < MR; m++)
        for (int v = 0; v < NV; v++) a[m][v] = b[m][v] = _mm512_setzero_ps();
    for (int g = 0; g < NG; g++) {
        __m512i acc[GH_MR][GH_NV];
        for (int m = 0; m < MR; m++)
            for (int v = 0; v < NV; v++) acc[m][v] = _mm512_setzero_si512();
        #pragma GCC unroll 8
        for (int j = 0; j < GH_GQ; j++) {
            __m512i w[GH_NV];
            for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512((const void *)(qv[v] + j * 64));
            for (int m = 0; m < MR; m++) {
                const __m512i xv = _mm512_set1_epi32((int)xb[j * GH_MR + m]);
                for (int v = 0; v < NV; v++) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], w[v], xv);
            }
        }
        xb += GH_GQ * GH_MR;
        for (int v = 0; v < NV; v++) {
            qv[v] += GH_GQ * 64;
            const __m512 sw = _mm512_loadu_ps(mv[v]), err = _mm512_loadu_ps(mv[v] + 16);
            const __m512 l1 = _mm512_loadu_ps(mv[v] + 32);
            mv[v] += 48;
            for (int m = 0; m < MR; m++) {
                const __m512i d = _mm512_sub_epi32(acc[m][v], _mm512_set1_epi32(xc[m]));
                a[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sw, _mm512_set1_ps(xs[m])), a[m][v]);
                b[m][v] = _mm512_fmadd_ps(err, _mm512_set1_ps(xs[GH_MR + m]),
                                          _mm512_fmadd_ps(l1, _mm512_set1_ps(xs[2 * GH_MR + m]), b[m][v]));
            }
        }
        xs += 3 * GH_MR;
        xc += GH_MR;
    }
}

#define GH_CASE(R, N) case (R) * 4 + (N): \
    gh_tile(xw + (int64_t)(m0 / GH_MR) * KQ * GH_MR, xs + (int64_t)(m0 / GH_MR) * NG * 3 * GH_MR, \
            xc + (int64_t)(m0 / GH_MR) * NG * GH_MR, NG, q + p0 * ps, ps, meta + p0 * ms, ms, a, b, R, N); break;
#define GH_ROW(R) GH_CASE(R, 1) GH_CASE(R, 2)

typedef struct {      /* what a thread keeps of one row: entries whose a + B reached the floor so far */
    int32_t *idx;
    float *up;
    int n;
    float floor;      /* the largest a - B it has seen */
} gh_list;

/* the bounds of a tile's outputs; raise the floors; keep the entries that reach them */
static void gh_keep(__m512 a[GH_MR][GH_NV], __m512 b[GH_MR][GH_NV], int mr, int nv, int p0, int m0, int V,
                    const float *meta, int64_t ms, int NG, const float *c3, gh_list *rows) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int v = 0; v < nv; v++) {
        const int vb = (p0 + v) * 16;
        const __mmask16 valid = vb + 16 <= V ? (__mmask16)0xFFFF : (__mmask16)((1u << (V - vb)) - 1);
        const __m512 wmax = _mm512_loadu_ps(meta + v * ms + NG * 48);
        for (int m = 0; m < mr; m++) {
            gh_list *r = rows + m0 + m;
            __m512 bound = _mm512_fmadd_ps(wmax, _mm512_set1_ps(c3[m0 + m]), _mm512_mul_ps(b[m][v], _mm512_set1_ps(1.001f)));
            bound = _mm512_fmadd_ps(_mm512_abs_ps(a[m][v]), _mm512_set1_ps(1e-6f), bound);
            const float lo = _mm512_mask_reduce_max_ps(valid, _mm512_sub_ps(a[m][v], bound));
            if (lo > r->floor) r->floor = lo;
            const __m512 up = _mm512_add_ps(a[m][v], bound);
            const __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, up, _mm512_set1_ps(r->floor), _CMP_GE_OQ);
            if (keep) {
                _mm512_mask_compressstoreu_epi32(r->idx + r->n, keep, _mm512_add_epi32(_mm512_set1_epi32(vb), iota));
                _mm512_mask_compressstoreu_ps(r->up + r->n, keep, up);
                r->n += __builtin_popcount((unsigned)keep);
            }
        }
    }
}

/* x's rows quantized group by group, in blocks of GH_MR rows (gh_tile's layouts; zeroed buffers, so rows past
 * M stay zero): int8 four to a word (zero past K), and per group its scale, |x|_1 and largest rounding error
 * (xs), 128 times its int8 sum (xc); c3: the bound's rounding term per row, per |w|max. Returns 2 for a
 * non-finite x. */
static int gh_rows(const float *x, int M, int K, int KQ, int NG, uint32_t *xw, float *xs, int32_t *xc, float *c3) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (int64_t)m * K;
        const int64_t blk = m / GH_MR, r = m % GH_MR;
        int8_t *u = (int8_t *)(xw + blk * KQ * GH_MR);
        float *xsb = xs + blk * NG * 3 * GH_MR + r;
        int32_t *xcb = xc + blk * NG * GH_MR + r;
        double n1 = 0., dmax = 0.;
        for (int g = 0; g < NG; g++) {
            int v[GH_GK];
            const int valid = gh_valid(K, g);
            const gh_group q = gh_round(xr + g * GH_GK, 1, valid, v);
            if (q.bad) return 2;
            double l1 = 0.;
            int32_t sum = 0;
            for (int i = 0; i < GH_GK; i++) {
                const int k = g * GH_GK + i;
                if (i < valid) l1 += fabsf(xr[k]);
                u[((int64_t)(k / 4) * GH_MR + r) * 4 + k % 4] = (int8_t)v[i];
                sum += v[i];
            }
            xsb[(int64_t)g * 3 * GH_MR] = q.scale;
            xsb[((int64_t)g * 3 + 1) * GH_MR] = (float)(l1 * (1 + 1e-6));
            xsb[((int64_t)g * 3 + 2) * GH_MR] = (float)(q.err * (1 + 1e-6));
            xcb[(int64_t)g * GH_MR] = 128 * sum;
            n1 += l1;
            dmax = fmax(dmax, q.err);
        }
        /* float32's rounding: of x.w, K 2^-24 sum |x w|; of the estimate's NG group terms and their sum,
         * about (NG + 3) 2^-24 sum |x~ w~|; both at most (|x|_1 + K dx) |w|max (with margins) */
        c3[m] = (float)((K + NG + 3) * 1.2e-7 * (n1 + K * dmax) * 1.01);
    }
    return 0;
}

int gh_greedy(const float *x, int M, int K, int V, const float *panels, const uint8_t *q, const float *meta,
              int max_panels, int64_t *tokens, int nthreads) {
    const int NP = (V + 15) / 16, NG = gh_groups(K), KQ = NG * GH_GQ, ntile = (NP + GH_NV - 1) / GH_NV;
    const int64_t ps = (int64_t)KQ * 64, ms = (int64_t)NG * 48 + 16;
    if (nthreads < 1) nthreads = 1;
    const size_t MB = (size_t)(M + GH_MR - 1) / GH_MR * GH_MR;  /* rows in whole blocks */
    uint32_t *xw = calloc(MB * KQ, sizeof(uint32_t));
    float *xs = calloc(MB * NG * 3 + M, sizeof(float)), *c3 = xs + MB * NG * 3;
    int32_t *xc = calloc(MB * NG, sizeof(int32_t));
    int rc = gh_rows(x, M, K, KQ, NG, xw, xs, xc, c3);
    if (rc) {
        free(xw); free(xs); free(xc);
        return rc;
    }
    const int cap = (ntile + nthreads - 1) / nthreads * GH_NV * 16;  /* a thread's share of the entries */
    gh_list *lists = calloc((size_t)nthreads * M, sizeof(gh_list));
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)nthreads * M * cap);
    float *ups = malloc(sizeof(float) * (size_t)nthreads * M * cap);
    uint8_t *mark = calloc((size_t)NP, 1);
    int bad = 0;
    #pragma omp parallel num_threads(nthreads) reduction(|:bad)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        gh_list *rows = lists + (int64_t)t * M;
        for (int m = 0; m < M; m++) {
            rows[m].idx = idx + ((int64_t)t * M + m) * cap;
            rows[m].up = ups + ((int64_t)t * M + m) * cap;
            rows[m].floor = -INFINITY;
        }
        const int t0 = (int)((int64_t)ntile * t / nt), t1 = (int)((int64_t)ntile * (t + 1) / nt);
        for (int tile = t0; tile < t1; tile++) {
            const int p0 = tile * GH_NV, nv = NP - p0 < GH_NV ? NP - p0 : GH_NV;
            for (int m0 = 0; m0 < M; m0 += GH_MR) {
                const int mr = M - m0 < GH_MR ? M - m0 : GH_MR;
                __m512 a[GH_MR][GH_NV], b[GH_MR][GH_NV];
                switch (mr * 4 + nv) {
                    GH_ROW(1) GH_ROW(2) GH_ROW(3) GH_ROW(4)
                }
                gh_keep(a, b, mr, nv, p0, m0, V, meta + p0 * ms, ms, NG, c3, rows);
            }
        }
        #pragma omp barrier
        /* each row's floor over all threads; what stays below it cannot be the argmax */
        for (int m = 0; m < M; m++) {
            float floor = -INFINITY;
            for (int u = 0; u < nt; u++) floor = fmaxf(floor, lists[(int64_t)u * M + m].floor);
            bad |= !isfinite(floor);
            gh_list *r = rows + m;
            int j = 0;
            for (int i = 0; i < r->n; i++)
                if (r->up[i] >= floor) {
                    r->idx[j++] = r->idx[i];
                    __atomic_store_n(&mark[r->idx[i] / 16], 1, __ATOMIC_RELAXED);
                }
            r->n = j;
        }
    }
    int n = 0;
    int32_t *pidx = malloc(sizeof(int32_t) * 2 * (size_t)NP), *pos = pidx + NP;
    for (int pi = 0; pi < NP; pi++)
        if (mark[pi]) {
            pos[pi] = n;
            pidx[n++] = pi;
        }
    if (bad) {
        rc = 2;
    } else if (n > max_panels || n == 0) {
        rc = 1;
    } else {  /* the candidates' panels, exactly; the first largest of each row's candidates */
        const int64_t ldy = (int64_t)16 * n;
        float *y = aligned_alloc(64, ((size_t)M * ldy * 4 + 63) / 64 * 64);
        panel_columns(x, panels, M, K, pidx, n, y, nthreads);
        for (int m = 0; m < M; m++) {
            int64_t best_v = -1;
            float best = 0.f;
            for (int u = 0; u < nthreads; u++) {
                const gh_list *r = lists + (int64_t)u * M + m;
                for (int i = 0; i < r->n; i++) {
                    const int v = r->idx[i];
                    const float val = y[m * ldy + pos[v / 16] * 16 + v % 16];
                    if (best_v < 0 || val > best || (val == best && v < best_v)) {
                        best = val;
                        best_v = v;
                    }
                }
            }
            tokens[m] = best_v;
        }
        free(y);
    }
    free(pidx);
    free(mark);
    free(ups);
    free(idx);
    free(lists);
    free(xw);
    free(xs);
    free(xc);
    return rc;
}
#else
int gh_available(void) { return 0; }
int64_t gh_packed_bytes(int V, int K) { (void)V; (void)K; return 0; }
int64_t gh_meta_floats(int V, int K) { (void)V; (void)K; return 0; }
int gh_pack(const float *panels, int V, int K, uint8_t *q, float *meta, int nthreads) {
    (void)panels; (void)V; (void)K; (void)q; (void)meta; (void)nthreads;
    return -1;
}
int gh_greedy(const float *x, int M, int K, int V, const float *panels, const uint8_t *q, const float *meta,
              int max_panels, int64_t *tokens, int nthreads) {
    (void)x; (void)M; (void)K; (void)V; (void)panels; (void)q; (void)meta; (void)max_panels; (void)tokens;
    (void)nthreads;
    return 1;
}
#endif
