"""Synaptic Intelligence (SI): importance from the path integral of the loss.

During an experience, every optimiser step adds each parameter's
contribution to the decrease of the *unregularised* task loss:

.. math::

  \\omega_i \\mathrel{+}= -g_i(t)\\, \\Delta\\theta_i(t),
  \\qquad g(t) = \\nabla_\\theta \\mathcal{L}_{\\text{task}}(\\theta(t)),
  \\quad \\Delta\\theta(t) = \\theta(t+1) - \\theta(t)

(a first-order path integral of the loss change). At the end of the
experience the running sum is consolidated with damping ``ξ``,

.. math::

  \\Omega_i \\mathrel{+}= \\frac{\\omega_i}{(\\Delta_i)^2 + \\xi},
  \\qquad \\Delta_i = \\theta_i^{\\text{end}} - \\theta_i^{\\text{start}},

``ω`` is reset to zero, and the anchor ``θ̃`` becomes the end parameters.
Training adds the surrogate loss

.. math::

  \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
    + c \\sum_i \\Omega_i (\\tilde\\theta_i - \\theta_i)^2

(Zenke et al. 2017, eqs. 4–5). ``c`` is ``c``, ``ξ`` is ``xi``; ``ω``,
``Ω`` and ``θ̃`` are ``SIState.omega``, ``.importance`` and ``.anchor``.

The gradient ``g`` is the task loss's alone: the strategy sets
``needs_task_grads`` so the step also returns it
(:attr:`jaxcl.state.StepInfo.task_grads`, one more backward pass per
step). ``Δθ`` is the optimiser's actual update, whatever the optimiser.

.. warning::

  ``Ω`` is not clipped: ``ω`` can be negative for a parameter whose updates
  increased the task loss (e.g. pushed by the penalty or momentum), as in
  the paper. ``c`` has no ``½``, unlike EWC's λ. The best ``c`` depends on
  the optimiser and learning rate (the path integral scales with them):
  Zenke et al. use ``c = 0.1`` with Adam (lr 1e-3) on Split MNIST.

References:
  Zenke, Poole & Ganguli, `Continual learning through synaptic
  intelligence <https://arxiv.org/abs/1703.04200>`_, ICML 2017.

See also:
  :mod:`jaxcl.strategies.ewc`, :mod:`jaxcl.strategies.mas`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies import _penalty
from jaxcl.strategy import Strategy

__all__ = ["SIState", "si"]


class SIState(NamedTuple):
  omega: Any       # like params: ω, the running path integral this experience
  importance: Any  # like params: Ω, consolidated importance
  anchor: Any      # like params: θ̃, parameters at the start of this experience
  c: jax.Array     # float32 scalar strength: in the state so a sweep can vary it


GRADS = ("task", "total")


def si(c: float = 0.1, xi: float = 0.1, grads: str = "task") -> Strategy:
  """Synaptic Intelligence.

  Args:
    c: penalty strength (>= 0).
    xi: damping ``ξ`` (> 0) of the consolidation ``ω / (Δ² + ξ)``.
    grads: the gradient ``g`` in ``ω``: ``task`` (the unregularised loss,
      as Zenke et al. define it; the default) or ``total`` (the gradient
      the optimiser saw, surrogate included, as van de Ven & Tolias's code
      takes ``p.grad`` after the backward pass; it also skips the extra
      task-loss backward pass).

  Raises:
    ValueError: negative ``c``, non-positive ``xi`` or an unknown ``grads``.
  """
  checks.nonnegative("si: c", c)
  checks.positive("si: xi (damping)", xi)
  if grads not in GRADS:
    raise ValueError(f"si: grads={grads!r}; valid: {list(GRADS)}")
  use_task = grads == "task"

  def init(ctx, key, params):
    del ctx, key
    # Distinct buffers: the loop donates the state, and a buffer aliased by
    # two leaves (or by params and anchor) would be donated twice.
    return SIState(_penalty.zeros_like_tree(params),
                   _penalty.zeros_like_tree(params),
                   jax.tree.map(jnp.copy, params),
                   jnp.asarray(c, jnp.float32))

  # Host-side hooks run these compiled functions (compiled once per
  # factory); jit outputs are fresh buffers, so anchors never alias params.
  @jax.jit
  def start(ss, params):
    # θ̃ is where this experience starts (equal to the previous end unless
    # another strategy moved the parameters in between).
    return ss._replace(omega=_penalty.zeros_like_tree(params), anchor=params)

  @jax.jit
  def consolidate(ss, params):
    importance = jax.tree.map(
        lambda big, w, p, a: big + w / (jnp.square(p - a) + xi),
        ss.importance, ss.omega, params, ss.anchor)
    return SIState(_penalty.zeros_like_tree(params), importance, params,
                   ss.c)

  def before_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=start(state.strategy, state.params))

  def loss(ctx, sstate, params, batch, logits):
    del ctx, batch, logits
    return sstate.c * _penalty.quadratic(sstate.importance, sstate.anchor,
                                         params)

  def after_step(ctx, sstate, info):
    del ctx
    omega = jax.tree.map(lambda w, g, a, b: w - g * (a - b), sstate.omega,
                         info.task_grads if use_task else info.grads,
                         info.params_after, info.params_before)
    return sstate._replace(omega=omega)

  def after_experience(ctx, state, experience):
    del ctx, experience
    return state.replace(strategy=consolidate(state.strategy, state.params))

  return Strategy(init=init, before_experience=before_experience, loss=loss,
                  after_step=after_step, after_experience=after_experience,
                  needs_task_grads=use_task, name="si")
