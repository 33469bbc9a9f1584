"""The metric formulas against cases with known answers."""
import numpy as np
import pytest

from mnistgan import metrics


def test_frechet_distance_known_values():
    # 1-D: (m1 - m2)^2 + s1^2 + s2^2 - 2 s1 s2 = (1 - 3)^2 + (2 - 1)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(5.0)
    # Diagonal covariances: a sum over dimensions of the same.
    d = metrics.frechet_distance([0, 0], np.diag([1.0, 9.0]), [1, 1], np.diag([4.0, 1.0]))
    assert d == pytest.approx(1 + 1 + (1 - 2) ** 2 + (3 - 1) ** 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 5))
    mu, cov = metrics.feature_stats(x)
    np.testing.assert_allclose(cov, np.cov(x.T))
    assert metrics.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-6)
    assert metrics.frechet_distance(mu, cov, mu + 1, cov) == pytest.approx(5, rel=1e-6)


def test_frechet_distance_singular_covariance():
    mu = np.zeros(4)
    cov = np.diag([1.0, 1.0, 0.0, 0.0])
    assert metrics.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-4)
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.frechet_distance(mu, cov, np.zeros(3), np.eye(3))


def test_classifier_score_extremes():
    uniform = np.full((100, 10), 0.1)
    assert metrics.classifier_score(uniform) == pytest.approx((1.0, 0.0))
    confident_balanced = np.eye(10)[np.arange(1000) % 10]
    mean, std = metrics.classifier_score(confident_balanced)
    assert mean == pytest.approx(10.0) and std == pytest.approx(0.0)
    one_class = np.eye(10)[np.zeros(1000, int)]
    assert metrics.classifier_score(one_class)[0] == pytest.approx(1.0)


def test_class_coverage():
    even = metrics.class_coverage(np.arange(1000) % 10)
    assert even == pytest.approx({"entropy": 1.0, "min_share": 0.1, "max_share": 0.1})
    collapsed = metrics.class_coverage(np.full(50, 3))
    assert collapsed == pytest.approx({"entropy": 0.0, "min_share": 0.0, "max_share": 1.0})
    probs = np.eye(10)[[1, 1, 2, 2]]
    assert metrics.class_coverage(probs)["max_share"] == 0.5


def test_precision_recall():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 8))
    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    assert metrics.precision_recall(a, a + 100) == (0.0, 0.0)
    # Real data in two clusters, fakes cover only one: precise but half the recall.
    real = np.vstack([rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 50])
    fake = rng.standard_normal((300, 2))
    p, r = metrics.precision_recall(real, fake)
    assert p > 0.95 and 0.4 < r < 0.55


def test_memorisation_share():
    rng = np.random.default_rng(2)
    train = rng.standard_normal((400, 16))
    test = rng.standard_normal((400, 16))
    assert metrics.memorisation_share(train[:100], train, test) == 1.0  # copies
    fresh = rng.standard_normal((2000, 16))
    assert metrics.memorisation_share(fresh, train, test, quantile=0.05) == pytest.approx(0.05, abs=0.03)
