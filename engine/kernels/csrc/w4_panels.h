/* W4A16 products on CPU (w4_panels.c). */
#ifndef W4_PANELS_H
#define W4_PANELS_H
#include <stdint.h>

int w4_available(void); /* the kernels' vector width: 512, 256 (AVX2), or 0 (none built) */
int w4_block(void);
/* y [M, N] (+)= x [M, K] W^T (+ b) over the packed codes p and (scale, min) pairs sm; an orphaned omp-for:
 * call it inside a parallel region (every thread of the team) */
void w4_rows(const float *x, const uint8_t *p, const float *sm, const float *b, float *y, int M, int N, int K,
             int group, int accumulate);
/* the same in a parallel region of its own */
void w4_linear(const float *x, const uint8_t *p, const float *sm, const float *b, float *y, int M, int N, int K,
               int group, int nthreads);
#endif
