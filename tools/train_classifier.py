"""Train a bundled evaluation classifier and write it into the package.

    python tools/train_classifier.py mnist           # ../shared/data/mnist-sample, 10,000 images
    python tools/train_classifier.py fashion-mnist   # Debian's full-size Fashion-MNIST, 60,000 images

Writes src/mnistgan/classifiers/<name>.npz: the weights, the official test
set's accuracy, the mean and covariance of the test set's penultimate
features (the "real" statistics FID compares against), and the first 2,000
test images. Seeded: the same command gives the same file.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
from mnistgan.classifier import Classifier  # noqa: E402
from mnistgan.data import read_idx_pair  # noqa: E402
from mnistgan.metrics import feature_stats  # noqa: E402

SOURCES = {
    "mnist": ROOT.parent / "shared" / "data" / "mnist-sample",
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(SOURCES))
    p.add_argument("--data", type=Path, default=None, help="folder with the four IDX files")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: 60 for mnist (10,000 images), 30 for fashion-mnist (60,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    folder = a.data or SOURCES[a.name]
    a.epochs = a.epochs or {"mnist": 60, "fashion-mnist": 30}[a.name]
    x_train, y_train = read_idx_pair(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
    x_test, y_test = read_idx_pair(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    t0 = time.perf_counter()
    with threadpool_limits(limits=2, user_api="blas"):
        clf = Classifier(seed=a.seed).fit(x_train, y_train, epochs=a.epochs, log=print)
        feats, probs = clf.features_and_probs(x_test)
    acc = float((probs.argmax(1) == y_test).mean())
    mean, cov = feature_stats(feats)
    clf.info = {"dataset": a.name, "train_images": len(x_train), "epochs": a.epochs, "seed": a.seed,
                "test_accuracy": acc, "test_images": len(x_test),
                "command": f"python tools/train_classifier.py {a.name}"}
    out = a.out or ROOT / "src" / "mnistgan" / "classifiers" / f"{a.name}.npz"
    # 2,000 held-out test images travel along: the real reference set of
    # precision/recall and of the memorisation check.
    clf.save(out, test_mean=mean, test_cov=cov, heldout=x_test[:2000])
    print(f"{a.name}: test accuracy {acc:.4f} on {len(x_test)} images; "
          f"{time.perf_counter() - t0:.0f} s; written to {out}")


if __name__ == "__main__":
    sys.exit(main())
