"""Multi-head: one output head per task, selected by the task id.

Turns any single-head model into a multi-head one without changing the
model, so it composes with any other strategy (``strategy.name =
'ewc+multihead'``). The model's ``head`` parameters are the *current* task's
head; a fixed stack of ``num_tasks`` heads lives in the strategy state:

* before task ``t``: the head in ``params`` becomes task ``t``'s stored head
  if it has one, else a fresh head (LeCun-normal kernel, zero bias, as
  ``flax.linen.Dense``);
* after task ``t``: the trained head is stored in slot ``t``;
* prediction for an example of task ``t``: backbone features times its
  task's stored head (the live head for a task not stored yet):

.. math::  f(x, t) = W_t^\\top \\phi(x) + b_t

In a task-incremental split the logits are also masked to the task's
classes, as the core does for single-head models. (A model built with
``model.multi_head=True`` already has per-task heads; use this strategy
with single-head models.)

Warning:
  Training sees the current head only: replayed examples of earlier tasks
  (``replay+multihead``) are scored by the current task's head.

References:
  Li & Hoiem, `Learning without Forgetting
  <https://arxiv.org/abs/1606.09282>`_, 2016 (shared backbone, task heads).
  Farquhar & Gal, `Towards Robust Evaluations of Continual Learning
  <https://arxiv.org/abs/1805.09733>`_, 2018 (multi-head evaluation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.state import masked_logits
from jaxcl.strategy import Strategy, check_task_seen


class MultiHeadState(NamedTuple):
  heads: Any         # {'kernel': (T, D, C), 'bias': (T, C)} stored heads
  filled: jax.Array  # bool (T,): task t's head is stored


def _head(params) -> dict:
  if not isinstance(params, dict) or "head" not in params:
    raise ValueError("multihead needs a model whose params have a 'head' "
                     "Dense layer (kernel, bias), e.g. mlp/cnn/resnet18; got "
                     f"{sorted(params) if isinstance(params, dict) else params}")
  head = params["head"]
  if set(head) != {"kernel", "bias"} or head["kernel"].ndim != 2:
    raise ValueError("multihead: params['head'] must be a Dense layer "
                     f"(kernel, bias); got {sorted(head)}")
  return head


def multihead() -> Strategy:
  """One head per task (see the module docstring)."""

  def init(ctx, key, params):
    del key
    if ctx.info.kind != "task":
      raise ValueError("multihead needs task ids (scenario.kind='task'), "
                       f"got kind={ctx.info.kind!r}")
    head = _head(params)
    if head["kernel"].shape[-1] != ctx.info.num_classes:
      raise ValueError(
          "multihead turns a single-head model into a multi-head one; the "
          f"model's head has {head['kernel'].shape[-1]} outputs for "
          f"{ctx.info.num_classes} classes (set model.multi_head=False)")
    n = ctx.info.num_tasks
    heads = jax.tree.map(lambda a: jnp.zeros((n,) + a.shape, a.dtype), head)
    return MultiHeadState(heads, jnp.zeros((n,), bool))

  def before_experience(ctx, state, experience):
    ss = state.strategy
    t = int(experience.task_id)
    if not 0 <= t < ss.filled.shape[0]:
      raise ValueError(f"task id {t} outside [0, {ss.filled.shape[0]})")
    if bool(ss.filled[t]):
      head = jax.tree.map(lambda a: a[t], ss.heads)
    elif experience.index == 0:
      head = state.params["head"]  # the model's own initial head
    else:
      key = jax.random.fold_in(jax.random.fold_in(state.rng, 0x4EAD), t)
      kernel = state.params["head"]["kernel"]
      head = {"kernel": nn.initializers.lecun_normal()(key, kernel.shape,
                                                       kernel.dtype),
              "bias": jnp.zeros_like(state.params["head"]["bias"])}
    params = dict(state.params)
    params["head"] = head
    del ctx
    return state.replace(params=params)

  def after_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    t = int(experience.task_id)
    heads = jax.tree.map(lambda s, a: s.at[t].set(a), ss.heads,
                         state.params["head"])
    return state.replace(strategy=MultiHeadState(heads, ss.filled.at[t].set(True)))

  def predict(ctx, sstate, params, model_state, x, task):
    feats, _ = ctx.apply(params, model_state, x, task, features=True)
    t = jnp.clip(task, 0, sstate.filled.shape[0] - 1)
    stored = sstate.filled[t][:, None]
    own = feats @ params["head"]["kernel"] + params["head"]["bias"]
    kern = sstate.heads["kernel"]
    routed = (jnp.einsum("bd,bdc->bc", feats, kern[t])
              + sstate.heads["bias"][t])
    logits = jnp.where(stored, routed, own)
    if ctx.mask_task_logits:
      logits = masked_logits(logits, task, ctx.info.task_classes)
    return logits

  return Strategy(init=init, before_experience=before_experience,
                  after_experience=after_experience, predict=predict,
                  name="multihead",
                  writes_params=frozenset({"before_experience"}))


def checked_head(state, task: int) -> Any:
  """Task ``task``'s stored head (host side).

  Raises:
    ValueError: ``task`` is outside the tasks seen so far.
  """
  check_task_seen(state.strategy.filled, task)
  return jax.tree.map(lambda a: a[int(task)], state.strategy.heads)
