# cython: language_level=3
"""Row-major GEMM on top of ``scipy.linalg.cython_blas`` (shared by the GEMM-based kernels)."""

from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef inline void gemm(bint ta, bint tb, Py_ssize_t m, Py_ssize_t n, Py_ssize_t k, floating alpha,
                      const floating* a, Py_ssize_t lda, const floating* b, Py_ssize_t ldb, floating beta,
                      floating* c, Py_ssize_t ldc) noexcept nogil:
    """Row-major ``C (m, n) = alpha * op(A) @ op(B) + beta * C`` via the column-major BLAS.

    The caller guarantees that every dimension and leading dimension fits a 32-bit int.
    """
    cdef char* transa = b"T" if tb else b"N"
    cdef char* transb = b"T" if ta else b"N"
    cdef int m_ = <int> n, n_ = <int> m, k_ = <int> k
    cdef int lda_ = <int> ldb, ldb_ = <int> lda, ldc_ = <int> ldc
    if floating is float:
        sgemm(transa, transb, &m_, &n_, &k_, &alpha, <float*> b, &lda_, <float*> a, &ldb_, &beta, c, &ldc_)
    else:
        dgemm(transa, transb, &m_, &n_, &k_, &alpha, <double*> b, &lda_, <double*> a, &ldb_, &beta, c, &ldc_)
