"""SupSup: supermasks in superposition over fixed random weights.

Wortsman et al. (2020). The weights are random and never trained
(:mod:`jaxcl.models.masked_mlp` with ``mask='edge_popup'``,
``weights='signed_constant'``, ``masked_head=True``: every layer, the output
layer included, is masked). Each task ``t`` learns a *supermask*: scores
``S_t`` whose top ``density`` fraction by magnitude are kept (edge-popup,
straight-through gradient):

.. math::  W_t = W \\odot M_t, \\qquad M_t = \\mathrm{top}_k(|S_t|)

Only the current task's scores train; after the task its binary mask is
stored (bool) and prediction uses it.

* **GG** (task given at test time): the example's task picks its mask.
* **GN** (task not given, inferred): superpose the masks of the ``k`` tasks
  seen with weights :math:`\\alpha_i = 1/k` (eq. 4),
  :math:`p(x, \\alpha) = f(x; W \\odot \\sum_i \\alpha_i M_i)`, and take the
  task whose weight most decreases the output entropy (one-shot, eq. 5):

  .. math::  \\hat t = \\arg\\max_i \\Big(-\\frac{\\partial
             \\mathcal{H}(p(x, \\alpha))}{\\partial \\alpha_i}\\Big)

  over a whole evaluation batch (``gn_scope='batch'``, as the paper, whose
  test batches hold one task) or per example (``'example'``, with
  ``jax.jacfwd``: one JVP per task).

Warning:
  In ``'batch'`` scope the padding rows of the last evaluation batch of a
  test set (zero images) take part in the entropy. Earlier tasks' scores
  stay fixed only if a zero gradient gives a zero update (``init`` rejects
  weight decay).

References:
  Wortsman, Ramanujan, Liu, Kembhavi, Rastegari, Yosinski & Farhadi,
  `Supermasks in Superposition <https://arxiv.org/abs/2006.14769>`_, 2020.
  Ramanujan et al., `What's Hidden in a Randomly Weighted Neural Network?
  <https://arxiv.org/abs/1911.13299>`_, 2020 (edge-popup).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcl.strategies.piggyback import (all_masks, apply_masked,
                                        mask_strategy)
from jaxcl.strategy import Strategy

MODES = ("gg", "gn")
GN_SCOPES = ("batch", "example")


def _entropy(logits):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def infer_task(ctx, sstate, params, model_state, x, scope: str = "batch"):
  """GN's one-shot task inference: ``(B,)`` inferred task ids.

  Tasks without a stored mask are never chosen; with none stored, 0.
  """
  masks = all_masks(ctx, sstate, params)
  seen = sstate.seen
  k = jnp.maximum(jnp.sum(seen), 1)
  alphas = jnp.where(seen, 1.0 / k, 0.0).astype(jnp.float32)
  dummy = jnp.zeros((x.shape[0],), jnp.int32)

  def ent(a):
    logits = ctx.model.apply({"params": params, **model_state}, x, dummy,
                             masks=masks, alphas=a)
    return _entropy(logits)

  if scope == "batch":
    g = jax.grad(lambda a: jnp.mean(ent(a)))(alphas)[None]  # (1, T)
  else:
    g = jax.jacfwd(ent)(alphas)  # (B, T)
  g = jnp.where(seen[None], g, jnp.inf)
  t = jnp.argmin(g, axis=-1).astype(jnp.int32)
  return jnp.broadcast_to(t, (x.shape[0],))


def supsup(mode: str = "gg", gn_scope: str = "batch") -> Strategy:
  """SupSup (see the module docstring).

  Args:
    mode: ``gg`` (task given at test time) or ``gn`` (task inferred).
    gn_scope: ``batch`` (one task per evaluation batch) or ``example``.

  Raises:
    ValueError: an unknown mode or scope.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {list(MODES)}")
  if gn_scope not in GN_SCOPES:
    raise ValueError(f"gn_scope={gn_scope!r}; valid: {list(GN_SCOPES)}")

  predict = None
  if mode == "gn":

    def predict(ctx, sstate, params, model_state, x, task):
      del task
      t = infer_task(ctx, sstate, params, model_state, x, gn_scope)
      return apply_masked(ctx, params, model_state, x, t,
                          all_masks(ctx, sstate, params))

  s = mask_strategy("supsup", "edge_popup", "", predict)
  return s._replace(name="supsup")
