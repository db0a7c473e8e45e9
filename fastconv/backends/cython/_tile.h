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
 * Where a plane has three tiles' worth of outputs left, fc_tile3 computes them at once with 24
 * accumulators (fc_tile2 two, with 16): 8 accumulators barely cover the FMA latency on a core
 * that issues two vector FMAs per cycle (Intel Xeon, 2 x 512 bits), and side-by-side tiles share
 * the broadcast weights (float32 forward passes on such a core, pairs against single tiles:
 * mnist-c2 9-13%, pw-1x1 7%, resnet-stem 5% faster; triples against pairs, one thread: vgg-224
 * 1.16x, pw-1x1 1.08x and its input gradient 1.06x, resnet-stem 1.07x, mnist-c2 1.04x, the
 * small planes of stripe-c2 and mnist-c1 unchanged; two threads: vgg-224 1.14x, pw-1x1's input
 * gradient 1.07x, stripe-c2's 1.04x, the others within 2%).
 *
 * The weight gradient's tile (fc_wtile) holds FC_WJ x FC_WQ = 4 x 6 (output channel, tap) pairs,
 * each as FC_WV partial sums over the flat outputs: per FC_WV outputs it loads FC_WQ input
 * vectors and FC_WJ output-gradient vectors for FC_WJ * FC_WQ vector FMAs (24 accumulators
 * and 10 loads; the 4 x 2 x 16 tile it replaced needed 12 loads for 16 FMAs and ran 1.5-2x
 * slower).  Its float lanes are one ymm register; on a core with two 512-bit FMA units that
 * is half of its peak, which the large planes reached (resnet-stem: the tile loop ran at
 * 2 ymm FMAs per cycle).  fc_wtile_wide_f has one zmm of lanes for them (2-core Xeon:
 * resnet-stem's weight gradient on one thread 17.7 -> 12.4 ms, on two 8.5 -> 7.9-8.7, where the
 * two cores' caches then limit it; vgg-224's 8.0 -> 6.1-7.6 ms); on small planes, fewer steps per
 * call to amortise its 24 accumulators' loads and stores, it measured 5-11% slower (stripe-c2,
 * mnist-c1).
 *
 * FC_TILE(T, SUFFIX) defines fc_tile_SUFFIX for element type T (float: f, double: d), FC_TILE2
 * fc_tile2_SUFFIX, FC_TILE3 fc_tile3_SUFFIX, FC_WTILE(T, NAME, LANES, KEEP) a weight-gradient tile.
 */
#ifndef FASTCONV_TILE_H
#define FASTCONV_TILE_H

#include <stddef.h>

#define FC_KBLOCK 8
#define FC_VBLOCK 16
#define FC_TGROUP 3 /* tiles side by side where a plane has them (fc_tile3) */
/* the weight gradient's tile: FC_WJ output channels by FC_WQ taps ... */
#define FC_WJ 4
#define FC_WQ 6
/* ... and FC_WV partial sums (lanes) per (channel, tap) pair: one ymm register of float or
 * zmm of double; fc_wtile_wide_f has FC_WV_WIDE (one zmm of float), for large planes on AVX-512
 * machines (FC_WIDE_OK: whether it runs in one register there) */
#define FC_WV 8
#define FC_WV_WIDE 16
#if defined(__AVX512F__)
#define FC_WIDE_OK 1
#else
#define FC_WIDE_OK 0
#endif

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
    }                                                                                           \


/* FC_TILE2(T, SUFFIX): fc_tile2_SUFFIX, fc_tile for 2*FC_VBLOCK outputs, two vectors per channel:
 * 16 accumulators, so that two loads and 8 broadcasts feed 16 FMAs (float only: for double the
 * 16 would not fit the register file) */
#define FC_TILE2(T, SUFFIX)                                                                     \
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
    }

/* FC_TILE3(T, SUFFIX): fc_tile3_SUFFIX, fc_tile for 3*FC_VBLOCK outputs: 24 accumulators, three
 * loads and 8 broadcasts per 24 FMAs (float only, as FC_TILE2) */
#define FC_TILE3(T, SUFFIX)                                                                     \
    static inline void fc_tile3_##SUFFIX(const T *xs, const T *wt, const ptrdiff_t *offs,     \
                                         ptrdiff_t taps, const T *b, T *out, ptrdiff_t ldo,    \
                                         ptrdiff_t nk)                                         \
    {                                                                                           \
        typedef fc_vec_##SUFFIX V;                                                              \
        V p0 = b[0] + (V){0}, q0 = p0, r0 = p0, p1 = b[1] + (V){0}, q1 = p1, r1 = p1,           \
          p2 = b[2] + (V){0}, q2 = p2, r2 = p2, p3 = b[3] + (V){0}, q3 = p3, r3 = p3,           \
          p4 = b[4] + (V){0}, q4 = p4, r4 = p4, p5 = b[5] + (V){0}, q5 = p5, r5 = p5,           \
          p6 = b[6] + (V){0}, q6 = p6, r6 = p6, p7 = b[7] + (V){0}, q7 = p7, r7 = p7;           \
        for (ptrdiff_t t = 0; t < taps; t++) {                                                  \
            const T *s = xs + offs[t];                                                          \
            const V x = *(const V *)s, y = *(const V *)(s + FC_VBLOCK), z = *(const V *)(s + 2 * FC_VBLOCK); \
            const T *w = wt + t * FC_KBLOCK;                                                    \
            T c;                                                                                \
            c = w[0]; p0 += x * c; q0 += y * c; r0 += z * c;                                    \
            c = w[1]; p1 += x * c; q1 += y * c; r1 += z * c;                                    \
            c = w[2]; p2 += x * c; q2 += y * c; r2 += z * c;                                    \
            c = w[3]; p3 += x * c; q3 += y * c; r3 += z * c;                                    \
            c = w[4]; p4 += x * c; q4 += y * c; r4 += z * c;                                    \
            c = w[5]; p5 += x * c; q5 += y * c; r5 += z * c;                                    \
            c = w[6]; p6 += x * c; q6 += y * c; r6 += z * c;                                    \
            c = w[7]; p7 += x * c; q7 += y * c; r7 += z * c;                                    \
        }                                                                                       \
        const V acc[3 * FC_KBLOCK] = {p0, q0, r0, p1, q1, r1, p2, q2, r2, p3, q3, r3,           \
                                      p4, q4, r4, p5, q5, r5, p6, q6, r6, p7, q7, r7};          \
        for (ptrdiff_t j = 0; j < nk; j++) {                                                    \
            *(V *)(out + j * ldo) = acc[3 * j];                                                 \
            *(V *)(out + j * ldo + FC_VBLOCK) = acc[3 * j + 1];                                 \
            *(V *)(out + j * ldo + 2 * FC_VBLOCK) = acc[3 * j + 2];                             \
        }                                                                                       \
    }

/* FC_KEEP_32 / FC_KEEP_64 keep a loaded vector of the weight tile (32 or 64 bytes) in a
 * register: left alone, GCC folds the load into each of the four FMAs that use it (four loads
 * instead of one, and the tile becomes load-bound).  Only where such a vector fits one x86
 * register (AVX, AVX-512); elsewhere the asm constraint cannot be met, and they do nothing. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX__)
#define FC_KEEP_32(v) __asm__("" : "+v"(v))
#else
#define FC_KEEP_32(v) ((void)0)
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__AVX512F__)
#define FC_KEEP_64(v) __asm__("" : "+v"(v))
#else
#define FC_KEEP_64(v) ((void)0)
#endif
/* the weight tile's accumulators a<j><q> for one output channel j, loaded from / stored to a */
#define FC_WROW(V, src, j)                                                                      \
    V a##j##0 = src[j * FC_WQ + 0], a##j##1 = src[j * FC_WQ + 1], a##j##2 = src[j * FC_WQ + 2], \
      a##j##3 = src[j * FC_WQ + 3], a##j##4 = src[j * FC_WQ + 4], a##j##5 = src[j * FC_WQ + 5];
#define FC_WSTORE(dst, j)                                                                       \
    dst[j * FC_WQ + 0] = a##j##0; dst[j * FC_WQ + 1] = a##j##1; dst[j * FC_WQ + 2] = a##j##2;   \
    dst[j * FC_WQ + 3] = a##j##3; dst[j * FC_WQ + 4] = a##j##4; dst[j * FC_WQ + 5] = a##j##5;
/* tap q of the weight tile: one input vector, four FMAs (one per output channel) */
#define FC_WTAP(V, KEEP, q, xq)                                                                 \
    { V u = *(const V *)(xq + f); KEEP(u);                                                      \
      a0##q += y0 * u; a1##q += y1 * u; a2##q += y2 * u; a3##q += y3 * u; }

/* acc[(j*FC_WQ + q)*LANES + v] += sum over images i < nimg and flat outputs f < steps * LANES,
 * f = v mod LANES, of g[i*gstride + j*ldg + f] * xs[i*xstride + offs[q] + f]: 24 vector
 * accumulators, so that 4 + 6 vector loads feed 24 vector FMAs.  KEEP: FC_KEEP_32 or FC_KEEP_64,
 * for the vector's size in bytes. */
#define FC_WTILE(T, NAME, LANES, KEEP)                                                          \
    static inline void NAME(const T *xs, ptrdiff_t xstride, const ptrdiff_t *offs, const T *g,   \
                            ptrdiff_t gstride, ptrdiff_t ldg, ptrdiff_t steps, ptrdiff_t nimg,   \
                            T *acc)                                                             \
    {                                                                                           \
        typedef T V __attribute__((vector_size(LANES * sizeof(T)), aligned(sizeof(T))));        \
        V *a = (V *)acc;                                                                        \
        FC_WROW(V, a, 0) FC_WROW(V, a, 1) FC_WROW(V, a, 2) FC_WROW(V, a, 3)                     \
        for (ptrdiff_t i = 0; i < nimg; i++) {                                                  \
            const T *x = xs + i * xstride, *g0 = g + i * gstride, *g1 = g0 + ldg;               \
            const T *g2 = g1 + ldg, *g3 = g2 + ldg;                                             \
            const T *x0 = x + offs[0], *x1 = x + offs[1], *x2 = x + offs[2];                    \
            const T *x3 = x + offs[3], *x4 = x + offs[4], *x5 = x + offs[5];                    \
            for (ptrdiff_t f = 0; f < steps * LANES; f += LANES) {                              \
                const V y0 = *(const V *)(g0 + f), y1 = *(const V *)(g1 + f);                   \
                const V y2 = *(const V *)(g2 + f), y3 = *(const V *)(g3 + f);                   \
                FC_WTAP(V, KEEP, 0, x0) FC_WTAP(V, KEEP, 1, x1) FC_WTAP(V, KEEP, 2, x2)         \
                FC_WTAP(V, KEEP, 3, x3) FC_WTAP(V, KEEP, 4, x4) FC_WTAP(V, KEEP, 5, x5)         \
            }                                                                                   \
        }                                                                                       \
        FC_WSTORE(a, 0) FC_WSTORE(a, 1) FC_WSTORE(a, 2) FC_WSTORE(a, 3)                         \
    }

FC_TILE(float, f)
FC_TILE(double, d)
FC_TILE2(float, f)
FC_TILE3(float, f)
FC_WTILE(float, fc_wtile_f, FC_WV, FC_KEEP_32)
FC_WTILE(float, fc_wtile_wide_f, FC_WV_WIDE, FC_KEEP_64)
FC_WTILE(double, fc_wtile_d, FC_WV, FC_KEEP_64)

#endif
