# cython: language_level=3
"""Inline helpers shared by the Cython kernels (no runtime module).

Every kernel in this package walks one output row at a time and, for each kernel
tap, touches the contiguous range of output columns whose input column lies
inside the image.  :func:`first_in` / :func:`end_in` compute that range exactly,
so the innermost loops (``axpy`` and friends) need no bounds tests and vectorise.
All index arithmetic is ``Py_ssize_t`` (64-bit).
"""

from cython cimport floating


cdef inline Py_ssize_t first_in(Py_ssize_t off, Py_ssize_t stride) noexcept nogil:
    """Smallest ``o >= 0`` with ``o * stride + off >= 0``."""
    if off >= 0:
        return 0
    return (-off + stride - 1) // stride


cdef inline Py_ssize_t end_in(Py_ssize_t off, Py_ssize_t stride, Py_ssize_t size,
                              Py_ssize_t n_out) noexcept nogil:
    """One past the largest ``o < n_out`` with ``o * stride + off < size`` (0 if none)."""
    cdef Py_ssize_t e
    if size - 1 - off < 0:
        return 0
    e = (size - 1 - off) // stride + 1
    return e if e < n_out else n_out


cdef inline void axpy(floating* y, const floating* x, floating a, Py_ssize_t n,
                      Py_ssize_t incx) noexcept nogil:
    """``y[i] += a * x[i * incx]`` for ``i < n``."""
    cdef Py_ssize_t i
    if incx == 1:
        for i in range(n):
            y[i] += a * x[i]
    else:
        for i in range(n):
            y[i] += a * x[i * incx]


cdef inline void axpy_scatter(floating* y, Py_ssize_t incy, const floating* x, floating a,
                              Py_ssize_t n) noexcept nogil:
    """``y[i * incy] += a * x[i]`` for ``i < n``."""
    cdef Py_ssize_t i
    if incy == 1:
        for i in range(n):
            y[i] += a * x[i]
    else:
        for i in range(n):
            y[i * incy] += a * x[i]


cdef inline void mul_acc(floating* acc, const floating* g, const floating* x, Py_ssize_t n,
                         Py_ssize_t incx) noexcept nogil:
    """``acc[i] += g[i] * x[i * incx]`` for ``i < n``."""
    cdef Py_ssize_t i
    if incx == 1:
        for i in range(n):
            acc[i] += g[i] * x[i]
    else:
        for i in range(n):
            acc[i] += g[i] * x[i * incx]


cdef inline void fill(floating* y, floating v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] = v


cdef inline void tap_ranges(Py_ssize_t* lo, Py_ssize_t* hi, Py_ssize_t taps, Py_ssize_t dil, Py_ssize_t pad,
                            Py_ssize_t stride, Py_ssize_t size, Py_ssize_t n_out) noexcept nogil:
    """For every kernel tap ``s < taps`` (input offset ``s*dil - pad``), the output range
    ``[lo[s], hi[s])`` whose input index lies in ``[0, size)``; ``lo <= hi <= n_out``.

    Computed once per call, so the kernels' inner loops carry no divisions.
    """
    cdef Py_ssize_t s, off
    for s in range(taps):
        off = s * dil - pad
        lo[s] = min(first_in(off, stride), n_out)
        hi[s] = max(end_in(off, stride, size, n_out), lo[s])


cdef inline Py_ssize_t _rows_per_chunk(Py_ssize_t rows, int nt) noexcept nogil:
    """Chunk size for dynamically scheduled row loops: about 16 chunks per thread, so a
    thread that the OS has descheduled holds up the others by little."""
    return max(1, rows // (16 * max(nt, 1)))
