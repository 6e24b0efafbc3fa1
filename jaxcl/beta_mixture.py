"""A two-component beta mixture on ``[0, 1]``, fitted by EM inside ``jit``.

Noisy-label methods split examples by a score in ``[0, 1]``: SPR's
self-centered filter (Kim et al. 2021) fits a beta mixture to each class's
eigenvector centralities and keeps an example with its posterior for the
high-centrality component. The references (SPR's ``utils.py``, Mammoth's
``utils/bmm.py``, both from Arazo et al.'s ``BetaMixture1D``) fit it in
NumPy / SciPy on the host; :func:`posterior` is the same computation as a
pure JAX function of fixed shapes, with a validity mask for the rows that
are not there (other classes, empty slots).

The steps, as the reference's ``outlier_remove``, ``normalize``, ``fit``,
``create_lookup(1)`` and ``look_lookup``:

1. **Trim**: ``p5`` and ``p95``, the 5th and 95th percentiles of the valid
   values (NumPy's linear interpolation); the fit uses the values in
   ``[p5, p95]``, normalised with ``lo = p5 + 1e-5`` and ``hi = p95``:
   ``u = (c - lo) / (hi - lo + 1e-6)``, then ``u >= 1 -> 0.999`` and
   ``u <= 0 -> 0.001``.
2. **EM** from ``Beta(1, 2)`` (component 0) and ``Beta(2, 1)``
   (component 1), weights ``(1/2, 1/2)``, exactly ``iters`` iterations on
   ``u`` clipped to ``[1e-4, 1 - 1e-4]``. E-step:
   ``r_k = π_k Beta(u; α_k, β_k)``, floored at ``1e-12``, normalised over
   ``k``. M-step, the weighted method of moments:

   .. math::
      \\bar u_k = \\frac{\\sum_i r_{ik} u_i}{\\sum_i r_{ik}},\\quad
      s^2_k = \\frac{\\sum_i r_{ik} (u_i - \\bar u_k)^2}{\\sum_i r_{ik}},\\quad
      \\alpha_k = \\bar u_k \\Big(\\frac{\\bar u_k (1 - \\bar u_k)}{s^2_k}
        - 1\\Big),\\quad
      \\beta_k = \\alpha_k \\frac{1 - \\bar u_k}{\\bar u_k},\\quad
      \\pi_k = \\frac{\\sum_i r_{ik}}{\\sum_{i,j} r_{ij}}.

3. **Lookup**: the posterior of component 1 on 100 points
   ``linspace(1e-12, 1 - 1e-12)``, ``π_1 p_1 / (π_0 p_0 + π_1 p_1 + 1e-12)``
   (1 where both are infinite), made flat at its maximum from the maximum
   on (so a higher score never gets a lower posterior there).
4. **Read**: every valid value (trimmed ones too), normalised as in 1, is
   looked up at index ``floor(100 u)`` (clipped to ``[0, 99]``).

Deliberately as the reference, not repaired: no guard against degenerate
fits. Fewer than three values, or values all equal, give a zero variance
or an empty fit and NaN posteriors, and a method that keeps an example
when ``posterior > uniform draw`` then never keeps those (SPR's filter
behaves so). A non-positive ``α`` or ``β`` gives a NaN density, as
``scipy.stats.beta.pdf`` does. Computed in float32 (the reference:
float64), the densities from ``log x`` and ``log(1 - x)``, with the
lookup grid's ``1 - x`` taken from float64 (its last point, ``1 - 1e-12``,
rounds to 1 in float32, where a density can be 0 or infinite).

References:
  Arazo, Ortego, Albert, O'Connor & McGuinness, `Unsupervised label noise
  modeling and loss correction <https://arxiv.org/abs/1904.11238>`_, ICML
  2019 (the beta mixture and its weighted moments).
  Kim, Jeong, Moon & Kim, `Continual learning on noisy data streams via
  self-purified replay <https://arxiv.org/abs/2110.07735>`_, ICCV 2021.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks

__all__ = ["BetaMixture", "fit", "pdf", "percentile", "posterior",
           "LOOKUP_SIZE"]

LOOKUP_SIZE = 100
_FLOOR = 1e-12  # the reference's eps_nan


class BetaMixture(NamedTuple):
  """Two beta components: ``alphas``, ``betas``, ``weights``, each (2,)."""
  alphas: jax.Array
  betas: jax.Array
  weights: jax.Array


def pdf(x: jax.Array, a: jax.Array, b: jax.Array,
        one_minus_x: jax.Array | None = None) -> jax.Array:
  """The beta density on ``(0, 1)``, NaN for ``a <= 0`` or ``b <= 0``
  (SciPy's rule). ``one_minus_x``: ``1 - x`` where float32 cannot hold it
  as ``x``'s complement (``x = 1 - 1e-12`` rounds to 1)."""
  ok = (a > 0) & (b > 0)
  a, b = jnp.where(ok, a, 1.0), jnp.where(ok, b, 1.0)
  rest = 1.0 - x if one_minus_x is None else one_minus_x
  log = (jax.scipy.special.xlogy(a - 1.0, x)
         + jax.scipy.special.xlogy(b - 1.0, rest)
         - jax.scipy.special.betaln(a, b))
  return jnp.where(ok, jnp.exp(log), jnp.nan)


def percentile(x: jax.Array, valid: jax.Array, q: float) -> jax.Array:
  """``np.percentile(x[valid], q)`` (linear interpolation); NaN when no
  value is valid."""
  n = jnp.sum(valid)
  xs = jnp.sort(jnp.where(valid, x, jnp.inf))
  rank = (q / 100.0) * (n - 1).astype(jnp.float32)
  lo = jnp.clip(jnp.floor(rank).astype(jnp.int32), 0, x.shape[0] - 1)
  hi = jnp.clip(lo + 1, 0, jnp.maximum(n - 1, 0))
  frac = rank - lo.astype(jnp.float32)
  out = xs[lo] + frac * (xs[hi] - xs[lo])
  return jnp.where(n > 0, out, jnp.nan)


def _normalise(c: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  u = (c - lo) / (hi - lo + 1e-6)
  return jnp.where(u >= 1, 1 - 1e-3, jnp.where(u <= 0, 1e-3, u))


def _weighted(x, w, m):
  return jnp.sum(w * x * m) / jnp.sum(w * m)


def fit(u: jax.Array, valid: jax.Array, iters: int = 10) -> BetaMixture:
  """EM for the mixture on the valid entries of ``u`` (values in
  ``[0, 1]``), from the reference's start, ``iters`` iterations."""
  m = valid.astype(jnp.float32)
  x = jnp.clip(jnp.where(valid, u, 0.5), 1e-4, 1 - 1e-4)
  start = BetaMixture(jnp.array([1.0, 2.0]), jnp.array([2.0, 1.0]),
                      jnp.array([0.5, 0.5]))

  def em(_, mix):
    r = mix.weights[:, None] * pdf(x[None, :], mix.alphas[:, None],
                                   mix.betas[:, None])
    r = jnp.where(r <= _FLOOR, _FLOOR, r)  # NaN stays NaN, as in NumPy
    r = r / jnp.sum(r, axis=0)
    mean = jax.vmap(lambda rk: _weighted(x, rk, m))(r)
    var = jax.vmap(lambda rk, xb: _weighted((x - xb) ** 2, rk, m))(r, mean)
    a = mean * (mean * (1 - mean) / var - 1)
    b = a * (1 - mean) / mean
    mass = jnp.sum(r * m, axis=1)
    return BetaMixture(a, b, mass / jnp.sum(mass))

  return jax.lax.fori_loop(0, iters, em, start)


def _lookup(mix: BetaMixture) -> jax.Array:
  grid = np.linspace(1e-12, 1 - 1e-12, LOOKUP_SIZE)
  # 1 - grid from float64: the last point's 1e-12 survives in float32.
  x, rest = jnp.asarray(grid, jnp.float32), jnp.asarray(1 - grid, jnp.float32)
  w1 = mix.weights[1] * pdf(x, mix.alphas[1], mix.betas[1], rest)
  p = w1 + mix.weights[0] * pdf(x, mix.alphas[0], mix.betas[0], rest)
  post = w1 / (p + _FLOOR)
  post = jnp.where(jnp.isinf(w1) & jnp.isinf(p), 1.0, post)
  top = jnp.argmax(post)  # the first NaN, if any, as np.argmax
  return jnp.where(jnp.arange(LOOKUP_SIZE) >= top, jnp.max(post), post)


def posterior(c: jax.Array, valid: jax.Array, iters: int = 10) -> jax.Array:
  """Each valid value's posterior for the high-score component (component
  1, started as ``Beta(2, 1)``), by the reference's trim, fit and lookup;
  0 for invalid rows, NaN for a degenerate fit (module docstring).

  Args:
    c: ``(N,)`` scores (SPR: eigenvector centralities).
    valid: ``(N,)`` bool, the rows that are there.
    iters: EM iterations (the reference: 10).
  """
  checks.whole("beta_mixture: iters", iters, 1)
  if c.ndim != 1 or valid.shape != c.shape:
    raise ValueError(f"beta_mixture: c and valid must be 1-D of one shape, "
                     f"got {c.shape} and {valid.shape}")
  c = c.astype(jnp.float32)
  valid = valid.astype(bool)
  p95, p5 = percentile(c, valid, 95.0), percentile(c, valid, 5.0)
  lo, hi = p5 + 1e-5, p95
  kept = valid & (c <= p95) & (c >= p5)
  mix = fit(_normalise(c, lo, hi), kept, iters)
  table = _lookup(mix)
  idx = jnp.clip((LOOKUP_SIZE * _normalise(c, lo, hi)).astype(jnp.int32), 0,
                 LOOKUP_SIZE - 1)
  return jnp.where(valid, table[idx], 0.0)
