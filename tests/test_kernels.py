"""Every kernel against a plain NumPy expression, in float32 and float64."""
import numpy as np
import pytest

from mnistgan import _kernels as K
from numpy_reference import box_muller

DTYPES = [np.float32, np.float64]
# (rows, d_in, d_out): a batch of 1, non-square layers, the real sizes.
SHAPES = [(1, 1, 1), (1, 7, 3), (2, 5, 9), (13, 17, 4), (50, 100, 128), (100, 157, 1)]


def tol(dtype):
    return dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close_normwise(actual, desired, dtype):
    """max |actual - desired| <= rtol * max |desired|: the error a sum of many
    rounded products has, whatever the order of summation."""
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    desired = np.asarray(desired, np.float64)
    err = np.abs(np.asarray(actual, np.float64) - desired).max(initial=0)
    assert err <= rtol * max(np.abs(desired).max(initial=0), 1e-30), (err, np.abs(desired).max())


def rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 2), (50, 100, 128), (1, 784, 628)])
def test_gemm(rng, dtype, trans_a, trans_b, m, k, n):
    A = rand(rng, (k, m) if trans_a else (m, k), dtype)
    B = rand(rng, (n, k) if trans_b else (k, n), dtype)
    C0 = rand(rng, (m, n), dtype)
    opA = A.T if trans_a else A
    opB = B.T if trans_b else B
    C = C0.copy()
    K.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b)
    assert_close_normwise(C, opA.astype(np.float64) @ opB, dtype)
    # The accumulate form: C = 0.5 op(A) op(B) + 1 * C.
    C = C0.copy()
    K.gemm(A, B, C, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=1.0)
    assert_close_normwise(C, 0.5 * (opA.astype(np.float64) @ opB) + C0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_empty_inner_dimension_scales_c(dtype):
    A = np.zeros((3, 0), dtype)
    B = np.zeros((0, 2), dtype)
    C = np.full((3, 2), 4.0, dtype)
    K.gemm(A, B, C, beta=0.5)
    np.testing.assert_array_equal(C, np.full((3, 2), 2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_in,d_out", SHAPES)
def test_dense_forward_backward(rng, dtype, n, d_in, d_out):
    X = rand(rng, (n, d_in), dtype)
    W = rand(rng, (d_in, d_out), dtype)
    b = rand(rng, (d_out,), dtype)
    Y = np.full((n, d_out), np.nan, dtype)
    K.dense_forward(X, W, b, Y)
    X64, W64 = X.astype(np.float64), W.astype(np.float64)
    assert_close_normwise(Y, X64 @ W64 + b, dtype)

    dY = rand(rng, (n, d_out), dtype)
    dW = np.full((d_in, d_out), np.nan, dtype)
    db = np.full((d_out,), np.nan, dtype)
    dX = np.full((n, d_in), np.nan, dtype)
    K.dense_backward(X, W, dY, dW, db, dX)
    assert_close_normwise(dW, X64.T @ dY, dtype)
    assert_close_normwise(db, dY.astype(np.float64).sum(axis=0), dtype)
    assert_close_normwise(dX, dY.astype(np.float64) @ W64.T, dtype)

    # dX only (the discriminator during the generator update)...
    dX2 = np.full((n, d_in), np.nan, dtype)
    K.dense_backward(X, W, dY, None, None, dX2)
    np.testing.assert_array_equal(dX2, dX)
    # ...and weights only (the first layer needs no input gradient).
    dW2 = np.full((d_in, d_out), np.nan, dtype)
    db2 = np.full((d_out,), np.nan, dtype)
    K.dense_backward(X, W, dY, dW2, db2, None)
    np.testing.assert_array_equal(dW2, dW)
    np.testing.assert_array_equal(db2, db)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (50, 784), (7, 3)])
def test_relu_and_tanh(rng, dtype, shape):
    X = rand(rng, shape, dtype, scale=2)
    X.flat[0] = 0  # the kink: ReLU'(0) is taken as 0, as in PyTorch
    Y = np.empty_like(X)
    K.relu_forward(X, Y)
    np.testing.assert_array_equal(Y, np.maximum(X, 0))
    dY = rand(rng, shape, dtype)
    dX = np.empty_like(X)
    K.relu_backward(Y, dY, dX)
    np.testing.assert_array_equal(dX, np.where(X > 0, dY, 0))

    T = np.empty_like(X)
    K.tanh_forward(X, T)
    np.testing.assert_allclose(T, np.tanh(X.astype(np.float64)), **tol(dtype))
    K.tanh_backward(T, dY, dX)
    np.testing.assert_allclose(dX, dY * (1 - T.astype(np.float64) ** 2), **tol(dtype))

    # NaN passes through ReLU, as in PyTorch, so divergence reaches the loss.
    nan = np.array([np.nan, -1.0, 2.0], dtype)
    out = np.empty_like(nan)
    K.relu_forward(nan, out)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 2

    # In place is allowed for elementwise kernels.
    Z = X.copy()
    K.tanh_forward(Z, Z)
    np.testing.assert_array_equal(Z, T)


def test_tanh_float32_accuracy_over_its_whole_range():
    """The vectorised float32 tanh (AVX2 and baseline builds alike): within 8
    float32 ulps of tanh everywhere, saturating to +-1, NaN kept."""
    x = np.concatenate([np.linspace(-20, 20, 200_001),
                        [1e4, -1e4, 0.25, -0.25, 0.24999999, 0.0625, -0.0625, 0.06249999, 1e-30, -1e-30, 0, 44, -44, 88, -88]]
                       ).astype(np.float32)
    for out_of_place in (True, False):
        y = np.empty_like(x) if out_of_place else x.copy()
        K.tanh_forward(x if out_of_place else y, y)
        want = np.tanh(x.astype(np.float64))
        ulps = np.abs(y - want) / np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        assert ulps.max() <= 8, (ulps.max(), x[ulps.argmax()])
    special = np.array([np.nan, np.inf, -np.inf], np.float32)
    K.tanh_forward(special, special)
    assert np.isnan(special[0]) and special[1] == 1 and special[2] == -1


def np_bce(z, t):
    z = z.astype(np.float64)
    return np.mean(np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z))))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 100])
def test_sigmoid_bce(rng, dtype, n):
    z = rand(rng, (n, 1), dtype, scale=3)
    t = (rng.random((n, 1)) < 0.5).astype(dtype)
    p = np.empty_like(z)
    dz = np.empty_like(z)
    loss = K.sigmoid_bce(z, t, p, dz)
    z64 = z.astype(np.float64)
    sig = 1 / (1 + np.exp(-z64))
    np.testing.assert_allclose(loss, np_bce(z, t), rtol=1e-6 if dtype == np.float32 else 1e-13)
    np.testing.assert_allclose(p, sig, **tol(dtype))
    np.testing.assert_allclose(dz, (sig - t) / n, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_is_stable_for_huge_logits(dtype):
    z = np.array([1e4, -1e4, 1e4, -1e4, 0, 88.8, -745.2], dtype)
    t = np.array([1, 0, 0, 1, 1, 0, 1], dtype)
    p = np.empty_like(z)
    dz = np.empty_like(z)
    with np.errstate(all="raise"):
        loss = K.sigmoid_bce(z, t, p, dz)
    assert np.isfinite(loss) and np.all(np.isfinite(p)) and np.all(np.isfinite(dz))
    # Confidently right: ~0 loss; confidently wrong: loss = |z|.
    expected = (0 + 0 + 1e4 + 1e4 + np.log(2) + 88.8 + 745.2) / 7
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(p, [1, 0, 1, 0, 0.5, 1, 0], atol=1e-30)
    np.testing.assert_allclose(dz * 7, [0, 0, 1, -1, -0.5, 1, -1], atol=1e-7)


def np_batchnorm(x, gamma, beta, eps):
    x = x.astype(np.float64)
    mu = x.mean(0)
    var = x.var(0)
    xhat = (x - mu) / np.sqrt(var + eps)
    return gamma * xhat + beta, mu, var, xhat


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(2, 1), (2, 5), (50, 128), (9, 1024)])
def test_batchnorm_train_forward_backward(rng, dtype, n, d):
    x = rand(rng, (n, d), dtype, scale=2) + 1
    gamma = rand(rng, (d,), dtype) + 1
    beta = rand(rng, (d,), dtype)
    rm0 = rand(rng, (d,), dtype)
    rv0 = np.abs(rand(rng, (d,), dtype)) + 0.5
    rm, rv = rm0.copy(), rv0.copy()
    mean = np.empty(d, dtype)
    invstd = np.empty(d, dtype)
    y = np.empty_like(x)
    eps, mom = 1e-5, 0.1
    K.batchnorm_forward(x, gamma, beta, rm, rv, mean, invstd, y, momentum=mom, eps=eps)
    ref, mu, var, xhat = np_batchnorm(x, gamma, beta, eps)
    t = tol(dtype)
    np.testing.assert_allclose(y, ref, rtol=t["rtol"] * 10, atol=t["atol"] * 10)
    np.testing.assert_allclose(mean, mu, **t)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var + eps), rtol=t["rtol"] * 10)
    np.testing.assert_allclose(rm, (1 - mom) * rm0 + mom * mu, **t)
    np.testing.assert_allclose(rv, (1 - mom) * rv0 + mom * var * n / (n - 1), **t)

    dy = rand(rng, (n, d), dtype)
    dgamma = np.empty(d, dtype)
    dbeta = np.empty(d, dtype)
    dx = np.empty_like(x)
    K.batchnorm_backward(x, mean, invstd, gamma, dy, dgamma, dbeta, dx)
    dy64 = dy.astype(np.float64)
    np.testing.assert_allclose(dbeta, dy64.sum(0), **t)
    np.testing.assert_allclose(dgamma, (dy64 * xhat).sum(0), rtol=t["rtol"] * 10, atol=t["atol"] * 10)
    dxhat = dy64 * gamma
    inv = 1 / np.sqrt(var + eps)
    ref_dx = inv / n * (n * dxhat - dxhat.sum(0) - xhat * (dxhat * xhat).sum(0))
    scale = np.abs(ref_dx).max()
    np.testing.assert_allclose(dx, ref_dx, rtol=t["rtol"] * 10, atol=t["atol"] * 10 * max(scale, 1))

    # update_running=False leaves the running statistics alone.
    rm2, rv2 = rm0.copy(), rv0.copy()
    K.batchnorm_forward(x, gamma, beta, rm2, rv2, mean, invstd, y, update_running=False)
    np.testing.assert_array_equal(rm2, rm0)
    np.testing.assert_array_equal(rv2, rv0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", [(1, 1), (1, 7), (50, 128)])
def test_batchnorm_eval(rng, dtype, n, d):
    x = rand(rng, (n, d), dtype)
    gamma, beta = rand(rng, (d,), dtype), rand(rng, (d,), dtype)
    rm = rand(rng, (d,), dtype)
    rv = np.abs(rand(rng, (d,), dtype)) + 0.1
    y = np.empty_like(x)
    K.batchnorm_eval(x, gamma, beta, rm, rv, y, eps=1e-3)
    ref = (x.astype(np.float64) - rm) / np.sqrt(rv.astype(np.float64) + 1e-3) * gamma + beta
    np.testing.assert_allclose(y, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [1, 10, 10007])
def test_adam_matches_pytorch_formula(rng, dtype, size):
    p0 = rand(rng, (size,), dtype)
    m0 = rand(rng, (size,), dtype) * 0.01
    v0 = np.abs(rand(rng, (size,), dtype)) * 1e-4
    g = rand(rng, (size,), dtype) * 0.1
    lr, b1, b2, eps, step = 2e-4, 0.5, 0.999, 1e-8, 7
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    K.adam_step(p, g, m, v, lr=lr, beta1=b1, beta2=b2, eps=eps, step=step)
    g64 = g.astype(np.float64)
    m_ref = b1 * m0.astype(np.float64) + (1 - b1) * g64
    v_ref = b2 * v0.astype(np.float64) + (1 - b2) * g64 ** 2
    m_hat = m_ref / (1 - b1 ** step)
    v_hat = v_ref / (1 - b2 ** step)
    p_ref = p0 - lr * m_hat / (np.sqrt(v_hat) + eps)
    t = tol(dtype)
    np.testing.assert_allclose(m, m_ref, **t)
    np.testing.assert_allclose(v, v_ref, **t)
    # p is right to within a couple of its own rounding steps.
    np.testing.assert_allclose(p, p_ref, rtol=3e-7 if dtype == np.float32 else 1e-15, atol=0)
    # The updates are far larger than that tolerance, so a no-op would fail.
    assert np.median(np.abs(p_ref - p0) / np.abs(p0)) > 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_batch_scales_to_minus_one_one(rng, dtype):
    images = rng.integers(0, 256, size=(30, 784), dtype=np.uint8)
    images[0, :256] = np.arange(256)
    idx = np.array([0, 29, 3, 3], np.int64)
    out = np.empty((4, 784), dtype)
    K.gather_batch(images, idx, out)
    np.testing.assert_array_equal(out, (images[idx].astype(np.float64) / 127.5 - 1).astype(dtype))
    assert out[0, 0] == -1 and out[0, 255] == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_batch_rejects_out_of_range_index(dtype):
    images = np.zeros((5, 4), np.uint8)
    out = np.empty((2, 4), dtype)
    with pytest.raises(IndexError, match=r"idx\[1\] = 5"):
        K.gather_batch(images, np.array([0, 5]), out)
    with pytest.raises(IndexError, match=r"idx\[0\] = -1"):
        K.gather_batch(images, np.array([-1, 0]), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_noise(rng, dtype):
    x = rand(rng, (6, 11), dtype)
    noise = rand(rng, (6, 11), dtype)
    out = np.empty_like(x)
    K.add_noise(x, noise, 0.25, out)
    np.testing.assert_allclose(out, x + 0.25 * noise.astype(np.float64), **tol(dtype))
    K.add_noise(x, noise, 0.25, x)  # in place
    np.testing.assert_array_equal(x, out)
    K.add_noise(x, noise, 0.0, out)
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (3,), (7, 11), (2, 3, 5), (1000, 1000)])
def test_standard_normal_matches_numpy_box_muller(dtype, shape):
    mine, twin = np.random.default_rng(7), np.random.default_rng(7)
    out = np.full(shape, np.nan, dtype)
    assert K.standard_normal(mine, out) is out
    want = box_muller(twin, shape, dtype)
    # float32: a few ulps of |z| <= 5.8 (polynomial log, sin, cos in float32).
    np.testing.assert_allclose(out, want, **(dict(rtol=2e-6, atol=2e-6) if dtype == np.float32
                                             else dict(rtol=1e-13, atol=1e-14)))
    # Both consumed the same words: the streams stay in step.
    assert mine.bit_generator.state == twin.bit_generator.state


@pytest.mark.parametrize("dtype", DTYPES)
def test_standard_normal_is_standard_normal(dtype):
    from scipy import stats
    z = np.empty(1_000_000, dtype)
    K.standard_normal(np.random.default_rng(2024), z)
    z = z.astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(stats.kurtosis(z)) < 5 * np.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Tails: P(|z| > 3) = 0.0027; the float32 cut at |z| <= 5.77.
    tail = np.mean(np.abs(z) > 3)
    assert abs(tail - 0.0026998) < 5 * np.sqrt(0.0027 / n)
    assert np.abs(z).max() <= (5.78 if dtype == np.float32 else 8.6)
    # Pairs are independent: neighbours uncorrelated.
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 5 / np.sqrt(n / 2)


def test_standard_normal_seeded_and_checked():
    a, b, c = (np.empty(99, np.float32) for _ in range(3))
    K.standard_normal(np.random.default_rng(1), a)
    K.standard_normal(np.random.default_rng(1).bit_generator, b)  # a BitGenerator works too
    K.standard_normal(np.random.default_rng(2), c)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        K.standard_normal(np.random.RandomState(0), a)
    with pytest.raises(TypeError, match="out must have dtype float32 or float64"):
        K.standard_normal(np.random.default_rng(0), np.empty(4, np.int64))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        K.standard_normal(np.random.default_rng(0), np.empty((4, 4), np.float32).T)
    ro = np.empty(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is an output and must be writeable"):
        K.standard_normal(np.random.default_rng(0), ro)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite(dtype):
    x = np.zeros((3, 4), dtype)
    assert K.all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[2, 3] = bad
        assert not K.all_finite(y)
    assert K.all_finite(np.full(5, np.finfo(dtype).max, dtype))


def np_softmax_ce(z, labels):
    z = z.astype(np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(z)), labels].mean(), np.exp(logp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (1, 10), (7, 3), (100, 10)])
def test_softmax_cross_entropy(rng, dtype, n, k):
    z = rand(rng, (n, k), dtype, scale=3)
    labels = rng.integers(0, k, n).astype(np.int64)
    p = np.empty_like(z)
    dz = np.empty_like(z)
    loss = K.softmax_cross_entropy(z, labels, p, dz)
    ref_loss, ref_p = np_softmax_ce(z, labels)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-7)
    np.testing.assert_allclose(p, ref_p, **tol(dtype))
    onehot = np.eye(k)[labels]
    np.testing.assert_allclose(dz, (ref_p - onehot) / n, **tol(dtype))


def test_softmax_cross_entropy_gradient_by_finite_differences(rng):
    z = rng.standard_normal((5, 4))
    labels = np.array([0, 3, 1, 1, 2])
    p, dz = np.empty_like(z), np.empty_like(z)
    K.softmax_cross_entropy(z, labels, p, dz)
    numeric = np.zeros_like(z)
    h = 1e-6
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        numeric[i] = (K.softmax_cross_entropy(zp, labels, p.copy(), dz.copy())
                      - K.softmax_cross_entropy(zm, labels, p.copy(), dz.copy())) / (2 * h)
    K.softmax_cross_entropy(z, labels, p, dz)
    assert np.linalg.norm(numeric - dz) / np.linalg.norm(numeric) < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_huge_logits_and_bad_labels(dtype):
    z = np.array([[1e4, -1e4, 0], [-1e4, -1e4, -1e4]], dtype)
    p, dz = np.empty_like(z), np.empty_like(z)
    with np.errstate(all="raise"):
        loss = K.softmax_cross_entropy(z, np.array([0, 2]), p, dz)
    np.testing.assert_allclose(loss, (0 + np.log(3)) / 2, rtol=1e-6)
    assert np.all(np.isfinite(p)) and np.all(np.isfinite(dz))
    with pytest.raises(IndexError, match=r"labels\[1\] = 3 is out of range for 3 classes"):
        K.softmax_cross_entropy(z, np.array([0, 3]), p, dz)
    with pytest.raises(TypeError, match="labels has dtype int32"):
        K.softmax_cross_entropy(z, np.array([0, 1], np.int32), p, dz)
