"""Piggyback: learn a binary mask per task over frozen pretrained weights.

Mallya, Davis & Lazebnik (2018). A backbone pretrained by jaxcl (on another
data set, e.g. an ``mlp`` on Fashion-MNIST, saved with
:mod:`jaxcl.pretrained`) is loaded as the frozen weights ``W`` of a
:mod:`jaxcl.models.masked_mlp` (``model.name='masked_mlp'``,
``mask='threshold'``). Each task ``t`` learns real-valued scores ``S_t``
(initialised to ``score_init`` > ``threshold``, i.e. the full network),
thresholded to a binary mask with a straight-through estimator:

.. math::  W_t = W \\odot \\mathbb{1}[S_t > \\tau], \\qquad
           \\frac{\\partial L}{\\partial S_t} :=
           \\frac{\\partial L}{\\partial (W \\odot M_t)} \\odot W

Only the current task's scores and its head train (other tasks' score rows
and heads get zero gradients, whatever other chained strategies add; the
weights are model state, never trained). After the
task, its binary mask is stored (bool, one entry per weight: a task costs
one bit per weight plus its head) and used for prediction.

Warning:
  Earlier tasks' scores and heads stay fixed only if a zero gradient gives a
  zero update: ``init`` rejects an optimiser with weight decay.

References:
  Mallya, Davis & Lazebnik, `Piggyback: Adapting a Single Network to
  Multiple Tasks by Learning to Mask Weights
  <https://arxiv.org/abs/1801.06519>`_, 2018.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import pretrained as pretrained_lib
from jaxcl.models.masked import (binary_masks, check_zero_grad_is_zero_update,
                                 head_task_grads, score_leaves,
                                 task_row_grads)
from jaxcl.state import masked_logits
from jaxcl.strategy import Strategy, check_task_seen, frozen_update


class MaskState(NamedTuple):
  masks: Any         # {layer: bool (num_tasks, ...)}: stored binary masks
  task: jax.Array    # int32 scalar: the task being trained
  seen: jax.Array    # bool (num_tasks,): tasks with a stored mask
  loaded: jax.Array  # bool scalar: the pretrained weights are in place


def _is_scores(path, leaf) -> bool:
  del leaf
  return bool(path) and getattr(path[-1], "key", None) == "scores"


def _mask_config(ctx, name: str, kind: str | tuple[str, ...]):
  model = ctx.model
  kinds = (kind,) if isinstance(kind, str) else tuple(kind)
  if getattr(model, "mask", None) not in kinds:
    want = " or ".join(repr(k) for k in kinds)
    raise ValueError(
        f"{name} needs the 'masked_mlp' model with mask={want} "
        f"(config.model.name='masked_mlp', model.masked_mlp.mask={want})")
  return model.threshold, model.density


def all_masks(ctx, sstate: MaskState, params) -> dict[str, jax.Array]:
  """Stored masks of seen tasks, masks from the scores for the others."""
  threshold, density = ctx.model.threshold, ctx.model.density
  out = {}
  for name, scores in score_leaves(params).items():
    live = binary_masks(scores, ctx.model.mask, threshold, density)
    seen = sstate.seen.reshape((-1,) + (1,) * (scores.ndim - 1))
    out[name] = jnp.where(seen, sstate.masks[name], live)
  return out


def apply_masked(ctx, params, model_state, x, task, masks, alphas=None):
  """The masked model's logits with explicit masks (and superposition)."""
  logits = ctx.model_apply({"params": params, **model_state}, x, task,
                           masks=masks, alphas=alphas)
  if ctx.mask_task_logits:
    logits = masked_logits(logits, task, ctx.info.task_classes)
  return logits


def mask_strategy(name: str, kind: str | tuple[str, ...], pretrained: str,
                  predict: Callable | None = None) -> Strategy:
  """The per-task-mask skeleton shared by Piggyback and SupSup."""

  def init(ctx, key, params):
    del key
    # One mask per task, each trained once: refuse a stream that reuses a
    # task id now, not at its second experience.
    ctx.info.require_task_per_experience(name)
    _mask_config(ctx, name, kind)
    scores = score_leaves(params)
    rows = {s.shape[0] for s in scores.values()}
    if not scores or len(rows) != 1:
      raise ValueError(f"{name}: the model has no per-task scores")
    (n,) = rows
    ctx.info.require_task_slots(name, n, "mask slots",
                                "model.masked_mlp.num_tasks")
    check_zero_grad_is_zero_update(ctx.tx, params, name)
    masks = {k: jnp.zeros(v.shape, bool) for k, v in scores.items()}
    return MaskState(masks, jnp.zeros((), jnp.int32), jnp.zeros((n,), bool),
                     jnp.asarray(not pretrained))

  def before_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    t = int(experience.task_id)
    if not 0 <= t < ss.seen.shape[0]:
      raise ValueError(f"task id {t} outside [0, {ss.seen.shape[0]})")
    if bool(ss.seen[t]):
      raise ValueError(f"{name}: task {t} already has a stored mask; each "
                       "task trains once (task-incremental streams)")
    model_state = state.model_state
    if not bool(ss.loaded):
      flat = pretrained_lib.load(pretrained)
      model_state = dict(model_state)
      model_state["frozen"] = pretrained_lib.assign(model_state["frozen"],
                                                    flat)
    ss = ss._replace(task=jnp.asarray(t, jnp.int32), loaded=jnp.asarray(True))
    return state.replace(model_state=model_state, strategy=ss)

  def freeze_grads(ctx, sstate, grads):
    # A mask (the current task's scores and head only), declared so that a
    # chained member adding gradient (MIR, RAR, ASER) or projecting it
    # keeps off the other tasks' scores too (session 36's fuzz: mir and
    # aser after piggyback moved an earlier task's scores).
    grads = task_row_grads(grads, sstate.task, _is_scores)
    if not ctx.model.masked_head:  # one trainable head per task
      grads = head_task_grads(grads, sstate.task, ctx.model.num_tasks)
    return grads

  @functools.partial(jax.jit, static_argnums=0)
  def _store(ctx, masks, params, t):
    model = ctx.model
    masks = dict(masks)
    for k, scores in score_leaves(params).items():
      m = binary_masks(scores[t][None], model.mask, model.threshold,
                       model.density)[0]
      masks[k] = masks[k].at[t].set(m)
    return masks

  def after_experience(ctx, state, experience):
    ss = state.strategy
    t = int(experience.task_id)
    masks = _store(ctx, ss.masks, state.params, jnp.asarray(t, jnp.int32))
    return state.replace(strategy=ss._replace(masks=masks,
                                              seen=ss.seen.at[t].set(True)))

  def gg_predict(ctx, sstate, params, model_state, x, task):
    return apply_masked(ctx, params, model_state, x, task,
                        all_masks(ctx, sstate, params))

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  after_experience=after_experience,
                  predict=predict or gg_predict, name=name)


def piggyback(pretrained: str = "") -> Strategy:
  """Piggyback (see the module docstring).

  Args:
    pretrained: ``.npz`` of params written by :mod:`jaxcl.pretrained` (e.g.
      from an ``mlp`` run with the same widths); its
      ``backbone/Dense_i/{kernel,bias}`` become the frozen weights.

  Raises:
    ValueError: no pretrained file given, or none at that path.
  """
  pretrained_lib.require(pretrained, "piggyback")
  return mask_strategy("piggyback", "threshold", pretrained)


def checked_mask(state, task: int) -> dict[str, np.ndarray]:
  """Task ``task``'s stored binary masks (host side).

  Raises:
    ValueError: ``task`` is outside the tasks seen so far.
  """
  check_task_seen(state.strategy.seen, task)
  return {k: np.asarray(v[int(task)])
          for k, v in state.strategy.masks.items()}
