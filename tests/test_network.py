"""DenseStack's evaluation forward (batch norm on running statistics) and the
GAN's generate(), against plain NumPy, alone and shared with the helper."""
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mnistgan import GAN, Config, DenseStack
from mnistgan import _kernels as K
from mnistgan import parallel


def numpy_eval_forward(net: DenseStack, x: np.ndarray) -> np.ndarray:
    a = x.astype(np.float64)
    for i in range(net.n_layers):
        h = a @ net.W[i].astype(np.float64) + net.b[i]
        if i < net.n_layers - 1:
            h = np.maximum(h, 0)
            if net.hidden_batchnorm:
                h = ((h - net.running_mean[i]) / np.sqrt(net.running_var[i].astype(np.float64) + net.bn_eps)
                     * net.gamma[i] + net.beta[i])
        elif net.output == "tanh":
            h = np.tanh(h)
        a = h
    return a


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("shared", [False, True])
def test_evaluation_forward_matches_numpy(dtype, tol, shared):
    rng = np.random.default_rng(0)
    net = DenseStack([20, 48, 64, 33], hidden_batchnorm=True, output="tanh", max_batch=16,
                     dtype=dtype, rng=np.random.default_rng(1))
    for i in range(2):  # running statistics away from their start (0 and 1)
        net.running_mean[i][...] = rng.uniform(-1, 1, net.running_mean[i].shape)
        net.running_var[i][...] = rng.uniform(0.5, 2, net.running_var[i].shape)
        net.gamma[i][...] = rng.uniform(0.5, 1.5, net.gamma[i].shape)
        net.beta[i][...] = rng.uniform(-0.5, 0.5, net.beta[i].shape)
    x = rng.standard_normal((13, 20)).astype(dtype)
    before = net.flat_buffers.copy()
    crew = K.Crew() if shared else None
    with parallel.helper_session(crew):
        y = net.forward(x, train=False, crew=crew).copy()
    np.testing.assert_allclose(y, numpy_eval_forward(net, x), rtol=tol, atol=tol)
    assert np.array_equal(net.flat_buffers, before)  # evaluation moves no statistics


def test_evaluation_plan_takes_no_groups():
    net = DenseStack([4, 40, 3], hidden_batchnorm=True, output="tanh", max_batch=8, rng=np.random.default_rng(0),
                     bn_groups=2)
    with pytest.raises(ValueError, match="groups are for training"):
        net.forward(np.zeros((8, 4), np.float32), train=False, groups=2)


def test_generate_is_the_same_with_one_and_two_threads():
    gan = GAN(Config(seed=2))
    images = np.random.default_rng(0).integers(0, 256, (500, 784), dtype=np.uint8)
    for i in range(3):
        gan.train_step(images, np.arange(50 * i, 50 * i + 50), 0.1)
    z = np.random.default_rng(3).standard_normal((237, 100))
    out = {}
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            out[threads] = (gan.generate(z), gan.generate(z, batch_stats=True))
    assert np.array_equal(out[1][0], out[2][0])
    assert np.array_equal(out[1][1], out[2][1])
    # Running statistics: each row alone gives the same image (to rounding).
    np.testing.assert_allclose(gan.generate(z[5:6]), out[1][0][5:6], atol=1e-5)
