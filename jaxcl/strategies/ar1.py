"""AR1: CWR* on the output layer plus Synaptic Intelligence below it.

Maltoni & Lomonaco (2019), Algorithm 3: the output layer is handled by
CWR* (consolidated per-class weights ``cw``, temporary weights trained on
the current classes only, count-weighted merge after each experience;
:mod:`jaxcl.strategies.cwr_star`), and — unlike CWR*, which freezes them —
the lower layers keep learning in every experience, protected by SI
(:mod:`jaxcl.strategies.si`):

.. math::
   \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
     + c \\sum_{i \\notin \\text{head}} \\Omega_i
       (\\tilde\\theta_i - \\theta_i)^2 .

This module composes the two existing strategies: the state is
``(CWRStarState, SIState)``; after each experience SI's importance of the
head is set to zero, because the head's weights are CWR*'s to manage (they
are reloaded from ``cw`` before every experience, so an SI anchor on them
would pull towards values that no longer exist). ``lower_lr_scale``
multiplies the lower layers' gradients after the first experience (the
paper trains them with a smaller learning rate there).

References:
  Maltoni & Lomonaco, `Continuous Learning in Single-Incremental-Task
  Scenarios <https://arxiv.org/abs/1806.08568>`_, Neural Networks 2019.
  Zenke, Poole & Ganguli, `Continual learning through synaptic
  intelligence <https://arxiv.org/abs/1703.04200>`_, ICML 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.strategies.cwr_star import cwr_star
from jaxcl.strategies.si import si
from jaxcl.strategy import Strategy, chain

__all__ = ["ar1"]


def ar1(c: float = 0.1, xi: float = 0.1,
        lower_lr_scale: float = 1.0) -> Strategy:
  """AR1 = CWR* (head) + SI (lower layers).

  Args:
    c: SI strength (>= 0).
    xi: SI damping (> 0).
    lower_lr_scale: gradient factor of the lower layers after the first
      experience, in ``(0, 1]`` (0 would be CWR*, with nothing for SI to
      protect).

  Raises:
    ValueError: bad ``c`` / ``xi`` (from SI) or ``lower_lr_scale``
      outside ``(0, 1]``; at ``init``, a model without a single ``head``.
  """
  if not (isinstance(lower_lr_scale, (int, float)) and
          0 < lower_lr_scale <= 1):
    raise ValueError(f"ar1: lower_lr_scale must be in (0, 1], got "
                     f"{lower_lr_scale!r} (0 is plain cwr_star)")
  inner = chain(cwr_star(backbone_lr_scale=float(lower_lr_scale)),
                si(c=c, xi=xi))

  def after_experience(ctx, state, experience):
    state = inner.after_experience(ctx, state, experience)
    cw, s = state.strategy
    imp = dict(s.importance)
    imp["head"] = jax.tree.map(jnp.zeros_like, imp["head"])
    return state.replace(strategy=(cw, s._replace(importance=imp)))

  return inner._replace(after_experience=after_experience, name="ar1")
