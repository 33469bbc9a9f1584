"""Milliseconds per training step: mnistgan against the NumPy reference step.

    python benchmarks/step.py            # batch 50, float32, 1 and 2 BLAS threads

Every configuration runs in short blocks, interleaved round-robin, so drift
on a shared machine hits all of them alike. Also timed: the bare sequence of
the step's 38 GEMMs (the same shapes, through the same BLAS), which is what a
step would cost if everything around the GEMMs were free.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from mnistgan import GAN, Config  # noqa: E402
from mnistgan import _kernels as K  # noqa: E402
from numpy_reference import RefGAN  # noqa: E402


def step_gemms(cfg: Config):
    """(m, n, k, trans_a, trans_b) of every GEMM in one step, in order."""
    B = cfg.batch_size
    g = [cfg.latent_dim, *cfg.g_hidden, cfg.image_dim]
    d = [cfg.image_dim, *cfg.d_hidden, 1]
    gl = list(zip(g[:-1], g[1:]))
    dl = list(zip(d[:-1], d[1:]))
    out = []
    fwd = lambda layers, n: [(n, o, i, False, False) for i, o in layers]  # noqa: E731
    out += fwd(gl, 2 * B)                                                  # G forward, both fake batches
    out += fwd(dl, 2 * B)                                                  # D forward, 2B rows
    for j, (i, o) in reversed(list(enumerate(dl))):                        # D backward
        out.append((i, o, 2 * B, True, False))
        if j > 0:
            out.append((2 * B, i, o, False, True))
    out += fwd(dl, B)                                                      # D forward, B rows
    out += [(B, i, o, False, True) for i, o in reversed(dl)]              # D backward, dX only
    for j, (i, o) in reversed(list(enumerate(gl))):                        # G backward
        out.append((i, o, B, True, False))
        if j > 0:
            out.append((B, i, o, False, True))
    return out


class GemmOnly:
    """The step's GEMMs alone, on preallocated operands."""

    def __init__(self, cfg):
        rng = np.random.default_rng(0)
        dt = np.dtype(cfg.dtype)
        self.ops = []
        for m, n, k, ta, tb in step_gemms(cfg):
            A = rng.standard_normal((k, m) if ta else (m, k)).astype(dt)
            B = rng.standard_normal((n, k) if tb else (k, n)).astype(dt)
            self.ops.append((A, B, np.zeros((m, n), dt), ta, tb))

    def step(self):
        for A, B, C, ta, tb in self.ops:
            K.gemm(A, B, C, trans_a=ta, trans_b=tb)


def make_runners(cfg):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10_000, cfg.image_dim), dtype=np.uint8)
    order = rng.permutation(len(images))
    B = cfg.batch_size
    batches = [order[i:i + B] for i in range(0, len(images) - B + 1, B)]
    gan = GAN(cfg)
    ref = RefGAN(gan, seed=1)
    gemm = GemmOnly(cfg)
    counter = {"i": 0}

    def next_batch():
        counter["i"] = (counter["i"] + 1) % len(batches)
        return batches[counter["i"]]

    return {
        "mnistgan": lambda: gan.train_step(images, next_batch(), 0.1),
        "numpy": lambda: ref.step(images, next_batch(), 0.1),
        "gemm-only": gemm.step,
    }


def measure(cfg, threads_list, rounds, block, warmup):
    runners = make_runners(cfg)
    times = {(name, t): [] for name in runners for t in threads_list}
    for (name, t) in times:
        with threadpool_limits(limits=t, user_api="blas"):
            for _ in range(warmup):
                runners[name]()
    for _ in range(rounds):
        for (name, t) in times:
            with threadpool_limits(limits=t, user_api="blas"):
                for _ in range(block):
                    t0 = time.perf_counter()
                    runners[name]()
                    times[(name, t)].append(time.perf_counter() - t0)
    return times


def summary(samples):
    ms = sorted(1000 * s for s in samples)
    q = statistics.quantiles(ms, n=4)
    return statistics.median(ms), q[0], q[2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    cfg = Config(batch_size=a.batch_size, dtype=a.dtype)
    blas = [f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
            for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; BLAS: {'; '.join(blas)}")
    print(f"batch {a.batch_size}, {a.dtype}, {len(step_gemms(cfg))} GEMMs per step, "
          f"{a.rounds} rounds x {a.block} steps per configuration, interleaved\n")
    times = measure(cfg, a.threads, a.rounds, a.block, a.warmup)
    print(f"{'threads':>7}  {'implementation':<10} {'median ms':>10} {'IQR ms':>15}  ratio")
    for t in a.threads:
        ours = summary(times[("mnistgan", t)])[0]
        for name in ("mnistgan", "numpy", "gemm-only"):
            med, lo, hi = summary(times[(name, t)])
            ratio = f"numpy / mnistgan = {med / ours:.2f}x" if name == "numpy" else (
                f"mnistgan / gemm-only = {ours / med:.2f}x" if name == "gemm-only" else "")
            print(f"{t:>7}  {name:<10} {med:>10.2f} {lo:>7.2f}-{hi:<7.2f}  {ratio}")


if __name__ == "__main__":
    main()
