"""python -m mnistgan.train and mnistgan.generate, end to end, as a user runs them."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mnistgan.data import load_images


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few hundred real MNIST images, as a Keras-style .npz."""
    path = tmp_path_factory.mktemp("data") / "mnist300.npz"
    np.savez(path, x_train=load_images("mnist-sample")[:300])
    return path


@pytest.fixture(scope="module")
def trained_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = run("mnistgan.train", "--data", str(small_data), "--epochs", "2", "--out", str(out), "--seed", "3",
            "--eval-every", "1", "--eval-samples", "500")
    assert r.returncode == 0, r.stderr
    return out, r


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_train_writes_every_file(trained_run):
    out, r = trained_run
    for name in ("config.json", "checkpoint.npz", "losses.csv", "losses.png", "samples.png",
                 "samples/epoch_001.png", "samples/epoch_002.png", "metrics.csv", "fid.png"):
        assert (out / name).is_file(), name
    lines = (out / "losses.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,d_loss,g_loss,d_real,d_fake"
    assert len(lines) == 1 + 2 * (300 // 50)
    last = lines[-1].split(",")
    assert last[0] == "12" and last[1] == "2"
    grid = read_png(out / "samples.png")
    assert grid.shape[0] == grid.shape[1] > 280  # 10x10 tiles of 28 pixels, scaled up
    assert read_png(out / "losses.png").ndim == 3
    assert '"seed": 3' in (out / "config.json").read_text()
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,step,fid,score") and len(metrics) == 3
    assert all(float(line.split(",")[2]) > 0 for line in metrics[1:])
    assert "epoch 2/2" in r.stderr and "img/s" in r.stderr
    assert not [p for p in out.rglob(".*tmp")]


def test_generate_png_and_npy(trained_run, tmp_path):
    out, _ = trained_run
    r = run("mnistgan.generate", "--checkpoint", str(out / "checkpoint.npz"), "--n", "12",
            "--out", str(tmp_path / "g.npy"), "--seed", "1")
    assert r.returncode == 0, r.stderr
    a = np.load(tmp_path / "g.npy")
    assert a.shape == (12, 28, 28) and a.dtype == np.uint8 and a.std() > 0
    r = run("mnistgan.generate", "--checkpoint", str(out), "--n", "12", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0, r.stderr
    # 12 images, 10 per row: 2 rows of 28-pixel tiles with 2-pixel gaps, scaled 3x.
    assert read_png(tmp_path / "g.png").shape == (3 * (2 * 30 + 2), 3 * (10 * 30 + 2))


def test_resume_continues_to_more_epochs(trained_run, small_data, tmp_path):
    import shutil

    out, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    # What kill -9 between open and rename leaves behind: the next run clears it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    debris = [copy / f".losses.csv.{dead}.tmp", copy / "samples" / f".epoch_002.png.{dead}.tmp"]
    for path in debris:
        path.write_bytes(b"half")
    r = run("mnistgan.train", "--data", str(small_data), "--resume", str(copy), "--epochs", "3")
    assert r.returncode == 0, r.stderr
    assert not any(path.exists() for path in debris)
    assert len((copy / "losses.csv").read_text().splitlines()) == 1 + 3 * 6
    assert (copy / "samples" / "epoch_003.png").is_file()


def test_sigint_saves_and_resume_is_bit_for_bit(small_data, tmp_path):
    data = tmp_path / "mnist1000.npz"
    np.savez(data, x_train=load_images("mnist-sample")[:1000])
    args = ["--data", str(data), "--epochs", "4", "--no-progress", "--seed", "5", "--threads", "1"]
    straight = tmp_path / "straight"
    assert run("mnistgan.train", *args, "--out", str(straight)).returncode == 0

    broken = tmp_path / "broken"
    p = subprocess.Popen([sys.executable, "-m", "mnistgan.train", *args, "--out", str(broken)],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (broken / "checkpoint.npz").exists() and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)  # mid-epoch 2 of 4
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "stopped by SIGINT" in err and "--resume" in err and "Traceback" not in err
    r = run("mnistgan.train", "--data", str(data), "--resume", str(broken), "--no-progress", "--threads", "1")
    assert r.returncode == 0, r.stderr
    with np.load(straight / "checkpoint.npz") as a, np.load(broken / "checkpoint.npz") as b:
        for key in ("G.params", "D.params", "G.adam_v", "D.adam_m", "G.buffers", "history.d_loss", "rng_state"):
            assert np.array_equal(a[key], b[key]), key


@pytest.mark.parametrize("args,message", [
    (["--epochs", "abc"], "argument --epochs: invalid int value"),
    (["--batch-size", "0"], "must be >= 1"),
    (["--lr", "-1"], "--lr = -1.0: must be a finite number > 0"),
    (["--beta1", "1.5"], "--beta1 = 1.5"),
    (["--data", "/no/such/place"], "unknown data source '/no/such/place'"),
    (["--resume", "/no/such/checkpoint.npz"], "no such checkpoint"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_give_one_line_errors(args, message, tmp_path):
    r = run("mnistgan.train", *args, "--out", str(tmp_path / "o"))
    assert r.returncode in (1, 2)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_bad_data_gives_one_line_error(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + (10).to_bytes(4, "big") * 3)
    r = run("mnistgan.train", "--data", str(folder), "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "truncated" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_refuses_other_settings(trained_run, small_data, tmp_path):
    out, _ = trained_run
    r = run("mnistgan.train", "--data", str(small_data), "--resume", str(out), "--latent-dim", "64",
            "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "--latent-dim 64 (checkpoint has 100)" in r.stderr


def test_generate_bad_arguments(trained_run, tmp_path):
    out, _ = trained_run
    r = run("mnistgan.generate", "--checkpoint", str(out), "--out", str(tmp_path / "x.jpg"))
    assert r.returncode == 2 and "must end in .png or .npy" in r.stderr
    (tmp_path / "bad.npz").write_bytes(b"junk")
    r = run("mnistgan.generate", "--checkpoint", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 1 and "damaged or not a mnistgan checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
