"""The GAN step: finite differences, the independent NumPy reference, and
hyperparameters that must reach the math."""
import numpy as np
import pytest

from mnistgan import GAN, Config
from numpy_reference import RefGAN

SMALL = dict(latent_dim=3, g_hidden=(6, 5), d_hidden=(7, 4), image_dim=9, batch_size=4)


def small_gan(dtype="float64", seed=0, **kw):
    return GAN(Config(**{**SMALL, "dtype": dtype, "seed": seed, **kw}))


def inputs(gan, rng):
    c = gan.config
    B = c.batch_size
    real = rng.uniform(-1, 1, (B, c.image_dim))
    z = rng.standard_normal((B, c.latent_dim))
    noise = rng.standard_normal((2 * B, c.image_dim))
    return real, z, noise


def fd_check(params: dict, grads: dict, loss_fn, h=1e-6):
    """Central differences of loss_fn w.r.t. every entry of every parameter."""
    worst = {}
    for name, p in params.items():
        analytic = grads[name].copy()
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = loss_fn()
            p[i] = old - h
            down = loss_fn()
            p[i] = old
            numeric[i] = (up - down) / (2 * h)
        worst[name] = np.linalg.norm(numeric - analytic) / np.linalg.norm(numeric)
    return worst


@pytest.mark.parametrize("std", [0.0, 0.1])
def test_discriminator_gradient_matches_finite_differences(std):
    gan = small_gan()
    real, z, noise = inputs(gan, np.random.default_rng(5))
    gan.discriminator_gradients(real, z, noise, std)
    grads = {k: v.copy() for k, v in gan.D.grads.items()}
    errors = fd_check(gan.D.params, grads, lambda: gan.discriminator_gradients(real, z, noise, std))
    assert len(errors) == 2 * len(SMALL["d_hidden"]) + 2  # every D parameter array
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("std", [0.0, 0.1])
def test_generator_gradient_matches_finite_differences(std):
    gan = small_gan()
    _, z, noise = inputs(gan, np.random.default_rng(6))
    noise = noise[: gan.batch_size]
    gan.generator_gradients(z, noise, std)
    grads = {k: v.copy() for k, v in gan.G.grads.items()}
    errors = fd_check(gan.G.params, grads, lambda: gan.generator_gradients(z, noise, std))
    # dense weight+bias for each layer, batch-norm weight+bias per hidden layer
    assert len(errors) == 2 * (len(SMALL["g_hidden"]) + 1) + 2 * len(SMALL["g_hidden"])
    assert max(errors.values()) < 1e-6, errors


def max_rel_diff(a, b):
    return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


def network_rel_diff(net, ref_params: dict, per_array: bool):
    """Largest |ours - ref|, relative to max |ref| of each array (per_array) or
    of the whole network."""
    if per_array:
        return max(max_rel_diff(p, ref_params[k]) for k, p in net.params.items())
    err = max(np.abs(p.astype(np.float64) - ref_params[k]).max() for k, p in net.params.items())
    return err / max(np.abs(ref_params[k]).max() for k in net.params)


@pytest.mark.parametrize("size", ["small", "reference"])
def test_float64_step_matches_numpy_reference_for_20_steps(size):
    """20 steps from the same seed, both implementations running free:
    every parameter array within 1e-9 of the reference, on its own scale."""
    limit = 1e-9
    cfg = Config(**{**(SMALL if size == "small" else {}), "dtype": "float64"})
    gan = GAN(cfg)
    ref = RefGAN(gan, seed=99)
    gan.rng = np.random.default_rng(99)  # the same stream of z and noise from here on
    data_rng = np.random.default_rng(7)
    images = data_rng.integers(0, 256, (200, cfg.image_dim), dtype=np.uint8)
    for step in range(20):
        idx = data_rng.integers(0, 200, cfg.batch_size)
        std = 0.1 * (1 - step / 20)  # annealed, as in training
        got = gan.train_step(images, idx, std)
        want = ref.step(images, idx, std)
        for g, w in zip(got, want):
            assert abs(g - w) <= limit * max(abs(w), 1e-3), (step, got, want)
        assert network_rel_diff(gan.G, ref.G.params(), True) < limit, step
        assert network_rel_diff(gan.D, ref.D.params(), True) < limit, step
        for i in range(len(gan.G.running_mean)):
            assert max_rel_diff(gan.G.running_mean[i], ref.G.rm[i]) < limit
            assert max_rel_diff(gan.G.running_var[i], ref.G.rv[i]) < limit
    assert gan.G.adam_steps == gan.D.adam_steps == ref.G.t == ref.D.t == 20


def gradient_errors(got: dict, exact: dict):
    """Per array, |got - exact| (2-norm) on the scale of the larger of the
    array's exact gradient and a thousandth of the whole network's. The
    floor is for arrays whose exact gradient cancels to ~0 (the bias of a
    unit that is active in every row, before batch norm): float32 gives them
    rounding noise of the size of the terms that cancel."""
    whole = np.sqrt(sum(np.sum(g ** 2) for g in exact.values()))
    return {k: np.linalg.norm(got[k].astype(np.float64) - g) / max(np.linalg.norm(g), 1e-3 * whole)
            for k, g in exact.items()}


@pytest.mark.parametrize("size", ["small", "reference"])
def test_float32_step_is_the_exact_step_to_float32_rounding(size):
    """20 float32 steps, each judged against the exact answer to its own
    question: the NumPy step in float64 on the same float32 draws, data and
    state (taken from the kernels before each step, and D taken from the
    kernels after its update, so that G's update is judged on the same D).

    Within 1e-4 at every step: the losses and D outputs, the running
    statistics, and the parameters after Adam, which must be the exact Adam
    step from the kernels' own gradients. The gradients are within 1e-4
    (see gradient_errors) at all steps but at most 2, and within 5e-2 there:
    measured, 1e-6 at most steps, and 6e-3 at a step where one ReLU input
    lies within float32 rounding of 0 and flips (the float32 NumPy step
    flips too, at its own steps), and 1.3e-4 at one step of the small model,
    where batch norm sees 4 rows and a column with one positive ReLU output
    is ill-conditioned. Why not compare free-running parameters:
    a gradient component that cancels to ~0 takes its float32 value, sign
    included, from the summation order, which BLAS versions change, and Adam
    turns any such value into a step of about lr (measured: scipy 1.11's
    OpenBLAS moved D 9e-4 from the exact step at step 16 of the reference
    model, by such components alone).
    """
    limit = 1e-4
    cfg = Config(**{**(SMALL if size == "small" else {}), "dtype": "float32"})
    gan = GAN(cfg)
    exact = RefGAN(gan, seed=99, compute_dtype="float64")
    adam = RefGAN(gan, seed=99, compute_dtype="float64")  # Adam alone, on the kernels' gradients
    gan.rng = np.random.default_rng(99)
    data_rng = np.random.default_rng(7)
    images = data_rng.integers(0, 256, (200, cfg.image_dim), dtype=np.uint8)
    worst_gradients = []
    for step in range(20):
        exact.sync_from(gan)
        adam.sync_from(gan)
        idx = data_rng.integers(0, 200, cfg.batch_size)
        std = 0.1 * (1 - step / 20)
        got = gan.train_step(images, idx, std)
        want = exact.step(images, idx, std, d_after=gan.D)
        for g, w in zip(got, want):
            assert abs(g - w) <= limit * max(abs(w), 1e-3), (step, got, want)
        worst = 0.0
        for key, net, rnet in (("G", gan.G, adam.G), ("D", gan.D, adam.D)):
            errors = gradient_errors(net.grads, exact.last_grads[key])
            assert set(errors) == set(net.params)  # every array judged
            worst = max(worst, *errors.values())
            rnet.adam({k: v.astype(np.float64) for k, v in net.grads.items()},
                      cfg.lr, cfg.beta1, cfg.beta2, cfg.adam_eps)
            assert network_rel_diff(net, rnet.params(), True) < limit, (step, net.name)
        worst_gradients.append(worst)
        for i in range(len(gan.G.running_mean)):
            assert max_rel_diff(gan.G.running_mean[i], exact.G.rm[i]) < limit
            assert max_rel_diff(gan.G.running_var[i], exact.G.rv[i]) < limit
    assert gan.G.adam_steps == gan.D.adam_steps == exact.G.t == 20
    assert sum(w >= limit for w in worst_gradients) <= 2, worst_gradients
    assert max(worst_gradients) < 5e-2, worst_gradients


def test_concatenated_d_batch_keeps_real_gradients():
    """The D gradient is the sum of the real-only and fake-only gradients
    (a cache overwritten by the fake pass would break this)."""
    gan = small_gan()
    real, z, noise = inputs(gan, np.random.default_rng(8))
    ref = RefGAN(gan, seed=0)
    _, grads, _, _ = ref.d_loss_and_grads(real, z, noise, 0.1)
    gan.discriminator_gradients(real, z, noise, 0.1)
    for name, g in grads.items():
        assert max_rel_diff(gan.D.grads[name], g) < 1e-12, name


def run_steps(cfg, n=3):
    gan = GAN(cfg)
    images = np.random.default_rng(1).integers(0, 256, (40, cfg.image_dim), dtype=np.uint8)
    stats = [gan.train_step(images, np.arange(i, i + cfg.batch_size) % 40, 0.1) for i in range(n)]
    return gan, stats


@pytest.mark.parametrize("field,value", [
    ("lr", 0.001), ("beta1", 0.9), ("beta2", 0.99), ("adam_eps", 1e-3),
    ("bn_momentum", 0.5), ("bn_eps", 0.8), ("label_smoothing", 0.1),
])
def test_every_hyperparameter_reaches_the_math(field, value):
    base = Config(**SMALL, dtype="float64")
    changed = Config(**{**SMALL, "dtype": "float64", field: value})
    g1, _ = run_steps(base)
    g2, _ = run_steps(changed)
    if field == "label_smoothing":
        assert not np.array_equal(g1.D.flat_params, g2.D.flat_params)
    elif field == "bn_momentum":
        assert not np.array_equal(g1.G.flat_buffers, g2.G.flat_buffers)
    else:
        assert not np.array_equal(g1.G.flat_params, g2.G.flat_params)
    # And the reference, given the same value, agrees with the kernels.
    gan = GAN(changed)
    ref = RefGAN(gan, seed=3)
    gan.rng = np.random.default_rng(3)
    images = np.random.default_rng(1).integers(0, 256, (40, 9), dtype=np.uint8)
    for i in range(3):
        idx = np.arange(i, i + 4) % 40
        gan.train_step(images, idx, 0.1)
        ref.step(images, idx, 0.1)
    for name, p in gan.G.params.items():
        assert max_rel_diff(p, ref.G.params()[name]) < 1e-9, name
    for i, rm in enumerate(gan.G.running_mean):
        assert max_rel_diff(rm, ref.G.rm[i]) < 1e-9


def test_instance_noise_reaches_discriminator():
    cfg = Config(**SMALL, dtype="float64")
    gan = GAN(cfg)
    real, z, noise = inputs(gan, np.random.default_rng(2))
    l0 = gan.discriminator_gradients(real, z, noise, 0.0)
    l1 = gan.discriminator_gradients(real, z, noise, 0.5)
    assert l0 != l1
    assert np.allclose(gan.d_input[:4], real + 0.5 * noise[:4])


def test_init_is_pytorch_linear_default():
    gan = GAN(Config())
    for net in (gan.G, gan.D):
        for i, (d_in, d_out) in enumerate(zip(net.sizes[:-1], net.sizes[1:])):
            bound = 1 / np.sqrt(d_in)
            W, b = net.W[i], net.b[i]
            assert W.shape == (d_in, d_out)
            assert np.abs(W).max() <= bound and np.abs(b).max() <= bound
            if W.size > 1000:  # uniform: std = bound / sqrt(3)
                assert abs(W.std() - bound / np.sqrt(3)) < 0.05 * bound
    for g in gan.G.gamma:
        assert np.all(g == 1)
    for rv in gan.G.running_var:
        assert np.all(rv == 1)
    # The named arrays are views into the flat arrays Adam updates.
    assert np.shares_memory(gan.G.params["dense0.weight"], gan.G.flat_params)


def test_reference_architecture_sizes():
    gan = GAN(Config())
    assert gan.G.sizes == [100, 128, 256, 512, 1024, 784]
    assert gan.D.sizes == [784, 628, 471, 314, 157, 1]
    assert gan.G.hidden_batchnorm and not gan.D.hidden_batchnorm
    assert gan.G.output == "tanh" and gan.D.output == "linear"


def test_same_seed_same_step_results():
    cfg = Config(**SMALL)
    _, a = run_steps(cfg, 5)
    _, b = run_steps(cfg, 5)
    assert a == b
    _, c = run_steps(Config(**{**SMALL, "seed": 1}), 5)
    assert a != c
