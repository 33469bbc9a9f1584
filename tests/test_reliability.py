"""Faults injected on purpose: divergence, signals, kill -9, full disks,
untrusted checkpoints; and determinism."""
import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from mnistgan import Config, Trainer, TrainingDiverged
from mnistgan import train as train_cli
from mnistgan.checkpoint import CheckpointError
from mnistgan.data import load_images
from mnistgan.gan import GAN

SMALL = dict(latent_dim=8, g_hidden=(32, 64), d_hidden=(64, 32), batch_size=20)


@pytest.fixture(scope="module")
def images():
    return load_images("mnist-sample")[:200]


@pytest.fixture(scope="module")
def npz_1000(tmp_path_factory):
    path = tmp_path_factory.mktemp("d") / "mnist1000.npz"
    np.savez(path, x_train=load_images("mnist-sample")[:1000])
    return path


# -- divergence --------------------------------------------------------------------

def test_nan_loss_stops_training_naming_the_step(images):
    t = Trainer(Config(**SMALL, epochs=3))

    def poison(tr, stats):
        if tr.step == 13:
            tr.gan.D.params["dense1.weight"][0, 0] = np.nan

    with pytest.raises(TrainingDiverged, match="at step 14 "):
        t.fit(images, on_step=poison)


def test_nan_parameter_without_nan_loss_is_caught_at_epoch_end(images):
    t = Trainer(Config(**SMALL, epochs=2))

    def poison(tr, stats):
        if tr.batch == 10:  # the last step of epoch 1: no loss sees it before the check
            tr.gan.G.adam_v[5] = np.inf

    with pytest.raises(TrainingDiverged, match="generator's Adam moments hold NaN or infinity"):
        t.fit(images, on_step=poison)


def test_diverged_state_is_never_saved(images, tmp_path):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "c.npz")
    before = (tmp_path / "c.npz").read_bytes()
    t.gan.G.flat_params[3] = np.nan
    with pytest.raises(TrainingDiverged):
        t.save(tmp_path / "c.npz")
    assert (tmp_path / "c.npz").read_bytes() == before


def test_cli_divergence_keeps_last_good_checkpoint(npz_1000, tmp_path, monkeypatch, capsys):
    real_step = GAN.train_step

    def step(self, images, idx, std):
        stats = real_step(self, images, idx, std)
        return stats._replace(d_loss=float("nan")) if self.steps == 30 else stats  # in epoch 2

    monkeypatch.setattr(GAN, "train_step", step)
    out = tmp_path / "run"
    rc = train_cli.main(["--data", str(npz_1000), "--epochs", "3", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training diverged at step 30 (epoch 2)" in err and "last good checkpoint is kept" in err
    assert "Traceback" not in err
    kept = Trainer.load(out / "checkpoint.npz")
    assert kept.epoch == 1 and kept.step == 20


# -- signals and kill -9 ---------------------------------------------------------------

def start_training(data, out, *extra, epochs=4):
    return subprocess.Popen([sys.executable, "-m", "mnistgan.train", "--data", str(data), "--epochs", str(epochs),
                             "--no-progress", "--seed", "5", "--threads", "1", "--out", str(out), *extra],
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_and_exits_cleanly(npz_1000, tmp_path):
    p = start_training(npz_1000, tmp_path / "run")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "stopped by SIGTERM" in err and "Traceback" not in err
    Trainer.load(tmp_path / "run" / "checkpoint.npz")


def test_kill_9_at_random_moments_never_breaks_the_checkpoint(npz_1000, tmp_path):
    straight = tmp_path / "straight"
    t0 = time.perf_counter()
    assert start_training(npz_1000, straight, epochs=8).wait(timeout=300) == 0
    whole_run = time.perf_counter() - t0  # start-up, 8 epochs, 8 saves

    out = tmp_path / "killed"

    def resume_or_start():
        resume = ["--resume", str(out)] if (out / "checkpoint.npz").exists() else []
        return start_training(npz_1000, out, *resume, epochs=8)

    rnd = random.Random(1234)
    kills = 0
    for attempt in range(8):
        p = resume_or_start()
        # Kill moments as shares of a whole run, so that a faster or slower
        # machine still sees runs killed while starting, mid-epoch and
        # mid-save; two of them add up to under 0.9 of a run, so at least
        # the first two runs are still going when their moment comes.
        time.sleep(rnd.uniform(0.15, 0.45) * whole_run)
        if p.poll() is None:
            p.kill()
            kills += 1
        p.communicate(timeout=120)
        if (out / "checkpoint.npz").exists():
            Trainer.load(out / "checkpoint.npz")  # always whole and loadable
        if p.returncode == 0:
            break
    assert kills >= 2
    if not (out / "checkpoint.npz").exists() or Trainer.load(out / "checkpoint.npz").epoch < 8:
        p = resume_or_start()
        assert p.wait(timeout=300) == 0
    # A kill between open and rename leaves `.NAME.PID.tmp`; the next run clears it.
    assert not [f for f in os.listdir(out) + os.listdir(out / "samples") if f.endswith(".tmp")]
    a, b = Trainer.load(straight / "checkpoint.npz"), Trainer.load(out / "checkpoint.npz")
    assert np.array_equal(a.gan.G.flat_params, b.gan.G.flat_params)
    assert np.array_equal(a.gan.D.adam_v, b.gan.D.adam_v)
    assert a.history == b.history


# -- disk -----------------------------------------------------------------------------------

def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    from mnistgan.fileio import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".checkpoint.npz.{dead.pid}.tmp": False, f".losses.csv.{dead.pid}.tmp": False,
                 f".train-images.gz.{dead.pid}.part": False,
                 f".checkpoint.npz.{live.pid}.tmp": True, f".losses.csv.{os.getpid()}.tmp": True,
                 "checkpoint.npz": True, "notes.tmp": True, f".x.{dead.pid}.tmpx": True}
        for name in names:
            (tmp_path / name).write_bytes(b"x")
        removed = remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted(n for n, keep in names.items() if not keep)
        assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_run_folder_that_cannot_be_created(npz_1000, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc = train_cli.main(["--data", str(npz_1000), "--out", str(blocker / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot write the run folder" in err and len(err.strip().splitlines()) == 1


def test_disk_full_while_saving_keeps_previous_checkpoint(images, tmp_path, monkeypatch):
    t = Trainer(Config(**SMALL, epochs=2))
    t.fit(images, epochs=1)
    t.save(tmp_path / "c.npz")
    before = (tmp_path / "c.npz").read_bytes()
    t.fit(images, epochs=1)

    real_write = np.lib.format.write_array
    calls = {"n": 0}

    def write_array(fp, array, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # a few arrays in: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fp, array, *a, **k)

    monkeypatch.setattr(np.lib.format, "write_array", write_array)
    with pytest.raises(OSError, match="No space left"):
        t.save(tmp_path / "c.npz")
    assert (tmp_path / "c.npz").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]
    assert Trainer.load(tmp_path / "c.npz").epoch == 1


def test_cli_reports_a_full_disk_in_one_line(npz_1000, tmp_path, monkeypatch, capsys):
    from mnistgan import checkpoint

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoint.npz"))

    monkeypatch.setattr(checkpoint, "save", full)
    rc = train_cli.main(["--data", str(npz_1000), "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "No space left on device" in err and "Traceback" not in err


# -- untrusted checkpoints ----------------------------------------------------------------------

def tampered(tmp_path, **changes):
    t = Trainer(Config(**SMALL))
    t.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            del arrays[k]
        else:
            arrays[k] = v
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("changes,message", [
    (dict(G__params=np.zeros(10, np.float32)), r"generator.params: shape \(10,\) does not match"),
    (dict(D__adam_m=np.zeros(1, np.float64)), r"discriminator.adam_m: shape \(1,\)"),
    (dict(G__buffers=None), "does not fit the model"),
    (dict(rng_state=None), "missing rng_state"),
    (dict(config=np.array('{"latent_dim": 8, "learning_rate": 1}')), "unknown config field"),
    (dict(format=np.array(7)), "checkpoint format 7"),
    (dict(G__params=np.array([object()], dtype=object)), "damaged or not a mnistgan checkpoint"),
])
def test_tampered_checkpoints_are_refused_with_what_differs(tmp_path, changes, message):
    with pytest.raises(CheckpointError, match=message):
        Trainer.load(tampered(tmp_path, **changes))


def test_wrong_dtype_in_checkpoint(tmp_path):
    t = Trainer(Config(**SMALL))
    n = t.gan.D.flat_params.size
    path = tampered(tmp_path, D__params=np.zeros(n, np.float64))
    with pytest.raises(CheckpointError, match="discriminator.params: dtype float64 does not match float32"):
        Trainer.load(path)


# -- determinism ------------------------------------------------------------------------------------

def run_steps(threads, steps=15):
    """Train `steps` steps of the reference model with `threads` BLAS threads."""
    images = load_images("mnist-sample")[:1000]
    with threadpool_limits(limits=threads, user_api="blas"):
        t = Trainer(Config(epochs=1))
        losses = []
        t.fit(images[: 50 * steps], on_step=lambda tr, s: losses.append(s))
        return t, losses, t.sample(16, seed=3)


def test_same_seed_same_everything_with_one_thread():
    a, la, sa = run_steps(1)
    b, lb, sb = run_steps(1)
    assert la == lb
    assert np.array_equal(sa, sb)
    assert np.array_equal(a.gan.G.flat_params, b.gan.G.flat_params)


def test_two_threads_give_the_same_bits():
    """With 2 BLAS threads a step runs with a helper thread, every GEMM on
    one BLAS thread and cut the same way as with 1 thread (mnistgan.parallel):
    losses, parameters and samples come out bit for bit the same."""
    a, la, sa = run_steps(1)
    b, lb, sb = run_steps(2)
    assert la == lb
    assert np.array_equal(sa, sb)
    for net_a, net_b in ((a.gan.G, b.gan.G), (a.gan.D, b.gan.D)):
        assert np.array_equal(net_a.flat_params, net_b.flat_params)
        assert np.array_equal(net_a.adam_v, net_b.adam_v)
        assert np.array_equal(net_a.flat_buffers, net_b.flat_buffers)
