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
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)
    ref = GaussianMixture(2, max_iter=10, tol=tol, reg_covar=5e-4,
                          random_state=0).fit(x[:, None])
  # Rows that are not there (masked), with values that would wreck every
  # statistic if they counted.
  xp = np.concatenate([x, [1e6, -5.0, np.nan]]).astype(np.float32)
  valid = np.r_[np.ones(100), np.zeros(3)]
  fit = jax.jit(lambda x, v: mixture.fit(x, v, max_iter=10, tol=tol,
                                         reg_covar=5e-4))
  mix = fit(jnp.asarray(xp), jnp.asarray(valid))
  o, oo = np.argsort(ref.means_[:, 0]), np.argsort(np.asarray(mix.means))
  np.testing.assert_allclose(np.asarray(mix.means)[oo], ref.means_[o, 0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(mix.weights)[oo], ref.weights_[o],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(mix.variances)[oo],
                             ref.covariances_[o].ravel(), rtol=1e-4)
  assert int(mix.n_iter) == ref.n_iter_, (int(mix.n_iter), ref.n_iter_)
  assert bool(mix.converged) == ref.converged_
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
