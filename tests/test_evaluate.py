"""The bundled classifiers, the evaluator and the evaluate command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mnistgan import classifier
from mnistgan.data import load_sample
from mnistgan.evaluate import evaluate_images


@pytest.fixture(scope="module")
def sample():
    return load_sample()


def test_bundled_mnist_classifier_is_accurate(sample):
    clf, mean, cov = classifier.bundled("mnist")
    # Measured on the official 10,000 test images when it was trained.
    assert clf.info["test_accuracy"] >= 0.975 and clf.info["test_images"] == 10000
    images, labels = sample
    assert clf.accuracy(images[:3000], labels[:3000]) > 0.98  # its own training images
    assert mean.shape == (256,) and cov.shape == (256, 256)


def test_bundled_fashion_classifier(tmp_path):
    clf, mean, cov = classifier.bundled("fashion-mnist")
    assert clf.info["test_accuracy"] > 0.85 and clf.info["train_images"] == 60000


def test_shift_augmentation_moves_pixels_not_mass():
    rng = np.random.default_rng(0)
    img = np.zeros((200, 28, 28), np.uint8)
    img[:, 10:18, 10:18] = 255
    moved = classifier.shift_images(img, rng, 2)
    assert np.all(moved.sum(axis=(1, 2)) == img.sum(axis=(1, 2)))  # shapes far from the edge stay whole
    assert (moved != img).any(axis=(1, 2)).mean() > 0.8  # most were moved (1 in 25 is not)


def test_metrics_on_real_and_broken_images(sample):
    images = sample[0]
    real = evaluate_images(images[:5000])
    one = evaluate_images(np.repeat(images[:1], 5000, axis=0))
    assert real["fid"] < 10 and one["fid"] > 100
    assert real["score"] > 8 and one["score"] < 1.1
    assert real["coverage_entropy"] > 0.99 and one["coverage_entropy"] == 0
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    assert one["recall"] < 0.05
    assert real["memorised"] > 0.9  # these are the training images themselves
    with pytest.raises(ValueError, match="uint8"):
        evaluate_images(images.astype(np.float32))


def test_evaluate_cli(tmp_path, sample):
    np.save(tmp_path / "s.npy", sample[0][:2000])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "mnistgan.evaluate", "--samples", str(tmp_path / "s.npy"), "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 2000 and out["fid"] < 20
    r = subprocess.run([sys.executable, "-m", "mnistgan.evaluate", "--samples", str(tmp_path / "s.npy")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert "| FID |" in r.stdout and "biased upward" in r.stdout
    r = subprocess.run([sys.executable, "-m", "mnistgan.evaluate", "--samples", str(tmp_path / "nope.npy")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "not a readable .npy" in r.stderr and "Traceback" not in r.stderr
