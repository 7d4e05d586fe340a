/* Greedy tokens from the LM head without every float32 logit (greedy_head.c). */
#ifndef GREEDY_HEAD_H
#define GREEDY_HEAD_H
#include <stdint.h>

/* cpu_kernels.c: y [M, 16 n] = x [M, K] against panels idx[0..n) of panel_linear's packed weight p, each
 * output computed as panel_linear computes it for M rows (bit for bit) */
void panel_columns(const float *x, const float *p, int M, int K, const int32_t *idx, int n, float *y, int nthreads);

int gh_available(void);
int64_t gh_packed_bytes(int V, int K);
int64_t gh_meta_floats(int V, int K);
/* the screen's copy of panel_linear's packed [V, K] weight: q (gh_packed_bytes), meta (gh_meta_floats);
 * returns how many weights are not finite (the copy is then unusable) */
int gh_pack(const float *panels, int V, int K, uint8_t *q, float *meta, int nthreads);
/* tokens[m] = argmax over v of panel_linear's x[m] . W[v] (first index on ties), or a non-zero return when the
 * screen could not narrow it down to max_panels panels (1) or met a non-finite value (2): the caller then
 * takes every logit */
int gh_greedy(const float *x, int M, int K, int V, const float *panels, const uint8_t *q, const float *meta,
              int max_panels, int64_t *tokens, int nthreads);
#endif
