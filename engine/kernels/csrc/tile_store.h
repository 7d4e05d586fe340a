/* The end of a register tile of float32 products (panel_tile in cpu_kernels.c, the 4-bit kernels in
 * w4_panels.c): y[m, 16 v + j] = acc[m * stride + v][j] + b[16 v + j] (+ y[m, 16 v + j] when accumulate), for
 * the tile's first ncols outputs; masked stores past them. AVX-512 builds only. */
#ifndef TILE_STORE_H
#define TILE_STORE_H
#if defined(__AVX512F__)
#include <immintrin.h>
#include <stdint.h>

static inline __attribute__((always_inline)) void tile_store(const __m512 *acc, int stride, int MR, int NV,
                                                             const float *b, float *y, int64_t ldy, int ncols,
                                                             int accumulate) {
    for (int v = 0; v < NV; v++) {
        const int left = ncols - 16 * v;
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 bv = b ? _mm512_maskz_loadu_ps(mk, b + 16 * v) : _mm512_setzero_ps();
        for (int m = 0; m < MR; m++) {
            float *yr = y + (int64_t)m * ldy + 16 * v;
            __m512 r = _mm512_add_ps(acc[m * stride + v], bv);
            if (accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mk, yr));
            _mm512_mask_storeu_ps(yr, mk, r);
        }
    }
}
#endif
#endif
