/* float32 products as three bfloat16 products on AMX tiles (amx_bf16x3.c). */
#ifndef AMX_BF16X3_H
#define AMX_BF16X3_H
#include <stdint.h>

#define X3_MIN_M 16 /* fewer token rows read the float32 panels instead (a weight stream either way) */

int x3_available(void);
int x3_min_rows(void); /* X3_MIN_M, for the Python side */
int64_t x3_packed_elems(int N, int K);
void x3_pack(const float *w, uint16_t *p, int N, int K, int nthreads);
int64_t x3_scratch_elems(int M, int K);
/* inside a parallel region (every thread calls it): y [M, N] (+)= x [M, K] W^T (+ b); a: x3_scratch_elems */
void x3_rows(const float *x, const uint16_t *p, const float *b, float *y, int M, int N, int K, int accumulate,
             uint16_t *a);
void x3_linear(const float *x, const uint16_t *p, const float *b, float *y, int M, int N, int K, int nthreads);
#endif
