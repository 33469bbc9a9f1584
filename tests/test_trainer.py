"""Trainer: shuffling, noise schedule, sampling, checkpoints and exact resume."""
import numpy as np
import pytest

from mnistgan import Config, Trainer
from mnistgan.checkpoint import CheckpointError
from mnistgan.data import load_images

SMALL = dict(latent_dim=8, g_hidden=(32, 64), d_hidden=(64, 32), batch_size=20)


@pytest.fixture(scope="module")
def images():
    return load_images("mnist-sample")[:200]


def same_state(a: Trainer, b: Trainer):
    sa, sb = a.gan.state(), b.gan.state()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert np.array_equal(sa[k], sb[k]), k
    assert a.rng.bit_generator.state == b.rng.bit_generator.state
    assert a.history == b.history


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_is_exact(images, tmp_path, dtype):
    cfg = Config(**SMALL, epochs=8, dtype=dtype)
    whole = Trainer(cfg)
    whole.fit(images)
    part = Trainer(cfg)
    part.fit(images, epochs=4)
    part.save(tmp_path / "c.npz")
    resumed = Trainer.load(tmp_path / "c.npz")
    resumed.fit(images, epochs=4)
    same_state(whole, resumed)
    assert resumed.epoch == 8 and resumed.step == 8 * 10


def test_resume_mid_epoch_is_exact(images, tmp_path):
    cfg = Config(**SMALL, epochs=3)
    whole = Trainer(cfg)
    whole.fit(images)
    part = Trainer(cfg)
    calls = iter(range(10**6))
    assert part.fit(images, should_stop=lambda: next(calls) >= 13) is False
    assert (part.epoch, part.batch) == (1, 3)
    part.save(tmp_path / "c.npz")
    resumed = Trainer.load(tmp_path / "c.npz")
    assert resumed.fit(images) is True
    same_state(whole, resumed)


@pytest.mark.parametrize("stop_after", [0, 10, 11, 20])
def test_stop_at_epoch_boundaries_resumes_exactly(images, tmp_path, stop_after):
    """Stops before the first step, right at an epoch boundary, and just after it."""
    cfg = Config(**SMALL, epochs=3)
    whole = Trainer(cfg)
    whole.fit(images)
    part = Trainer(cfg)
    calls = iter(range(10**6))
    part.fit(images, should_stop=lambda: next(calls) >= stop_after)
    assert part.step == stop_after
    part.save(tmp_path / "c.npz")
    resumed = Trainer.load(tmp_path / "c.npz")
    resumed.fit(images)
    same_state(whole, resumed)


def test_epochs_shuffle_differently_and_drop_last(images):
    t = Trainer(Config(**SMALL, epochs=2))
    orders = []
    t.fit(images[:50], epochs=1, on_step=lambda tr, s: orders.append(tr.order.copy()) if tr.batch == 1 else None)
    t.fit(images[:50], epochs=1, on_step=lambda tr, s: orders.append(tr.order.copy()) if tr.batch == 1 else None)
    assert sorted(orders[0]) == list(range(50))
    assert not np.array_equal(orders[0], orders[1])
    assert t.step == 2 * (50 // 20)  # 2 batches per epoch, the last 10 images dropped


def test_noise_schedule_is_linear_to_zero():
    t = Trainer(Config(**SMALL, epochs=10, instance_noise=0.1))
    assert t.noise_std(0, 100) == pytest.approx(0.1)
    assert t.noise_std(500, 100) == pytest.approx(0.05)
    assert t.noise_std(1000, 100) == 0
    assert t.noise_std(5000, 100) == 0


def test_sample_shapes_and_independence_from_training_rng(images):
    t = Trainer(Config(**SMALL))
    state = t.rng.bit_generator.state
    a = t.sample(7, seed=3)
    assert a.shape == (7, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, t.sample(7, seed=3))
    assert t.rng.bit_generator.state == state
    assert t.sample(3, batch_stats=True).shape == (3, 28, 28)
    with pytest.raises(ValueError, match="positive integer"):
        t.sample(0)


def test_checkpoint_of_other_architecture_is_refused(images, tmp_path):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "c.npz")
    other = Trainer(Config(**{**SMALL, "latent_dim": 9}))
    with pytest.raises(CheckpointError, match="latent_dim 8 in the checkpoint, 9 here"):
        other.restore(tmp_path / "c.npz")
    with pytest.raises(CheckpointError, match="dtype float32 in the checkpoint, float64 here"):
        Trainer(Config(**SMALL, dtype="float64")).restore(tmp_path / "c.npz")


def test_damaged_checkpoint_is_refused(tmp_path):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "c.npz")
    raw = (tmp_path / "c.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="damaged or not a mnistgan checkpoint"):
        Trainer.load(tmp_path / "cut.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a mnistgan checkpoint"):
        Trainer.load(tmp_path / "other.npz")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer.load(tmp_path / "missing.npz")


def test_checkpoint_has_no_pickles_and_holds_everything(tmp_path):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        names = set(z.files)
        for k in z.files:
            assert z[k].dtype != object
    for part in ("params", "buffers", "adam_m", "adam_v", "adam_steps"):
        assert f"G.{part}" in names and f"D.{part}" in names
    assert {"config", "rng_state", "epoch", "batch", "order", "steps", "history.d_loss"} <= names


def test_save_leaves_no_temporary_files(tmp_path):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "c.npz")
    t.save(tmp_path / "c.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


def test_bad_images_are_refused():
    t = Trainer(Config(**SMALL))
    with pytest.raises(TypeError, match="uint8"):
        t.fit(np.zeros((100, 28, 28), np.float32))
    with pytest.raises(ValueError, match="784 pixels"):
        t.fit(np.zeros((100, 27, 27), np.uint8))
    with pytest.raises(ValueError, match="fewer than one batch"):
        t.fit(np.zeros((5, 28, 28), np.uint8))


def test_keyword_overrides():
    t = Trainer(epochs=3, lr=0.001)
    assert t.config.epochs == 3 and t.config.lr == 0.001 and t.config.batch_size == 50


def test_png_encoder_round_trips():
    import matplotlib.image

    from mnistgan.plots import encode_png

    gray = np.random.default_rng(0).integers(0, 256, (13, 29), dtype=np.uint8)
    import io

    back = matplotlib.image.imread(io.BytesIO(encode_png(gray)), format="png")
    np.testing.assert_array_equal(np.rint(back * 255).astype(np.uint8), gray)


def test_named_recipes():
    from mnistgan.config import RECIPES, recipe

    assert recipe("reference") == Config()
    assert recipe("label-smoothing").label_smoothing == 0.1
    assert recipe("label-smoothing", lr=1e-3).lr == 1e-3
    assert recipe("reference", epochs=3).epochs == 3
    for name in RECIPES:
        recipe(name)  # every named recipe is a valid Config
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        recipe("nope")
