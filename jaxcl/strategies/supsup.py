"""SupSup: supermasks in superposition over fixed random weights.

Wortsman et al. (2020). The weights are random and never trained
(:mod:`jaxcl.models.masked_mlp` with ``mask='edge_popup'`` or ``'sign'``,
``weights='signed_constant'``, ``masked_head=True``: every layer, the output
layer included, is masked). Each task ``t`` learns a *supermask* from scores
``S_t`` (straight-through gradient): the top ``density`` fraction by
magnitude (edge-popup), or, as the reference code's MNIST experiments
(``FastMultitaskMaskConv``), the positive scores:

.. math::  W_t = W \\odot M_t, \\qquad M_t = \\mathrm{top}_k(|S_t|)
           \\ \\text{or}\\ \\mathbb{1}[S_t > 0]

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
  ``jax.jacfwd``: one JVP per task). ``gn_search='binary'`` is the paper's
  binary variant: keep the half of the candidates with the smallest
  gradient, superpose only those, repeat (``ceil(log2 T)`` gradients).

  Why the choices matter (measured on Permuted MNIST, 10 tasks, 256-256):
  with edge-popup masks on [0, 1] pixels every mask keeps more negative
  than positive weights (61%), so the superposition of 10 masks silences
  the network (3% of first-layer units active), its output is uniform
  (entropy 2.3019 of log 10 = 2.3026) and the one-shot gradient picks the
  wrong task for 4 of 10 tasks. Sign masks keep the superposed net alive:
  one-shot then errs on 1 task of 10, binary search on none.

  ``gn_objective='g'`` replaces H by the paper's G (Sec. 3.5): the output
  layer gets superfluous neurons that no label points at (the model's
  ``superfluous``; training's softmax drives them down under the right
  mask), and the task is the one whose weight most decreases
  :math:`\\log\\sum_j \\exp z_j` with the real classes' logits held
  constant, i.e. the superfluous outputs' mass.

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

import math

import jax
import jax.numpy as jnp

from jaxcl.strategies.piggyback import (all_masks, apply_masked,
                                        mask_strategy)
from jaxcl.strategy import Strategy

MODES = ("gg", "gn")
GN_SCOPES = ("batch", "example")
GN_SEARCHES = ("oneshot", "binary")
GN_OBJECTIVES = ("entropy", "g")


def _entropy(logits):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _g(logits, num_classes):
  """The G objective (Wortsman et al. 2020, Sec. 3.5): the log-sum-exp of
  all outputs with the real classes' logits held constant, so only the
  superfluous outputs carry gradient; training drove those down for the
  right task's mask."""
  real = jax.lax.stop_gradient(logits[:, :num_classes])
  return jax.nn.logsumexp(
      jnp.concatenate([real, logits[:, num_classes:]], axis=-1)
      .astype(jnp.float32), axis=-1)


def _entropy_grad(ctx, params, model_state, masks, x, alive, scope,
                  objective: str = "entropy"):
  """d(objective)/dalpha at the uniform superposition of the ``alive``
  tasks' masks; ``inf`` for the others. ``(1, T)`` (batch scope) or
  ``(B, T)``. ``objective``: ``entropy`` (H, eq. 5) or ``g``."""
  k = jnp.maximum(jnp.sum(alive), 1)
  alphas = jnp.where(alive, 1.0 / k, 0.0).astype(jnp.float32)
  dummy = jnp.zeros((x.shape[0],), jnp.int32)

  def ent(a):
    logits = ctx.model_apply({"params": params, **model_state}, x, dummy,
                             masks=masks, alphas=a,
                             all_outputs=objective == "g")
    if objective == "g":
      return _g(logits, ctx.model.num_classes)
    return _entropy(logits)

  if scope == "batch":
    g = jax.grad(lambda a: jnp.mean(ent(a)))(alphas)[None]  # (1, T)
  else:
    g = jax.jacfwd(ent)(alphas)  # (B, T)
  return jnp.where(alive[None], g, jnp.inf)


def infer_task(ctx, sstate, params, model_state, x, scope: str = "batch",
               search: str = "oneshot", objective: str = "entropy"):
  """GN's task inference: ``(B,)`` inferred task ids.

  ``search='oneshot'``: one gradient at the uniform superposition (eq. 5).
  ``'binary'``: the paper's binary variant (``se_binary_minimization`` of
  the reference code, ``log_base`` 2): keep the half of the candidate tasks
  with the smallest gradient and superpose only those, until one is left
  (``ceil(log2 T)`` gradients).
  ``objective``: the output entropy H (eq. 5) or G (see :func:`_g`; needs
  a model with superfluous outputs).

  Tasks without a stored mask are never chosen; with none stored, 0.
  """
  masks = all_masks(ctx, sstate, params)
  seen = sstate.seen
  if search == "oneshot":
    g = _entropy_grad(ctx, params, model_state, masks, x, seen, scope,
                      objective)
    t = jnp.argmin(g, axis=-1).astype(jnp.int32)
    return jnp.broadcast_to(t, (x.shape[0],))

  def halve(alive, xb):
    # One candidate set for the batch xb: (T,) bool -> (T,) bool, (T,) grad.
    g = _entropy_grad(ctx, params, model_state, masks, xb, alive, "batch",
                      objective)[0]
    n = jnp.sum(alive)
    keep = jnp.maximum((n + 1) // 2, 1)
    thr = jnp.sort(g)[keep - 1]
    return alive & (g <= thr), g

  def search_batch(xb):
    alive = seen
    g = jnp.zeros(seen.shape, jnp.float32)
    for _ in range(max(1, math.ceil(math.log2(max(seen.shape[0], 2))))):
      alive, g = halve(alive, xb)
    return jnp.argmin(jnp.where(alive, g, jnp.inf)).astype(jnp.int32)

  if scope == "batch":
    return jnp.broadcast_to(search_batch(x), (x.shape[0],))
  return jax.vmap(lambda xi: search_batch(xi[None]))(x)


def supsup(mode: str = "gg", gn_scope: str = "batch",
           gn_search: str = "oneshot",
           gn_objective: str = "entropy") -> Strategy:
  """SupSup (see the module docstring).

  Args:
    mode: ``gg`` (task given at test time) or ``gn`` (task inferred).
    gn_scope: ``batch`` (one task per evaluation batch) or ``example``.
    gn_search: ``oneshot`` (eq. 5) or ``binary`` (see :func:`infer_task`).
    gn_objective: ``entropy`` (H) or ``g`` (the G objective over
      superfluous outputs: ``model.masked_mlp.superfluous > 0``).

  Raises:
    ValueError: an unknown mode, scope, search or objective; at ``init``,
      ``gn_objective='g'`` on a model without superfluous outputs.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; valid: {list(MODES)}")
  if gn_scope not in GN_SCOPES:
    raise ValueError(f"gn_scope={gn_scope!r}; valid: {list(GN_SCOPES)}")
  if gn_search not in GN_SEARCHES:
    raise ValueError(f"gn_search={gn_search!r}; valid: {list(GN_SEARCHES)}")
  if gn_objective not in GN_OBJECTIVES:
    raise ValueError(f"gn_objective={gn_objective!r}; valid: "
                     f"{list(GN_OBJECTIVES)}")

  predict = None
  if mode == "gn":

    def predict(ctx, sstate, params, model_state, x, task):
      del task
      t = infer_task(ctx, sstate, params, model_state, x, gn_scope,
                     gn_search, gn_objective)
      return apply_masked(ctx, params, model_state, x, t,
                          all_masks(ctx, sstate, params))

  s = mask_strategy("supsup", ("edge_popup", "sign"), "", predict)

  def init(ctx, key, params):
    if mode == "gn" and gn_scope == "example" and not getattr(
        ctx.model, "mixed_batches", True):
      raise ValueError(
          "supsup: gn_scope='example' gives each example its own inferred "
          "task, so the model must route mixed batches: set "
          "model.masked_mlp.mixed_batches=True (it is False)")
    if mode == "gn" and gn_objective == "g" and not getattr(
        ctx.model, "superfluous", 0):
      raise ValueError(
          "supsup: gn_objective='g' differentiates the superfluous outputs; "
          "set model.masked_mlp.superfluous > 0 (the reference code's "
          "MNIST runs have 490)")
    return s.init(ctx, key, params)

  return s._replace(init=init, name="supsup")
