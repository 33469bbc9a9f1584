"""Calibration: the evaluation metrics on real images and on known kinds of broken ones.

    python benchmarks/calibration.py        # writes benchmarks/CALIBRATION.md

So any number `python -m mnistgan.evaluate` prints can be read against real
data (the floor) and against blur, pixel noise, full mode collapse (one image
repeated) and partial collapse (one class, five classes). "real" here are the
10,000 training images of the bundled sample, so their memorisation share is
1 by construction: that row shows what copying the training set looks like.
"""
from pathlib import Path

import numpy as np
from scipy import ndimage

from mnistgan.data import load_sample
from mnistgan.evaluate import evaluate_images, format_table

HERE = Path(__file__).resolve().parent


def main():
    images, labels = load_sample()
    rng = np.random.default_rng(0)
    blurred = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, 1, 1))
    noisy = images.astype(np.float32) + rng.normal(0, 40, images.shape)
    cases = {
        "real (10,000 MNIST training images)": images,
        "real, Gaussian blur sigma 1 px": np.clip(np.rint(blurred), 0, 255).astype(np.uint8),
        "real + pixel noise (std 40 of 255)": np.clip(np.rint(noisy), 0, 255).astype(np.uint8),
        "one image repeated 10,000 times": np.repeat(images[:1], 10000, axis=0),
        f"one class only (the {int((labels == 3).sum())} threes)": images[labels == 3],
        f"five classes only (0-4, {int((labels < 5).sum())} images)": images[labels < 5],
    }
    rows = {}
    for name, x in cases.items():
        rows[name] = evaluate_images(x)
        print(name, {k: round(v, 3) for k, v in rows[name].items() if isinstance(v, float)}, flush=True)
    text = "\n".join([
        "# Calibration of the evaluation metrics", "",
        "Command: `python benchmarks/calibration.py`. Bundled MNIST classifier; FID against the official "
        "test set's statistics; precision/recall and memorisation on 2,000 images against 2,000 held-out "
        "test images.", "", format_table(rows), ""])
    (HERE / "CALIBRATION.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
