"""A one-dimensional Gaussian mixture fitted by EM, inside ``jit``.

Noisy-label methods (DivideMix, PuriDivER) split a set of examples by
fitting a two-component Gaussian mixture to their losses (or
uncertainties) and reading each example's posterior for the component with
the smaller mean. The references call ``sklearn.mixture.GaussianMixture``
on the host; :func:`fit` is the same estimator as a pure JAX function of
fixed shapes, so the split runs inside a compiled loop:

* ``x`` has a fixed length ``N`` and a validity mask: the rows that are not
  there (empty memory slots, rows outside a subset) take no part in any
  statistic, and ``N`` never changes between calls.
* EM runs at most ``max_iter`` iterations, a ``lax.fori_loop`` of
  ``max_iter`` steps; once the change of the lower
  bound falls below ``tol`` (sklearn's stopping rule) the later steps leave
  the parameters unchanged, so the result equals sklearn's early stop.

The estimator, as sklearn's ``covariance_type='full'`` on one feature
(Bishop 2006, ch. 9.2), with responsibilities :math:`r_{ik}`:

.. math::
   n_k = \\sum_i m_i r_{ik} + 10\\epsilon,\\qquad
   \\pi_k = n_k / \\textstyle\\sum_i m_i,\\quad
   \\mu_k = \\sum_i m_i r_{ik} x_i / n_k,\\quad
   \\sigma^2_k = \\sum_i m_i r_{ik} (x_i - \\mu_k)^2 / n_k
     + \\texttt{reg\\_covar}

where :math:`m_i` is the mask. The lower bound is the mean over valid rows
of :math:`\\log \\sum_k \\pi_k \\mathcal{N}(x_i; \\mu_k, \\sigma^2_k)`,
taken at the parameters *before* each M-step, as sklearn computes it.

Initialisation: sklearn's default (``init_params='kmeans'``) runs k-means
(k-means++ seeding, ``random_state``) and starts from the hard assignment.
Here k-means is Lloyd's algorithm for ``kmeans_iter`` iterations from the
valid values' evenly spaced quantiles, then the same M-step on the hard
assignment. On one feature both reach the same partition whenever the
clusters are separated (the case the tests compare); where k-means has
several local optima the two can start, and so end, differently.

References:
  Dempster, Laird & Rubin, `Maximum likelihood from incomplete data via the
  EM algorithm <https://doi.org/10.1111/j.2517-6161.1977.tb01600.x>`_,
  1977.
  Pedregosa et al., `Scikit-learn: machine learning in Python
  <https://jmlr.org/papers/v12/pedregosa11a.html>`_, JMLR 2011
  (``sklearn.mixture.GaussianMixture``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks

__all__ = ["Mixture", "fit", "predict_proba", "log_responsibilities"]

# sklearn adds 10 * eps (float64) to each component's mass; in float32 the
# term is below the resolution of any mass >= 1e-7 either way.
_MASS_EPS = 10 * float(jnp.finfo(jnp.float32).eps)


class Mixture(NamedTuple):
  """A fitted 1-D Gaussian mixture (sklearn's ``weights_``, ``means_``,
  ``covariances_`` flattened)."""
  weights: jax.Array    # float32 (k,): mixing proportions, sum 1
  means: jax.Array      # float32 (k,)
  variances: jax.Array  # float32 (k,): reg_covar included
  converged: jax.Array  # bool scalar: the lower bound moved less than tol
  n_iter: jax.Array     # int32 scalar: EM iterations run (sklearn n_iter_)


def log_responsibilities(mix: Mixture, x: jax.Array
                         ) -> tuple[jax.Array, jax.Array]:
  """``(log_resp, log_norm)``: ``(N, k)`` log posteriors of each component
  and ``(N,)`` log densities of the mixture at ``x``."""
  x = x.astype(jnp.float32)[:, None]
  logp = (-0.5 * (jnp.log(2 * jnp.pi) + jnp.log(mix.variances)
                  + (x - mix.means) ** 2 / mix.variances)
          + jnp.log(mix.weights))
  norm = jax.nn.logsumexp(logp, axis=1)
  return logp - norm[:, None], norm


def predict_proba(mix: Mixture, x: jax.Array) -> jax.Array:
  """``(N, k)`` posterior of each component at each ``x``
  (sklearn's ``predict_proba``)."""
  return jnp.exp(log_responsibilities(mix, x)[0])


def _m_step(x: jax.Array, m: jax.Array, resp: jax.Array,
            reg_covar: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  r = resp * m[:, None]
  nk = jnp.sum(r, axis=0) + _MASS_EPS
  means = (r.T @ x) / nk
  var = jnp.sum(r * (x[:, None] - means) ** 2, axis=0) / nk + reg_covar
  return nk / jnp.maximum(jnp.sum(m), 1.0), means, var


def _kmeans_resp(x: jax.Array, m: jax.Array, k: int, iters: int
                 ) -> jax.Array:
  """Hard ``(N, k)`` assignments of Lloyd's k-means on the valid rows,
  started from their evenly spaced quantiles."""
  valid = m > 0
  n = jnp.maximum(jnp.sum(valid), 1)
  xs = jnp.sort(jnp.where(valid, x, jnp.inf))
  pos = ((jnp.arange(k) + 0.5) / k * (n - 1).astype(jnp.float32))
  centres = xs[jnp.round(pos).astype(jnp.int32)]

  def assign(c):
    return jax.nn.one_hot(jnp.argmin(jnp.abs(x[:, None] - c), axis=1), k)

  def lloyd(_, c):
    a = assign(c) * m[:, None]
    cnt = jnp.sum(a, axis=0)
    # An empty cluster keeps its centre (sklearn relocates it; on one
    # feature from quantile starts this does not arise in practice).
    return jnp.where(cnt > 0, (a.T @ x) / jnp.maximum(cnt, 1.0), c)

  return assign(jax.lax.fori_loop(0, iters, lloyd, centres))


def fit(x: jax.Array, valid: jax.Array | None = None, *,
        n_components: int = 2, max_iter: int = 10, tol: float = 1e-3,
        reg_covar: float = 1e-6, kmeans_iter: int = 20) -> Mixture:
  """Fits a Gaussian mixture to the valid entries of ``x`` by EM.

  Args:
    x: ``(N,)`` values.
    valid: ``(N,)`` bool or 0/1 weights (None: every row); at least
      ``n_components`` rows should be valid (with fewer the fit is
      degenerate but finite, where sklearn raises).
    n_components: components ``k``.
    max_iter, tol, reg_covar: as ``sklearn.mixture.GaussianMixture`` (same
      defaults; PuriDivER uses 10, 1e-2 and 5e-4).
    kmeans_iter: Lloyd iterations of the initialisation.

  Returns:
    A :class:`Mixture`.

  Raises:
    ValueError: bad arguments (host side, before tracing).
  """
  checks.whole("mixture: n_components", n_components, 1)
  checks.whole("mixture: max_iter", max_iter, 1)
  checks.whole("mixture: kmeans_iter", kmeans_iter, 0)
  checks.nonnegative("mixture: tol", tol)
  checks.nonnegative("mixture: reg_covar", reg_covar)
  if x.ndim != 1:
    raise ValueError(f"mixture: x must be 1-D (N,), got shape {x.shape}")
  x = x.astype(jnp.float32)
  m = (jnp.ones_like(x) if valid is None else
       (jnp.asarray(valid) > 0).astype(jnp.float32))
  # Invalid rows may hold anything (inf, NaN): keep them out of every sum.
  x = jnp.where(m > 0, x, 0.0)
  k = n_components
  w, mu, var = _m_step(x, m, _kmeans_resp(x, m, k, kmeans_iter),
                       float(reg_covar))
  init = Mixture(w, mu, var, jnp.zeros((), bool), jnp.zeros((), jnp.int32))
  nvalid = jnp.maximum(jnp.sum(m), 1.0)

  def em(_, carry):
    mix, prev = carry
    log_resp, norm = log_responsibilities(mix, x)
    bound = jnp.sum(norm * m) / nvalid
    w, mu, var = _m_step(x, m, jnp.exp(log_resp), float(reg_covar))
    new = Mixture(w, mu, var, jnp.abs(bound - prev) < tol, mix.n_iter + 1)
    # After convergence nothing moves (sklearn breaks out of its loop).
    out = jax.tree.map(lambda a, b: jnp.where(mix.converged, a, b), mix, new)
    return out, jnp.where(mix.converged, prev, bound)

  mix, _ = jax.lax.fori_loop(0, max_iter, em, (init, jnp.asarray(-math.inf)))
  return mix
