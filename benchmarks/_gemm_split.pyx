# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A measuring device, not product code: one GEMM split by columns between
the calling thread and a spinning helper thread, each calling BLAS with one
thread (BLAS must be held to one thread by the caller). Used by
gemm_split.py to ask whether splitting the step's GEMMs ourselves beats
OpenBLAS's own two threads. Linux/macOS only (pthreads)."""
from scipy.linalg.cython_blas cimport sgemm

cdef extern from "pthread.h" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t*, void*, void* (*)(void*) noexcept nogil, void*)
    int pthread_join(pthread_t, void**)

cdef extern from *:
    """
    static inline long gs_load(volatile long *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void gs_store(volatile long *p, long v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    #if defined(__x86_64__)
    #define GS_PAUSE() __builtin_ia32_pause()
    #else
    #define GS_PAUSE() ((void)0)
    #endif
    """
    long gs_load(long*) nogil
    void gs_store(long*, long) nogil
    void GS_PAUSE() nogil

cdef struct Job:
    char ta, tb
    int m, n, k, lda, ldb, ldc
    float* a
    float* b
    float* c

cdef Job job            # the helper's half
cdef long posted = 0    # job number posted; -1 tells the helper to exit
cdef long finished = 0  # last job number the helper finished
cdef pthread_t thread
cdef bint running = False


cdef void run(Job* j) noexcept nogil:
    cdef float one = 1, zero = 0
    # Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    sgemm(&j.tb, &j.ta, &j.n, &j.m, &j.k, &one, j.b, &j.ldb, j.a, &j.lda, &zero, j.c, &j.ldc)


cdef void* helper(void* arg) noexcept nogil:
    cdef long seen = 0, p
    while True:
        p = gs_load(&posted)
        if p < 0:
            return NULL
        if p == seen:
            GS_PAUSE()
            continue
        seen = p
        run(&job)
        gs_store(&finished, p)


def start():
    """Start the helper (it spins until stop())."""
    global running
    if not running:
        gs_store(&posted, 0)
        gs_store(&finished, 0)
        if pthread_create(&thread, NULL, helper, NULL) != 0:
            raise OSError("pthread_create failed")
        running = True


def stop():
    global running
    if running:
        gs_store(&posted, -1)
        with nogil:
            pthread_join(thread, NULL)
        running = False


def gemm(float[:, ::1] A, float[:, ::1] B, float[:, ::1] C, bint trans_a, bint trans_b):
    """C = op(A) op(B), columns [0, h) here and [h, n) on the helper (h a
    multiple of 16 near n/2). Shapes are the caller's to get right."""
    global job
    if not running:
        raise RuntimeError("start() first")
    cdef int m = C.shape[0], n = C.shape[1]
    cdef int k = A.shape[0] if trans_a else A.shape[1]
    if (B.shape[1] if trans_b else B.shape[0]) != k or (B.shape[0] if trans_b else B.shape[1]) != n \
            or (A.shape[1] if trans_a else A.shape[0]) != m:
        raise ValueError("shapes do not match")
    cdef int h = min(n, (n // 2 + 15) // 16 * 16)
    cdef Job mine
    cdef long p
    mine.ta = b'T' if trans_a else b'N'
    mine.tb = b'T' if trans_b else b'N'
    mine.m, mine.k = m, k
    mine.lda, mine.ldb, mine.ldc = A.shape[1], B.shape[1], n
    mine.a = &A[0, 0]
    job = mine
    job.n = n - h
    job.b = &B[h, 0] if trans_b else &B[0, h]
    job.c = &C[0, h]
    mine.n = h
    mine.b = &B[0, 0]
    mine.c = &C[0, 0]
    with nogil:
        p = gs_load(&posted) + 1
        gs_store(&posted, p)
        if h > 0:
            run(&mine)
        while gs_load(&finished) != p:
            GS_PAUSE()
