/* Register tiles of the channel-blocked direct convolution (``_direct.pyx``, "channel-blocked").
 *
 * One tile is FC_KBLOCK output channels by FC_VBLOCK consecutive flat outputs.  It is written
 * with GCC / Clang vector extensions rather than left to the auto-vectoriser, which turned
 * the 8 x 16 accumulator array into shuffles instead of keeping it in registers: here each
 * output channel's FC_VBLOCK sums are one vector variable, and every tap costs one vector
 * load of the input, FC_KBLOCK broadcast weights and FC_KBLOCK vector FMAs.  The compiler
 * splits the vectors into whatever registers the target has (two ymm or one zmm for float,
 * on AVX-512 machines), so the code is portable; only the speed depends on the target.
 *
 * FC_TILE(T, SUFFIX) defines fc_tile_SUFFIX for element type T (float: f, double: d).
 */
#ifndef FASTCONV_TILE_H
#define FASTCONV_TILE_H

#include <stddef.h>

#define FC_KBLOCK 8
#define FC_VBLOCK 16

#define FC_TILE(T, SUFFIX)                                                                      \
    /* FC_VBLOCK elements of T, aligned only as T (loads and stores may be unaligned) */       \
    typedef T fc_vec_##SUFFIX __attribute__((vector_size(FC_VBLOCK * sizeof(T)), aligned(sizeof(T)))); \
                                                                                                \
    /* out[j*ldo + v] = b[j] + sum_t wt[t*FC_KBLOCK + j] * xs[offs[t] + v], v < FC_VBLOCK, j < nk */ \
    static inline void fc_tile_##SUFFIX(const T *xs, const T *wt, const ptrdiff_t *offs,      \
                                        ptrdiff_t taps, const T *b, T *out, ptrdiff_t ldo,     \
                                        ptrdiff_t nk)                                          \
    {                                                                                           \
        fc_vec_##SUFFIX acc0 = b[0] + (fc_vec_##SUFFIX){0}, acc1 = b[1] + (fc_vec_##SUFFIX){0}, \
                        acc2 = b[2] + (fc_vec_##SUFFIX){0}, acc3 = b[3] + (fc_vec_##SUFFIX){0}, \
                        acc4 = b[4] + (fc_vec_##SUFFIX){0}, acc5 = b[5] + (fc_vec_##SUFFIX){0}, \
                        acc6 = b[6] + (fc_vec_##SUFFIX){0}, acc7 = b[7] + (fc_vec_##SUFFIX){0}; \
        for (ptrdiff_t t = 0; t < taps; t++) {                                                  \
            const fc_vec_##SUFFIX x = *(const fc_vec_##SUFFIX *)(xs + offs[t]);                 \
            const T *w = wt + t * FC_KBLOCK;                                                    \
            acc0 += x * w[0]; acc1 += x * w[1]; acc2 += x * w[2]; acc3 += x * w[3];             \
            acc4 += x * w[4]; acc5 += x * w[5]; acc6 += x * w[6]; acc7 += x * w[7];             \
        }                                                                                       \
        const fc_vec_##SUFFIX acc[FC_KBLOCK] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7}; \
        for (ptrdiff_t j = 0; j < nk; j++)                                                      \
            *(fc_vec_##SUFFIX *)(out + j * ldo) = acc[j];                                       \
    }

FC_TILE(float, f)
FC_TILE(double, d)

#endif
