"""A feature extractor no gradient trains, for the closed-form classifiers
(Deep SLDA, RanPAC): the model's backbone as the stream starts, copied
into the strategy's state, or the flattened inputs themselves; and the
prediction of such a classifier (RanPAC, FeCAM).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcl.state import masked_logits
from jaxcl.strategies._class_incremental import mask_inactive
from jaxcl.strategy import predict_once_ready
from jaxcl.train import feature_width, init_variables

__all__ = ["FEATURES", "extract", "init_extractor", "copy_model",
           "predict_fitted"]

FEATURES = ("backbone", "input")


def extract(ctx, features: str, params: Any, model_state: Any,
            x: jax.Array, task: jax.Array) -> jax.Array:
  """``(B, D)`` float32 features: the flattened inputs (``'input'``) or
  the model's features in evaluation mode (``'backbone'``)."""
  if features == "input":
    return x.reshape(x.shape[0], -1).astype(jnp.float32)
  z, _ = ctx.apply(params, model_state, x, task, train=False, features=True)
  return z.reshape(z.shape[0], -1).astype(jnp.float32)


def init_extractor(ctx, key: jax.Array, params: Any, features: str
                   ) -> tuple[Any, Any, int]:
  """``(params, model_state, D)`` to keep in the strategy's state: ``()``
  for ``'input'``; for ``'backbone'`` a copy of the parameters (replaced
  by :func:`copy_model` as the stream starts) and a model state of the
  right structure."""
  if features == "input":
    return (), (), math.prod(ctx.info.input_shape)
  _, model_state = init_variables(ctx, key)
  frozen = jax.tree.map(jnp.copy, params)
  return frozen, model_state, feature_width(ctx, frozen, model_state)


def copy_model(state: Any) -> tuple[Any, Any]:
  """The training state's parameters and model state, copied (the
  compiled loop donates the training state's buffers)."""
  return (jax.tree.map(jnp.copy, state.params),
          jax.tree.map(jnp.copy, state.model_state))


def predict_fitted(scores: Callable[[], jax.Array], count: jax.Array, ctx,
                   params: Any, model_state: Any, x: jax.Array,
                   task: jax.Array) -> jax.Array:
  """A closed-form classifier's ``predict`` (FeCAM, RanPAC): its
  ``scores()`` ``(B, C)`` over the classes it has statistics for (``count``
  ``(C,)`` > 0; the others masked out), and in a task-incremental stream
  over the row's task's classes; the model's own logits until a class has
  statistics (:func:`jaxcl.strategy.predict_once_ready`, so ``scores`` is
  not computed before)."""
  has = count > 0

  def fitted():
    out = mask_inactive(scores(), has)
    if ctx.mask_task_logits:
      out = masked_logits(out, task, ctx.info.task_classes)
    return out

  return predict_once_ready(jnp.any(has), fitted, ctx, params, model_state,
                            x, task)
