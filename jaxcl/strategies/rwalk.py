"""Riemannian Walk (RWalk): a running Fisher plus path-based importance.

Chaudhry et al. (2018) combine the two importance measures of EWC and SI.
Each parameter's weight in the quadratic penalty is the sum of

* a Fisher information :math:`F` kept as a moving average over
  experiences, :math:`F \\leftarrow \\alpha F + (1 - \\alpha) F_t` (the
  paper's EWC++, eq. 10), with :math:`F_t` the diagonal Fisher at the end
  of experience :math:`t`; and
* a score :math:`s` from the optimisation path: over experience :math:`t`
  the loss change attributed to each parameter,
  :math:`w = -\\sum_k g_k \\, \\Delta\\theta_k` (with :math:`g_k` the
  unregularised loss's gradient at step :math:`k`), divided by the
  distance moved in the Fisher metric,

  .. math::
     s_t = \\max\\Big(0, \\frac{w}{F\\,(\\theta - \\theta^*)^2 + \\xi}
                  \\Big), \\qquad s \\leftarrow \\tfrac12 (s + s_t),

  the average keeping the penalty from growing ever more rigid (p. 8).

The loss adds (eq. 9)

.. math::
   \\lambda \\sum_i (F_i + s_i)\\,(\\theta_i - \\theta^*_i)^2,

with :math:`\\theta^*` the parameters at the end of the previous
experience; it is 0 during the first, as :math:`F` and :math:`s` start at 0.

This follows FACIL's ``r_walk.py`` (Masana et al. 2022's survey code),
whose defaults these are (λ = 1, α = 0.5, ξ = 0.1, the Fisher of the
model's predicted label), with two differences: the Fisher is computed from
per-example gradients (:func:`jaxcl.strategies._penalty.fisher_diagonal`)
where FACIL squares mini-batch gradients, and every parameter is
regularised, where FACIL leaves out its multi-head heads. Avalanche's
``RWalkPlugin`` instead updates the Fisher every step from mini-batch
gradients, as the paper's online variant does.

References:
  Chaudhry, Dokania, Ajanthan & Torr, `Riemannian walk for incremental
  learning: understanding forgetting and intransigence
  <https://arxiv.org/abs/1801.10112>`_, ECCV 2018.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies import _penalty
from jaxcl.strategy import Strategy

__all__ = ["RWalkState", "rwalk", "consolidate"]


class RWalkState(NamedTuple):
  fisher: Any      # like params: the running Fisher F
  scores: Any      # like params: the path-based scores s
  w: Any           # like params: -Σ g Δθ over the current experience
  anchor: Any      # like params: θ* at the end of the previous experience
  lam: jax.Array   # float32 scalar λ: in the state so a sweep can vary it


def consolidate(ss: RWalkState, params: Any, fisher_t: Any, alpha: float,
                damping: float) -> RWalkState:
  """The end of an experience: the Fisher's moving average, the scores'
  average with this experience's, a new anchor, ``w`` reset."""
  fisher = jax.tree.map(lambda f, ft: alpha * f + (1.0 - alpha) * ft,
                        ss.fisher, fisher_t)
  scores = jax.tree.map(
      lambda s, w, f, p, a: 0.5 * (s + jnp.maximum(
          w / (f * jnp.square(p - a) + damping), 0.0)),
      ss.scores, ss.w, fisher, params, ss.anchor)
  return RWalkState(fisher, scores, _penalty.zeros_like_tree(params),
                    params, ss.lam)


def rwalk(lam: float = 1.0, alpha: float = 0.5, damping: float = 0.1,
          fisher: str = "predicted", max_examples: int = 1000,
          batch_size: int = 32, seed: int = 0) -> Strategy:
  """RWalk.

  Args:
    lam: penalty strength ``λ`` (>= 0).
    alpha: weight of the old Fisher in the moving average, in ``[0, 1]``.
    damping: ``ξ`` (> 0) of the scores' denominator.
    fisher: ``predicted`` (default: FACIL's ``max_pred``), ``exact``,
      ``sampled`` or ``empirical`` (see :mod:`jaxcl.strategies.ewc`).
    max_examples: training examples per experience for the Fisher (0: all).
    batch_size: examples per per-example-gradient batch.
    seed: picks the example subset and the ``sampled`` labels.

  Raises:
    ValueError: negative ``lam``, ``alpha`` outside ``[0, 1]``, a
      non-positive ``damping``, unknown ``fisher``, bad sizes.
  """
  checks.nonnegative("rwalk: lam", lam)
  if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and
                                     math.isfinite(alpha) and
                                     0.0 <= alpha <= 1.0):
    raise ValueError(f"rwalk: alpha must be in [0, 1], got {alpha!r}")
  checks.positive("rwalk: damping", damping)
  _penalty.check_fisher("rwalk", fisher)
  _penalty.check_estimator_args("rwalk", max_examples, batch_size, seed)

  # Compiled once per factory (ctx static); the state is an argument, and
  # jit outputs are fresh buffers, so the anchor never aliases params.
  @functools.partial(jax.jit, static_argnums=0)
  def end_experience(ctx, ss, params, model_state, batches, key):
    f = _penalty.fisher_diagonal(ctx, params, model_state, batches, key,
                                 kind=fisher)
    return consolidate(ss, params, f, alpha, damping)

  def init(ctx, key, params):
    del ctx, key
    # Distinct buffers: the loop donates the state, and a buffer aliased by
    # two leaves (or by params and anchor) would be donated twice.
    zeros = lambda: _penalty.zeros_like_tree(params)
    return RWalkState(zeros(), zeros(), zeros(),
                      jax.tree.map(jnp.copy, params),
                      jnp.asarray(lam, jnp.float32))

  def loss(ctx, sstate, params, batch, logits):
    del ctx, batch, logits
    weight = jax.tree.map(jnp.add, sstate.fisher, sstate.scores)
    return sstate.lam * _penalty.quadratic(weight, sstate.anchor, params)

  def after_step(ctx, sstate, info):
    del ctx
    w = jax.tree.map(lambda w, g, a, b: w - g * (a - b), sstate.w,
                     info.task_grads, info.params_after, info.params_before)
    return sstate._replace(w=w)

  after_experience = _penalty.consolidation_hook(end_experience, batch_size,
                                                 max_examples, seed)

  return Strategy(init=init, loss=loss, after_step=after_step,
                  after_experience=after_experience, needs_task_grads=True,
                  name="rwalk")
