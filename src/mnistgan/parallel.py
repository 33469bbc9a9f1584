"""Threads: how many BLAS may use, and the one helper thread of the backward.

Small GEMMs split across cores waste much of the time (OpenBLAS gets about
1.5x on two cores for this model's shapes), so the backward pass runs
differently: the calling thread walks the gradient chain while a helper
thread computes weight gradients and Adam steps beside it (a
`_kernels.BackwardPlan`), each thread calling BLAS with one thread. BLAS's
thread count is process-wide, so it is lowered to 1 for the length of such a
backward and put back afterwards; nothing else should call BLAS from another
thread meanwhile.

The thread budget is whatever BLAS is allowed, which is how the command line's
--threads and threadpoolctl's `threadpool_limits` already express it: with
one BLAS thread everything runs on the calling thread.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# OpenBLAS's idle worker threads spin for 2^OPENBLAS_THREAD_TIMEOUT cycles
# (default 2^28, about 0.1 s) before they sleep. While BLAS is held to one
# thread for a shared backward, a spinning worker takes half a core from the
# helper thread: the shared backward then loses more than it gains (measured
# on 2 cores: 32 ms per step against 28 without a helper). 2^20 cycles (well
# under a millisecond) keeps the workers awake between the GEMMs of a forward
# pass and lets them sleep during a shared backward. OpenBLAS reads the
# variable when it loads, which is when scipy.linalg is first imported; if
# that happened before mnistgan was imported (and the user set nothing), the
# helper thread stays off.
_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"
_user_set_timeout = _TIMEOUT_VAR in os.environ
_blas_already_loaded = any(name == "scipy.linalg" or name.startswith("scipy.linalg.") for name in sys.modules)
if not _user_set_timeout and not _blas_already_loaded:
    os.environ[_TIMEOUT_VAR] = "20"
#: Whether sharing a backward with a helper thread is expected to pay here.
HELPER_ADVISED = _user_set_timeout or not _blas_already_loaded

_lock = threading.Lock()
_blas = None        # threadpoolctl controllers of the loaded BLAS libraries
_executor = None


def _blas_controllers() -> list:
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController

        # Import scipy's BLAS first, so that the controller sees the library
        # our kernels call (scipy.linalg.cython_blas), not only numpy's.
        import scipy.linalg.cython_blas  # noqa: F401

        _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
    return _blas


def blas_threads() -> int:
    """Threads BLAS may use now (the smallest over the BLAS libraries loaded);
    1 when no BLAS can be controlled (then no helper thread is used)."""
    libs = _blas_controllers()
    if not libs:
        return 1
    return max(1, min(int(c.num_threads) for c in libs))


@contextlib.contextmanager
def blas_single_threaded():
    """BLAS held to one thread inside the block; restored on the way out."""
    libs = _blas_controllers()
    before = [int(c.num_threads) for c in libs]
    for c in libs:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(libs, before):
            c.set_num_threads(n)


def _helper() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mnistgan-helper")
        return _executor


def run_plan(plan, parallel: bool):
    """Run a BackwardPlan that start() has reset: alone, or with the helper.

    Returns only once the helper is done with the plan's memory, even if
    the calling thread is interrupted (KeyboardInterrupt) meanwhile.
    """
    if not parallel or plan.n_tasks == 0:
        plan.work(True)
        return
    with blas_single_threaded():
        future = _helper().submit(plan.work, False)
        try:
            plan.work(True)
        except BaseException:
            plan.abort()  # the chain may not have run: release the helper
            raise
        finally:
            _wait(future)


def _wait(future):
    interrupted = None
    while True:
        try:
            future.result()
            break
        except KeyboardInterrupt as e:  # keep waiting; the helper holds our buffers
            interrupted = e
    if interrupted is not None:
        raise interrupted
