/* Register tiles of the channel-blocked direct convolution (``_direct.pyx``, "channel-blocked").
 *
 * One tile is FC_KBLOCK output channels by FC_VBLOCK consecutive flat outputs; fc_tiles_T computes
 * up to FC_TGROUP such tiles side by side.  The kernels are written with GCC / Clang vector
 * extensions over the target's own vector register (FC_VREG bytes: zmm with AVX-512, ymm with
 * AVX, xmm otherwise) rather than left to the auto-vectoriser, which turned the accumulator
 * arrays into shuffles instead of keeping them in registers.  Vectors wider than the target's
 * are no shortcut either: GCC 12 lowered 64-byte vectors on an AVX2 core (Zen 3) into xmm
 * pieces passed through the stack, 30x slower than PyTorch on mnist-c2.
 *
 * fc_tiles_T cuts its outputs into panels of FC_PANEL_CH channels by at most FC_PANEL_NV
 * vectors (fc_panelN_T), whose FC_PANEL_CH * N accumulators stay in registers over every tap:
 * per tap a panel loads N input vectors and FC_PANEL_CH broadcast weights for FC_PANEL_CH * N
 * FMAs.  With AVX-512's 32 registers a panel is all 8 channels by 3 vectors (24 accumulators;
 * 8 barely cover the FMA latency on a core that issues two vector FMAs per cycle, and side-by-
 * side tiles share the broadcast weights: on a 2-core Xeon, float32 forward passes, pairs
 * against single tiles: mnist-c2 9-13%, pw-1x1 7%, resnet-stem 5% faster; triples against
 * pairs, one thread: vgg-224 1.16x, pw-1x1 1.08x, resnet-stem 1.07x, mnist-c2 1.04x).  With 16
 * registers (AVX2, SSE) a panel is half the channels by up to 3 vectors: 12 accumulators, 3
 * input vectors and a broadcast.  There a tile of three takes four panels, which pass over the
 * taps in chunks of FC_TAP_CHUNK together, so that a chunk's input is read from L2 once and
 * from L1 by the other three (the panels loop unrolled by FC_TAP_UNROLL taps).  On the Zen 3,
 * one thread, a three-tile call of 288 taps (mnist-c2's) ran at 44 GFLOP/s with whole-tap
 * panels, 74 with chunks of 64 taps (32 and 128 within 3%) and 91 unrolled by 4 (unrolled by 2:
 * 47; by 8: 82), of a measured sgemm peak of 92; the blocked forward passes went from 0.47x
 * to 0.8-1.2x PyTorch's speed.  AVX-512 builds keep whole-tap single panels, as measured there.
 *
 * The weight gradient's tile (fc_wtile) holds FC_WJ x FC_WQ = 4 x 6 (output channel, tap) pairs,
 * each as LANES partial sums over the flat outputs: per LANES outputs it loads FC_WQ input
 * vectors and FC_WJ output-gradient vectors for FC_WJ * FC_WQ vector FMAs (24 accumulators
 * and 10 loads; the 4 x 2 x 16 tile it replaced needed 12 loads for 16 FMAs and ran 1.5-2x
 * slower).  Where 24 lane vectors do not fit the registers (16 registers, or lanes wider than
 * one), it runs over the output channels in chunks that fit.  Float lanes are
 * FC_WV = 8, one ymm register; on a core with two 512-bit FMA units that is half of its peak,
 * which the large planes reached (resnet-stem: the tile loop ran at 2 ymm FMAs per cycle).
 * fc_wtile_wide_f has FC_WV_WIDE = 16 lanes, one zmm, for them (2-core Xeon: resnet-stem's
 * weight gradient on one thread 17.7 -> 12.4 ms, on two 8.5 -> 7.9-8.7, where the two cores'
 * caches then limit it; vgg-224's 8.0 -> 6.1-7.6 ms); on small planes, fewer steps per call to
 * amortise its 24 accumulators' loads and stores, it measured 5-11% slower (stripe-c2, mnist-c1).
 * It keeps its sums between calls folded into FC_WV lanes (FC_KEPT_HALVES below): kept whole,
 * mnist-c2's were 1.2 MiB per thread, swept once per image from beyond a Zen 5's 1 MiB L2, and
 * the accumulator loads took a third of the tile's time.  2-core Zen 5, 2 threads, in-process
 * A/B against keeping them whole, 30 alternating rounds: mnist-c2 1.29x (118 -> 153 GFLOP/s),
 * pw-1x1 1.24x, 8x8 to 56x56 planes of 32-64 channels 1.08-1.13x, one input channel 1.02x.
 *
 * FC_TILES(T, SUFFIX) defines fc_tiles_SUFFIX for element type T (float: f, double: d),
 * FC_WTILE(T, NAME, LANES, KEPT) a weight-gradient tile.
 */
#ifndef FASTCONV_TILE_H
#define FASTCONV_TILE_H

#include <stddef.h>

#define FC_KBLOCK 8
#define FC_VBLOCK 16
#define FC_TGROUP 3 /* tiles side by side where a plane has them (fc_tiles) */
/* the weight gradient's tile: FC_WJ output channels by FC_WQ taps ... */
#define FC_WJ 4
#define FC_WQ 6
/* ... and FC_WV partial sums (lanes) per (channel, tap) pair: one ymm register of float or
 * zmm of double; fc_wtile_wide_f has FC_WV_WIDE (one zmm of float), for large planes on AVX-512
 * machines (FC_WIDE_OK: whether it runs in one register there) */
#define FC_WV 8
#define FC_WV_WIDE 16

/* the target's vector register (bytes), and how many of them may hold accumulators */
#if defined(__AVX512F__)
#define FC_VREG 64
#define FC_ACC_REGS 24
#define FC_WIDE_OK 1
#define FC_TAP_UNROLL 1 /* taps per iteration of a panel's loop */
#elif defined(__AVX__)
#define FC_VREG 32
#define FC_ACC_REGS 12
#define FC_WIDE_OK 0
#define FC_TAP_UNROLL 4
#else
#define FC_VREG 16
#define FC_ACC_REGS 12
#define FC_WIDE_OK 0
#define FC_TAP_UNROLL 4
#endif
/* a forward panel: FC_PANEL_CH output channels (a divisor of FC_KBLOCK) by up to FC_PANEL_NV vectors */
#define FC_PANEL_NV 3
#define FC_TAP_CHUNK 64 /* taps per chunk where a tile takes several panels (fc_tiles) */
#define FC_PANEL_CH (FC_ACC_REGS / FC_PANEL_NV < FC_KBLOCK ? FC_ACC_REGS / FC_PANEL_NV : FC_KBLOCK)
#if FC_KBLOCK % FC_PANEL_CH != 0 || FC_VBLOCK * 4 % FC_VREG != 0
#error "_tile.h: a tile must be whole panels of whole vectors"
#endif

#define FC_PRAGMA(x) FC_PRAGMA_(x)
#define FC_PRAGMA_(x) _Pragma(#x)
/* for (int i = 0; i < n; i++), fully unrolled (n a constant up to 8) */
#define FC_FOR(i, n) FC_PRAGMA(GCC unroll 8) for (int i = 0; i < (n); i++)

/* fc_panelNV_SUFFIX: out[j*ldo + v] = (add ? out[j*ldo + v] : b[j]) + sum_t wt[t*FC_KBLOCK + j] *
 * xs[offs[t] + v] for v < NV vectors and j < min(FC_PANEL_CH, nk) */
#define FC_PANEL(T, SUFFIX, NV)                                                                 \
    static inline void fc_panel##NV##_##SUFFIX(const T *xs, const T *wt, const ptrdiff_t *offs, \
                                               ptrdiff_t taps, const T *b, T *out, ptrdiff_t ldo, \
                                               ptrdiff_t nk, int add)                          \
    {                                                                                           \
        typedef T V __attribute__((vector_size(FC_VREG), aligned(sizeof(T))));                  \
        enum { L = FC_VREG / sizeof(T) };                                                       \
        V acc[FC_PANEL_CH][NV];                                                                 \
        FC_FOR(j, FC_PANEL_CH) FC_FOR(v, NV)                                                    \
            acc[j][v] = add ? (j < nk ? *(const V *)(out + j * ldo + v * L) : (V){0}) : b[j] + (V){0}; \
        FC_PRAGMA(GCC unroll FC_TAP_UNROLL) for (ptrdiff_t t = 0; t < taps; t++) {              \
            const T *s = xs + offs[t], *w = wt + t * FC_KBLOCK;                                 \
            V x[NV];                                                                            \
            FC_FOR(v, NV) x[v] = *(const V *)(s + v * L);                                       \
            FC_FOR(j, FC_PANEL_CH) {                                                            \
                const T c = w[j];                                                               \
                FC_FOR(v, NV) acc[j][v] += x[v] * c;                                            \
            }                                                                                   \
        }                                                                                       \
        FC_FOR(j, FC_PANEL_CH) if (j < nk) FC_FOR(v, NV) *(V *)(out + j * ldo + v * L) = acc[j][v]; \
    }

/* fc_tiles_SUFFIX: out[j*ldo + v] = b[j] + sum_t wt[t*FC_KBLOCK + j] * xs[offs[t] + v] for
 * v < count*FC_VBLOCK and j < nk <= FC_KBLOCK (b and wt padded to FC_KBLOCK channels).  Where
 * that takes more than one panel, the taps go in chunks of FC_TAP_CHUNK, every panel passing
 * over a chunk before the next, so that the chunk's input stays in L1 for them all. */
#define FC_TILES(T, SUFFIX)                                                                     \
    FC_PANEL(T, SUFFIX, 1) FC_PANEL(T, SUFFIX, 2) FC_PANEL(T, SUFFIX, 3)                         \
    static inline void fc_tiles_##SUFFIX(const T *xs, const T *wt, const ptrdiff_t *offs,      \
                                         ptrdiff_t taps, const T *b, T *out, ptrdiff_t ldo,     \
                                         ptrdiff_t nk, ptrdiff_t count)                         \
    {                                                                                           \
        const ptrdiff_t L = FC_VREG / sizeof(T), nv = count * FC_VBLOCK / L;                    \
        const ptrdiff_t chunk = nv <= FC_PANEL_NV && nk <= FC_PANEL_CH ? taps : FC_TAP_CHUNK;   \
        for (ptrdiff_t t = 0; t < taps; t += chunk) {                                           \
            const ptrdiff_t n = taps - t < chunk ? taps - t : chunk;                            \
            for (ptrdiff_t v = 0; v < nv; v += FC_PANEL_NV)                                     \
                for (ptrdiff_t j = 0; j < nk; j += FC_PANEL_CH) {                               \
                    const T *x = xs + v * L, *w = wt + t * FC_KBLOCK + j;                       \
                    T *o = out + j * ldo + v * L;                                               \
                    if (nv - v == 1)                                                            \
                        fc_panel1_##SUFFIX(x, w, offs + t, n, b + j, o, ldo, nk - j, t > 0);    \
                    else if (nv - v == 2)                                                       \
                        fc_panel2_##SUFFIX(x, w, offs + t, n, b + j, o, ldo, nk - j, t > 0);    \
                    else                                                                        \
                        fc_panel3_##SUFFIX(x, w, offs + t, n, b + j, o, ldo, nk - j, t > 0);    \
                }                                                                               \
        }                                                                                       \
    }

/* FC_KEEP keeps a loaded vector of the weight tile in a register: left alone, GCC folds the
 * load into each of the FMAs that use it (four loads instead of one, and the tile becomes
 * load-bound).  x86 GCC / Clang only; elsewhere it does nothing. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && defined(__SSE2__)
#define FC_KEEP(v) __asm__("" : "+v"(v))
#else
#define FC_KEEP(v) ((void)0)
#endif

/* How a weight-gradient tile (FC_WTILE) keeps FC_WV sums per (channel, tap) pair between calls:
 * KEPT_LOAD(V, L, p, src) is vector p (L lanes) of a pair's accumulators on entry, from the kept
 * sums at src; KEPT_STORE(V, L, p, dst, v) keeps vector p, v, at dst.  FC_KEPT_LANES: lane by
 * lane, vectors past the first FC_WV lanes starting at zero and added into those on the way
 * out.  FC_KEPT_HALVES: one AVX-512 vector of 2 * FC_WV floats (the wide tile), which starts
 * as the kept sums in its low half and zeros above and is kept as the sum of its halves. */
#define FC_KEPT_LANES_LOAD(V, L, p, src) ((p) * (L) < FC_WV ? *(const V *)((src) + (p) * (L)) : (V){0})
#define FC_KEPT_LANES_STORE(V, L, p, dst, v)                                                    \
    do {                                                                                        \
        if ((p) * (L) < FC_WV)                                                                  \
            *(V *)((dst) + (p) * (L)) = (v);                                                    \
        else                                                                                    \
            *(V *)((dst) + (p) * (L) % FC_WV) += (v);                                           \
    } while (0)
#if FC_WIDE_OK
#include <immintrin.h>
#define FC_KEPT_HALVES_LOAD(V, L, p, src) ((V)_mm512_zextps256_ps512(_mm256_loadu_ps(src)))
#define FC_KEPT_HALVES_STORE(V, L, p, dst, v)                                                   \
    _mm256_storeu_ps((dst), _mm256_add_ps(_mm512_castps512_ps256((__m512)(v)),                  \
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd((__m512)(v)), 1))))
#define FC_WIDE_KEPT FC_KEPT_HALVES
#else
#define FC_WIDE_KEPT FC_KEPT_LANES /* there the wide tile's lane groups are two vectors */
#endif
#define FC_CAT(a, b) FC_CAT_(a, b)
#define FC_CAT_(a, b) a##b

/* NAME: acc[(j*FC_WQ + q)*FC_WV + v] += sum over images i < nimg and flat outputs f < steps *
 * LANES with f mod FC_WV = v, of g[i*gstride + j*ldg + f] * xs[i*xstride + offs[q] + f], j < FC_WJ,
 * q < FC_WQ; nimg >= 1 and steps >= 1.  Its loops are do-while for that: with a zero-trip path
 * around them, GCC 12 copied the 24 accumulators to the stack and back in every call, and perf
 * put 36% of the tile's time on mnist-c2's 13-step planes outside its inner loop (21% after;
 * 2-core Zen 5, in-process A/B, 30 alternating rounds, 2 threads: mnist-c2 1.10x, faster in 30
 * of 30; stripe-c2 1.13x; cifar-64 1.05x).  Each lane group is P vectors of at most FC_VREG
 * bytes; the channels go in chunks of JC whose JC * FC_WQ * P accumulators fit FC_ACC_REGS (all
 * four where they fit).  The sums in acc keep FC_WV lanes per pair whatever LANES is: a wider
 * tile folds its lanes into FC_WV when it stores them (one extract and one add per accumulator)
 * and loads them into the low lanes of zeroed accumulators, so that the partial sums a thread
 * sweeps once per chunk of images are no larger than the narrow tile's (mnist-c2: 590 KiB, not 1.2 MiB, against a 1 MiB L2). */
#define FC_WTILE(T, NAME, LANES, KEPT)                                                             \
    static inline void NAME(const T *xs, ptrdiff_t xstride, const ptrdiff_t *offs, const T *g,   \
                            ptrdiff_t gstride, ptrdiff_t ldg, ptrdiff_t steps, ptrdiff_t nimg,   \
                            T *acc)                                                             \
    {                                                                                           \
        enum { VB = LANES * sizeof(T) < FC_VREG ? LANES * sizeof(T) : FC_VREG, L = VB / sizeof(T), \
               P = LANES / L, FIT = FC_ACC_REGS / (FC_WQ * P),                                  \
               JC = FIT < 1 ? 1 : FIT >= FC_WJ ? FC_WJ : FIT >= FC_WJ / 2 ? FC_WJ / 2 : 1 };    \
        typedef T V __attribute__((vector_size(VB), aligned(sizeof(T))));                       \
        for (int j0 = 0; j0 < FC_WJ; j0 += JC) {                                                \
            V a[JC][FC_WQ][P];                                                                  \
            FC_FOR(j, JC) FC_FOR(q, FC_WQ) FC_FOR(p, P)                                         \
                a[j][q][p] = FC_CAT(KEPT, _LOAD)(V, L, p, acc + ((j0 + j) * FC_WQ + q) * FC_WV); \
            ptrdiff_t i = 0;                                                                    \
            do {                                                                                \
                const T *x = xs + i * xstride, *gi = g + i * gstride + j0 * ldg, *xq[FC_WQ];    \
                FC_FOR(q, FC_WQ) xq[q] = x + offs[q];                                           \
                ptrdiff_t f = 0;                                                                \
                do {                                                                            \
                    V y[JC][P];                                                                 \
                    FC_FOR(j, JC) FC_FOR(p, P) y[j][p] = *(const V *)(gi + j * ldg + f + p * L); \
                    FC_FOR(q, FC_WQ) FC_FOR(p, P) {                                             \
                        V u = *(const V *)(xq[q] + f + p * L);                                  \
                        FC_KEEP(u);                                                             \
                        FC_FOR(j, JC) a[j][q][p] += y[j][p] * u;                                \
                    }                                                                           \
                    f += LANES;                                                                 \
                } while (f < steps * LANES);                                                    \
            } while (++i < nimg);                                                               \
            FC_FOR(j, JC) FC_FOR(q, FC_WQ) FC_FOR(p, P)                                         \
                FC_CAT(KEPT, _STORE)(V, L, p, acc + ((j0 + j) * FC_WQ + q) * FC_WV, a[j][q][p]); \
        }                                                                                       \
    }

FC_TILES(float, f)
FC_TILES(double, d)
FC_WTILE(float, fc_wtile_f, FC_WV, FC_KEPT_LANES)
FC_WTILE(float, fc_wtile_wide_f, FC_WV_WIDE, FC_WIDE_KEPT)
FC_WTILE(double, fc_wtile_d, FC_WV, FC_KEPT_LANES)

#endif
