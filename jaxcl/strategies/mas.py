"""Memory Aware Synapses (MAS): importance from the output's sensitivity.

After each experience, a parameter's importance is how much the squared L2
norm of the model's output moves when it changes, averaged over the
experience's examples (no labels needed):

.. math::

  \\Omega^{(k)}_i = \\frac{1}{N} \\sum_{n=1}^{N} \\Big|
      \\frac{\\partial\\, \\lVert f_\\theta(x_n) \\rVert_2^2}
            {\\partial \\theta_i} \\Big|

computed from per-example gradients (``jax.vmap(jax.grad(...))``) at the
end of experience ``k``. Importances accumulate over experiences,
``Ω ← Ω + Ω^{(k)}``, the anchor ``θ*`` becomes the end parameters, and
later experiences train on

.. math::

  \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
    + \\lambda \\sum_i \\Omega_i (\\theta_i - \\theta^*_i)^2

(Aljundi et al. 2018, eqs. 3–4 and 10). ``λ`` is ``lam``; ``Ω`` and ``θ*``
are ``MASState.importance`` and ``.anchor``. ``f`` is the logits; in
task-incremental streams, the logits of the example's task only.

.. warning::

  The paper's ``λ`` has no ``½`` (EWC's does). Aljundi et al. take the
  gradient of the squared norm per example, as here; implementations that
  take it of the *batch* mean give smaller values (sign cancellations).

References:
  Aljundi et al., `Memory Aware Synapses: Learning what (not) to forget
  <https://arxiv.org/abs/1711.09601>`_, ECCV 2018.

See also:
  :mod:`jaxcl.strategies.ewc`, :mod:`jaxcl.strategies.si`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies import _penalty
from jaxcl.strategy import Strategy

__all__ = ["MASState", "mas"]


class MASState(NamedTuple):
  importance: Any  # like params: Ω, summed over past experiences
  anchor: Any      # like params: θ* at the end of the latest experience
  lam: jax.Array   # float32 scalar λ: in the state so a sweep can vary it


def mas(lam: float = 1.0, max_examples: int = 1000, batch_size: int = 32,
        seed: int = 0) -> Strategy:
  """Memory Aware Synapses.

  Args:
    lam: penalty strength ``λ`` (>= 0).
    max_examples: training examples per experience for the importance (0:
      all).
    batch_size: examples per per-example-gradient batch.
    seed: picks the example subset.

  Raises:
    ValueError: negative ``lam`` or bad sizes.
  """
  checks.nonnegative("mas: lam", lam)
  _penalty.check_estimator_args("mas", max_examples, batch_size, seed)

  # Compiled once per factory (ctx static); the state is an argument.
  @functools.partial(jax.jit, static_argnums=0)
  def consolidate(ctx, ss, params, model_state, batches, key):
    # (The key only draws the training augmentation, if the run has one.)
    new = _penalty.mas_importance(ctx, params, model_state, batches, key)
    # jit outputs are fresh buffers: the anchor never aliases params.
    return MASState(jax.tree.map(jnp.add, ss.importance, new), params,
                    ss.lam)

  def init(ctx, key, params):
    del ctx, key
    # A copy: the loop donates the state (params and anchor must not alias).
    return MASState(_penalty.zeros_like_tree(params),
                    jax.tree.map(jnp.copy, params),
                    jnp.asarray(lam, jnp.float32))

  def loss(ctx, sstate, params, batch, logits):
    del ctx, batch, logits
    return sstate.lam * _penalty.quadratic(sstate.importance, sstate.anchor,
                                           params)

  after_experience = _penalty.consolidation_hook(consolidate, batch_size,
                                                 max_examples, seed)

  return Strategy(init=init, loss=loss, after_experience=after_experience,
                  name="mas")
