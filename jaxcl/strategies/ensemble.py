"""Ensemble: one model per experience.

Each experience trains a freshly initialised model; after it, the model is
stored in a fixed-size stack of ``num_experiences`` slots (so the state's
shape never changes). Prediction:

* task-incremental: the model of the example's task (routing by task id);
* class-/domain-incremental: the mean of the stored models' softmax outputs,

.. math::  p(y \\mid x) = \\frac{1}{K} \\sum_{k<K} \\mathrm{softmax}(f_{\\theta_k}(x))

evaluated with ``jax.vmap`` over the stacked parameters. Before any model is
stored (e.g. the random-initialisation baseline for FWT), the current
parameters predict.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl.strategy import Strategy, predict_once_ready
from jaxcl.train import init_variables


class EnsembleState(NamedTuple):
  params: Any        # (num_experiences, ...) stacked parameters
  model_state: Any   # (num_experiences, ...) stacked model state
  filled: jax.Array  # bool (num_experiences,): slot holds a trained model


def ensemble() -> Strategy:
  """A model per experience, combined with ``vmap``."""

  def init(ctx, key, params):
    n = ctx.info.num_experiences
    stack = lambda t: jax.tree.map(
        lambda a: jnp.zeros((n,) + a.shape, a.dtype), t)
    _, model_state = init_variables(ctx, key)  # only its structure is used
    return EnsembleState(stack(params), stack(model_state),
                         jnp.zeros((n,), bool))

  def before_experience(ctx, state, experience):
    if experience.index == 0:
      return state
    # A fresh model per experience, from a key of this run and experience.
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0xE45),
                             experience.index)
    params, model_state = init_variables(ctx, key)
    return state.replace(params=params, model_state=model_state,
                         opt_state=ctx.tx.init(params))

  def after_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    i = experience.index
    put = lambda stack, new: jax.tree.map(lambda s, a: s.at[i].set(a), stack,
                                          new)
    ss = EnsembleState(put(ss.params, state.params),
                       put(ss.model_state, state.model_state),
                       ss.filled.at[i].set(True))
    return state.replace(strategy=ss)

  def predict(ctx, sstate, params, model_state, x, task):
    probs = lambda: jax.nn.softmax(jax.vmap(
        lambda p, m: ctx.logits(p, m, x, task))(
            sstate.params, sstate.model_state), axis=-1)  # (E, B, C)
    if ctx.info.kind == "task":
      # Route each example to its task's model (task id == experience).
      stacked = probs()
      t = jnp.clip(task, 0, stacked.shape[0] - 1)
      routed = jnp.take_along_axis(stacked, t[None, :, None], axis=0)[0]
      have = sstate.filled[t][:, None]
      own = ctx.logits(params, model_state, x, task)
      return jnp.where(have, jnp.log(routed + 1e-12), own)

    def mean_of_members():
      stacked = probs()
      w = sstate.filled.astype(stacked.dtype)
      mean = jnp.einsum("e,ebc->bc", w, stacked) / jnp.maximum(w.sum(), 1.0)
      return jnp.log(mean + 1e-12)

    return predict_once_ready(jnp.any(sstate.filled), mean_of_members, ctx,
                              params, model_state, x, task)

  return Strategy(init=init, before_experience=before_experience,
                  after_experience=after_experience, predict=predict,
                  name="ensemble",
                  writes_params=frozenset({"before_experience"}))
