"""The helper thread and the plans it shares: same numbers with or without
the helper, plans that refuse inconsistent buffers, and a helper that never
outlives a step."""
import threading
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import mnistgan.gan as gan_module
from mnistgan import GAN, Config, DenseStack
from mnistgan import _kernels as K
from mnistgan import parallel

SMALL = dict(latent_dim=8, g_hidden=(32, 48), d_hidden=(40, 24), image_dim=30, batch_size=10)
# Plan runs a step posts to the helper: G's forward (2B rows), D's forward
# (2B rows), D's backward + Adam, D's forward (B rows), D's input gradient,
# G's backward + Adam.
JOBS_PER_STEP = 6


@pytest.fixture
def helper_forced(monkeypatch):
    """The GAN step asks for the helper although BLAS is held to one thread:
    then every GEMM is one-threaded on both paths and results can be compared
    bit for bit (BLAS's own threads may round differently)."""
    monkeypatch.setattr(gan_module, "blas_threads", lambda: 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", [SMALL, {}], ids=["small", "reference"])
def test_helper_thread_gives_the_same_bits(helper_forced, dtype, config):
    rng = np.random.default_rng(0)
    cfg = Config(**{**config, "dtype": dtype, "seed": 3})
    images = rng.integers(0, 256, (200, cfg.image_dim), dtype=np.uint8)
    alone, shared = GAN(cfg, parallel=False), GAN(cfg, parallel=True)
    with threadpool_limits(limits=1, user_api="blas"):
        for step in range(4):
            idx = rng.integers(0, 200, cfg.batch_size)
            a = alone.train_step(images, idx, 0.1)
            b = shared.train_step(images, idx, 0.1)
            assert a == b
    assert alone._crew.jobs_posted == 0
    assert shared._crew.jobs_posted == 4 * JOBS_PER_STEP
    if config == {}:  # passes of milliseconds: the helper is there for some
        assert shared._crew.jobs_helped > 0
    assert not shared._crew.serving     # and left after each step
    for key, value in alone.state().items():
        assert np.array_equal(value, shared.state()[key]), key


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_and_two_threads_give_the_same_bits(dtype):
    """With two BLAS threads a step is a helper session (every GEMM on one
    BLAS thread, cut the same way as with one thread): the same bits."""
    cfg = Config(dtype=dtype, seed=5)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (500, cfg.image_dim), dtype=np.uint8)
    idxs = [rng.integers(0, 500, cfg.batch_size) for _ in range(5)]
    runs = []
    for threads in (1, 2):
        gan = GAN(cfg, parallel=True)
        with threadpool_limits(limits=threads, user_api="blas"):
            stats = [gan.train_step(images, idx, 0.1) for idx in idxs]
        assert gan._crew.jobs_posted == (0 if threads == 1 else 5 * JOBS_PER_STEP)
        runs.append((stats, gan.state()))
    assert runs[0][0] == runs[1][0]
    for key, value in runs[0][1].items():
        assert np.array_equal(value, runs[1][1][key]), key


def test_fused_update_equals_backward_then_adam():
    """backward_and_update is backward + adam_update, per layer, as one pass."""
    rng = np.random.default_rng(1)

    def net():
        return DenseStack([6, 9, 7, 5], hidden_batchnorm=True, output="tanh", max_batch=8,
                          dtype="float64", rng=np.random.default_rng(2))

    a, b = net(), net()
    x = rng.standard_normal((8, 6))
    g = rng.standard_normal((8, 5))
    for _ in range(3):
        a.forward(x)
        a.backward(g)
        a.adam_update(0.01, 0.5, 0.9, 1e-8)
        b.forward(x)
        b.backward_and_update(g, 0.01, 0.5, 0.9, 1e-8)
    assert a.adam_steps == b.adam_steps == 3
    assert np.array_equal(a.flat_params, b.flat_params)
    assert np.array_equal(a.adam_v, b.adam_v)


def test_helper_is_used_only_with_two_blas_threads():
    gan = GAN(Config(**SMALL), parallel=True)
    images = np.zeros((50, 30), np.uint8)
    idx = np.arange(10)
    with threadpool_limits(limits=1, user_api="blas"):
        gan.train_step(images, idx, 0.1)
    assert gan._crew.jobs_posted == 0
    with threadpool_limits(limits=2, user_api="blas"):
        gan.train_step(images, idx, 0.1)
        assert parallel.blas_threads() == 2  # put back after the step
    assert gan._crew.jobs_posted == JOBS_PER_STEP


def _wait_serving(crew):
    deadline = time.monotonic() + 10
    while not crew.serving and time.monotonic() < deadline:
        time.sleep(0.001)
    assert crew.serving


def _stack(dtype, bn=True):
    return DenseStack([20, 48, 64, 33], hidden_batchnorm=bn, output="tanh" if bn else "linear",
                      max_batch=12, dtype=dtype, rng=np.random.default_rng(5), input_grad=True,
                      bn_groups=2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shared_passes_give_the_same_bits_as_one_thread(dtype):
    """Forward (halves of each layer), input gradient (halves of each GEMM)
    and backward + Adam, each with a serving helper, against one thread."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 20)).astype(dtype)
    g = rng.standard_normal((6, 33)).astype(dtype)
    alone, shared = _stack(dtype), _stack(dtype)
    crew = K.Crew()
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(3):
            ya = alone.forward(x, groups=2).copy()
            gxa = alone.backward(g, param_grads=False, group=1).copy()
            alone.forward(x, groups=2)
            alone.backward_and_update(g, 0.01, 0.5, 0.9, 1e-8, group=1)
            with parallel.helper_session(crew):
                _wait_serving(crew)  # tiny passes could end before the helper wakes
                yb = shared.forward(x, groups=2, crew=crew).copy()
                gxb = shared.backward(g, param_grads=False, group=1, crew=crew).copy()
                shared.forward(x, groups=2, crew=crew)
                shared.backward_and_update(g, 0.01, 0.5, 0.9, 1e-8, group=1, crew=crew)
            assert np.array_equal(ya, yb)
            assert np.array_equal(gxa, gxb)
    for key, value in alone.state().items():
        assert np.array_equal(value, shared.state()[key]), key
    assert crew.jobs_posted == 12 and crew.jobs_helped > 0


def test_a_crew_without_a_helper_costs_only_time():
    """Posted parts nobody claims are taken back and done by the caller."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 20))
    g = rng.standard_normal((12, 33))
    alone, posted = _stack("float64", bn=False), _stack("float64", bn=False)
    crew = K.Crew()  # nobody serves it
    alone.forward(x)
    gxa = alone.backward(g).copy()
    alone.forward(x)
    alone.backward_and_update(g, 0.01, 0.5, 0.9, 1e-8)
    posted.forward(x, crew=crew)
    gxb = posted.backward(g, param_grads=False, crew=crew)
    np.testing.assert_array_equal(gxa, gxb)
    posted.forward(x, crew=crew)
    posted.backward_and_update(g, 0.01, 0.5, 0.9, 1e-8, crew=crew)
    assert crew.jobs_posted == 4 and crew.jobs_helped == 0
    assert np.array_equal(alone.flat_params, posted.flat_params)


def test_two_models_stepped_from_two_threads_take_turns_correctly():
    """Two GANs in two threads: their sessions share the one helper thread
    (a crew without its helper does the work alone), results as if alone."""
    cfg = Config(**SMALL, seed=4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 30), dtype=np.uint8)
    idxs = [rng.integers(0, 200, 10) for _ in range(20)]
    with threadpool_limits(limits=2, user_api="blas"):
        ref = GAN(cfg, parallel=True)
        want = [ref.train_step(images, idx, 0.1) for idx in idxs]
        gans = [GAN(cfg, parallel=True) for _ in range(2)]
        got = [None, None]

        def train(k):
            got[k] = [gans[k].train_step(images, idx, 0.1) for idx in idxs]

        threads = [threading.Thread(target=train, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    # BLAS's thread count is process-wide, so a step that began while the
    # other held BLAS to one thread may round differently: compare closely.
    for k in range(2):
        assert got[k] is not None
        np.testing.assert_allclose(np.array(got[k]), np.array(want), rtol=1e-4, atol=1e-5)
        assert not gans[k]._crew.serving


def test_session_waits_for_the_helper_on_an_interrupt():
    crew = K.Crew()
    with pytest.raises(KeyboardInterrupt):
        with parallel.helper_session(crew):
            _wait_serving(crew)
            raise KeyboardInterrupt
    assert not crew.serving  # the helper had left before the interrupt went on


def test_a_crew_takes_one_helper():
    crew = K.Crew()
    with parallel.helper_session(crew):
        _wait_serving(crew)
        with pytest.raises(RuntimeError, match="already has a helper"):
            crew.serve()


# -- the plan's own checks ------------------------------------------------------------

def _layers(n=4, dtype=np.float64, sizes=(3, 5, 2)):
    """Buffers for a 2-layer relu -> linear stack, wired as the network wires them."""
    z = lambda *s: np.zeros(s, dtype)  # noqa: E731
    x = z(n, sizes[0])
    h, gh = z(n, sizes[1]), z(n, sizes[1])
    out, gout = z(n, sizes[2]), z(n, sizes[2])
    flat = [z(sizes[0] * sizes[1] + sizes[1] + sizes[1] * sizes[2] + sizes[2]) for _ in range(4)]
    p, g = flat[0], flat[1]
    w0 = p[:15].reshape(3, 5)
    w1 = p[20:30].reshape(5, 2)
    dw0, db0 = g[:15].reshape(3, 5), g[15:20]
    dw1, db1 = g[20:30].reshape(5, 2), g[30:32]
    layers = [dict(x=x, w=w0, y=h, gout=gh, gpre=gh, gx=None, act="relu", dw=dw0, db=db0, p_lo=0, p_size=20),
              dict(x=h, w=w1, y=out, gout=gout, gpre=gout, gx=gh, act="linear", dw=dw1, db=db1,
                   p_lo=20, p_size=12)]
    return layers, flat


def test_plan_accepts_consistent_buffers():
    layers, flat = _layers()
    plan = K.BackwardPlan(layers, param_grads=True, adam=flat)
    # G(1), X(1); G(0), the block of layer 1; the block of layer 0.
    assert plan.n == 4 and plan.n_items == 5


@pytest.mark.parametrize("change, message", [
    (lambda L, f: L[0].update(act="tanh"), "'tanh' and 'linear' are for the last layer"),
    (lambda L, f: L[1].update(act="sigmoid"), "layers\\[1\\]\\['act'\\] must be one of"),
    (lambda L, f: L[1].update(gx=np.zeros((4, 5))), "layers\\[1\\]\\['gx'\\] must be layers\\[0\\]\\['gout'\\]"),
    (lambda L, f: L[1].update(y=np.zeros((3, 2))), "layers\\[1\\]\\['y'\\] has shape \\(3, 2\\)"),
    (lambda L, f: L[0].update(x=np.zeros((4, 3), np.float32)), "layers\\[0\\]\\['x'\\] has dtype float32"),
    (lambda L, f: L[1].update(gpre=L[1]["gout"][:, :1].copy().reshape(4, 1)), "layers\\[1\\]\\['gpre'\\]"),
    (lambda L, f: L[1].update(dw=L[1]["x"][:, :2].copy()), "layers\\[1\\]\\['dw'\\] has shape"),
    (lambda L, f: L[1].update(p_lo=19), "'w' does not start the layer's slice"),
    (lambda L, f: L[1].update(w=f[0][15:25].reshape(5, 2), dw=f[1][15:25].reshape(5, 2), db=f[1][25:27],
                              p_lo=15, p_size=12), "overlap"),
    (lambda L, f: L[1].update(p_size=40), "outside the 32 flat parameters"),
    (lambda L, f: L[0].update(db=f[0][15:20]), "'db' is not inside the layer's slice of the flat gradients"),
    (lambda L, f: (L[0].update(dw=f[1][1:16].reshape(3, 5), db=f[1][16:21]), L[1].update(p_lo=21, p_size=11)),
     "'dw' does not start the layer's slice"),
    (lambda L, f: L[0].update(dw=np.zeros((5, 3)).T), "must be C-contiguous"),
])
def test_plan_refuses_inconsistent_buffers(change, message):
    layers, flat = _layers()
    change(layers, flat)
    with pytest.raises((ValueError, TypeError), match=message):
        K.BackwardPlan(layers, param_grads=True, adam=flat)


def test_plan_refuses_bad_adam_settings():
    layers, flat = _layers()
    plan = K.BackwardPlan(layers, param_grads=True, adam=flat)
    for kwargs, message in [(dict(step=0), "step must be >= 1"), (dict(beta1=1.0), "beta1 must be in"),
                            (dict(eps=0.0), "eps must be > 0"), (dict(lr=float("nan")), "lr must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            plan.start(**{**dict(lr=0.1, beta1=0.5, beta2=0.9, eps=1e-8, step=1), **kwargs})


def test_plan_refuses_a_slice_with_room_for_more_than_the_layer():
    """Adam steps the parameters at their gradients' places: a slice with a
    gap would leave parameters out, so it is refused."""
    layers, _ = _layers()
    flat = [np.zeros(33) for _ in range(4)]
    p, g = flat[0], flat[1]
    layers[0].update(w=p[:15].reshape(3, 5), dw=g[:15].reshape(3, 5), db=g[15:20])
    layers[1].update(w=p[20:30].reshape(5, 2), dw=g[20:30].reshape(5, 2), db=g[30:32], p_size=13)
    with pytest.raises(ValueError, match="must hold exactly the layer's 12 parameters"):
        K.BackwardPlan(layers, param_grads=True, adam=flat)
    layers[1].update(p_size=12)
    K.BackwardPlan(layers, param_grads=True, adam=flat)


def test_a_session_keeps_the_helper_across_steps_and_generate():
    gan = GAN(Config(**SMALL), parallel=True)
    images = np.zeros((50, 30), np.uint8)
    idx = np.arange(10)
    with threadpool_limits(limits=2, user_api="blas"):
        with gan.session() as crew:
            assert crew is gan._crew
            _wait_serving(crew)
            for _ in range(3):
                gan.train_step(images, idx, 0.1)
                assert crew.serving  # not sent away between steps
            assert parallel.blas_threads() == 1
            out = gan.generate(np.zeros((25, 8)))  # inside the session: no second helper
            with gan.session() as inner:
                assert inner is crew
            assert crew.serving
        assert not crew.serving
        assert parallel.blas_threads() == 2
    assert crew.jobs_posted == 3 * JOBS_PER_STEP + 2  # generate: 25 rows in chunks of 2B = 20
    assert out.shape == (25, 30)
    with threadpool_limits(limits=1, user_api="blas"):
        with gan.session() as crew:
            assert crew is None
