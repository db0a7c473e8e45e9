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
 * Where a plane has two tiles' worth of outputs left, fc_tile2 computes both at once with 16
 * accumulators: 8 accumulators barely cover the FMA latency on a core that issues two vector FMAs
 * per cycle (Intel Xeon, 2 x 512 bits), and the pair halves the broadcasts per FMA (float32
 * forward passes on such a core: mnist-c2 9-13%, pw-1x1 7%, resnet-stem 5% faster).
 *
 * The weight gradient's tile (fc_wtile) holds FC_WJ x FC_WQ = 4 x 6 (output channel, tap) pairs,
 * each as FC_WV partial sums over the flat outputs: per FC_WV outputs it loads FC_WQ input
 * vectors and FC_WJ output-gradient vectors for FC_WJ * FC_WQ vector FMAs (24 accumulators
 * and 10 loads; the 4 x 2 x 16 tile it replaced needed 12 loads for 16 FMAs and ran 1.5-2x
 * slower).
 *
 * FC_TILE(T, SUFFIX) defines fc_tile_SUFFIX and fc_wtile_SUFFIX for element type T (float: f,
 * double: d).
 */
#ifndef FASTCONV_TILE_H
#define FASTCONV_TILE_H

#include <stddef.h>

#define FC_KBLOCK 8
#define FC_VBLOCK 16
/* the weight gradient's tile: FC_WJ output channels by FC_WQ taps ... */
#define FC_WJ 4
#define FC_WQ 6
/* ... and FC_WV partial sums (lanes) per (channel, tap) pair */
#define FC_WV 8

#define FC_TILE(T, SUFFIX)                                                                      \
    /* FC_VBLOCK elements of T, aligned only as T (loads and stores may be unaligned) */       \
    typedef T fc_vec_##SUFFIX __attribute__((vector_size(FC_VBLOCK * sizeof(T)), aligned(sizeof(T)))); \
    typedef T fc_wvec_##SUFFIX __attribute__((vector_size(FC_WV * sizeof(T)), aligned(sizeof(T)))); \
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
    /* the same for 2*FC_VBLOCK outputs: two vectors per channel, 16 accumulators, so that two   \
     * loads and 8 broadcasts feed 16 FMAs (float; for double the 16 would not fit a register   \
     * file) */                                                                                 \
    static inline void fc_tile2_##SUFFIX(const T *xs, const T *wt, const ptrdiff_t *offs,     \
                                         ptrdiff_t taps, const T *b, T *out, ptrdiff_t ldo,    \
                                         ptrdiff_t nk)                                         \
    {                                                                                           \
        typedef fc_vec_##SUFFIX V;                                                              \
        V p0 = b[0] + (V){0}, q0 = p0, p1 = b[1] + (V){0}, q1 = p1, p2 = b[2] + (V){0}, q2 = p2, \
          p3 = b[3] + (V){0}, q3 = p3, p4 = b[4] + (V){0}, q4 = p4, p5 = b[5] + (V){0}, q5 = p5, \
          p6 = b[6] + (V){0}, q6 = p6, p7 = b[7] + (V){0}, q7 = p7;                             \
        for (ptrdiff_t t = 0; t < taps; t++) {                                                  \
            const V x = *(const V *)(xs + offs[t]), y = *(const V *)(xs + offs[t] + FC_VBLOCK); \
            const T *w = wt + t * FC_KBLOCK;                                                    \
            p0 += x * w[0]; q0 += y * w[0]; p1 += x * w[1]; q1 += y * w[1];                     \
            p2 += x * w[2]; q2 += y * w[2]; p3 += x * w[3]; q3 += y * w[3];                     \
            p4 += x * w[4]; q4 += y * w[4]; p5 += x * w[5]; q5 += y * w[5];                     \
            p6 += x * w[6]; q6 += y * w[6]; p7 += x * w[7]; q7 += y * w[7];                     \
        }                                                                                       \
        const V acc[2 * FC_KBLOCK] = {p0, q0, p1, q1, p2, q2, p3, q3, p4, q4, p5, q5, p6, q6, p7, q7}; \
        for (ptrdiff_t j = 0; j < nk; j++) {                                                    \
            *(V *)(out + j * ldo) = acc[2 * j];                                                 \
            *(V *)(out + j * ldo + FC_VBLOCK) = acc[2 * j + 1];                                 \
        }                                                                                       \
    }                                                                                           \
                                                                                                \
    /* acc[(j*FC_WQ + q)*FC_WV + v] += sum over images i < nimg and flat outputs f < steps *      \
     * FC_WV, f = v mod FC_WV, of g[i*gstride + j*ldg + f] * xs[i*xstride + offs[q] + f]: 24      \
     * accumulators (ymm for float), so that 4 + 6 vector loads feed 24 vector FMAs */            \
    static inline void fc_wtile_##SUFFIX(const T *xs, ptrdiff_t xstride, const ptrdiff_t *offs,  \
                                         const T *g, ptrdiff_t gstride, ptrdiff_t ldg,         \
                                         ptrdiff_t steps, ptrdiff_t nimg, T *acc)              \
    {                                                                                           \
        typedef fc_wvec_##SUFFIX V;                                                             \
        V *a = (V *)acc;                                                                        \
        FC_WROW(V, a, 0) FC_WROW(V, a, 1) FC_WROW(V, a, 2) FC_WROW(V, a, 3)                     \
        for (ptrdiff_t i = 0; i < nimg; i++) {                                                  \
            const T *x = xs + i * xstride, *g0 = g + i * gstride, *g1 = g0 + ldg;               \
            const T *g2 = g1 + ldg, *g3 = g2 + ldg;                                             \
            const T *x0 = x + offs[0], *x1 = x + offs[1], *x2 = x + offs[2];                    \
            const T *x3 = x + offs[3], *x4 = x + offs[4], *x5 = x + offs[5];                    \
            for (ptrdiff_t f = 0; f < steps * FC_WV; f += FC_WV) {                              \
                const V y0 = *(const V *)(g0 + f), y1 = *(const V *)(g1 + f);                   \
                const V y2 = *(const V *)(g2 + f), y3 = *(const V *)(g3 + f);                   \
                FC_WTAP(V, SUFFIX, 0, x0) FC_WTAP(V, SUFFIX, 1, x1) FC_WTAP(V, SUFFIX, 2, x2)   \
                FC_WTAP(V, SUFFIX, 3, x3) FC_WTAP(V, SUFFIX, 4, x4) FC_WTAP(V, SUFFIX, 5, x5)   \
            }                                                                                   \
        }                                                                                       \
        FC_WSTORE(a, 0) FC_WSTORE(a, 1) FC_WSTORE(a, 2) FC_WSTORE(a, 3)                         \
    }

/* FC_KEEP_f / FC_KEEP_d keep a loaded vector of the weight tile (8 floats: 32 bytes, 8 doubles:
 * 64 bytes) in a register: left alone, GCC folds the load into each of the four FMAs that use
 * it (four loads instead of one, and the tile becomes load-bound).  Only where such a vector
 * fits one x86 register (AVX, AVX-512); elsewhere the asm constraint cannot be met, and they
 * do nothing. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)
#define FC_KEEP_f(v) __asm__("" : "+v"(v))
#else
#define FC_KEEP_f(v) ((void)0)
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX512F__)
#define FC_KEEP_d(v) __asm__("" : "+v"(v))
#else
#define FC_KEEP_d(v) ((void)0)
#endif
/* the weight tile's accumulators a<j><q> for one output channel j, loaded from / stored to a */
#define FC_WROW(V, src, j)                                                                      \
    V a##j##0 = src[j * FC_WQ + 0], a##j##1 = src[j * FC_WQ + 1], a##j##2 = src[j * FC_WQ + 2], \
      a##j##3 = src[j * FC_WQ + 3], a##j##4 = src[j * FC_WQ + 4], a##j##5 = src[j * FC_WQ + 5];
#define FC_WSTORE(dst, j)                                                                       \
    dst[j * FC_WQ + 0] = a##j##0; dst[j * FC_WQ + 1] = a##j##1; dst[j * FC_WQ + 2] = a##j##2;   \
    dst[j * FC_WQ + 3] = a##j##3; dst[j * FC_WQ + 4] = a##j##4; dst[j * FC_WQ + 5] = a##j##5;
/* tap q of the weight tile: one input vector, four FMAs (one per output channel) */
#define FC_WTAP(V, SUFFIX, q, xq)                                                               \
    { V u = *(const V *)(xq + f); FC_KEEP_##SUFFIX(u);                                          \
      a0##q += y0 * u; a1##q += y1 * u; a2##q += y2 * u; a3##q += y3 * u; }

FC_TILE(float, f)
FC_TILE(double, d)

#endif
