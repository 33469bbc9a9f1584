"""The evaluation classifier: an MLP on the project's own kernels.

784 -> 512 -> 256 -> 10, ReLU hidden layers, softmax cross-entropy. Its
256-unit penultimate layer is the feature space of the Frechet distance and
of precision/recall (FID on MNIST is computed with an MNIST classifier's
features, not Inception's). Trained by `python tools/train_classifier.py`;
the package ships the weights and the real test set's feature statistics in
`classifiers/<dataset>.npz`, so evaluating needs no download.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import _kernels as K
from .fileio import atomic_write
from .network import DenseStack

SIZES = (784, 512, 256, 10)
BUNDLED = Path(__file__).parent / "classifiers"


def shift_images(images: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Each uint8 image (N, 28, 28) moved by its own random (dy, dx) in
    [-max_shift, max_shift], zero-filled: the augmentation."""
    n, h, w = images.shape
    s = max_shift
    padded = np.zeros((n, h + 2 * s, w + 2 * s), np.uint8)
    padded[:, s:s + h, s:s + w] = images
    dy = rng.integers(-s, s + 1, n)
    dx = rng.integers(-s, s + 1, n)
    out = np.empty_like(images)
    for oy in range(-s, s + 1):
        for ox in range(-s, s + 1):
            sel = np.flatnonzero((dy == oy) & (dx == ox))
            out[sel] = padded[sel, s - oy:s - oy + h, s - ox:s - ox + w]
    return out


class Classifier:
    """MLP classifier over preallocated buffers (float32)."""

    def __init__(self, batch_size: int = 100, seed: int = 0, sizes=SIZES):
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.net = DenseStack(sizes, hidden_batchnorm=False, output="linear", max_batch=batch_size,
                              dtype="float32", rng=self.rng, name="classifier")
        self.x = np.zeros((batch_size, sizes[0]), np.float32)
        self.probs = np.zeros((batch_size, sizes[-1]), np.float32)
        self.info: dict = {}

    def fit(self, images, labels, *, epochs: int = 30, lr: float = 1e-3, max_shift: int = 2, log=None):
        """Adam with the learning rate decayed linearly to 0; shifted images each epoch."""
        rows = len(images)
        labels = np.asarray(labels, np.int64)
        B = self.batch_size
        steps = rows // B
        total = epochs * steps
        for epoch in range(epochs):
            shifted = shift_images(images, self.rng, max_shift).reshape(rows, -1)
            order = self.rng.permutation(rows)
            loss_sum = 0.0
            for s in range(steps):
                idx = order[s * B:(s + 1) * B]
                K.gather_batch(shifted, idx, self.x)
                logits = self.net.forward(self.x)
                grad = self.net.grad_output(B)
                loss_sum += K.softmax_cross_entropy(logits, labels[idx], self.probs, grad)
                self.net.backward(grad)
                step = epoch * steps + s
                self.net.adam_update(lr * (1 - step / total), 0.9, 0.999, 1e-8)
            if log:
                log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / steps:.4f}")
        return self

    def features_and_probs(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Penultimate features (n, 256) and class probabilities (n, 10), float64."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 pixels, got {images.dtype}")
        rows = np.ascontiguousarray(images.reshape(len(images), -1))
        if rows.shape[1] != self.net.sizes[0]:
            raise ValueError(f"images have {rows.shape[1]} pixels, the classifier takes {self.net.sizes[0]}")
        n = len(rows)
        feats = np.empty((n, self.net.sizes[-2]))
        probs = np.empty((n, self.net.sizes[-1]))
        B = self.batch_size
        for s in range(0, n, B):
            m = min(B, n - s)
            idx = np.arange(s, s + m, dtype=np.int64)
            x = self.x[:m]
            K.gather_batch(rows, idx, x)
            logits = self.net.forward(x, train=False).astype(np.float64)
            feats[s:s + m] = self.net.views(m).post[self.net.n_layers - 2]
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs[s:s + m] = e / e.sum(axis=1, keepdims=True)
        return feats, probs

    def accuracy(self, images, labels) -> float:
        return float((self.features_and_probs(images)[1].argmax(1) == np.asarray(labels)).mean())

    def save(self, path, **extra):
        """Weights, sizes, and extra arrays (e.g. the real features' mean and covariance)."""
        arrays = {"params": self.net.flat_params, "sizes": np.array(self.net.sizes),
                  "info": np.array(json.dumps(self.info))}
        arrays.update(extra)
        with atomic_write(path) as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path) -> tuple["Classifier", dict]:
        """The classifier and the file's other arrays."""
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        clf = cls(sizes=tuple(int(s) for s in data.pop("sizes")))
        clf.net.load_state({"params": data.pop("params"), "buffers": clf.net.flat_buffers,
                            "adam_m": clf.net.adam_m, "adam_v": clf.net.adam_v,
                            "adam_steps": np.array(0)})
        clf.info = json.loads(str(data.pop("info")))
        return clf, data


def bundled(name: str = "mnist") -> tuple[Classifier, np.ndarray, np.ndarray]:
    """The shipped classifier for `name` and the real test set's feature mean and covariance."""
    path = BUNDLED / f"{name}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled classifier for {name!r} (expected {path})")
    clf, data = Classifier.load(path)
    return clf, data["test_mean"], data["test_cov"]
