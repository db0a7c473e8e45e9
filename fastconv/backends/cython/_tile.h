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
 * The weight gradient's tile (fc_wtile) holds FC_WJ x FC_WQ (output channel, tap) pairs, each
 * as FC_VBLOCK partial sums over the flat outputs: per FC_VBLOCK outputs it loads FC_WQ input
 * vectors and FC_WJ output-gradient vectors for FC_WJ * FC_WQ vector FMAs.
 *
 * FC_TILE(T, SUFFIX) defines fc_tile_SUFFIX and fc_wtile_SUFFIX for element type T (float: f,
 * double: d).
 */
#ifndef FASTCONV_TILE_H
#define FASTCONV_TILE_H

#include <stddef.h>

#define FC_KBLOCK 8
#define FC_VBLOCK 16
#define FC_HALF (FC_VBLOCK / 2)
/* the weight gradient's tile: FC_WJ output channels by FC_WQ taps, each FC_VBLOCK partial sums */
#define FC_WJ 4
#define FC_WQ 2

#define FC_TILE(T, SUFFIX)                                                                      \
    /* FC_VBLOCK elements of T, aligned only as T (loads and stores may be unaligned) */       \
    typedef T fc_vec_##SUFFIX __attribute__((vector_size(FC_VBLOCK * sizeof(T)), aligned(sizeof(T)))); \
    typedef T fc_half_##SUFFIX __attribute__((vector_size(FC_HALF * sizeof(T)), aligned(sizeof(T)))); \
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
    }                                                                                           \
                                                                                                \
    /* acc[(j*FC_WQ + q)*FC_VBLOCK + v] += sum over images i < nimg and flat outputs f < tiles *  \
     * FC_VBLOCK, f = v mod FC_VBLOCK, of g[i*gstride + j*ldg + f] * xs[i*xstride + offs[q] + f]:   \
     * 16 half-tile accumulators (ymm for float: full 64-byte vectors here made every unaligned     \
     * input load split a cache line, and ran at half the speed) */                                \
    static inline void fc_wtile_##SUFFIX(const T *xs, ptrdiff_t xstride, const ptrdiff_t *offs,  \
                                         const T *g, ptrdiff_t gstride, ptrdiff_t ldg,         \
                                         ptrdiff_t tiles, ptrdiff_t nimg, T *acc)              \
    {                                                                                           \
        typedef fc_half_##SUFFIX V;                                                             \
        V *a = (V *)acc;                                                                        \
        V a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], a4 = a[4], a5 = a[5], a6 = a[6], a7 = a[7], \
          a8 = a[8], a9 = a[9], a10 = a[10], a11 = a[11], a12 = a[12], a13 = a[13], a14 = a[14], \
          a15 = a[15];                                                                          \
        for (ptrdiff_t i = 0; i < nimg; i++) {                                                  \
            const T *x0 = xs + i * xstride + offs[0], *x1 = xs + i * xstride + offs[1];         \
            const T *g0 = g + i * gstride, *g1 = g0 + ldg, *g2 = g1 + ldg, *g3 = g2 + ldg;     \
            for (ptrdiff_t f = 0; f < tiles * FC_VBLOCK; f += FC_VBLOCK) {                      \
                const V u = *(const V *)(x0 + f), uh = *(const V *)(x0 + f + FC_HALF);          \
                const V w = *(const V *)(x1 + f), wh = *(const V *)(x1 + f + FC_HALF);          \
                V y = *(const V *)(g0 + f), yh = *(const V *)(g0 + f + FC_HALF);                \
                a0 += y * u; a1 += yh * uh; a2 += y * w; a3 += yh * wh;                         \
                y = *(const V *)(g1 + f); yh = *(const V *)(g1 + f + FC_HALF);                  \
                a4 += y * u; a5 += yh * uh; a6 += y * w; a7 += yh * wh;                         \
                y = *(const V *)(g2 + f); yh = *(const V *)(g2 + f + FC_HALF);                  \
                a8 += y * u; a9 += yh * uh; a10 += y * w; a11 += yh * wh;                       \
                y = *(const V *)(g3 + f); yh = *(const V *)(g3 + f + FC_HALF);                  \
                a12 += y * u; a13 += yh * uh; a14 += y * w; a15 += yh * wh;                     \
            }                                                                                   \
        }                                                                                       \
        a[0] = a0; a[1] = a1; a[2] = a2; a[3] = a3; a[4] = a4; a[5] = a5; a[6] = a6; a[7] = a7; \
        a[8] = a8; a[9] = a9; a[10] = a10; a[11] = a11; a[12] = a12; a[13] = a13; a[14] = a14;  \
        a[15] = a15;                                                                            \
    }

FC_TILE(float, f)
FC_TILE(double, d)

#endif
