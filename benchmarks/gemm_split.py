"""Can we beat OpenBLAS's own two threads by splitting each GEMM ourselves?

    python benchmarks/gemm_split.py      # Linux/macOS, needs a C compiler (builds _gemm_split.pyx)

The step's 38 float32 GEMMs (batch 50; the shapes of step.py's GemmOnly),
timed three ways, interleaved round by round: OpenBLAS with 1 thread;
OpenBLAS with 2 threads, one GEMM at a time (what GAN(parallel=False) does);
and each GEMM split by columns into two halves, one on the calling thread
and one on a spinning helper thread, each through OpenBLAS with 1 thread.
Reported for the whole sequence and for its two kinds of GEMM: products
with a batch-sized dimension in the output (forward, input gradients) and
weight gradients (X^T G, large outputs).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import pyximport
from threadpoolctl import threadpool_limits

# mnistgan first: it shortens OpenBLAS's idle spinning (mnistgan.parallel),
# which only works before scipy's BLAS is loaded. With OpenBLAS's default
# (about 0.1 s of spinning after each call), its idle workers would take a
# core from the split's helper thread.
from mnistgan import Config  # noqa: E402
from mnistgan import _kernels as K  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
pyximport.install(language_level=3, build_dir=os.path.join(HERE, ".pyxbld"))

import _gemm_split  # noqa: E402
from step import GemmOnly  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args(argv)
    ops = GemmOnly(Config()).ops
    groups = {"all 38": ops,
              "forward and input gradients": [o for o in ops if not o[3]],
              "weight gradients": [o for o in ops if o[3]]}

    for A, B, C, ta, tb in ops:  # the split computes the same product
        want = np.empty_like(C)
        K.gemm(A, B, want, trans_a=ta, trans_b=tb)
        _gemm_split.start()
        with threadpool_limits(1, user_api="blas"):
            _gemm_split.gemm(A, B, C, ta, tb)
        _gemm_split.stop()
        np.testing.assert_allclose(C, want, rtol=1e-4, atol=1e-4)

    def blas(sel):
        for A, B, C, ta, tb in sel:
            K.gemm(A, B, C, trans_a=ta, trans_b=tb)

    def split(sel):
        for A, B, C, ta, tb in sel:
            _gemm_split.gemm(A, B, C, ta, tb)

    ways = {"OpenBLAS, 1 thread": (1, blas, False), "OpenBLAS, 2 threads": (2, blas, False),
            "split over 2 threads": (1, split, True)}
    times = {(g, w): [] for g in groups for w in ways}
    for r in range(a.rounds + 1):
        for w, (threads, f, helper) in ways.items():
            if helper:
                _gemm_split.start()
            with threadpool_limits(threads, user_api="blas"):
                for g, sel in groups.items():
                    t0 = time.perf_counter()
                    for _ in range(a.reps):
                        f(sel)
                    if r:  # round 0 warms up
                        times[(g, w)].append(1000 * (time.perf_counter() - t0) / a.reps)
            if helper:
                _gemm_split.stop()
            time.sleep(0.2)  # let OpenBLAS's workers go idle between ways
    print(f"median ms per pass over {a.rounds} rounds x {a.reps} passes\n")
    print(f"| GEMMs | {' | '.join(ways)} | OpenBLAS 2 threads / split |")
    print("|---|" + "---|" * (len(ways) + 1))
    for g in groups:
        med = [statistics.median(times[(g, w)]) for w in ways]
        print(f"| {g} | {' | '.join(f'{m:.2f}' for m in med)} | {med[1] / med[2]:.2f}x |")


if __name__ == "__main__":
    main()
