"""The AVX-512 float32 kernel for forward products and weight gradients
(_sgemm.h): against float64 NumPy and against BLAS, on shapes with every
kind of edge (rows not a multiple of 6, columns not a multiple of 16 or 64,
short sums), and the same bits however a pass is cut."""
import os
import subprocess
import sys

import numpy as np
import pytest

from mnistgan import _kernels as K
from mnistgan import DenseStack

pytestmark = pytest.mark.skipif(not K.own_gemm_available(),
                                reason="this build or CPU has no AVX-512 kernel (BLAS is used)")

SHAPES = [(1, 1, 1), (1, 3, 17), (5, 7, 16), (6, 16, 64), (7, 33, 65), (13, 64, 17), (50, 157, 1),
          (25, 628, 471), (100, 784, 628), (100, 512, 1024), (50, 1024, 784), (11, 100, 130),
          (7, 33, 517), (9, 13, 512)]


@pytest.fixture
def own():
    before = K.use_own_gemm(True)
    yield
    K.use_own_gemm(before)


@pytest.mark.parametrize("n, d_in, d_out", SHAPES)
def test_forward_and_weight_gradient_match_float64(own, n, d_in, d_out):
    rng = np.random.default_rng(n * 1000 + d_out)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    b = rng.standard_normal(d_out).astype(np.float32)
    g = rng.standard_normal((n, d_out)).astype(np.float32)
    # Outputs filled with NaN: every element must be written.
    y = np.full((n, d_out), np.nan, np.float32)
    dw = np.full((d_in, d_out), np.nan, np.float32)
    dx = np.full((n, d_in), np.nan, np.float32)
    K.dense_forward(x, w, b, y)
    K.dense_backward(x, w, g, dW=dw, db=np.empty(d_out, np.float32), dX=dx)
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    # Error bound of a float32 sum of d_in products, relative to the sum of magnitudes.
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(d_in + 1)
    assert np.all(np.abs(y - (x64 @ w64 + b)) <= tol * (np.abs(x64) @ np.abs(w64) + np.abs(b)) + 1e-30)
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(n)
    assert np.all(np.abs(dw - x64.T @ g64) <= tol * (np.abs(x64).T @ np.abs(g64)) + 1e-30)
    # The input gradient: BLAS below 512 terms, the kernel's dot products from there.
    tol = 4 * np.finfo(np.float32).eps * np.sqrt(d_out)
    assert np.all(np.abs(dx - g64 @ w64.T) <= tol * (np.abs(g64) @ np.abs(w64).T) + 1e-30)


def test_own_kernel_and_blas_agree_to_rounding():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 784)).astype(np.float32)
    w = rng.standard_normal((784, 628)).astype(np.float32)
    b = rng.standard_normal(628).astype(np.float32)
    out = {}
    before = K.use_own_gemm(True)
    try:
        for on in (True, False):
            assert K.use_own_gemm(on) == on
            y = np.empty((100, 628), np.float32)
            K.dense_forward(x, w, b, y)
            out[on] = y
    finally:
        K.use_own_gemm(before)
    np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-4)
    assert not np.array_equal(out[True], out[False])  # two different summation orders: the switch works


def test_cutting_a_forward_in_column_halves_gives_the_same_bits(own):
    """Each output is bias, then the multiply-adds in order: where a pass is
    cut (ForwardPlan halves or not) does not change a bit."""
    rng = np.random.default_rng(1)
    net = DenseStack([100, 128, 256, 512, 1024, 784], hidden_batchnorm=True, output="tanh",
                     max_batch=100, rng=np.random.default_rng(2), bn_groups=2)
    x = rng.standard_normal((100, 100)).astype(np.float32)
    plan = net._forward_plan(x, 100, 2, False, True)
    outs = []
    for halves in (True, False):
        plan.start(halves=halves)
        plan.run(None)
        outs.append(net.views(100).pre[-1].copy())
    assert np.array_equal(outs[0], outs[1])


def test_environment_variable_keeps_blas():
    """MNISTGAN_OWN_GEMM=0: BLAS from the start (the kernel can still be switched on)."""
    code = ("from mnistgan import _kernels as K; "
            "print(K._own_gemm_in_use(), K.own_gemm_available(), K.use_own_gemm(True))")
    env = {**os.environ, "MNISTGAN_OWN_GEMM": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MNISTGAN_OWN_GEMM": "1"},
                         capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True", "True"]
