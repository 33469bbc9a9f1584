# cython: language_level=3
"""Typed compute kernels of mnistgan: every loop that touches numbers.

Layout of this file, top to bottom:
  1. argument checking (runs with the GIL, before any raw pointer is used)
  2. GEMM: the single place where BLAS is called
  3. layers, each forward beside its backward: dense, ReLU, tanh, batch norm
  4. the losses: sigmoid + binary cross-entropy, and softmax + cross-entropy
     (for the evaluation classifier), each fused with its gradient
  5. the optimizer: Adam, in place
  6. data: batch gather from uint8, normal draws, instance noise,
     finiteness check

Conventions. Matrices are C-contiguous, row-major, one example per row.
Dense weights are stored (fan_in, fan_out), so a layer is Y = X @ W + b.
Every kernel writes into buffers the caller allocated; nothing here allocates
numpy memory. The public functions accept float32 or float64 arrays (all of
one dtype per call) and raise TypeError/ValueError naming the bad argument
before any code without the GIL runs.
"""

cimport cython
cimport numpy as cnp
from libc.math cimport exp, log, log1p, sqrt, tanh, fabs
from libc.string cimport memcpy
from libc.stdlib cimport calloc, free
from libc.stdint cimport int64_t, uint8_t, uint64_t
from cpython.pycapsule cimport PyCapsule_GetPointer, PyCapsule_IsValid
from numpy.random cimport bitgen_t
from scipy.linalg.cython_blas cimport sgemm, dgemm

cdef extern from "_fastmath.h" nogil:
    void mg_tanh_array_f(const float* x, float* y, long n)
    void mg_adam_f(float* p, const float* g, float* m, float* v, long n, float step_size,
                   float inv_sqrt_bc2, float b1, float b2, float one_b1, float one_b2, float eps)
    void mg_adam_d(double* p, const double* g, double* m, double* v, long n, double step_size,
                   double inv_sqrt_bc2, double b1, double b2, double one_b1, double one_b2, double eps)
    void mg_normal_pairs_f(const uint64_t* raw, float* out, long n_pairs)
    void mg_normal_pairs_d(const uint64_t* raw, double* out, long n_pairs)

cdef extern from "_sgemm.h" nogil:
    int MG_OWN_SGEMM
    void mg_sgemm(long m, long n, long k, const float* x, long sxr, long sxk, const float* w, long ldw,
                  const float* bias, float* y, long ldy)
    void mg_sgemm_nt(long m, long n, long k, const float* g, long ldg, const float* w, long ldw,
                     float* y, long ldy)
    int mg_own_sgemm_available()

cdef extern from "_sync.h" nogil:
    ctypedef long mg_atomic
    long mg_load(mg_atomic* p)
    void mg_store(mg_atomic* p, long v)
    long mg_fetch_add(mg_atomic* p, long v)
    bint mg_cas(mg_atomic* p, long expected, long desired)
    bint mg_wait_ge(mg_atomic* p, long bound, mg_atomic* abort)
    void mg_yield()
    void MG_PAUSE()

import numpy as np

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef int F32 = cnp.NPY_FLOAT32
cdef int F64 = cnp.NPY_FLOAT64
cdef Py_ssize_t INT_MAX = 2147483647


# ---------------------------------------------------------------------------
# 1. Argument checking
# ---------------------------------------------------------------------------

_DTYPE_NAMES = {cnp.NPY_FLOAT32: "float32", cnp.NPY_FLOAT64: "float64",
                cnp.NPY_UINT8: "uint8", cnp.NPY_INT64: "int64"}


cdef inline tuple _shape(cnp.ndarray a):
    return (<object>a).shape


cdef inline cnp.ndarray _array(str name, object a):
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    return <cnp.ndarray>a


cdef int _float_type(str name, object a) except -1:
    """The dtype number of a float32/float64 array, or TypeError."""
    cdef cnp.ndarray arr = _array(name, a)
    cdef int t = cnp.PyArray_TYPE(arr)
    if t != F32 and t != F64:
        raise TypeError(f"{name} must have dtype float32 or float64, got {arr.dtype}")
    return t


cdef cnp.ndarray _check(str name, object a, int typenum, int ndim,
                        Py_ssize_t d0=-1, Py_ssize_t d1=-1):
    """Validate one argument: ndarray, dtype, ndim, shape (-1: any), C order.

    Every dimension must fit a BLAS int.
    """
    cdef cnp.ndarray arr = _array(name, a)
    cdef int i
    if cnp.PyArray_TYPE(arr) != typenum:
        raise TypeError(
            f"{name} has dtype {arr.dtype}, expected {_DTYPE_NAMES.get(typenum, typenum)}")
    if cnp.PyArray_NDIM(arr) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(arr)}")
    if ndim >= 1 and d0 >= 0 and arr.shape[0] != d0:
        raise ValueError(f"{name} has shape {_shape(arr)}: dimension 0 must be {d0}")
    if ndim >= 2 and d1 >= 0 and arr.shape[1] != d1:
        raise ValueError(f"{name} has shape {_shape(arr)}: dimension 1 must be {d1}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous (use numpy.ascontiguousarray)")
    for i in range(ndim):
        if arr.shape[i] > INT_MAX:
            raise ValueError(f"{name} has shape {_shape(arr)}: too large for BLAS")
    return arr


cdef cnp.ndarray _out(str name, object a, int typenum, int ndim,
                      Py_ssize_t d0=-1, Py_ssize_t d1=-1):
    """_check for an output argument, which must also be writeable."""
    cdef cnp.ndarray arr = _check(name, a, typenum, ndim, d0, d1)
    if not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is an output and must be writeable")
    return arr


cdef int64_t* _indices_below(str name, cnp.ndarray idx, Py_ssize_t limit, str what) except NULL:
    """The data of an int64 index array after checking every entry is in
    [0, limit): a kernel then indexes with it without further checks."""
    cdef int64_t* p = <int64_t*>cnp.PyArray_DATA(idx)
    cdef Py_ssize_t i
    for i in range(idx.shape[0]):
        if p[i] < 0 or p[i] >= limit:
            raise IndexError(f"{name}[{i}] = {p[i]} is out of range for {limit} {what}")
    return p


cdef inline char* _lo(cnp.ndarray a) noexcept nogil:
    return <char*>cnp.PyArray_DATA(a)


cdef inline char* _hi(cnp.ndarray a) noexcept nogil:
    return <char*>cnp.PyArray_DATA(a) + cnp.PyArray_NBYTES(a)


cdef int _disjoint(str out_name, cnp.ndarray out, str in_name, cnp.ndarray inp) except -1:
    """Raise if the memory of `out` overlaps that of `inp` at all."""
    if cnp.PyArray_NBYTES(out) == 0 or cnp.PyArray_NBYTES(inp) == 0:
        return 0
    if _lo(out) < _hi(inp) and _lo(inp) < _hi(out):
        raise ValueError(f"{out_name} overlaps {in_name}: this kernel cannot work in place")
    return 0


cdef int _same_or_disjoint(str out_name, cnp.ndarray out, str in_name, cnp.ndarray inp) except -1:
    """Elementwise kernels may write in place (out is in) but not partly over."""
    if _lo(out) == _lo(inp) and cnp.PyArray_NBYTES(out) == cnp.PyArray_NBYTES(inp):
        return 0
    return _disjoint(out_name, out, in_name, inp)


# ---------------------------------------------------------------------------
# 2. GEMM: the only call into BLAS
# ---------------------------------------------------------------------------

cdef void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k,
                  floating alpha, floating* a, int lda, floating* b, int ldb,
                  floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C (m x n) = alpha * op(A) op(B) + beta * C.

    BLAS is column-major, where a row-major matrix reads as its transpose;
    so we ask BLAS for C^T = op(B)^T op(A)^T, which is the same memory.
    """
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    cdef Py_ssize_t i, j
    if m == 0 or n == 0:
        return
    if k == 0:
        # BLAS would also do this, but reference BLAS rejects ld = 0.
        for i in range(m):
            for j in range(n):
                c[i * ldc + j] = 0 if beta == 0 else beta * c[i * ldc + j]
        return
    if floating is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


def gemm(A, B, C, *, bint trans_a=False, bint trans_b=False,
         double alpha=1.0, double beta=0.0):
    """C = alpha * op(A) @ op(B) + beta * C, in place; returns C.

    A: (m, k), or (k, m) when trans_a. B: (k, n), or (n, k) when trans_b.
    C: (m, n). All C-contiguous, one float dtype. beta = 1 accumulates.
    C may not overlap A or B.
    """
    cdef int t = _float_type("A", A)
    cdef cnp.ndarray a = _check("A", A, t, 2)
    cdef Py_ssize_t m = a.shape[1] if trans_a else a.shape[0]
    cdef Py_ssize_t k = a.shape[0] if trans_a else a.shape[1]
    cdef cnp.ndarray b = _check("B", B, t, 2, -1 if trans_b else k, k if trans_b else -1)
    cdef Py_ssize_t n = b.shape[0] if trans_b else b.shape[1]
    cdef cnp.ndarray c = _out("C", C, t, 2, m, n)
    _disjoint("C", c, "A", a)
    _disjoint("C", c, "B", b)
    cdef int lda = max(<int>a.shape[1], 1), ldb = max(<int>b.shape[1], 1), ldc = max(<int>n, 1)
    if t == F32:
        with nogil:
            gemm_rm(trans_a, trans_b, <int>m, <int>n, <int>k, <float>alpha,
                    <float*>_lo(a), lda, <float*>_lo(b), ldb, <float>beta, <float*>_lo(c), ldc)
    else:
        with nogil:
            gemm_rm(trans_a, trans_b, <int>m, <int>n, <int>k, alpha,
                    <double*>_lo(a), lda, <double*>_lo(b), ldb, beta, <double*>_lo(c), ldc)
    return C


# ---------------------------------------------------------------------------
# 3a. Dense layer: Y = X W + b
# ---------------------------------------------------------------------------

# float32 forward products and weight gradients go through our own AVX-512
# kernel (_sgemm.h) where the CPU has it: faster than BLAS on these shapes.
# MNISTGAN_OWN_GEMM=0 in the environment, or use_own_gemm(False), keeps BLAS.
cdef bint _own_sgemm = False


def own_gemm_available():
    """Whether this build and CPU can run the AVX-512 forward kernel."""
    return bool(MG_OWN_SGEMM) and bool(mg_own_sgemm_available())


def use_own_gemm(bint on):
    """Route float32 forward products and weight gradients through the
    AVX-512 kernel (if available) or BLAS; returns whether the kernel is
    now in use. Not while a pass runs on another thread."""
    global _own_sgemm
    _own_sgemm = on and own_gemm_available()
    return _own_sgemm


# Input gradients G W^T go through the kernel's dot products only when each
# sums at least this many terms: measured (1 thread, cold W) 7-29% faster
# than OpenBLAS at 628-1024 terms, 2-25% slower at 314-471, where summing
# the lanes of each accumulator costs more than the loop saves.
cdef int OWN_NT_MIN_K = 512


cdef inline bint _own_nt(bint own, int k) noexcept nogil:
    return own and k >= OWN_NT_MIN_K


cdef void input_grad_k(floating* g, floating* w, floating* gx, int n, int cols, int k, int ldgx,
                       bint own) noexcept nogil:
    """gx[:, :cols] = g (n x k) W[:cols, :]^T, W's rows k apart, gx's rows ldgx apart."""
    if floating is float:
        if _own_nt(own, k):
            mg_sgemm_nt(n, cols, k, g, k, w, k, gx, ldgx)
            return
    gemm_rm(False, True, n, cols, k, 1, g, k, w, k, 0, gx, ldgx)


def _own_gemm_in_use():
    return bool(_own_sgemm)


import os as _os
use_own_gemm(_os.environ.get("MNISTGAN_OWN_GEMM", "1") != "0")


cdef void dense_columns_k(floating* x, floating* w, floating* bias, floating* y, int n, int d_in,
                          int cols, int ld, bint own) noexcept nogil:
    """Y[:, :cols] = X W[:, :cols] + bias for a block of columns; W and Y rows ld apart.
    own: through the AVX-512 kernel (float32; the caller checked _own_sgemm)."""
    cdef Py_ssize_t i
    if floating is float:
        if own:
            mg_sgemm(n, cols, d_in, x, d_in, 1, w, ld, bias, y, ld)
            return
    # Seed Y with the bias, then let BLAS accumulate X W on top (beta = 1):
    # one pass over Y instead of two.
    for i in range(n):
        memcpy(y + i * ld, bias, cols * sizeof(floating))
    gemm_rm(False, False, n, cols, d_in, 1, x, d_in, w, ld, 1, y, ld)


cdef void dense_forward_k(floating* x, floating* w, floating* bias, floating* y,
                          int n, int d_in, int d_out) noexcept nogil:
    dense_columns_k(x, w, bias, y, n, d_in, d_out, d_out, _own_sgemm)


cdef void dense_backward_k(floating* x, floating* w, floating* dy,
                           floating* dw, floating* db, floating* dx,
                           int n, int d_in, int d_out) noexcept nogil:
    """dW = X^T dY, db = column sums of dY, dX = dY W^T (each skipped if NULL)."""
    cdef Py_ssize_t i, j
    cdef floating* row
    if dw != NULL:
        if floating is float and _own_sgemm:
            mg_sgemm(d_in, d_out, n, x, 1, d_in, dy, d_out, NULL, dw, d_out)
        else:
            gemm_rm(True, False, d_in, d_out, n, 1, x, d_in, dy, d_out, 0, dw, d_out)
    if db != NULL:
        for j in range(d_out):
            db[j] = 0
        for i in range(n):
            row = dy + i * d_out
            for j in range(d_out):
                db[j] += row[j]
    if dx != NULL:
        input_grad_k(dy, w, dx, n, d_in, d_out, d_in, _own_sgemm)


def dense_forward(X, W, b, Y):
    """Y = X @ W + b. X: (n, d_in), W: (d_in, d_out), b: (d_out,), Y: (n, d_out)."""
    cdef int t = _float_type("X", X)
    cdef cnp.ndarray x = _check("X", X, t, 2)
    cdef cnp.ndarray w = _check("W", W, t, 2, x.shape[1])
    cdef Py_ssize_t n = x.shape[0], d_in = x.shape[1], d_out = w.shape[1]
    cdef cnp.ndarray bb = _check("b", b, t, 1, d_out)
    cdef cnp.ndarray y = _out("Y", Y, t, 2, n, d_out)
    _disjoint("Y", y, "X", x)
    _disjoint("Y", y, "W", w)
    _disjoint("Y", y, "b", bb)
    if t == F32:
        with nogil:
            dense_forward_k(<float*>_lo(x), <float*>_lo(w), <float*>_lo(bb), <float*>_lo(y),
                            <int>n, <int>d_in, <int>d_out)
    else:
        with nogil:
            dense_forward_k(<double*>_lo(x), <double*>_lo(w), <double*>_lo(bb), <double*>_lo(y),
                            <int>n, <int>d_in, <int>d_out)
    return Y


def dense_backward(X, W, dY, dW=None, db=None, dX=None):
    """Gradients of Y = X @ W + b given dY = dL/dY, written in place.

    X: (n, d_in), W: (d_in, d_out), dY: (n, d_out).
    dW: (d_in, d_out) and db: (d_out,) -- both or neither (None skips them).
    dX: (n, d_in) or None (skipped: the first layer needs no input gradient).
    """
    cdef int t = _float_type("dY", dY)
    cdef cnp.ndarray dy = _check("dY", dY, t, 2)
    cdef Py_ssize_t n = dy.shape[0], d_out = dy.shape[1]
    cdef cnp.ndarray x = _check("X", X, t, 2, n)
    cdef Py_ssize_t d_in = x.shape[1]
    cdef cnp.ndarray w = _check("W", W, t, 2, d_in, d_out)
    cdef cnp.ndarray dw = None, dbb = None, dx = None
    if (dW is None) != (db is None):
        raise ValueError("dW and db must both be arrays or both be None")
    if dW is not None:
        dw = _out("dW", dW, t, 2, d_in, d_out)
        dbb = _out("db", db, t, 1, d_out)
        for name, other in (("X", x), ("W", w), ("dY", dy)):
            _disjoint("dW", dw, name, other)
            _disjoint("db", dbb, name, other)
        _disjoint("db", dbb, "dW", dw)
    if dX is not None:
        dx = _out("dX", dX, t, 2, n, d_in)
        for name, other in (("X", x), ("W", w), ("dY", dy)):
            _disjoint("dX", dx, name, other)
        if dw is not None:
            _disjoint("dX", dx, "dW", dw)
            _disjoint("dX", dx, "db", dbb)
    cdef char *pdw = NULL
    cdef char *pdb = NULL
    cdef char *pdx = NULL
    if dw is not None:
        pdw = _lo(dw)
        pdb = _lo(dbb)
    if dx is not None:
        pdx = _lo(dx)
    if t == F32:
        with nogil:
            dense_backward_k(<float*>_lo(x), <float*>_lo(w), <float*>_lo(dy),
                             <float*>pdw, <float*>pdb, <float*>pdx, <int>n, <int>d_in, <int>d_out)
    else:
        with nogil:
            dense_backward_k(<double*>_lo(x), <double*>_lo(w), <double*>_lo(dy),
                             <double*>pdw, <double*>pdb, <double*>pdx, <int>n, <int>d_in, <int>d_out)


# ---------------------------------------------------------------------------
# 3b. Elementwise activations (forward beside backward)
# ---------------------------------------------------------------------------

cdef void relu_forward_k(floating* x, floating* y, Py_ssize_t size) noexcept nogil:
    # Written as "0 if x <= 0" so that NaN passes through (as in PyTorch):
    # a NaN must reach the loss and stop training, not be zeroed here.
    cdef Py_ssize_t i
    cdef floating v
    for i in range(size):
        v = x[i]
        y[i] = 0 if v <= 0 else v


cdef void relu_backward_k(floating* y, floating* dy, floating* dx, Py_ssize_t size) noexcept nogil:
    # Uses the ReLU output: y > 0 exactly where the input was > 0. dy is
    # loaded unconditionally so the compiler can turn the branch into a
    # vector select (a conditional load would keep it a mispredicted branch).
    cdef Py_ssize_t i
    cdef floating g
    for i in range(size):
        g = dy[i]
        dx[i] = g if y[i] > 0 else 0


cdef void tanh_forward_k(floating* x, floating* y, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i
    if floating is float:
        mg_tanh_array_f(x, y, size)  # vectorised; libm's tanhf is a call per element
    else:
        for i in range(size):
            y[i] = tanh(x[i])


cdef void tanh_backward_k(floating* y, floating* dy, floating* dx, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(size):
        dx[i] = dy[i] * (1 - y[i] * y[i])


cdef tuple _unary(str xname, object X, str yname, object Y):
    cdef int t = _float_type(xname, X)
    cdef cnp.ndarray x = _array(xname, X)
    x = _check(xname, X, t, x.ndim)
    cdef cnp.ndarray y = _out(yname, Y, t, x.ndim)
    if _shape(y) != _shape(x):
        raise ValueError(f"{yname} has shape {_shape(y)}, expected {_shape(x)} like {xname}")
    _same_or_disjoint(yname, y, xname, x)
    return t, x, y


cdef tuple _binary(str aname, object A, str bname, object B, str oname, object O):
    t, a, o = _unary(aname, A, oname, O)
    cdef cnp.ndarray b = _check(bname, B, t, a.ndim)
    if _shape(b) != _shape(a):
        raise ValueError(f"{bname} has shape {_shape(b)}, expected {_shape(a)} like {aname}")
    _same_or_disjoint(oname, o, bname, b)
    return t, a, b, o


# The four elementwise wrappers share their checks and dispatch: each passes
# its kernel's float and double specialisations as function pointers.
ctypedef void (*unary_f)(float*, float*, Py_ssize_t) noexcept nogil
ctypedef void (*unary_d)(double*, double*, Py_ssize_t) noexcept nogil
ctypedef void (*binary_f)(float*, float*, float*, Py_ssize_t) noexcept nogil
ctypedef void (*binary_d)(double*, double*, double*, Py_ssize_t) noexcept nogil


cdef object _run_unary(str xname, object X, str yname, object Y, unary_f kf, unary_d kd):
    cdef int t
    cdef cnp.ndarray x, y
    t, x, y = _unary(xname, X, yname, Y)
    cdef Py_ssize_t size = x.size
    if t == F32:
        with nogil:
            kf(<float*>_lo(x), <float*>_lo(y), size)
    else:
        with nogil:
            kd(<double*>_lo(x), <double*>_lo(y), size)
    return Y


cdef object _run_binary(object A, object B, object O, binary_f kf, binary_d kd):
    cdef int t
    cdef cnp.ndarray a, b, o
    t, a, b, o = _binary("Y", A, "dY", B, "dX", O)
    cdef Py_ssize_t size = a.size
    if t == F32:
        with nogil:
            kf(<float*>_lo(a), <float*>_lo(b), <float*>_lo(o), size)
    else:
        with nogil:
            kd(<double*>_lo(a), <double*>_lo(b), <double*>_lo(o), size)
    return O


def relu_forward(X, Y):
    """Y = max(X, 0), any shape (NaN passes through); Y may be X (in place)."""
    return _run_unary("X", X, "Y", Y, relu_forward_k[float], relu_forward_k[double])


def relu_backward(Y, dY, dX):
    """dX = dY where Y > 0, else 0; Y is the ReLU output; dX may be dY."""
    return _run_binary(Y, dY, dX, relu_backward_k[float], relu_backward_k[double])


def tanh_forward(X, Y):
    """Y = tanh(X), any shape; Y may be X (in place)."""
    return _run_unary("X", X, "Y", Y, tanh_forward_k[float], tanh_forward_k[double])


def tanh_backward(Y, dY, dX):
    """dX = dY * (1 - Y^2), with Y the tanh output; dX may be dY."""
    return _run_binary(Y, dY, dX, tanh_backward_k[float], tanh_backward_k[double])


# ---------------------------------------------------------------------------
# 3c. Batch norm over the batch axis (PyTorch's BatchNorm1d semantics)
# ---------------------------------------------------------------------------
# The training forward keeps the batch mean and 1/sqrt(var + eps) per feature;
# the backward recomputes xhat from X with them instead of storing an
# (n, d) xhat buffer: less memory traffic for the same arithmetic.

cdef void batchnorm_forward_k(floating* x, floating* gamma, floating* beta,
                              floating* run_mean, floating* run_var,
                              floating* mean, floating* invstd, floating* y,
                              int n, int d, double momentum, double eps,
                              bint update_running, Py_ssize_t ld) noexcept nogil:
    # d columns of n rows; x and y rows ld apart (ld = d for a whole matrix,
    # more for a block of columns: ForwardPlan normalises column blocks).
    cdef Py_ssize_t i, j
    cdef floating* row
    cdef floating* yrow
    cdef floating diff
    cdef double var
    for j in range(d):
        mean[j] = 0
        invstd[j] = 0
    for i in range(n):
        row = x + i * ld
        for j in range(d):
            mean[j] += row[j]
    for j in range(d):
        mean[j] = mean[j] / n
    # Two-pass variance (sum of squared deviations), accumulated in invstd.
    for i in range(n):
        row = x + i * ld
        for j in range(d):
            diff = row[j] - mean[j]
            invstd[j] += diff * diff
    for j in range(d):
        var = invstd[j] / n
        if update_running:
            run_mean[j] = (1 - momentum) * run_mean[j] + momentum * mean[j]
            # PyTorch keeps the unbiased variance in the running statistics.
            run_var[j] = (1 - momentum) * run_var[j] + momentum * var * n / (n - 1)
        invstd[j] = 1 / sqrt(var + eps)
    for i in range(n):
        row = x + i * ld
        yrow = y + i * ld
        for j in range(d):
            yrow[j] = (row[j] - mean[j]) * invstd[j] * gamma[j] + beta[j]


cdef void batchnorm_backward_k(floating* x, floating* mean, floating* invstd,
                               floating* gamma, floating* dy,
                               floating* dgamma, floating* dbeta, floating* dx,
                               int n, int d) noexcept nogil:
    # dx = gamma * invstd / n * (n dy - sum(dy) - xhat * sum(dy xhat))
    cdef Py_ssize_t i, j
    cdef floating* row
    cdef floating* dyrow
    cdef floating* dxrow
    cdef floating xhat
    for j in range(d):
        dgamma[j] = 0
        dbeta[j] = 0
    for i in range(n):
        row = x + i * d
        dyrow = dy + i * d
        for j in range(d):
            xhat = (row[j] - mean[j]) * invstd[j]
            dbeta[j] += dyrow[j]
            dgamma[j] += dyrow[j] * xhat
    for i in range(n):
        row = x + i * d
        dyrow = dy + i * d
        dxrow = dx + i * d
        for j in range(d):
            xhat = (row[j] - mean[j]) * invstd[j]
            dxrow[j] = gamma[j] * invstd[j] * (dyrow[j] - (dbeta[j] + xhat * dgamma[j]) / n)


cdef void batchnorm_eval_k(floating* x, floating* gamma, floating* beta,
                           floating* run_mean, floating* run_var, floating* y,
                           int n, int d, double eps, Py_ssize_t ld) noexcept nogil:
    # x and y rows ld apart, as in batchnorm_forward_k.
    cdef Py_ssize_t i, j
    cdef floating* row
    cdef floating* yrow
    for i in range(n):
        row = x + i * ld
        yrow = y + i * ld
        for j in range(d):
            yrow[j] = (row[j] - run_mean[j]) / sqrt(run_var[j] + eps) * gamma[j] + beta[j]


def batchnorm_forward(X, gamma, beta, running_mean, running_var, mean, invstd, Y,
                      *, double momentum=0.1, double eps=1e-5, bint update_running=True):
    """Training-mode batch norm with batch statistics.

    X, Y: (n, d), n >= 2. gamma, beta, running_mean, running_var: (d,).
    Writes the batch mean and 1/sqrt(var + eps) into mean, invstd (d,), which
    batchnorm_backward needs. Running statistics move by `momentum` (PyTorch
    convention: new = (1 - momentum) * old + momentum * batch, unbiased
    variance) unless update_running is False. Y may be X.
    """
    cdef int t = _float_type("X", X)
    cdef cnp.ndarray x = _check("X", X, t, 2)
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    if n < 2:
        raise ValueError(f"batch norm in training mode needs at least 2 rows in X, got {n}")
    if not (0 <= momentum <= 1):
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    cdef cnp.ndarray g = _check("gamma", gamma, t, 1, d)
    cdef cnp.ndarray b = _check("beta", beta, t, 1, d)
    cdef cnp.ndarray rm = _out("running_mean", running_mean, t, 1, d)
    cdef cnp.ndarray rv = _out("running_var", running_var, t, 1, d)
    cdef cnp.ndarray mu = _out("mean", mean, t, 1, d)
    cdef cnp.ndarray istd = _out("invstd", invstd, t, 1, d)
    cdef cnp.ndarray y = _out("Y", Y, t, 2, n, d)
    _same_or_disjoint("Y", y, "X", x)
    outs = (("running_mean", rm), ("running_var", rv), ("mean", mu), ("invstd", istd))
    for i, (oname, o) in enumerate(outs):
        for iname, other in (("X", x), ("gamma", g), ("beta", b), ("Y", y)) + outs[i + 1:]:
            _disjoint(oname, o, iname, other)
    for iname, other in (("gamma", g), ("beta", b)):
        _disjoint("Y", y, iname, other)
    if t == F32:
        with nogil:
            batchnorm_forward_k(<float*>_lo(x), <float*>_lo(g), <float*>_lo(b), <float*>_lo(rm),
                                <float*>_lo(rv), <float*>_lo(mu), <float*>_lo(istd), <float*>_lo(y),
                                <int>n, <int>d, momentum, eps, update_running, d)
    else:
        with nogil:
            batchnorm_forward_k(<double*>_lo(x), <double*>_lo(g), <double*>_lo(b), <double*>_lo(rm),
                                <double*>_lo(rv), <double*>_lo(mu), <double*>_lo(istd), <double*>_lo(y),
                                <int>n, <int>d, momentum, eps, update_running, d)
    return Y


def batchnorm_backward(X, mean, invstd, gamma, dY, dgamma, dbeta, dX):
    """Gradients of training-mode batch norm.

    X, dY, dX: (n, d); mean, invstd: (d,) from batchnorm_forward;
    gamma, dgamma, dbeta: (d,). dX may be dY.
    """
    cdef int t = _float_type("dY", dY)
    cdef cnp.ndarray dy = _check("dY", dY, t, 2)
    cdef Py_ssize_t n = dy.shape[0], d = dy.shape[1]
    cdef cnp.ndarray x = _check("X", X, t, 2, n, d)
    cdef cnp.ndarray mu = _check("mean", mean, t, 1, d)
    cdef cnp.ndarray istd = _check("invstd", invstd, t, 1, d)
    cdef cnp.ndarray g = _check("gamma", gamma, t, 1, d)
    cdef cnp.ndarray dg = _out("dgamma", dgamma, t, 1, d)
    cdef cnp.ndarray db = _out("dbeta", dbeta, t, 1, d)
    cdef cnp.ndarray dx = _out("dX", dX, t, 2, n, d)
    _same_or_disjoint("dX", dx, "dY", dy)
    for oname, o in (("dgamma", dg), ("dbeta", db), ("dX", dx)):
        for iname, other in (("X", x), ("mean", mu), ("invstd", istd), ("gamma", g)):
            _disjoint(oname, o, iname, other)
    for oname, o in (("dgamma", dg), ("dbeta", db)):
        _disjoint(oname, o, "dY", dy)
        _disjoint(oname, o, "dX", dx)
    _disjoint("dgamma", dg, "dbeta", db)
    if t == F32:
        with nogil:
            batchnorm_backward_k(<float*>_lo(x), <float*>_lo(mu), <float*>_lo(istd), <float*>_lo(g),
                                 <float*>_lo(dy), <float*>_lo(dg), <float*>_lo(db), <float*>_lo(dx),
                                 <int>n, <int>d)
    else:
        with nogil:
            batchnorm_backward_k(<double*>_lo(x), <double*>_lo(mu), <double*>_lo(istd), <double*>_lo(g),
                                 <double*>_lo(dy), <double*>_lo(dg), <double*>_lo(db), <double*>_lo(dx),
                                 <int>n, <int>d)


def batchnorm_eval(X, gamma, beta, running_mean, running_var, Y, *, double eps=1e-5):
    """Evaluation-mode batch norm with the running statistics. X, Y: (n, d); Y may be X."""
    cdef int t = _float_type("X", X)
    cdef cnp.ndarray x = _check("X", X, t, 2)
    cdef Py_ssize_t n = x.shape[0], d = x.shape[1]
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    cdef cnp.ndarray g = _check("gamma", gamma, t, 1, d)
    cdef cnp.ndarray b = _check("beta", beta, t, 1, d)
    cdef cnp.ndarray rm = _check("running_mean", running_mean, t, 1, d)
    cdef cnp.ndarray rv = _check("running_var", running_var, t, 1, d)
    cdef cnp.ndarray y = _out("Y", Y, t, 2, n, d)
    _same_or_disjoint("Y", y, "X", x)
    for iname, other in (("gamma", g), ("beta", b), ("running_mean", rm), ("running_var", rv)):
        _disjoint("Y", y, iname, other)
    if t == F32:
        with nogil:
            batchnorm_eval_k(<float*>_lo(x), <float*>_lo(g), <float*>_lo(b), <float*>_lo(rm),
                             <float*>_lo(rv), <float*>_lo(y), <int>n, <int>d, eps, d)
    else:
        with nogil:
            batchnorm_eval_k(<double*>_lo(x), <double*>_lo(g), <double*>_lo(b), <double*>_lo(rm),
                             <double*>_lo(rv), <double*>_lo(y), <int>n, <int>d, eps, d)
    return Y


# ---------------------------------------------------------------------------
# 4. Loss: sigmoid + binary cross-entropy on logits, with its gradient
# ---------------------------------------------------------------------------

cdef double sigmoid_bce_k(floating* z, floating* target, floating* prob, floating* dz,
                          Py_ssize_t n) noexcept nogil:
    """Mean BCE of sigmoid(z) against target; prob = sigmoid(z); dz = d mean / dz.

    Written with exp(-|z|) only, so no exp overflows whatever z is:
    loss_i = max(z, 0) - z t + log(1 + exp(-|z|)).
    """
    cdef Py_ssize_t i
    cdef double total = 0, zi, e, p
    for i in range(n):
        zi = z[i]
        e = exp(-fabs(zi))
        if zi >= 0:
            p = 1 / (1 + e)
            total += zi - zi * target[i] + log1p(e)
        else:
            p = e / (1 + e)
            total += -zi * target[i] + log1p(e)
        prob[i] = <floating>p
        dz[i] = <floating>((p - target[i]) / n)
    return total / n


def sigmoid_bce(logits, targets, probs, dlogits):
    """Mean binary cross-entropy of sigmoid(logits) against targets.

    All four arrays have the same shape (any; usually (n,) or (n, 1)).
    Writes probs = sigmoid(logits) and dlogits = d(mean loss)/d(logits).
    Returns the mean loss as a Python float. Stable for |logits| up to 1e4
    and beyond. dlogits may be logits.
    """
    cdef int t = _float_type("logits", logits)
    cdef cnp.ndarray z = _array("logits", logits)
    z = _check("logits", logits, t, z.ndim)
    cdef cnp.ndarray tg = _check("targets", targets, t, z.ndim)
    cdef cnp.ndarray p = _out("probs", probs, t, z.ndim)
    cdef cnp.ndarray dz = _out("dlogits", dlogits, t, z.ndim)
    for name, a in (("targets", tg), ("probs", p), ("dlogits", dz)):
        if _shape(a) != _shape(z):
            raise ValueError(f"{name} has shape {_shape(a)}, expected {_shape(z)} like logits")
    if z.size == 0:
        raise ValueError("logits is empty: the mean loss of no examples is undefined")
    _same_or_disjoint("dlogits", dz, "logits", z)
    _disjoint("dlogits", dz, "targets", tg)
    _disjoint("probs", p, "logits", z)
    _disjoint("probs", p, "targets", tg)
    _disjoint("probs", p, "dlogits", dz)
    cdef Py_ssize_t n = z.size
    cdef double loss
    if t == F32:
        with nogil:
            loss = sigmoid_bce_k(<float*>_lo(z), <float*>_lo(tg), <float*>_lo(p), <float*>_lo(dz), n)
    else:
        with nogil:
            loss = sigmoid_bce_k(<double*>_lo(z), <double*>_lo(tg), <double*>_lo(p), <double*>_lo(dz), n)
    return loss


cdef double softmax_ce_k(floating* z, int64_t* labels, floating* prob, floating* dz,
                         Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """Mean cross-entropy of softmax(z) rows against integer labels;
    prob = softmax(z), dz = d mean / dz = (prob - onehot) / n. The row max
    is subtracted before exp, so no logit can overflow."""
    cdef Py_ssize_t i, j
    cdef floating* zr
    cdef floating* pr
    cdef floating* dr
    cdef double total = 0, top, s, logs
    for i in range(n):
        zr = z + i * k
        pr = prob + i * k
        dr = dz + i * k
        top = zr[0]
        for j in range(1, k):
            if zr[j] > top:
                top = zr[j]
        s = 0
        for j in range(k):
            s += exp(zr[j] - top)
        logs = log(s)
        total += top + logs - zr[labels[i]]
        for j in range(k):
            pr[j] = <floating>exp(zr[j] - top - logs)
            dr[j] = <floating>(pr[j] / n)
        dr[labels[i]] -= <floating>(1.0 / n)
    return total / n


def softmax_cross_entropy(logits, labels, probs, dlogits):
    """Mean cross-entropy of softmax(logits) against class indices.

    logits, probs, dlogits: (n, k) float; labels: (n,) int64 in [0, k).
    Writes probs = softmax(logits) and dlogits = d(mean loss)/d(logits);
    returns the mean loss. dlogits may not alias logits.
    """
    cdef int t = _float_type("logits", logits)
    cdef cnp.ndarray z = _check("logits", logits, t, 2)
    cdef Py_ssize_t n = z.shape[0], k = z.shape[1]
    if n == 0 or k == 0:
        raise ValueError(f"logits has shape {_shape(z)}: need at least one row and one class")
    cdef cnp.ndarray lab = _check("labels", labels, cnp.NPY_INT64, 1, n)
    cdef cnp.ndarray p = _out("probs", probs, t, 2, n, k)
    cdef cnp.ndarray dz = _out("dlogits", dlogits, t, 2, n, k)
    for oname, o in (("probs", p), ("dlogits", dz)):
        _disjoint(oname, o, "logits", z)
        _disjoint(oname, o, "labels", lab)
    _disjoint("dlogits", dz, "probs", p)
    cdef int64_t* pl = _indices_below("labels", lab, k, "classes")
    cdef double loss
    if t == F32:
        with nogil:
            loss = softmax_ce_k(<float*>_lo(z), pl, <float*>_lo(p), <float*>_lo(dz), n, k)
    else:
        with nogil:
            loss = softmax_ce_k(<double*>_lo(z), pl, <double*>_lo(p), <double*>_lo(dz), n, k)
    return loss


# ---------------------------------------------------------------------------
# 5. Adam, in place (PyTorch's update, bias correction included)
# ---------------------------------------------------------------------------

cdef void adam_k(floating* p, floating* g, floating* m, floating* v, Py_ssize_t size,
                 double lr, double beta1, double beta2, double eps, long step) noexcept nogil:
    # The loop is mg_adam_f/d in _fastmath.h (vectorised, AVX2 where the CPU has it).
    cdef double bc1 = 1 - beta1 ** step
    cdef double bc2 = 1 - beta2 ** step
    if floating is float:
        mg_adam_f(p, g, m, v, size, <float>(lr / bc1), <float>(1 / sqrt(bc2)), <float>beta1,
                  <float>beta2, <float>(1 - beta1), <float>(1 - beta2), <float>eps)
    else:
        mg_adam_d(p, g, m, v, size, lr / bc1, 1 / sqrt(bc2), beta1, beta2,
                  1 - beta1, 1 - beta2, eps)


cdef int _check_adam(double lr, double beta1, double beta2, double eps, long step) except -1:
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if not (lr >= 0):
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0 <= beta1 < 1):
        raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
    if not (0 <= beta2 < 1):
        raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
    if not (eps > 0):
        raise ValueError(f"eps must be > 0, got {eps}")
    return 0


def adam_step(param, grad, m, v, *, double lr, double beta1, double beta2,
              double eps, long step):
    """One Adam update of param, m and v in place, from grad.

    All four arrays share one shape (any) and dtype; step is the 1-based
    count of updates including this one (it sets the bias correction).
    """
    cdef int t = _float_type("param", param)
    cdef cnp.ndarray p = _array("param", param)
    p = _out("param", param, t, p.ndim)
    cdef cnp.ndarray g = _check("grad", grad, t, p.ndim)
    cdef cnp.ndarray mm = _out("m", m, t, p.ndim)
    cdef cnp.ndarray vv = _out("v", v, t, p.ndim)
    for name, a in (("grad", g), ("m", mm), ("v", vv)):
        if _shape(a) != _shape(p):
            raise ValueError(f"{name} has shape {_shape(a)}, expected {_shape(p)} like param")
    arrays = (("param", p), ("grad", g), ("m", mm), ("v", vv))
    for i in range(4):
        for j in range(i + 1, 4):
            _disjoint(arrays[i][0], arrays[i][1], arrays[j][0], arrays[j][1])
    _check_adam(lr, beta1, beta2, eps, step)
    cdef Py_ssize_t size = p.size
    if t == F32:
        with nogil:
            adam_k(<float*>_lo(p), <float*>_lo(g), <float*>_lo(mm), <float*>_lo(vv), size,
                   lr, beta1, beta2, eps, step)
    else:
        with nogil:
            adam_k(<double*>_lo(p), <double*>_lo(g), <double*>_lo(mm), <double*>_lo(vv), size,
                   lr, beta1, beta2, eps, step)


# ---------------------------------------------------------------------------
# 6. Data: batch gather, instance noise, finiteness
# ---------------------------------------------------------------------------

cdef void gather_k(uint8_t* images, int64_t* idx, floating* out,
                   Py_ssize_t n, Py_ssize_t d) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint8_t* src
    cdef floating* dst
    cdef floating lut[256]
    # x / 127.5 - 1 computed once per byte value in double, then rounded:
    # each output is the correctly rounded value.
    for j in range(256):
        lut[j] = <floating>(j / 127.5 - 1.0)
    for i in range(n):
        src = images + idx[i] * d
        dst = out + i * d
        for j in range(d):
            dst[j] = lut[src[j]]


def gather_batch(images, idx, out):
    """out[i] = images[idx[i]] / 127.5 - 1, scaling uint8 pixels to [-1, 1].

    images: (N, d) uint8; idx: (n,) int64, each in [0, N); out: (n, d) float.
    """
    cdef cnp.ndarray im = _check("images", images, cnp.NPY_UINT8, 2)
    cdef cnp.ndarray ix = _check("idx", idx, cnp.NPY_INT64, 1)
    cdef Py_ssize_t n = ix.shape[0], N = im.shape[0], d = im.shape[1]
    cdef int t = _float_type("out", out)
    cdef cnp.ndarray o = _out("out", out, t, 2, n, d)
    _disjoint("out", o, "images", im)
    _disjoint("out", o, "idx", ix)
    cdef int64_t* pidx = _indices_below("idx", ix, N, "images")
    if t == F32:
        with nogil:
            gather_k(<uint8_t*>_lo(im), pidx, <float*>_lo(o), n, d)
    else:
        with nogil:
            gather_k(<uint8_t*>_lo(im), pidx, <double*>_lo(o), n, d)
    return out


# Pairs per chunk of raw words: 4 KB of words on the stack, and the normals
# made from them are written while the words are still in L1.
cdef enum:
    NORMAL_CHUNK = 256


cdef void normal_fill_k(bitgen_t* bg, floating* out, Py_ssize_t size) noexcept nogil:
    cdef uint64_t raw[2 * NORMAL_CHUNK]
    cdef floating tail[2]
    cdef Py_ssize_t pairs = size // 2, done = 0, m, i
    # float32 takes one 64-bit word per pair of normals, float64 two.
    cdef Py_ssize_t words = 1 if floating is float else 2
    while done < pairs:
        m = min(NORMAL_CHUNK, pairs - done)
        for i in range(m * words):
            raw[i] = bg.next_uint64(bg.state)
        if floating is float:
            mg_normal_pairs_f(raw, out + 2 * done, m)
        else:
            mg_normal_pairs_d(raw, out + 2 * done, m)
        done += m
    if size % 2:
        # An odd count: one more pair, its second normal dropped.
        for i in range(words):
            raw[i] = bg.next_uint64(bg.state)
        if floating is float:
            mg_normal_pairs_f(raw, tail, 1)
        else:
            mg_normal_pairs_d(raw, tail, 1)
        out[size - 1] = tail[0]


def standard_normal(rng, out):
    """Fill out with standard normal draws from rng's bit generator, in place.

    rng: a numpy.random.Generator (or BitGenerator); its state advances.
    out: C-contiguous float32 or float64 array of any shape.
    The Box-Muller transform in out's own precision (see _fastmath.h): 5-8x
    faster than Generator.standard_normal, and a different stream of
    numbers. float32 uses one 64-bit word per pair of normals (24-bit
    uniforms), float64 two (52-bit uniforms); an odd count draws one
    extra pair and drops its second value.
    """
    bitgen = getattr(rng, "bit_generator", rng)
    capsule = getattr(bitgen, "capsule", None)
    if capsule is None or not PyCapsule_IsValid(capsule, "BitGenerator"):
        raise TypeError(f"rng must be a numpy.random.Generator or BitGenerator, got {type(rng).__name__}")
    cdef int t = _float_type("out", out)
    cdef cnp.ndarray o = _array("out", out)
    o = _out("out", out, t, o.ndim)
    cdef Py_ssize_t size = o.size
    cdef bitgen_t* bg = <bitgen_t*>PyCapsule_GetPointer(capsule, "BitGenerator")
    with bitgen.lock:
        if t == F32:
            with nogil:
                normal_fill_k(bg, <float*>_lo(o), size)
        else:
            with nogil:
                normal_fill_k(bg, <double*>_lo(o), size)
    return out


cdef void add_noise_k(floating* x, floating* noise, floating std, floating* out,
                      Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(size):
        out[i] = x[i] + std * noise[i]


def add_noise(X, noise, double std, out):
    """out = X + std * noise (instance noise). Same shapes; out may be X.

    noise holds standard normal draws (e.g. Generator.standard_normal(out=...)).
    """
    if not (std >= 0):
        raise ValueError(f"std must be >= 0, got {std}")
    cdef int t
    cdef cnp.ndarray x, nz, o
    t, x, nz, o = _binary("X", X, "noise", noise, "out", out)
    cdef Py_ssize_t size = x.size
    if t == F32:
        with nogil:
            add_noise_k(<float*>_lo(x), <float*>_lo(nz), <float>std, <float*>_lo(o), size)
    else:
        with nogil:
            add_noise_k(<double*>_lo(x), <double*>_lo(nz), std, <double*>_lo(o), size)
    return out


cdef bint all_finite_k(floating* x, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating acc = 0
    # x * 0 is 0 for finite x and NaN for inf or NaN: one branch-free pass.
    for i in range(size):
        acc += x[i] * 0
    return acc == 0


def all_finite(X):
    """True if every element of the float array X is finite (no NaN, no inf)."""
    cdef int t = _float_type("X", X)
    cdef cnp.ndarray x = _array("X", X)
    x = _check("X", X, t, x.ndim)
    cdef Py_ssize_t size = x.size
    cdef bint ok
    if t == F32:
        with nogil:
            ok = all_finite_k(<float*>_lo(x), size)
    else:
        with nogil:
            ok = all_finite_k(<double*>_lo(x), size)
    return ok


# ---------------------------------------------------------------------------
# 7. The crew: a helper thread for the plans
# ---------------------------------------------------------------------------
# The crew: one helper thread that serves plans without the GIL. For the
# length of a training step the helper sits in Crew.serve, a loop that
# spins (then yields) until the calling thread posts a job: a plan's helper
# part, as a C function and its state. The caller works on the same plan,
# then takes the job back if the helper has not claimed it yet (it then
# does that part itself: plans hand out their parts dynamically) or waits
# until the helper is done. No future, no lock, no GIL and no wake-up
# between the passes of a step: a thread pool's round trip costs about
# 60 us, a layer's half of a forward 20-600 us.
ctypedef void (*crew_job)(void* state) noexcept nogil

cdef struct CrewState:
    mg_atomic posted   # number of the last job posted
    mg_atomic claim    # 2 j: job j awaits the helper; 2 j + 1: claimed by it, or taken back
    mg_atomic out      # number of the last job the helper finished
    mg_atomic closing  # set: serve returns once idle
    mg_atomic helped   # jobs the helper has claimed and finished
    mg_atomic serving  # a thread is inside serve
    long job           # the caller's count of jobs posted
    crew_job fn
    void* arg


cdef mg_atomic _NEVER = 0  # an abort flag that is never set


cdef void _crew_serve(CrewState* c) noexcept nogil:
    cdef long j, seen = -1
    cdef int spins = 0
    while True:
        j = mg_load(&c.posted)
        if j != seen:
            seen = j
            # fn and arg are read only after the claim: they were written
            # before claim and posted were released, and not again until the
            # caller is through with job j.
            if mg_cas(&c.claim, 2 * j, 2 * j + 1):
                c.fn(c.arg)
                mg_fetch_add(&c.helped, 1)
                mg_store(&c.out, j)
            spins = 0
            continue
        if mg_load(&c.closing):
            return
        spins += 1
        if spins < 20000:
            MG_PAUSE()
        else:
            mg_yield()


cdef inline void _crew_post(CrewState* c, crew_job fn, void* arg) noexcept nogil:
    c.job += 1
    c.fn = fn
    c.arg = arg
    mg_store(&c.claim, 2 * c.job)
    mg_store(&c.posted, c.job)


cdef inline void _crew_finish(CrewState* c) noexcept nogil:
    if not mg_cas(&c.claim, 2 * c.job, 2 * c.job + 1):
        mg_wait_ge(&c.out, c.job, &_NEVER)


cdef class Crew:
    """A helper thread's post box: run serve() on the helper thread; plans
    given this crew (`run(crew)`) share their work with it until close().

    serve() returns only after close() and once no job is running. A plan
    never waits for a helper that has not claimed its part, so a crew whose
    helper never comes only costs the caller the work.
    """
    cdef CrewState s

    def __cinit__(self):
        mg_store(&self.s.claim, 1)  # job 0 is no job: already taken back

    def serve(self):
        """The helper's loop (blocks, without the GIL, until close())."""
        if mg_fetch_add(&self.s.serving, 1) != 0:
            mg_fetch_add(&self.s.serving, -1)
            raise RuntimeError("this crew already has a helper serving it")
        with nogil:
            _crew_serve(&self.s)
        mg_fetch_add(&self.s.serving, -1)

    @property
    def serving(self):
        """Whether a helper thread is inside serve() now."""
        return mg_load(&self.s.serving) > 0

    def open(self):
        """Let serve() run until the next close()."""
        mg_store(&self.s.closing, 0)

    def close(self):
        """Ask serve() to return once it is idle."""
        mg_store(&self.s.closing, 1)

    @property
    def jobs_posted(self):
        """Plan runs posted to the helper so far."""
        return self.s.job

    @property
    def jobs_helped(self):
        """Of those, the runs the helper took part in."""
        return mg_load(&self.s.helped)


cdef void _run_shared(Crew crew, crew_job work, void* state):
    """One run of a plan: work(state) on this thread, and, with a crew, the
    same work posted to its helper; returns once the helper is out."""
    cdef CrewState* c = &crew.s if crew is not None else NULL
    with nogil:
        if c != NULL:
            _crew_post(c, work, state)
        work(state)
        if c != NULL:
            _crew_finish(c)


cdef inline int _half_split(Py_ssize_t d):
    """Where a plan cuts d columns in two: on a 16-column boundary (BLAS
    panels, 64-byte lines) near the middle; d itself (one part) below 32."""
    return <int>d if d < 32 else <int>min(d, (d // 2 + 15) // 16 * 16)


# ---------------------------------------------------------------------------
# 8. The backward plan: a whole backward pass, and its Adam step, in one call
# ---------------------------------------------------------------------------
# A backward pass is a chain (layer i's input gradient needs its output
# gradient) with work hanging off it: each layer's weight gradients
# dW = X^T gpre and, in training, its Adam step. The plan lays all of it out
# as one sequence of items, taken in order by whichever thread comes next
# (fetch-and-add), last layer first:
#     for i = L-1 .. 0:  G(i), X(i) in halves, blocks of layer i+1
#     then               blocks of layer 0
# G(i) is the activation's backward (gpre from gout: tanh, ReLU, batch norm),
# X(i) the input gradient gx = gpre W^T in two column halves, and a block a
# run of rows of dW followed at once by the Adam step of those rows (and,
# in a layer's first block, db and the Adam step of b, gamma and beta). A
# block is small (BLOCK_BYTES of dW) so that Adam finds its gradients in L2
# rather than reading them back from memory, which on this model is most of
# what Adam costs. A block of layer j may only run once X(j) has read W_j;
# coming after X(j-1) in the sequence, it hardly ever waits.
#
# An item waits only for items before it (counters below), so nothing can
# deadlock, and one thread alone runs the same items in the same order: the
# same bits whichever threads run a plan.
#   chain_done[i] = G(i) and X(i) parts finished (1 + gx parts: layer done)
#   next_item     = the next item to hand out

cdef enum:
    ACT_RELU = 0        # hidden layer: dense -> ReLU
    ACT_RELU_BN = 1     # hidden layer: dense -> ReLU -> batch norm
    ACT_TANH = 2        # output layer: dense -> tanh
    ACT_LINEAR = 3      # output layer: dense alone (logits)

_ACTIVATIONS = {"relu": ACT_RELU, "relu_bn": ACT_RELU_BN, "tanh": ACT_TANH, "linear": ACT_LINEAR}



cdef struct LayerPlan:
    char* x          # (n, d_in)  the layer's input
    char* w          # (d_in, d_out)
    char* y          # (n, d_out) activation output kept by the forward (ReLU or tanh output)
    char* gout       # (n, d_out) dLoss/d(layer output): batch-norm output for relu_bn
    char* gpre       # (n, d_out) dLoss/d(dense output); may be gout itself (not for relu_bn)
    char* gx         # (n, d_in)  dLoss/d(input) or NULL
    char* dw         # (d_in, d_out) or NULL
    char* db         # (d_out,) or NULL
    char* mean       # batch norm: (d_out,) each, else NULL
    char* invstd
    char* gamma
    char* dgamma
    char* dbeta
    int d_in
    int d_out
    int act
    int gx_split     # the second part of gx starts at this column (d_in: one part)
    int block_rows   # rows of dW per block
    int n_blocks
    Py_ssize_t p_lo  # this layer's parameters: [p_lo, p_lo + p_size) of the flat arrays
    Py_ssize_t p_size


# Rows of dW per block: about this many bytes, half of a 1 MB L2. Measured
# on the reference model (2 threads, one process, interleaved): 256 KB to
# 4 MB within 2% of each other, 512 KB and 1 MB the fastest.
cdef Py_ssize_t BLOCK_BYTES = 1 << 19


cdef struct PlanState:
    LayerPlan* layers
    int n_layers
    int n
    bint param_grads
    bint adam
    bint halves        # input gradients in two column halves
    bint own_gemm      # weight gradients through the AVX-512 kernel
    bint is_f32
    char* p            # flat parameters, gradients, Adam moments (Adam only)
    char* g
    char* m
    char* v
    double lr, beta1, beta2, eps
    long step
    mg_atomic next_item
    mg_atomic* chain_done


cdef inline void _layer_grad_pre(PlanState* s, LayerPlan* L, floating* tag) noexcept nogil:
    """gpre = dLoss/d(dense output) from gout, through the layer's activation (and batch norm)."""
    cdef Py_ssize_t size = <Py_ssize_t>s.n * L.d_out
    if L.act == ACT_TANH:
        tanh_backward_k(<floating*>L.y, <floating*>L.gout, <floating*>L.gpre, size)
    elif L.act == ACT_RELU_BN:
        batchnorm_backward_k(<floating*>L.y, <floating*>L.mean, <floating*>L.invstd,
                             <floating*>L.gamma, <floating*>L.gout, <floating*>L.dgamma,
                             <floating*>L.dbeta, <floating*>L.gpre, s.n, L.d_out)
        relu_backward_k(<floating*>L.y, <floating*>L.gpre, <floating*>L.gpre, size)
    elif L.act == ACT_RELU:
        relu_backward_k(<floating*>L.y, <floating*>L.gout, <floating*>L.gpre, size)


cdef inline int _gx_parts(PlanState* s, LayerPlan* L) noexcept nogil:
    if L.gx == NULL:
        return 0
    return 2 if s.halves and L.gx_split < L.d_in else 1


cdef inline int _blocks(PlanState* s, int i) noexcept nogil:
    return s.layers[i].n_blocks if s.param_grads and 0 <= i < s.n_layers else 0


cdef void _gx_columns(PlanState* s, LayerPlan* L, int lo, int hi, floating* tag) noexcept nogil:
    """gx[:, lo:hi] = gpre W[lo:hi, :]^T (W's rows lo..hi-1 are contiguous)."""
    input_grad_k(<floating*>L.gpre, <floating*>L.w + <Py_ssize_t>lo * L.d_out, <floating*>L.gx + lo,
                 s.n, hi - lo, L.d_out, L.d_in, s.own_gemm)


cdef inline void _adam_at(PlanState* s, char* grad, Py_ssize_t size, floating* tag) noexcept nogil:
    """Adam on the parameters whose gradients are grad[0:size] in the flat gradients."""
    cdef Py_ssize_t off = (grad - s.g) // sizeof(floating)
    adam_k(<floating*>s.p + off, <floating*>s.g + off, <floating*>s.m + off, <floating*>s.v + off,
           size, s.lr, s.beta1, s.beta2, s.eps, s.step)


cdef void _block(PlanState* s, LayerPlan* L, int b, floating* tag) noexcept nogil:
    """Rows [r0, r1) of dW = X^T gpre, then their Adam step; block 0 also db
    and the Adam step of the layer's vectors."""
    cdef int r0 = b * L.block_rows
    cdef int r1 = min(r0 + L.block_rows, L.d_in)
    cdef Py_ssize_t i, j
    cdef floating* db
    cdef floating* row
    cdef floating* dw = <floating*>L.dw + <Py_ssize_t>r0 * L.d_out
    if floating is float and s.own_gemm:
        mg_sgemm(r1 - r0, L.d_out, s.n, <float*>L.x + r0, 1, L.d_in, <float*>L.gpre, L.d_out, NULL,
                 dw, L.d_out)
    else:
        gemm_rm(True, False, r1 - r0, L.d_out, s.n, 1, <floating*>L.x + r0, L.d_in,
                <floating*>L.gpre, L.d_out, 0, dw, L.d_out)
    if s.adam:
        _adam_at(s, <char*>dw, <Py_ssize_t>(r1 - r0) * L.d_out, tag)
    if b == 0:
        db = <floating*>L.db
        for j in range(L.d_out):
            db[j] = 0
        for i in range(s.n):
            row = <floating*>L.gpre + i * L.d_out
            for j in range(L.d_out):
                db[j] += row[j]
        if s.adam:
            _adam_at(s, L.db, L.d_out, tag)
            if L.act == ACT_RELU_BN:
                _adam_at(s, L.dgamma, L.d_out, tag)
                _adam_at(s, L.dbeta, L.d_out, tag)


cdef inline bint _layer_done(PlanState* s, int i) noexcept nogil:
    """Wait until G(i) and X(i) have finished (W_i and gamma_i no longer read)."""
    return mg_wait_ge(&s.chain_done[i], 1 + _gx_parts(s, &s.layers[i]), &_NEVER)


cdef void _plan_items(PlanState* s, floating* tag) noexcept nogil:
    cdef long p
    cdef int i, gxp, count
    cdef LayerPlan* L
    while True:
        p = mg_fetch_add(&s.next_item, 1)
        i = s.n_layers - 1
        while i >= 0:
            count = 1 + _gx_parts(s, &s.layers[i]) + _blocks(s, i + 1)
            if p < count:
                break
            p -= count
            i -= 1
        if i < 0:  # the tail: blocks of layer 0
            if p >= _blocks(s, 0):
                return
            _layer_done(s, 0)
            _block(s, &s.layers[0], <int>p, tag)
            continue
        L = &s.layers[i]
        gxp = _gx_parts(s, L)
        if p == 0:                       # G(i): needs layer i+1's input gradient whole
            if i < s.n_layers - 1:
                _layer_done(s, i + 1)
            _layer_grad_pre(s, L, tag)
            mg_fetch_add(&s.chain_done[i], 1)
        elif p <= gxp:                   # X(i), part p - 1
            mg_wait_ge(&s.chain_done[i], 1, &_NEVER)
            if gxp == 1:
                _gx_columns(s, L, 0, L.d_in, tag)
            elif p == 1:
                _gx_columns(s, L, 0, L.gx_split, tag)
            else:
                _gx_columns(s, L, L.gx_split, L.d_in, tag)
            mg_fetch_add(&s.chain_done[i], 1)
        else:                            # a block of layer i + 1
            _layer_done(s, i + 1)
            _block(s, &s.layers[i + 1], <int>(p - 1 - gxp), tag)


cdef void _plan_work(void* state) noexcept nogil:
    cdef PlanState* s = <PlanState*>state
    if s.is_f32:
        _plan_items(s, <float*>NULL)
    else:
        _plan_items(s, <double*>NULL)


cdef class BackwardPlan:
    """A network's backward pass over fixed buffers, checked once, run many times.

    layers: one dict per dense layer, input layer first, with the arrays
    (all C-contiguous, one float dtype, n rows):
        x (n, d_in), w (d_in, d_out), y (n, d_out) the ReLU/tanh output of
        the forward, gout (n, d_out) the gradient of the layer's output,
        gpre (n, d_out) scratch for the gradient before the activation (may
        be gout itself, except for relu_bn), gx (n, d_in) or None: the input
        gradient, which must be the previous layer's gout;
        act: "relu", "relu_bn", "tanh" or "linear" (the last two only last);
        for relu_bn: mean, invstd (from the training forward), gamma, dgamma,
        dbeta (d_out,);
        with param_grads: dw (d_in, d_out), db (d_out,).
    adam: None, or (params, grads, m, v), the flat 1-D arrays in which every
    layer's w, b (and gamma, beta) lie, in order; then each layer also needs
    p_lo, p_size: its slice of the flat arrays, which must start at its w
    (and its dw, in the gradients) and hold exactly its dw, db, dgamma and
    dbeta.
    block_bytes: about how much of dW a block computes before its Adam step
    (the default suits L2 caches of 512 KB and more).

    Everything is checked here, so `work` can run without the GIL.
    """
    cdef PlanState s
    cdef bint is_f32
    cdef readonly bint param_grads, adam
    cdef Py_ssize_t block_bytes
    cdef list keep

    def __cinit__(self):
        self.s.layers = NULL
        self.s.chain_done = NULL

    def __init__(self, layers, *, bint param_grads, adam=None, Py_ssize_t block_bytes=BLOCK_BYTES):
        cdef int i, t, L = len(layers)
        if L < 1:
            raise ValueError("a plan needs at least one layer")
        if block_bytes < 1:
            raise ValueError(f"block_bytes must be >= 1, got {block_bytes}")
        self.block_bytes = block_bytes
        self.keep = []
        t = _float_type("layers[0]['w']", layers[0]["w"])
        self.is_f32 = t == F32
        self.s.is_f32 = self.is_f32
        self.param_grads = param_grads or adam is not None
        self.adam = adam is not None
        self.s.param_grads = self.param_grads
        self.s.adam = self.adam
        self.s.halves = True
        self.s.layers = <LayerPlan*>calloc(L, sizeof(LayerPlan))
        self.s.chain_done = <mg_atomic*>calloc(L, sizeof(mg_atomic))
        if self.s.layers == NULL or self.s.chain_done == NULL:
            raise MemoryError()
        self.s.n_layers = L
        self.s.n = _check("layers[0]['x']", layers[0]["x"], t, 2).shape[0]
        if self.s.n < 1:
            raise ValueError("layers[0]['x'] has no rows")
        flat = None
        if self.adam:
            if len(adam) != 4:
                raise ValueError("adam must be (params, grads, m, v)")
            flat = [_out(name, a, t, 1) for name, a in zip(("params", "grads", "m", "v"), adam)]
            for j in range(1, 4):
                if flat[j].shape[0] != flat[0].shape[0]:
                    raise ValueError("params, grads, m and v must have one length")
                for k in range(j):
                    _disjoint(("params", "grads", "m", "v")[j], flat[j], ("params", "grads", "m", "v")[k], flat[k])
            self.keep.extend(flat)
            self.s.p = _lo(<cnp.ndarray>flat[0])
            self.s.g = _lo(<cnp.ndarray>flat[1])
            self.s.m = _lo(<cnp.ndarray>flat[2])
            self.s.v = _lo(<cnp.ndarray>flat[3])
        prev_gout = None
        for i in range(L):
            self._add_layer(i, layers[i], t, L, flat, prev_gout)
            prev_gout = layers[i]["gout"]
        if self.adam:
            # Each parameter is stepped once: the layers' slices may not overlap.
            spans = sorted((self.s.layers[i].p_lo, self.s.layers[i].p_lo + self.s.layers[i].p_size, i)
                           for i in range(L))
            for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
                if lo1 < hi0:
                    raise ValueError(f"the parameter slices of layers[{a}] and layers[{b}] overlap")

    cdef _add_layer(self, int i, dict spec, int t, int L, list flat, object prev_gout):
        cdef LayerPlan* lp = &self.s.layers[i]
        cdef int n = self.s.n
        name = f"layers[{i}]"
        act = spec.get("act")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{name}['act'] must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        lp.act = _ACTIVATIONS[act]
        if (lp.act == ACT_TANH or lp.act == ACT_LINEAR) != (i == L - 1):
            raise ValueError(f"{name}: 'tanh' and 'linear' are for the last layer, 'relu' and 'relu_bn' for the others")
        w = _check(f"{name}['w']", spec["w"], t, 2)
        cdef Py_ssize_t d_in = w.shape[0], d_out = w.shape[1]
        x = _check(f"{name}['x']", spec["x"], t, 2, n, d_in)
        y = _check(f"{name}['y']", spec["y"], t, 2, n, d_out)
        gout = _out(f"{name}['gout']", spec["gout"], t, 2, n, d_out)
        gpre = _out(f"{name}['gpre']", spec["gpre"], t, 2, n, d_out)
        if lp.act == ACT_RELU_BN:
            _disjoint(f"{name}['gpre']", gpre, f"{name}['gout']", gout)
        else:
            _same_or_disjoint(f"{name}['gpre']", gpre, f"{name}['gout']", gout)
        arrays = [w, x, y, gout, gpre]
        for other_name, other in ((f"{name}['x']", x), (f"{name}['w']", w), (f"{name}['y']", y)):
            _disjoint(f"{name}['gpre']", gpre, other_name, other)
        gx = spec.get("gx")
        if gx is not None:
            gx = _out(f"{name}['gx']", gx, t, 2, n, d_in)
            for other_name, other in (("x", x), ("w", w), ("gpre", gpre)):
                _disjoint(f"{name}['gx']", gx, f"{name}['{other_name}']", other)
            arrays.append(gx)
            lp.gx = _lo(gx)
            lp.gx_split = _half_split(d_in)
        if i > 0:
            # The chain hands layer i's input gradient to layer i-1 as its gout.
            if gx is None or _lo(<cnp.ndarray>prev_gout) != _lo(gx):
                raise ValueError(f"{name}['gx'] must be layers[{i - 1}]['gout']")
        lp.x = _lo(x)
        lp.w = _lo(w)
        lp.y = _lo(y)
        lp.gout = _lo(gout)
        lp.gpre = _lo(gpre)
        lp.d_in = <int>d_in
        lp.d_out = <int>d_out
        if lp.act == ACT_RELU_BN:
            vecs = []
            for key in ("mean", "invstd", "gamma", "dgamma", "dbeta"):
                f = _out if key.startswith("d") else _check
                vecs.append(f(f"{name}['{key}']", spec[key], t, 1, d_out))
            for a_name, a in (("dgamma", vecs[3]), ("dbeta", vecs[4])):
                for o_name, o in (("mean", vecs[0]), ("invstd", vecs[1]), ("gamma", vecs[2]),
                                  ("x", x), ("y", y), ("gout", gout), ("gpre", gpre)):
                    _disjoint(f"{name}['{a_name}']", a, f"{name}['{o_name}']", o)
            _disjoint(f"{name}['dgamma']", vecs[3], f"{name}['dbeta']", vecs[4])
            arrays.extend(vecs)
            lp.mean = _lo(<cnp.ndarray>vecs[0])
            lp.invstd = _lo(<cnp.ndarray>vecs[1])
            lp.gamma = _lo(<cnp.ndarray>vecs[2])
            lp.dgamma = _lo(<cnp.ndarray>vecs[3])
            lp.dbeta = _lo(<cnp.ndarray>vecs[4])
        if self.param_grads:
            dw = _out(f"{name}['dw']", spec["dw"], t, 2, d_in, d_out)
            db = _out(f"{name}['db']", spec["db"], t, 1, d_out)
            for o_name, o in (("x", x), ("gpre", gpre), ("y", y), ("gout", gout)):
                _disjoint(f"{name}['dw']", dw, f"{name}['{o_name}']", o)
                _disjoint(f"{name}['db']", db, f"{name}['{o_name}']", o)
            _disjoint(f"{name}['dw']", dw, f"{name}['db']", db)
            arrays.extend([dw, db])
            lp.dw = _lo(dw)
            lp.db = _lo(db)
            lp.block_rows = <int>max(1, min(d_in, self.block_bytes // (d_out * (4 if t == F32 else 8))))
            lp.n_blocks = <int>((d_in + lp.block_rows - 1) // lp.block_rows)
        if self.adam:
            self._check_adam_slice(lp, name, flat, spec, t)
        self.keep.extend(arrays)

    cdef _check_adam_slice(self, LayerPlan* lp, str name, list flat, dict spec, int t):
        cdef Py_ssize_t lo = spec["p_lo"], size = spec["p_size"]
        cdef Py_ssize_t item = 4 if t == F32 else 8
        cdef Py_ssize_t total = flat[0].shape[0]
        if lo < 0 or size < 0 or lo + size > total:
            raise ValueError(f"{name}: parameter slice [{lo}, {lo + size}) is outside the {total} flat parameters")
        # Adam steps each parameter at the place of its gradient in the flat
        # arrays: the slice must be the layer's parameters, w first, and
        # its gradients at the same places, nothing else.
        if lp.w != _lo(flat[0]) + lo * item:
            raise ValueError(f"{name}: 'w' does not start the layer's slice of the flat parameters")
        if lp.dw != _lo(flat[1]) + lo * item:
            raise ValueError(f"{name}: 'dw' does not start the layer's slice of the flat gradients")
        cdef char* start = _lo(<cnp.ndarray>flat[1]) + lo * item
        cdef char* stop = start + size * item
        keys = ("dw", "db", "dgamma", "dbeta") if lp.act == ACT_RELU_BN else ("dw", "db")
        covered = 0
        for key in keys:
            a = <cnp.ndarray>spec[key]  # checked by _add_layer
            if not (start <= _lo(a) and _hi(a) <= stop):
                raise ValueError(f"{name}: '{key}' is not inside the layer's slice of the flat gradients")
            covered += a.size
        if covered != size:
            raise ValueError(f"{name}: the slice of {size} parameters must hold exactly the layer's "
                             f"{covered} parameters ({', '.join(keys)})")
        lp.p_lo = lo
        lp.p_size = size

    def __dealloc__(self):
        free(self.s.layers)
        free(<void*>self.s.chain_done)

    @property
    def n(self):
        """Rows of the batch the plan was made for."""
        return self.s.n

    @property
    def n_items(self):
        """Items of a run (with halves; see the comment above the plan)."""
        cdef int i, k = 0
        for i in range(self.s.n_layers):
            k += 1 + _gx_parts(&self.s, &self.s.layers[i]) + _blocks(&self.s, i)
        return k

    def start(self, *, double lr=0, double beta1=0, double beta2=0, double eps=1, long step=1,
              bint halves=True, bint own_gemm=True):
        """Reset the counters before a run (and set Adam's hyperparameters).

        halves=False computes each input gradient in one GEMM. Halves are
        the default with one thread too: BLAS may round a half-size product
        differently, and a pass should give the same bits whichever threads
        run it. own_gemm=False keeps BLAS for the weight gradients (when
        BLAS has threads of its own to use; see use_own_gemm)."""
        cdef int i
        if self.adam:
            _check_adam(lr, beta1, beta2, eps, step)
        self.s.lr, self.s.beta1, self.s.beta2, self.s.eps, self.s.step = lr, beta1, beta2, eps, step
        self.s.halves = halves
        self.s.own_gemm = own_gemm and _own_sgemm
        for i in range(self.s.n_layers):
            mg_store(&self.s.chain_done[i], 0)
        mg_store(&self.s.next_item, 0)

    def work(self):
        """Take items until none are left, without the GIL. Two threads may
        work on one run at once (after one start())."""
        with nogil:
            _plan_work(&self.s)

    def run(self, Crew crew=None):
        """One run after start(), without the GIL: on this thread alone, or
        shared with crew's helper thread (which must be serving)."""
        _run_shared(crew, _plan_work, &self.s)


# ---------------------------------------------------------------------------
# 9. The forward pass as one plan, shared by two threads column by column
# ---------------------------------------------------------------------------
# Every step of a layer's forward is local to a column of its output: the
# GEMM's column j, its bias, ReLU or tanh, and batch norm's statistics of
# column j. So a layer splits into two column halves, each done from GEMM to
# batch norm by one thread (with one BLAS thread), and only the next layer
# waits for both halves. Measured on the step's forward products, that beats
# OpenBLAS's own two threads (benchmarks/gemm_split.py), and the elementwise
# work is shared too.

cdef struct FwdLayer:
    char* x          # (n, d_in) the layer's input: the previous layer's output
    char* w          # (d_in, d_out)
    char* b          # (d_out,)
    char* y          # (n, d_out) dense output, then ReLU/tanh applied in place
    char* post       # relu_bn: (n, d_out) batch-norm output; else NULL
    char* gamma      # relu_bn: (d_out,) each; else NULL
    char* beta
    char* run_mean
    char* run_var
    char* mean       # relu_bn: (groups, d_out) batch statistics; else NULL
    char* invstd
    int d_in
    int d_out
    int act
    int split        # the second half starts at this column (d_out: one part)


cdef struct FwdState:
    FwdLayer* layers
    int n_layers
    int n
    int groups
    double momentum, eps
    bint training     # batch statistics (else the running statistics)
    bint update_running
    bint halves       # split layers in two parts (set per run by start)
    bint own_gemm     # products through the AVX-512 kernel (set per run by start)
    mg_atomic next_part
    mg_atomic* done   # per layer: parts finished
    bint is_f32


cdef inline int _fwd_parts(FwdState* s, FwdLayer* L) noexcept nogil:
    return 2 if s.halves and L.split < L.d_out else 1


cdef void _fwd_part(FwdState* s, FwdLayer* L, int lo, int hi, floating* tag) noexcept nogil:
    """Columns [lo, hi) of one layer: bias, GEMM, activation, batch norm."""
    cdef int n = s.n, d = L.d_out, cols = hi - lo, m = s.n // s.groups, g
    cdef Py_ssize_t i
    cdef floating* y = <floating*>L.y + lo
    dense_columns_k(<floating*>L.x, <floating*>L.w + lo, <floating*>L.b + lo, y, n, L.d_in, cols, d,
                    s.own_gemm)
    if L.act == ACT_TANH:
        for i in range(n):
            tanh_forward_k(y + i * d, y + i * d, cols)
    elif L.act == ACT_RELU or L.act == ACT_RELU_BN:
        for i in range(n):
            relu_forward_k(y + i * d, y + i * d, cols)
    if L.act == ACT_RELU_BN and not s.training:
        batchnorm_eval_k(y, <floating*>L.gamma + lo, <floating*>L.beta + lo, <floating*>L.run_mean + lo,
                         <floating*>L.run_var + lo, <floating*>L.post + lo, n, cols, s.eps, d)
    elif L.act == ACT_RELU_BN:
        # Group after group, as separate forwards of m rows would do.
        for g in range(s.groups):
            batchnorm_forward_k(y + <Py_ssize_t>g * m * d, <floating*>L.gamma + lo, <floating*>L.beta + lo,
                                <floating*>L.run_mean + lo, <floating*>L.run_var + lo,
                                <floating*>L.mean + <Py_ssize_t>g * d + lo,
                                <floating*>L.invstd + <Py_ssize_t>g * d + lo,
                                <floating*>L.post + <Py_ssize_t>g * m * d + lo,
                                m, cols, s.momentum, s.eps, s.update_running, d)


cdef void _fwd_work(FwdState* s, floating* tag) noexcept nogil:
    cdef long p
    cdef int i, parts
    cdef FwdLayer* L
    while True:
        # Parts are taken in order, layer by layer: a part of layer i + 1 is
        # taken only after both of layer i, so waiting on them cannot deadlock.
        p = mg_fetch_add(&s.next_part, 1)
        i = 0
        while i < s.n_layers:
            parts = _fwd_parts(s, &s.layers[i])
            if p < parts:
                break
            p -= parts
            i += 1
        if i >= s.n_layers:
            return
        L = &s.layers[i]
        if i > 0 and not mg_wait_ge(&s.done[i - 1], _fwd_parts(s, &s.layers[i - 1]), &_NEVER):
            return
        if _fwd_parts(s, L) == 1:
            _fwd_part(s, L, 0, L.d_out, tag)
        elif p == 0:
            _fwd_part(s, L, 0, L.split, tag)
        else:
            _fwd_part(s, L, L.split, L.d_out, tag)
        mg_fetch_add(&s.done[i], 1)


cdef void _fwd_help(void* state) noexcept nogil:
    cdef FwdState* s = <FwdState*>state
    if s.is_f32:
        _fwd_work(s, <float*>NULL)
    else:
        _fwd_work(s, <double*>NULL)


cdef class ForwardPlan:
    """A network's training forward over fixed buffers, checked once, run many times.

    layers: one dict per dense layer, input layer first, with C-contiguous
    arrays of one float dtype and n rows:
        x (n, d_in): the network's input for layer 0, else the previous
        layer's output (its 'post' for relu_bn, its 'y' otherwise);
        w (d_in, d_out), b (d_out,), y (n, d_out): the dense output, then the
        ReLU or tanh output in place;
        act: "relu", "relu_bn" (hidden), "tanh" or "linear" (last layer);
        for relu_bn: post (n, d_out) the batch-norm output; gamma, beta,
        running_mean, running_var (d_out,); mean, invstd (groups, d_out),
        for training only.
    groups: batch norm normalises each of `groups` equal row groups with its
    own statistics (each at least 2 rows), the running statistics moved
    group after group (with update_running).
    training=False: batch norm with the running statistics (evaluation).

    `run` (or `work`, from two threads at once) runs without the GIL, each
    thread taking half-layers in order.
    """
    cdef FwdState s
    cdef bint is_f32
    cdef list keep

    def __cinit__(self):
        self.s.layers = NULL
        self.s.done = NULL

    def __init__(self, layers, *, int groups=1, double momentum=0.1, double eps=1e-5,
                 bint update_running=True, bint training=True):
        cdef int i, L = len(layers)
        if L < 1:
            raise ValueError("a plan needs at least one layer")
        if not (eps > 0):
            raise ValueError(f"eps must be > 0, got {eps}")
        if not (0 <= momentum <= 1):
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        cdef int t = _float_type("layers[0]['w']", layers[0]["w"])
        self.is_f32 = t == F32
        self.s.is_f32 = self.is_f32
        self.keep = []
        x0 = _check("layers[0]['x']", layers[0]["x"], t, 2)
        cdef int n = x0.shape[0]
        if n < 1:
            raise ValueError("layers[0]['x'] has no rows")
        if groups < 1 or n % groups:
            raise ValueError(f"groups={groups} must divide the {n} rows")
        if not training and groups != 1:
            raise ValueError("groups are for training (batch statistics) only")
        self.s.layers = <FwdLayer*>calloc(L, sizeof(FwdLayer))
        self.s.done = <mg_atomic*>calloc(L, sizeof(mg_atomic))
        if self.s.layers == NULL or self.s.done == NULL:
            raise MemoryError()
        self.s.n_layers = L
        self.s.n = n
        self.s.groups = groups
        self.s.momentum = momentum
        self.s.eps = eps
        self.s.update_running = update_running and training
        self.s.training = training
        prev_out = None
        for i in range(L):
            prev_out = self._add_layer(i, layers[i], t, L, prev_out)

    cdef object _add_layer(self, int i, dict spec, int t, int L, object prev_out):
        cdef FwdLayer* lp = &self.s.layers[i]
        cdef int n = self.s.n
        name = f"layers[{i}]"
        act = spec.get("act")
        if act not in _ACTIVATIONS:
            raise ValueError(f"{name}['act'] must be one of {sorted(_ACTIVATIONS)}, got {act!r}")
        lp.act = _ACTIVATIONS[act]
        if (lp.act == ACT_TANH or lp.act == ACT_LINEAR) != (i == L - 1):
            raise ValueError(f"{name}: 'tanh' and 'linear' are for the last layer, 'relu' and 'relu_bn' for the others")
        w = _check(f"{name}['w']", spec["w"], t, 2)
        cdef Py_ssize_t d_in = w.shape[0], d_out = w.shape[1]
        if d_in < 1 or d_out < 1:
            raise ValueError(f"{name}['w'] has shape {_shape(w)}: both dimensions must be >= 1")
        x = _check(f"{name}['x']", spec["x"], t, 2, n, d_in)
        if i > 0 and _lo(x) != _lo(<cnp.ndarray>prev_out):
            raise ValueError(f"{name}['x'] must be the output of layers[{i - 1}]")
        b = _check(f"{name}['b']", spec["b"], t, 1, d_out)
        y = _out(f"{name}['y']", spec["y"], t, 2, n, d_out)
        for o_name, o in (("x", x), ("w", w), ("b", b)):
            _disjoint(f"{name}['y']", y, f"{name}['{o_name}']", o)
        arrays = [x, w, b, y]
        out = y
        if lp.act == ACT_RELU_BN:
            m = n // self.s.groups
            if m < 2 and self.s.training:
                raise ValueError(f"batch norm needs at least 2 rows per group, got {m}")
            post = _out(f"{name}['post']", spec["post"], t, 2, n, d_out)
            vecs = [_check(f"{name}['{k}']", spec[k], t, 1, d_out) for k in ("gamma", "beta")]
            stats = []
            if self.s.training:
                vecs += [_out(f"{name}['{k}']", spec[k], t, 1, d_out) for k in ("running_mean", "running_var")]
                stats = [_out(f"{name}['{k}']", spec[k], t, 2, self.s.groups, d_out) for k in ("mean", "invstd")]
                written = [("post", post), ("running_mean", vecs[2]), ("running_var", vecs[3]),
                           ("mean", stats[0]), ("invstd", stats[1])]
                read = [("x", x), ("w", w), ("b", b), ("y", y), ("gamma", vecs[0]), ("beta", vecs[1])]
            else:  # the running statistics are only read
                vecs += [_check(f"{name}['{k}']", spec[k], t, 1, d_out) for k in ("running_mean", "running_var")]
                written = [("post", post)]
                read = [("x", x), ("w", w), ("b", b), ("y", y), ("gamma", vecs[0]), ("beta", vecs[1]),
                        ("running_mean", vecs[2]), ("running_var", vecs[3])]
            for k, (a_name, a) in enumerate(written):
                for o_name, o in read + written[:k]:
                    _disjoint(f"{name}['{a_name}']", a, f"{name}['{o_name}']", o)
            arrays += [post] + vecs + stats
            lp.post = _lo(post)
            lp.gamma = _lo(<cnp.ndarray>vecs[0])
            lp.beta = _lo(<cnp.ndarray>vecs[1])
            lp.run_mean = _lo(<cnp.ndarray>vecs[2])
            lp.run_var = _lo(<cnp.ndarray>vecs[3])
            if self.s.training:
                lp.mean = _lo(<cnp.ndarray>stats[0])
                lp.invstd = _lo(<cnp.ndarray>stats[1])
            out = post
        lp.x = _lo(x)
        lp.w = _lo(w)
        lp.b = _lo(b)
        lp.y = _lo(y)
        lp.d_in = <int>d_in
        lp.d_out = <int>d_out
        lp.split = _half_split(d_out)
        self.keep.extend(arrays)
        return out

    def __dealloc__(self):
        free(self.s.layers)
        free(<void*>self.s.done)

    @property
    def n(self):
        """Rows of the batch the plan was made for."""
        return self.s.n

    @property
    def n_parts(self):
        """Parts of a run (a helper thread has work when this is > 1)."""
        cdef int i, k = 0
        for i in range(self.s.n_layers):
            k += _fwd_parts(&self.s, &self.s.layers[i])
        return k

    def start(self, *, bint halves=True, bint own_gemm=True):
        """Reset the counters before a run. halves=False: every layer in one
        part. Halves are the default with one thread too: BLAS may round a
        half-size product differently, and a pass should give the same bits
        whichever threads run it. own_gemm=False keeps BLAS (see use_own_gemm)."""
        cdef int i
        self.s.halves = halves
        self.s.own_gemm = own_gemm and _own_sgemm
        for i in range(self.s.n_layers):
            mg_store(&self.s.done[i], 0)
        mg_store(&self.s.next_part, 0)

    def work(self):
        """Take half-layers until none are left, without the GIL. Two threads
        may work on one run at once (after one start())."""
        with nogil:
            _fwd_help(&self.s)

    def run(self, Crew crew=None):
        """One run after start(), without the GIL: on this thread alone, or
        shared with crew's helper thread (which must be serving); a run
        without halves has nothing to share."""
        _run_shared(crew if self.s.halves else None, _fwd_help, &self.s)

