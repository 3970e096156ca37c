/* What matvec.c offers the other kernels (block.c): products without the call lock, and the lock. */
#ifndef GF_MATVEC_H
#define GF_MATVEC_H

#define GF_ABI 2
enum { F32 = 0, BF16 = 1, Q8 = 2 };

/* y (M, N) = x (M, K) W^T + b; W packed as `kind` (see matvec.c). The caller holds gf_lock(). Returns -1
 * when there is no memory for the int8 activations. */
int gf_product(int kind, const float *x, const void *w, const float *sw, const float *b, float *y, int M, int N, int K);
void gf_lock(void);    /* one product (or block step) at a time: they share the thread pool and scratch */
void gf_unlock(void);

#endif
