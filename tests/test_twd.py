"""Sequential three-way decisions: a single level over all components is exact 1-NN; with granules it does far
less work and, on well-separated classes, still agrees with 1-NN."""

import numpy as np
import pytest

from ocula.errors import OculaError
from ocula.index import build_index
from ocula.index.twd import ThreeWayDecisions


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(20, 48)) * 1.5
    y = rng.integers(0, 20, 1000)
    yq = rng.integers(0, 20, 200)
    noise = lambda n: rng.normal(size=(n, 48)) * np.linspace(2, 0.2, 48)  # decaying variance, as in CNN features
    g, q = (centres[y] + noise(1000)).astype(np.float32), (centres[yq] + noise(200)).astype(np.float32)
    nearest = y[build_index(g, "brute").search(q, 1)[1][:, 0]]
    return g, y, q, yq, nearest


@pytest.mark.parametrize("delta", [1.0, 1.5, 10.0])
def test_single_level_over_all_components_is_exact_1nn(data, delta):
    g, y, q, _, nearest = data
    out = ThreeWayDecisions(m=48, delta=delta).fit(g, y).predict(q)
    assert (out.labels == nearest).all()
    assert (out.terms == 1000 * 48).all() and (out.levels == 1).all()


def test_granules_save_work_and_keep_the_decisions(data):
    g, y, q, yq, nearest = data
    out = ThreeWayDecisions(m=8, delta=1.3).fit(g, y).predict(q)
    assert out.speedup(1000 * 48) > 2
    assert (out.labels == nearest).mean() >= 0.95
    assert out.levels.max() > 1  # some queries needed finer granules


def test_first_granule_bounds_hold_where_rounding_is_worst():
    """The fast first granule only filters: its bounds must stay below every exact value, also for large norms and
    near-ties, or a true neighbour could be lost."""
    rng = np.random.default_rng(2)
    g = (rng.normal(size=(3000, 16)) * 50 + 400).astype(np.float32)  # far from the mean: large norms
    q = np.concatenate([g[:20] + rng.normal(size=(20, 16)).astype(np.float32) * 1e-3, g[20:40] * 1.1])
    twd = ThreeWayDecisions(m=16).fit(g, np.arange(3000) % 7)
    gp, qp = twd.gallery_.astype(np.float64), twd.pca_(q).astype(np.float64)
    exact = (gp * gp).sum(1) - 2 * qp @ gp.T  # the squared distance minus |q|^2
    lower = -2 * twd._upper_scores(twd.pca_(q))
    assert (lower <= exact + 1e-6 * np.abs(exact).max()).all()
    assert np.abs(lower - exact).max() < 0.05 * np.abs(exact).max()  # tight enough to filter


def test_a_smaller_delta_prunes_more(data):
    g, y, q, _, _ = data
    loose, tight = (ThreeWayDecisions(m=8, delta=d).fit(g, y).predict(q).terms.mean() for d in (3.0, 1.1))
    assert tight < loose


def test_distance_ratio_baseline(data):
    g, y, q, _, nearest = data
    strict = ThreeWayDecisions(m=8, rule="ratio", ratio=1e-9).fit(g, y).predict(q)  # never confident: exact
    assert (strict.labels == nearest).all() and (strict.levels == 6).all()
    quick = ThreeWayDecisions(m=8, rule="ratio", ratio=0.9).fit(g, y).predict(q)
    assert quick.terms.mean() < strict.terms.mean()


def test_bad_parameters_and_input():
    with pytest.raises(OculaError, match="delta >= 1"):
        ThreeWayDecisions(delta=0.5)
    with pytest.raises(OculaError, match="labels"):
        ThreeWayDecisions().fit(np.ones((3, 4)), [0, 1])
    with pytest.raises(OculaError, match="dimension 5"):
        ThreeWayDecisions().fit(np.eye(4), [0, 1, 2, 3]).predict(np.ones((1, 5)))
