"""Progressive neural networks: a new column per task, earlier ones frozen.

Rusu et al. (2016). The model (:mod:`jaxcl.models.progressive`, config
``model.name='progressive'``) allocates one column per task with lateral
connections from every earlier column's layers; the example's task id picks
its column. This strategy trains only the column of the current task:

.. math::  g^{(k)} \\leftarrow g^{(k)} \\cdot \\mathbb{1}[k = t]

for every parameter (all leaves are stacked along the column axis 0, lateral
weights ``U^{(k:j)}`` belong to the receiving column ``k``). Earlier columns
are therefore bit-identical after later experiences (their activations feed
the new column's laterals, but their gradients are dropped), and later
columns stay untouched until their task comes. The columns are preallocated
from the stream's length, so shapes never change and nothing recompiles.

Warning:
  Freezing relies on a zero gradient giving a zero update; ``init`` raises if
  the optimiser has weight decay.

References:
  Rusu et al., `Progressive Neural Networks
  <https://arxiv.org/abs/1606.04671>`_, 2016.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl.models.masked import check_zero_grad_is_zero_update, task_row_grads
from jaxcl.strategy import Strategy, check_task_seen, frozen_update


class ProgressiveState(NamedTuple):
  column: jax.Array  # int32 scalar: the column being trained
  seen: jax.Array    # bool (num_columns,): columns trained so far


def _num_columns(params) -> int:
  leaves = jax.tree.leaves(params)
  return int(leaves[0].shape[0]) if leaves else 0


def progressive() -> Strategy:
  """Progressive networks (see the module docstring); needs the
  ``progressive`` model."""

  def init(ctx, key, params):
    del key
    ctx.info.require_task_per_experience("progressive")
    names = set(params) if isinstance(params, dict) else set()
    if "head_W" not in names or "layer_0_W" not in names:
      raise ValueError("progressive needs the 'progressive' model "
                       "(config.model.name='progressive'); got params "
                       f"{sorted(names)}")
    cols = _num_columns(params)
    ctx.info.require_task_slots("progressive", cols, "columns",
                                "model.progressive.num_columns")
    check_zero_grad_is_zero_update(ctx.tx, params, "progressive")
    return ProgressiveState(jnp.zeros((), jnp.int32), jnp.zeros((cols,), bool))

  def before_experience(ctx, state, experience):
    t = int(experience.task_id)
    cols = state.strategy.seen.shape[0]
    if not 0 <= t < cols:
      raise ValueError(f"task id {t} outside the {cols} columns")
    return state.replace(strategy=state.strategy._replace(
        column=jnp.asarray(t, jnp.int32)))

  def freeze_grads(ctx, sstate, grads):
    del ctx
    return task_row_grads(grads, sstate.column, lambda p, g: True)

  def after_experience(ctx, state, experience):
    del ctx
    ss = state.strategy
    return state.replace(strategy=ss._replace(
        seen=ss.seen.at[int(experience.task_id)].set(True)))

  return Strategy(init=init, before_experience=before_experience,
                  update_grads=frozen_update(freeze_grads),
                  freeze_grads=freeze_grads,
                  after_experience=after_experience, name="progressive")


def checked_column(state, task: int) -> int:
  """The column of ``task``, checking it was trained (host side).

  Raises:
    ValueError: ``task`` is outside the tasks seen so far.
  """
  check_task_seen(state.strategy.seen, task)
  return int(task)
