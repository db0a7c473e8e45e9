/* Moving data between image planes and the lane-major tile blocks of ``_winograd.pyx``.
 *
 * fc_copy: a short copy without a call.  The input planes are staged row by row, a few dozen
 * elements per row; ``memcpy`` is a library call per row, and GCC turns a plain element loop
 * into one (or vectorises it behind alias checks with a scalar tail).  Here every size from 4
 * bytes up is at most two unaligned vector moves (the second overlapping the first), or a
 * loop of 64-byte moves.  The buffers must not overlap.
 *
 * fc_tiles_out_SUFFIX: the output block holds row r = i*4 + j of every 4 x 4 output tile as a
 * row of lanes (one tile per lane); storing it tile by tile read one scalar per output.  This
 * transposes one group of 16 lanes with vector shuffles and stores each tile's rows from
 * registers.  FC_TILES_OUT(T, SUFFIX) defines it for element type T.
 */
#ifndef FASTCONV_STAGE_H
#define FASTCONV_STAGE_H

#include <stddef.h>

/* the first and the last n of ``bytes`` bytes (n <= bytes <= 2n): two moves of a constant size */
#define FC_COPY_ENDS(n)                                                                         \
    { __builtin_memcpy(d, s, n); __builtin_memcpy(d + bytes - (n), s + bytes - (n), n); }

static inline void fc_copy(void *dst, const void *src, size_t bytes)
{
    char *d = (char *)dst;
    const char *s = (const char *)src;
    if (bytes >= 64) {
        size_t i = 0;
        for (; i + 64 <= bytes; i += 64)
            __builtin_memcpy(d + i, s + i, 64);
        if (i < bytes)
            __builtin_memcpy(d + bytes - 64, s + bytes - 64, 64);
    } else if (bytes >= 32) FC_COPY_ENDS(32)
    else if (bytes >= 16) FC_COPY_ENDS(16)
    else if (bytes >= 8) FC_COPY_ENDS(8)
    else if (bytes >= 4) FC_COPY_ENDS(4)
    else {
        for (size_t i = 0; i < bytes; i++)
            d[i] = s[i];
    }
}

/* 16 lanes, 4 x 4 tiles: ``_winograd.pyx``'s LANES and M */
#define FC_OUT_LANES 16
#define FC_OUT_M 4

/* (compilers without __builtin_shufflevector, or -DFC_NO_SHUFFLE, get the plain loops below) */
#if !defined(FC_NO_SHUFFLE) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12))
/* For the n <= 16 tiles l of one lane group: out[offs[l] + i*ld + j*step] = blk[(i*4 + j)*tb + l]
 * for i < rows[l], j < cols[l].  Row i of all 16 tiles is four vector loads and eight two-source
 * shuffles; each tile's row is then stored straight from its register (staged through memory,
 * the wide stores and narrow reloads stalled store-to-load forwarding and ran slower than
 * scalar code). */
#define FC_TILES_OUT(T, SUFFIX)                                                                 \
    static inline void fc_tiles_out_##SUFFIX(const T *blk, ptrdiff_t tb, T *out, const ptrdiff_t *offs, \
                                             const ptrdiff_t *rows, const ptrdiff_t *cols, int n, \
                                             ptrdiff_t ld, ptrdiff_t step)                     \
    {                                                                                           \
        typedef T V __attribute__((vector_size(16 * sizeof(T)), aligned(sizeof(T))));          \
        typedef T V4 __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T))));          \
        for (int i = 0; i < 4; i++) {                                                           \
            const V r0 = *(const V *)(blk + (4 * i) * tb), r1 = *(const V *)(blk + (4 * i + 1) * tb); \
            const V r2 = *(const V *)(blk + (4 * i + 2) * tb), r3 = *(const V *)(blk + (4 * i + 3) * tb); \
            /* (r0[l], r1[l]) and (r2[l], r3[l]) pairs, lanes 0-7 and 8-15 */                    \
            const V a = __builtin_shufflevector(r0, r1, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23); \
            const V b = __builtin_shufflevector(r0, r1, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31); \
            const V c = __builtin_shufflevector(r2, r3, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23); \
            const V e = __builtin_shufflevector(r2, r3, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31); \
            /* then the quadruples (r0[l], r1[l], r2[l], r3[l]): tile l's row i */              \
            const V q0 = __builtin_shufflevector(a, c, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23); \
            const V q1 = __builtin_shufflevector(a, c, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31); \
            const V q2 = __builtin_shufflevector(b, e, 0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23); \
            const V q3 = __builtin_shufflevector(b, e, 8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31); \
            FC_ROW_OUT(T, V4, q0, 0, 0) FC_ROW_OUT(T, V4, q0, 1, 1)                             \
            FC_ROW_OUT(T, V4, q0, 2, 2) FC_ROW_OUT(T, V4, q0, 3, 3)                             \
            FC_ROW_OUT(T, V4, q1, 0, 4) FC_ROW_OUT(T, V4, q1, 1, 5)                             \
            FC_ROW_OUT(T, V4, q1, 2, 6) FC_ROW_OUT(T, V4, q1, 3, 7)                             \
            FC_ROW_OUT(T, V4, q2, 0, 8) FC_ROW_OUT(T, V4, q2, 1, 9)                             \
            FC_ROW_OUT(T, V4, q2, 2, 10) FC_ROW_OUT(T, V4, q2, 3, 11)                           \
            FC_ROW_OUT(T, V4, q3, 0, 12) FC_ROW_OUT(T, V4, q3, 1, 13)                           \
            FC_ROW_OUT(T, V4, q3, 2, 14) FC_ROW_OUT(T, V4, q3, 3, 15)                           \
        }                                                                                       \
    }
/* row i of tile l, the t-th quadruple of v: four consecutive elements in one store, else
 * (clipped at the right edge, or a dilated tile's strided columns) one by one */
#define FC_ROW_OUT(T, V4, v, t, l)                                                              \
    if ((l) < n && i < rows[l]) {                                                               \
        T *p = out + offs[l] + i * ld;                                                          \
        const V4 w = __builtin_shufflevector(v, v, 4 * (t), 4 * (t) + 1, 4 * (t) + 2, 4 * (t) + 3); \
        if (cols[l] == 4 && step == 1) {                                                        \
            __builtin_memcpy(p, &w, sizeof w);                                                  \
        } else {                                                                                \
            p[0] = w[0];                                                                        \
            if (cols[l] > 1) p[step] = w[1];                                                    \
            if (cols[l] > 2) p[2 * step] = w[2];                                                \
            if (cols[l] > 3) p[3 * step] = w[3];                                                \
        }                                                                                       \
    }
#else
#define FC_TILES_OUT(T, SUFFIX)                                                                 \
    static inline void fc_tiles_out_##SUFFIX(const T *blk, ptrdiff_t tb, T *out, const ptrdiff_t *offs, \
                                             const ptrdiff_t *rows, const ptrdiff_t *cols, int n, \
                                             ptrdiff_t ld, ptrdiff_t step)                     \
    {                                                                                           \
        for (int l = 0; l < n; l++)                                                             \
            for (ptrdiff_t i = 0; i < rows[l]; i++)                                             \
                for (ptrdiff_t j = 0; j < cols[l]; j++)                                         \
                    out[offs[l] + i * ld + j * step] = blk[(i * 4 + j) * tb + l];               \
    }
#endif

FC_TILES_OUT(float, f)
FC_TILES_OUT(double, d)

#endif
