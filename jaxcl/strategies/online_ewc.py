"""Online EWC: one running Fisher with decay γ (Schwarz et al. 2018).

Instead of a penalty per past experience (:mod:`jaxcl.strategies.ewc`),
online EWC keeps a single running Fisher ``F*`` and one anchor ``θ*`` (the
parameters at the end of the latest experience). After experience ``k``:

.. math::

  F^*_k = \\gamma F^*_{k-1} + F_k, \\qquad \\theta^*_k = \\theta_k

and while training experience ``k + 1`` the loss is

.. math::

  \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
    + \\frac{\\lambda}{2} \\sum_i \\gamma F^*_{k,i}
      (\\theta_i - \\theta^*_{k,i})^2

(Schwarz et al. 2018, eqs. 4–5, the "compress" penalty; the γ inside the
penalty is theirs and is also what van de Ven et al.'s reference code does).
``λ`` is ``lam``, ``γ`` is ``gamma`` (``γ = 1`` keeps all Fishers at full
weight), ``F*`` and ``θ*`` are ``OnlineEWCState.fisher`` and ``.anchor``.
Memory and per-step cost are constant in the number of experiences.

.. warning::

  The Fisher convention (``exact`` default, ``sampled``, ``predicted``,
  ``empirical``) sets the scale of λ exactly as for EWC; see the warning in
  :mod:`jaxcl.strategies.ewc`. Some implementations normalise the Fisher or
  omit the γ inside the penalty; their λ differ from these by those factors.

References:
  Schwarz et al., `Progress & Compress: A scalable framework for continual
  learning <https://arxiv.org/abs/1805.06370>`_, ICML 2018.

  Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
  <https://arxiv.org/abs/1612.00796>`_, PNAS 2017.

See also:
  :mod:`jaxcl.strategies.ewc`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategies import _penalty
from jaxcl.strategy import Strategy

__all__ = ["OnlineEWCState", "online_ewc"]


class OnlineEWCState(NamedTuple):
  fisher: Any        # like params: the running Fisher F*
  anchor: Any        # like params: θ* at the end of the latest experience
  count: jax.Array   # int32 scalar: experiences consolidated so far
  lam: jax.Array     # float32 scalar λ: in the state so a sweep can vary it


def online_ewc(lam: float = 100.0, gamma: float = 1.0, fisher: str = "exact",
               max_examples: int = 1000, batch_size: int = 32,
               seed: int = 0) -> Strategy:
  """Online EWC: a running Fisher ``F* ← γ F* + F`` and the latest anchor.

  Args:
    lam: penalty strength ``λ`` (>= 0).
    gamma: decay ``γ`` of the running Fisher, in ``(0, 1]``.
    fisher: ``exact`` (default), ``sampled``, ``predicted`` or
      ``empirical`` (see :mod:`jaxcl.strategies.ewc`).
    max_examples: training examples per experience for the Fisher (0: all).
    batch_size: examples per per-example-gradient batch.
    seed: picks the example subset and the ``sampled`` labels.

  Raises:
    ValueError: negative ``lam``, ``gamma`` outside ``(0, 1]``, unknown
      ``fisher``, bad sizes.
  """
  checks.nonnegative("online_ewc: lam", lam)
  if not (checks.is_real(gamma)
          and 0.0 < gamma <= 1.0):
    raise ValueError(f"online_ewc: gamma must be in (0, 1], got {gamma!r}")
  _penalty.check_fisher("online_ewc", fisher)
  _penalty.check_estimator_args("online_ewc", max_examples, batch_size, seed)

  # Compiled once per factory (ctx static); the state is an argument.
  @functools.partial(jax.jit, static_argnums=0)
  def consolidate(ctx, ss, params, model_state, batches, key):
    f = _penalty.fisher_diagonal(ctx, params, model_state, batches, key,
                                 kind=fisher)
    # jit outputs are fresh buffers, so the anchor never aliases params
    # (the loop donates the state).
    return OnlineEWCState(
        jax.tree.map(lambda old, new: gamma * old + new, ss.fisher, f),
        params, ss.count + 1, ss.lam)

  def init(ctx, key, params):
    del ctx, key
    # Copies: the loop donates the state, and a leaf aliased by params and
    # anchor would be donated twice.
    return OnlineEWCState(_penalty.zeros_like_tree(params),
                          jax.tree.map(jnp.copy, params),
                          jnp.zeros((), jnp.int32),
                          jnp.asarray(lam, jnp.float32))

  def loss(ctx, sstate, params, batch, logits):
    del ctx, batch, logits
    # Zero before the first consolidation because F* starts at zero.
    return 0.5 * sstate.lam * gamma * _penalty.quadratic(sstate.fisher,
                                                  sstate.anchor, params)

  after_experience = _penalty.consolidation_hook(consolidate, batch_size,
                                                 max_examples, seed)

  return Strategy(init=init, loss=loss, after_experience=after_experience,
                  name="online_ewc")
