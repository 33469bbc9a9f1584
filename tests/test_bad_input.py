"""Bad arguments get a clear exception that names the argument, never a crash."""
import numpy as np
import pytest

from mnistgan import GAN, Config
from mnistgan import _kernels as K

f32 = np.float32


def arr(*shape, dtype=f32):
    return np.ones(shape, dtype)


def test_wrong_type_names_argument():
    with pytest.raises(TypeError, match="X must be a numpy.ndarray, got list"):
        K.dense_forward([[1.0]], arr(1, 1), arr(1), arr(1, 1))


def test_mixed_dtypes_name_argument():
    with pytest.raises(TypeError, match="W has dtype float64, expected float32"):
        K.dense_forward(arr(2, 3), arr(3, 4, dtype=np.float64), arr(4), arr(2, 4))
    with pytest.raises(TypeError, match="X must have dtype float32 or float64, got int64"):
        K.relu_forward(np.ones((2, 2), np.int64), np.ones((2, 2), np.int64))
    with pytest.raises(TypeError, match="idx has dtype int32, expected int64"):
        K.gather_batch(arr(3, 4, dtype=np.uint8), np.array([0, 1], np.int32), arr(2, 4))


@pytest.mark.parametrize("call,message", [
    (lambda: K.dense_forward(arr(2, 3), arr(4, 4), arr(4), arr(2, 4)), r"W has shape \(4, 4\): dimension 0 must be 3"),
    (lambda: K.dense_forward(arr(2, 3), arr(3, 4), arr(5), arr(2, 4)), r"b has shape \(5,\)"),
    (lambda: K.dense_forward(arr(2, 3), arr(3, 4), arr(4), arr(3, 4)), r"Y has shape \(3, 4\)"),
    (lambda: K.dense_backward(arr(2, 3), arr(3, 4), arr(2, 4), arr(3, 4), None), "dW and db must both"),
    (lambda: K.gemm(arr(2, 3), arr(2, 3), arr(2, 3)), r"B has shape \(2, 3\): dimension 0 must be 3"),
    (lambda: K.relu_forward(arr(2, 3), arr(3, 2)), r"Y has shape \(3, 2\), expected \(2, 3\)"),
    (lambda: K.sigmoid_bce(arr(4, 1), arr(4), arr(4, 1), arr(4, 1)), "targets must be 2-D"),
    (lambda: K.sigmoid_bce(arr(0), arr(0), arr(0), arr(0)), "logits is empty"),
    (lambda: K.batchnorm_forward(arr(1, 3), arr(3), arr(3), arr(3), arr(3), arr(3), arr(3), arr(1, 3)),
     "at least 2 rows"),
    (lambda: K.adam_step(arr(5), arr(5), arr(5), arr(4), lr=1e-3, beta1=0.5, beta2=0.9, eps=1e-8, step=1),
     r"v has shape \(4,\)"),
    (lambda: K.adam_step(arr(5), arr(5), arr(5), arr(5), lr=1e-3, beta1=0.5, beta2=0.9, eps=1e-8, step=0),
     "step must be >= 1"),
    (lambda: K.adam_step(arr(5), arr(5), arr(5), arr(5), lr=1e-3, beta1=1.0, beta2=0.9, eps=1e-8, step=1),
     "beta1 must be in"),
    (lambda: K.gather_batch(arr(3, 4, dtype=np.uint8), np.array([0, 1]), arr(2, 5)), r"out has shape \(2, 5\)"),
    (lambda: K.add_noise(arr(3), arr(3), -1.0, arr(3)), "std must be >= 0"),
])
def test_shape_and_value_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_non_contiguous_rejected():
    X = np.ones((4, 6), f32)[:, ::2]
    with pytest.raises(ValueError, match="X must be C-contiguous"):
        K.dense_forward(X, arr(3, 2), arr(2), arr(4, 2))
    with pytest.raises(ValueError, match="W must be C-contiguous"):
        K.dense_forward(arr(4, 3), np.ones((2, 3), f32).T, arr(2), arr(4, 2))


def test_read_only_output_rejected():
    Y = arr(2, 2)
    Y.flags.writeable = False
    with pytest.raises(ValueError, match="Y is an output and must be writeable"):
        K.relu_forward(arr(2, 2), Y)


def test_overlapping_output_rejected():
    buf = np.ones((4, 4), f32)
    with pytest.raises(ValueError, match="C overlaps A"):
        K.gemm(buf, arr(4, 4), buf)
    big = np.zeros(10, f32)
    with pytest.raises(ValueError, match="Y overlaps X"):
        K.relu_forward(big[:6], big[2:8])  # partly over: not in place, not disjoint


def test_gan_rejects_bad_batches():
    gan = GAN(Config(latent_dim=3, g_hidden=(5,), d_hidden=(4,), image_dim=6, batch_size=4))
    images = np.zeros((10, 6), np.uint8)
    with pytest.raises(TypeError, match="images has dtype float32, expected uint8"):
        gan.train_step(images.astype(f32), np.arange(4), 0.1)
    with pytest.raises(ValueError, match=r"idx has shape \(3,\), expected \(4,\)"):
        gan.train_step(images, np.arange(3), 0.1)
    with pytest.raises(IndexError, match="out of range for 10 images"):
        gan.train_step(images, np.array([0, 1, 2, 10]), 0.1)
    with pytest.raises(ValueError, match=r"images has shape \(10, 5\), expected \(N, 6\)"):
        gan.train_step(np.zeros((10, 5), np.uint8), np.arange(4), 0.1)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        gan.train_step(images, np.arange(4), float("nan"))


def test_generate_rejects_nan_and_bad_shapes():
    gan = GAN(Config(latent_dim=3, g_hidden=(5,), d_hidden=(4,), image_dim=6, batch_size=4))
    z = np.zeros((5, 3))
    z[2, 1] = np.nan
    with pytest.raises(ValueError, match="z contains NaN or infinity"):
        gan.generate(z)
    with pytest.raises(ValueError, match=r"z has shape \(5, 4\), expected \(n, 3\)"):
        gan.generate(np.zeros((5, 4)))
    with pytest.raises(TypeError, match="z must be a float array"):
        gan.generate(np.zeros((5, 3), np.int64))
    out = gan.generate(np.zeros((9, 3)))
    assert out.shape == (9, 6) and np.all(np.abs(out) <= 1)


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="config.batch_size = 1"):
        Config(batch_size=1)
    with pytest.raises(ValueError, match="config.beta1 = 1.0"):
        Config(beta1=1.0)
    with pytest.raises(ValueError, match="config.lr = nan"):
        Config(lr=float("nan"))
    with pytest.raises(ValueError, match="config.dtype = 'float16'"):
        Config(dtype="float16")
    with pytest.raises(ValueError, match="unknown config field"):
        Config.from_dict({"learning_rate": 1})
