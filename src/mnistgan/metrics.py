"""Sample-quality metrics, computed on feature vectors and class probabilities.

These are the formulas; which features they see (an MNIST classifier's
penultimate layer, as the FID authors advise for MNIST) is the evaluator's
business. All inputs are float arrays, one sample per row; the arithmetic is
done in float64.

  frechet_distance      FID's formula between two Gaussians (mean, covariance)
  classifier_score      the Inception-score formula, mean and spread over splits
  class_coverage        entropy of the predicted-class histogram / log(classes),
                        smallest and largest class share (mode collapse shows here)
  precision_recall      Kynkaanniemi et al. 2019: k-NN balls in feature space
  memorisation_share    share of samples closer to a training image than
                        real held-out images usually are
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of features (n, d), n >= 2."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    If the product is singular (too few samples for the dimension), eps is
    added to both diagonals before the square root, as the FID reference
    code does. Biased upward for small sample counts: use >= 10,000 samples.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, cov {cov1.shape} {cov2.shape}")
    with warnings.catch_warnings():
        # A singular product is handled below; scipy's warning would only alarm.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all() or np.linalg.matrix_rank(cov1 @ cov2) < len(mu1):
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)  # rounding leaves tiny imaginary parts
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean), 0.0))


def classifier_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) on each of `splits` parts: (mean, std).

    probs: (n, classes), rows summing to 1. 1 = no information; the number of
    classes = every sample confidently classified and classes balanced.
    """
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise ValueError(f"probs must be (n >= splits, classes), got {p.shape} with splits={splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_coverage(predicted, n_classes: int = 10) -> dict:
    """How evenly samples spread over classes.

    predicted: class indices (n,) or probabilities (n, classes).
    Returns entropy of the class histogram divided by log(n_classes) (1 =
    perfectly even, 0 = one class), and the smallest and largest share.
    """
    predicted = np.asarray(predicted)
    labels = predicted.argmax(axis=1) if predicted.ndim == 2 else predicted.astype(np.int64)
    if labels.size == 0:
        raise ValueError("no samples")
    share = np.bincount(labels, minlength=n_classes)[:n_classes] / labels.size
    nz = share[share > 0]
    entropy = max(0.0, float(-(nz * np.log(nz)).sum() / np.log(n_classes)))  # never "-0.0"
    return {"entropy": entropy, "min_share": float(share.min()), "max_share": float(share.max())}


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0)


def _kth_radius(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row."""
    out = np.empty(len(x))
    for s in range(0, len(x), chunk):
        d = _sq_distances(x[s:s + chunk], x)
        out[s:s + chunk] = np.partition(d, k, axis=1)[:, k]  # column 0 is the point itself
    return out


def _inside_any_ball(points, centres, radii, chunk) -> np.ndarray:
    inside = np.zeros(len(points), bool)
    for s in range(0, len(points), chunk):
        d = _sq_distances(points[s:s + chunk], centres)
        inside[s:s + chunk] = (d <= radii[None, :]).any(axis=1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Each set's manifold is the union of balls around its points reaching their
    k-th nearest neighbour. Precision: share of fake points inside the real
    manifold. Recall: share of real points inside the fake manifold.
    """
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real {real.shape} and fake {fake.shape} must be (n, d) with the same d")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples in each set")
    precision = _inside_any_ball(fake, real, _kth_radius(real, k, chunk), chunk).mean()
    recall = _inside_any_ball(real, fake, _kth_radius(fake, k, chunk), chunk).mean()
    return float(precision), float(recall)


def _nearest(points, reference, chunk):
    out = np.empty(len(points))
    for s in range(0, len(points), chunk):
        out[s:s + chunk] = _sq_distances(points[s:s + chunk], reference).min(axis=1)
    return np.sqrt(out)


def memorisation_share(generated, train, held_out, quantile: float = 0.05, chunk: int = 1024) -> float:
    """Share of generated samples closer to their nearest training sample
    than all but `quantile` of real held-out samples are to theirs.

    Real held-out data scores about `quantile` by construction; a model that
    copies training images scores near 1.
    """
    g, tr, ho = (np.asarray(x, np.float64).reshape(len(x), -1) for x in (generated, train, held_out))
    threshold = np.quantile(_nearest(ho, tr, chunk), quantile)
    return float((_nearest(g, tr, chunk) < threshold).mean())
