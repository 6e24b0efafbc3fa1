"""CWR*: copy weights with re-init, count-weighted consolidation.

Lomonaco & Maltoni (2017) introduced CWR, Maltoni & Lomonaco (2019)
refined it as CWR+, and Lomonaco, Maltoni & Pellegrini (2020) gave CWR*,
which this module implements. The output layer keeps *consolidated* weights
``cw`` (per class) in the strategy state; training uses *temporary* weights
``tw`` (the model's ``head``):

* before experience ``i`` (classes :math:`B_i`): ``tw[j] = cw[j]`` for the
  classes :math:`j \\in B_i` seen before, 0 for the new ones; classes outside
  :math:`B_i` are switched off (weight 0, bias -1e9, gradient 0), so the
  softmax is over :math:`B_i` only, as in the paper's "train on the s_i
  classes of B_i";
* the feature extractor trains in the first experience only
  (``backbone_lr_scale=0``: its gradient is zeroed and its weights are
  restored after every update, since weight decay and carried-over
  momentum move a parameter whose gradient is zero; a value in (0, 1]
  scales its gradient after the first experience instead: "trained
  slowly");
* after it, for each :math:`j \\in B_i` with ``cur_j`` training examples and
  ``past_j`` examples seen before:

.. math::
   w_{past,j} = \\sqrt{past_j / cur_j}, \\qquad
   cw[j] = \\frac{cw[j]\\, w_{past,j} + (tw[j] - \\overline{tw})}{w_{past,j} + 1},
   \\qquad past_j \\mathrel{+}= cur_j

where :math:`\\overline{tw}` is the mean of ``tw`` over the classes of
:math:`B_i`. A class's weight vector here is its head column together with
its bias (the consolidation treats the bias as one more weight).

Prediction uses the features and ``cw``; classes never seen are masked out.

**With replay (AR1*, Pellegrini et al. 2020).** When another strategy in
the chain replays examples of old classes (latent replay), those classes
must take part in training: their units are loaded from ``cw`` and left
active like the current ones, and their replayed examples count in
``cur_j`` (as in the reference implementation, where the replay memory's
class counts are added to ``cur_j`` before the head is reset). The state's
``replayed`` field holds those per-class counts; a composite such as
:func:`jaxcl.strategies.ar1.ar1` with a latent memory sets it (with
:func:`set_replayed`) *before* CWR*'s ``before_experience`` runs. Then the
active classes are :math:`B_i \\cup R` and the merge uses
``cur_j = count_j(B_i) + count_j(R)``. ``replayed`` is all zeros otherwise,
which is plain CWR*.

References:
  Lomonaco & Maltoni, `CORe50: a New Dataset and Benchmark for Continuous
  Object Recognition <https://arxiv.org/abs/1705.03550>`_, 2017.
  Maltoni & Lomonaco, `Continuous Learning in Single-Incremental-Task
  Scenarios <https://arxiv.org/abs/1806.08568>`_, 2019 (CWR+).
  Lomonaco, Maltoni & Pellegrini, `Rehearsal-Free Continual Learning over
  Small Non-I.I.D. Batches <https://arxiv.org/abs/1907.03799>`_, CVPR
  Workshops 2020 (CWR* and AR1*).
  Pellegrini, Graffieti, Lomonaco & Maltoni, `Latent replay for real-time
  continual learning <https://arxiv.org/abs/1912.01100>`_, IROS 2020
  (AR1* with latent replay, Algorithm 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl.state import masked_logits
from jaxcl.strategies._freeze import restore_part
from jaxcl.strategy import (Strategy, experience_classes,
                            predict_once_ready, require_single_head)

_OFF = -1e9  # bias of switched-off classes during training


class CWRStarState(NamedTuple):
  cw: jax.Array       # float32 (D, C): consolidated head kernel
  cb: jax.Array       # float32 (C,): consolidated head bias
  past: jax.Array     # float32 (C,): training examples seen per class
  active: jax.Array   # bool (C,): classes of the current experience
  first: jax.Array    # bool scalar: training the first experience
  replayed: jax.Array  # float32 (C,): replayed examples per class (AR1*)
  frozen: Any = None  # non-head params at the experience's start, restored
                      # after every update (backbone_lr_scale=0 only)


def set_replayed(sstate: CWRStarState, counts) -> CWRStarState:
  """``sstate`` with the per-class counts of the examples another strategy
  will replay during the coming experience (host side, before CWR*'s
  ``before_experience``): those classes stay active and count in the
  merge."""
  counts = jnp.asarray(counts, jnp.float32)
  if counts.shape != sstate.replayed.shape:
    raise ValueError(f"cwr_star: replayed counts of shape {counts.shape}; "
                     f"expected {sstate.replayed.shape} (one per class)")
  return sstate._replace(replayed=counts)


def consolidate(cw, cb, past, tw, tb, counts):
  """CWR*'s merge (Algorithm 2) for the classes with ``counts > 0``.

  Args:
    cw, cb: consolidated kernel (D, C) and bias (C,).
    past: examples of each class seen before (C,).
    tw, tb: trained temporary kernel and bias.
    counts: examples of each class in this experience (C,).

  Returns:
    New ``(cw, cb, past)``.
  """
  cur = counts > 0
  n_cur = jnp.maximum(jnp.sum(cur), 1)
  mean_w = jnp.sum(jnp.where(cur[None], tw, 0.0), axis=1, keepdims=True) / n_cur
  mean_b = jnp.sum(jnp.where(cur, tb, 0.0)) / n_cur
  wpast = jnp.sqrt(past / jnp.maximum(counts, 1.0))
  new_w = (cw * wpast + (tw - mean_w)) / (wpast + 1.0)
  new_b = (cb * wpast + (tb - mean_b)) / (wpast + 1.0)
  return (jnp.where(cur[None], new_w, cw), jnp.where(cur, new_b, cb),
          past + counts)


def cwr_star(backbone_lr_scale: float = 0.0) -> Strategy:
  """CWR* (see the module docstring).

  Args:
    backbone_lr_scale: gradient scale of the non-head parameters after the
      first experience: 0 freezes them (CWR*), in (0, 1] trains them slowly.

  Raises:
    ValueError: ``backbone_lr_scale`` outside [0, 1].
  """
  if isinstance(backbone_lr_scale, bool) or not isinstance(
      backbone_lr_scale, (int, float)) or not 0.0 <= backbone_lr_scale <= 1.0:
    raise ValueError(f"cwr_star: backbone_lr_scale={backbone_lr_scale!r} is "
                     "outside [0, 1] (0 freezes the feature extractor)")

  def body_copy(params):
    """The non-head parameters (a copy), when the backbone freezes."""
    if backbone_lr_scale != 0:
      return None
    return {k: jax.tree.map(jnp.copy, v) for k, v in params.items()
            if k != "head"}

  def init(ctx, key, params):
    del key
    c = ctx.info.num_classes
    kernel = require_single_head(
        "cwr_star", params, c, (frozenset({"kernel", "bias"}),),
        "a linear 'head' layer with a kernel and a bias "
        "(model.head='linear'; a cosine head has no bias to consolidate)"
    )["kernel"]
    return CWRStarState(jnp.zeros(kernel.shape, jnp.float32),
                        jnp.zeros((c,), jnp.float32),
                        jnp.zeros((c,), jnp.float32),
                        jnp.ones((c,), bool), jnp.asarray(True),
                        jnp.zeros((c,), jnp.float32), body_copy(params))

  def before_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    c = ss.cb.shape[0]
    # Replayed old classes train too (AR1*); none without replay.
    active = experience_classes(c, experience) | (ss.replayed > 0)
    seen = ss.past > 0
    load = active & seen
    tw = jnp.where(load[None], ss.cw, 0.0)
    tb = jnp.where(load, ss.cb, jnp.where(active, 0.0, _OFF))
    params = dict(state.params)
    params["head"] = {"kernel": tw.astype(params["head"]["kernel"].dtype),
                      "bias": tb.astype(params["head"]["bias"].dtype)}
    first = jnp.asarray(experience.index == 0)
    return state.replace(params=params,
                         strategy=ss._replace(active=active, first=first,
                                              frozen=body_copy(params)))

  def project_params(ctx, sstate, params):
    del ctx
    if sstate.frozen is None:
      return params
    for part in sstate.frozen:
      params = restore_part(params, sstate.frozen, part, ~sstate.first)
    return params

  def update_grads(ctx, sstate, grads, params, batch, key):
    del ctx, params, batch, key
    scale = jnp.where(sstate.first, 1.0, backbone_lr_scale)
    out = {k: (v if k == "head" else jax.tree.map(lambda g: g * scale, v))
           for k, v in grads.items()}
    a = sstate.active
    out["head"] = {"kernel": jnp.where(a[None], grads["head"]["kernel"], 0.0),
                   "bias": jnp.where(a, grads["head"]["bias"], 0.0)}
    return out

  def after_experience(ctx, state, experience):
    ss = state.strategy
    counts = np.bincount(experience.train_y, minlength=ctx.info.num_classes)
    counts = jnp.asarray(counts, jnp.float32) + ss.replayed
    cw, cb, past = consolidate(ss.cw, ss.cb, ss.past,
                               state.params["head"]["kernel"],
                               state.params["head"]["bias"], counts)
    return state.replace(strategy=ss._replace(cw=cw, cb=cb, past=past))

  def predict(ctx, sstate, params, model_state, x, task):
    seen = sstate.past > 0

    def consolidated():
      feats, _ = ctx.apply(params, model_state, x, task, features=True)
      logits = jnp.where(seen, feats @ sstate.cw + sstate.cb, _OFF)
      if ctx.mask_task_logits:
        logits = masked_logits(logits, task, ctx.info.task_classes)
      return logits

    return predict_once_ready(jnp.any(seen), consolidated, ctx, params,
                              model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=update_grads, project_params=project_params,
                  after_experience=after_experience, predict=predict,
                  name="cwr_star",
                  writes_params=frozenset({"before_experience"}))
