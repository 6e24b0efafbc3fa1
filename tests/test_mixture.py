"""The 1-D Gaussian mixture (jaxcl.mixture) against scikit-learn's."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from jaxcl import mixture


def _sample(a, b, sa, sb, seed=0):
  rng = np.random.default_rng(seed)
  return np.concatenate([rng.normal(a, sa, 60), rng.normal(b, sb, 40)])


def _sklearn(x, **kw):
  """sklearn's fit with PuriDivER's settings unless ``kw`` says otherwise."""
  kw = {"max_iter": 10, "reg_covar": 5e-4, "random_state": 0, **kw}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    return GaussianMixture(kw.pop("n_components", 2), **kw).fit(x[:, None])


def _assert_same_fit(mix, ref):
  """Means, weights, variances (components in the order of their means),
  EM iterations and convergence as sklearn's."""
  o, oo = np.argsort(ref.means_[:, 0]), np.argsort(np.asarray(mix.means))
  np.testing.assert_allclose(np.asarray(mix.means)[oo], ref.means_[o, 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(mix.weights)[oo], ref.weights_[o],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mix.variances)[oo],
                             ref.covariances_[o].ravel(), rtol=1e-4)
  assert int(mix.n_iter) == ref.n_iter_, (int(mix.n_iter), ref.n_iter_)
  assert bool(mix.converged) == ref.converged_


@pytest.mark.parametrize("a,b,sa,sb,tol", [
    (0.1, 0.8, 0.05, 0.1, 1e-2),   # separated: converges early (2 iters)
    (0.2, 0.6, 0.1, 0.15, 0.0),    # overlapping: all 10 iterations
    (0.3, 0.5, 0.1, 0.1, 0.0),     # strongly overlapping
    # Stops after 5 iterations: the bound compared is the one before each
    # M-step, as sklearn's (the one after stops an iteration early).
    (0.3, 0.5, 0.1, 0.1, 1e-3),
    (0.2, 0.6, 0.1, 0.15, 1e-4),   # a small tol: all 10
])
def test_matches_sklearn_means_weights_variances_posteriors(a, b, sa, sb,
                                                           tol):
  # PuriDivER's settings (max_iter 10, reg_covar 5e-4). Where k-means has
  # one optimum both start from the same hard split, so every EM iterate
  # and the stopping iteration agree.
  x = _sample(a, b, sa, sb)
  ref = _sklearn(x, tol=tol)
  # Rows that are not there (masked), with values that would wreck every
  # statistic if they counted.
  xp = np.concatenate([x, [1e6, -5.0, np.nan]]).astype(np.float32)
  valid = np.r_[np.ones(100), np.zeros(3)]
  fit = jax.jit(lambda x, v: mixture.fit(x, v, max_iter=10, tol=tol,
                                         reg_covar=5e-4))
  mix = fit(jnp.asarray(xp), jnp.asarray(valid))
  _assert_same_fit(mix, ref)
  o, oo = np.argsort(ref.means_[:, 0]), np.argsort(np.asarray(mix.means))
  post = np.asarray(mixture.predict_proba(mix, jnp.asarray(x, jnp.float32)))
  np.testing.assert_allclose(post[:, oo], ref.predict_proba(x[:, None])[:, o],
                             atol=2e-6)


def test_reg_covar_floors_the_variance_of_a_point_mass():
  # Two point masses: each component's variance is reg_covar alone.
  x = jnp.array([0.0] * 5 + [1.0] * 5)
  mix = mixture.fit(x, reg_covar=5e-4, tol=1e-2)
  np.testing.assert_allclose(np.asarray(mix.variances), [5e-4, 5e-4],
                             rtol=1e-4)
  np.testing.assert_allclose(np.sort(np.asarray(mix.means)), [0.0, 1.0],
                             atol=1e-6)


def test_bad_arguments_raise():
  x = jnp.zeros((4,))
  with pytest.raises(ValueError, match="n_components must be an int >= 1"):
    mixture.fit(x, n_components=0)
  with pytest.raises(ValueError, match="reg_covar must be a finite number "
                     ">= 0, got -1"):
    mixture.fit(x, reg_covar=-1.0)
  with pytest.raises(ValueError, match=r"x must be 1-D \(N,\), got shape "
                     r"\(4, 1\)"):
    mixture.fit(x[:, None])


@pytest.mark.parametrize("max_iter", [1, 3])
def test_max_iter_caps_the_em_iterations(max_iter):
  # The first test runs PuriDivER's 10 only: a loop of a fixed length
  # would pass it. tol 0: sklearn runs (and reports) all max_iter.
  x = _sample(0.2, 0.6, 0.1, 0.15)
  mix = mixture.fit(jnp.asarray(x, jnp.float32), max_iter=max_iter, tol=0.0,
                    reg_covar=5e-4)
  _assert_same_fit(mix, _sklearn(x, max_iter=max_iter, tol=0.0))
  assert int(mix.n_iter) == max_iter and not bool(mix.converged)


@pytest.mark.parametrize("tol", [1e-2, 3e-3, 1e-3, 3e-4])
def test_many_masked_rows_change_neither_the_stop_nor_the_start(tol):
  # Three masked rows (the first test) barely move a mean over all rows;
  # three times as many masked as valid rows would, in the lower bound,
  # shrink its change and stop EM early at one of these tols.
  x = _sample(0.3, 0.5, 0.1, 0.1)
  xp = jnp.asarray(np.r_[x, np.full(300, 1e6)], jnp.float32)
  valid = jnp.asarray(np.r_[np.ones(100), np.zeros(300)])
  mix = mixture.fit(xp, valid, max_iter=10, tol=tol, reg_covar=5e-4)
  _assert_same_fit(mix, _sklearn(x, tol=tol))
  # From the quantile start alone (no Lloyd steps to repair it), masked
  # rows counted among the quantiles would give another start.
  kw = dict(max_iter=10, tol=tol, reg_covar=5e-4, kmeans_iter=0)
  alone = mixture.fit(jnp.asarray(x, jnp.float32), **kw)
  for a, b in zip(mixture.fit(xp, valid, **kw), alone):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


def test_three_components_match_sklearn():
  # Every other test fits two components.
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.normal(0.1, 0.05, 50), rng.normal(0.5, 0.05, 30),
                      rng.normal(0.9, 0.05, 40)])
  mix = mixture.fit(jnp.asarray(x, jnp.float32), n_components=3,
                    max_iter=10, tol=1e-3, reg_covar=5e-4)
  _assert_same_fit(mix, _sklearn(x, n_components=3, tol=1e-3))


def test_kmeans_iter_zero_starts_from_the_quantile_split():
  # kmeans_iter=0: the hard split at the nearest of the valid values'
  # evenly spaced quantiles ((j + 1/2) / k), then one EM step (max_iter
  # 1), in NumPy. Unequal, overlapping clusters: Lloyd's steps would move
  # that split, so a kmeans_iter that is not passed on shows.
  x = _sample(0.2, 0.6, 0.1, 0.15)
  reg, n = 5e-4, len(x)
  centres = np.sort(x)[np.round((np.arange(2) + 0.5) / 2 * (n - 1))
                       .astype(int)]

  def m_step(r):
    nk = r.sum(0)
    mu = r.T @ x / nk
    return nk / n, mu, (r * (x[:, None] - mu) ** 2).sum(0) / nk + reg

  w, mu, var = m_step(np.eye(2)[np.argmin(np.abs(x[:, None] - centres), 1)])
  logp = -0.5 * (np.log(2 * np.pi * var) + (x[:, None] - mu) ** 2 / var)
  logp += np.log(w)
  resp = np.exp(logp - logp.max(1, keepdims=True))
  w, mu, var = m_step(resp / resp.sum(1, keepdims=True))
  mix = mixture.fit(jnp.asarray(x, jnp.float32), max_iter=1, tol=0.0,
                    reg_covar=reg, kmeans_iter=0)
  np.testing.assert_allclose(np.asarray(mix.means), mu, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mix.weights), w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mix.variances), var, rtol=1e-4)
  # And the split it tests is not Lloyd's (else the check above is blind).
  lloyd = mixture.fit(jnp.asarray(x, jnp.float32), max_iter=1, tol=0.0,
                      reg_covar=reg)
  assert np.abs(np.asarray(lloyd.means) - mu).max() > 1e-3
