"""Threads: how many BLAS may use, and the one helper thread of a step.

Small GEMMs split across cores by BLAS waste much of the time (OpenBLAS gets
about 1.5x on two cores for this model's shapes, while two one-thread GEMMs
side by side get 1.9x). So with two or more BLAS threads allowed, a training
step runs as a helper session: BLAS is held to one thread, and a helper
thread sits in a `_kernels.Crew` loop without the GIL for the length of the
step. Every pass of the step is a plan shared with it: forwards and the
input gradient through D half a layer each, backward passes as a chain on
the calling thread with weight gradients and Adam steps beside it.
BLAS's thread count is process-wide, so nothing else should call BLAS from
another thread meanwhile.

The thread budget is whatever BLAS is allowed, which is how the command line's
--threads and threadpoolctl's `threadpool_limits` already express it: with
one BLAS thread everything runs on the calling thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# OpenBLAS's idle worker threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles
# (default 2^28, about 0.1 s) before they sleep. A helper session calls BLAS
# with one thread only, so its workers stay asleep; but a step without the
# helper (parallel=False) runs each GEMM on OpenBLAS's own threads, and
# between them the spinning workers take cores from everything else
# (measured on 2 cores, scipy loaded first, so the default: 13.8-27 ms per
# step against 11.7-12.6 with the helper). 2^20 cycles (well under a
# millisecond) keeps the workers awake between the GEMMs of a pass and lets
# them sleep soon after. OpenBLAS reads the variable when it loads, which is
# when scipy.linalg is first imported: after that, setting it does nothing.
_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"
_blas_already_loaded = any(name == "scipy.linalg" or name.startswith("scipy.linalg.") for name in sys.modules)
if _TIMEOUT_VAR not in os.environ and not _blas_already_loaded:
    os.environ[_TIMEOUT_VAR] = "20"

_lock = threading.Lock()
_blas = None        # a _Blas per BLAS library loaded
_executor = None


class _Blas:
    """One BLAS library's thread count. OpenBLAS's C functions are resolved
    once: threadpoolctl looks them up anew on every call, which costs a
    little time and, through ctypes, memory that is never given back (about
    3 bytes a call), and a training step asks twice. Other libraries go
    through threadpoolctl."""

    def __init__(self, controller):
        self.controller = controller
        self._get = self._set = None
        if controller.internal_api != "openblas":
            return
        try:
            lib = ctypes.CDLL(controller.filepath)
        except OSError:
            return
        # The names threadpoolctl knows: scipy's and numpy's builds add affixes.
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_", "_64")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.argtypes, get.restype = [], ctypes.c_int
                put.argtypes, put.restype = [ctypes.c_int], None
                self._get, self._set = get, put
                return

    def num_threads(self) -> int:
        return int(self._get() if self._get is not None else self.controller.num_threads)

    def set_num_threads(self, n: int):
        if self._set is not None:
            self._set(n)
        else:
            self.controller.set_num_threads(n)


def _blas_libraries() -> list:
    global _blas
    with _lock:
        if _blas is None:
            from threadpoolctl import ThreadpoolController

            # Import scipy's BLAS first, so that the controller sees the library
            # our kernels call (scipy.linalg.cython_blas), not only numpy's.
            import scipy.linalg.cython_blas  # noqa: F401

            _blas = [_Blas(c) for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        return _blas


def blas_threads() -> int:
    """Threads BLAS may use now (the smallest over the BLAS libraries loaded);
    1 when no BLAS can be controlled (then no helper thread is used)."""
    libs = _blas_libraries()
    if not libs:
        return 1
    return max(1, min(lib.num_threads() for lib in libs))


@contextlib.contextmanager
def blas_single_threaded():
    """BLAS held to one thread inside the block; restored on the way out."""
    libs = _blas_libraries()
    before = [lib.num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)


def _helper() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mnistgan-helper")
        return _executor


@contextlib.contextmanager
def helper_session(crew):
    """With a `_kernels.Crew`: its helper thread serves plans (`plan.run(crew)`)
    until the block ends, with BLAS held to one thread; yields the crew. With
    None: yields None and changes nothing. On the way out, even on an
    exception or a KeyboardInterrupt, waits until the helper has left the
    crew's loop. Sessions of two crews at once (two models stepped from two
    threads) are correct but take turns with the one helper thread.
    """
    if crew is None:
        yield None
        return
    with blas_single_threaded():
        crew.open()
        future = _helper().submit(crew.serve)
        try:
            yield crew
        finally:
            crew.close()
            _wait(future)


def _wait(future):
    interrupted = None
    while True:
        try:
            future.result()
            break
        except KeyboardInterrupt as e:  # keep waiting; the helper may hold our buffers
            interrupted = e
    if interrupted is not None:
        raise interrupted
