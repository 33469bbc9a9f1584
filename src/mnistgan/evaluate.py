"""python -m mnistgan.evaluate: how good are a model's samples, in numbers.

    python -m mnistgan.evaluate --checkpoint runs/mnistgan            # table
    python -m mnistgan.evaluate --samples samples.npy --json          # uint8 (N, 28, 28)

Metrics (see mnistgan.metrics), all in the bundled classifier's feature space:
  fid            Frechet distance to the official test set's features (shipped
                 statistics). Use >= 10,000 samples: fewer bias it upward.
  score          classifier score (Inception-score formula), mean and spread
                 over 10 splits; 10 is the most a 10-class data set allows.
  coverage       entropy of the predicted-class histogram / log 10 (1 = every
                 class equally often), and the smallest and largest class share.
  precision,     Kynkaanniemi et al. 2019, k = 3, on 2,000 samples against
  recall         2,000 held-out real test images (shipped).
  memorised      share of samples closer (in pixels) to a training image than
                 95% of real held-out images are: about 0.05 for real data,
                 1 for copies of the training set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from . import metrics
from .classifier import bundled
from .train import _Parser, positive_int

PR_SAMPLES = 2000


def evaluate_images(images: np.ndarray, dataset: str = "mnist", train_images: np.ndarray | None = None,
                    *, precision_recall: bool = True, memorisation: bool = True) -> dict:
    """Every metric for uint8 images (N, 28, 28) against the bundled `dataset` statistics.

    train_images: the GAN's training images, for the memorisation check
    (default for mnist: the bundled mnist-sample). precision_recall and
    memorisation can be switched off where time matters (during training).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, height, width), got {images.dtype} {images.shape}")
    if len(images) < 20:
        raise ValueError(f"{len(images)} images are too few to evaluate (use 10,000)")
    clf, mean, cov, heldout = _load(dataset)
    feats, probs = clf.features_and_probs(images)
    mu, sigma = metrics.feature_stats(feats)
    score, spread = metrics.classifier_score(probs, splits=10)
    out = {"n": int(len(images)), "dataset": dataset,
           "fid": metrics.frechet_distance(mu, sigma, mean, cov),
           "score": score, "score_std": spread}
    out.update({f"coverage_{k}" if k == "entropy" else k: v
                for k, v in metrics.class_coverage(probs).items()})
    rng = np.random.default_rng(0)
    pick = rng.choice(len(images), min(PR_SAMPLES, len(images)), replace=False)
    if precision_recall:
        real_feats, _ = clf.features_and_probs(heldout)
        out["precision"], out["recall"] = metrics.precision_recall(real_feats, feats[pick], k=3)
    if memorisation:
        if train_images is None:
            if dataset != "mnist":
                raise ValueError("memorisation needs the training images (--train-data) for this data set")
            from .data import load_sample

            train_images = load_sample()[0]
        flat = lambda x: np.asarray(x, np.float32).reshape(len(x), -1) / 255  # noqa: E731
        out["memorised"] = metrics.memorisation_share(flat(images[pick]), flat(train_images), flat(heldout))
    return out


_CACHE: dict = {}


def _load(dataset):
    if dataset not in _CACHE:
        clf, mean, cov = bundled(dataset)
        from .classifier import BUNDLED

        with np.load(BUNDLED / f"{dataset}.npz", allow_pickle=False) as z:
            heldout = z["heldout"]
        _CACHE[dataset] = (clf, mean, cov, heldout)
    return _CACHE[dataset]


COLUMNS = [("fid", "FID", "{:.2f}"), ("score", "score", "{:.2f}"), ("coverage_entropy", "coverage", "{:.3f}"),
           ("min_share", "min class", "{:.3f}"), ("max_share", "max class", "{:.3f}"),
           ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("memorised", "memorised", "{:.3f}")]


def format_table(rows: dict) -> str:
    """A Markdown table: one row per named result dict."""
    head = "| | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            cell = "-" if v is None else fmt.format(v)
            if key == "score" and v is not None:
                cell += f" ± {r['score_std']:.2f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parser():
    p = _Parser(prog="python -m mnistgan.evaluate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint.npz or a run folder")
    src.add_argument("--samples", help="a .npy file of uint8 images (N, 28, 28)")
    p.add_argument("--n", type=positive_int, default=10000, help="samples to draw from a checkpoint (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed for the samples' z (default 0)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"],
                   help="which bundled classifier and statistics (default mnist)")
    p.add_argument("--train-data", default=None,
                   help="the GAN's training data for the memorisation check (any --data value; "
                        "default for mnist: mnist-sample)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError, load_images

    args = parser().parse_args(argv)
    try:
        if args.checkpoint:
            from .trainer import Trainer

            path = Path(args.checkpoint)
            trainer = Trainer.load(path / "checkpoint.npz" if path.is_dir() else path)
            images = trainer.sample(args.n, seed=args.seed)
            name = str(args.checkpoint)
        else:
            try:
                images = np.load(args.samples, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"--samples {args.samples}: not a readable .npy file ({e})") from None
            name = str(args.samples)
        train = load_images(args.train_data, progress=False) if args.train_data else None
        result = evaluate_images(images, args.dataset, train)
    except (CheckpointError, DataError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"mnistgan.evaluate: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table({name: result}))
        if result["n"] < 10000:
            print(f"note: FID from {result['n']} samples is biased upward; use 10,000 or more.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
