"""An MLP whose hidden units are gated per task: HAT's model.

Serra et al. (2018), eq. 1: after each hidden layer ``l``,

.. math::  h_l \\leftarrow h_l \\odot a_l^t, \\qquad
           a_l^t = \\sigma(s\\, e_l^t)

with a learned task embedding ``e_l^t`` (``params/embedding_l``, shape
``(num_tasks, width_l)``, initialised N(0, 1)) and a scale ``s``. At test
time ``s = s_max`` (almost binary gates). In training, ``s`` is annealed
over each epoch's batches ``b = 1..B`` (eq. 3):

.. math::  s = \\frac{1}{s_{max}} + \\Big(s_{max} - \\frac{1}{s_{max}}\\Big)
           \\frac{b - 1}{B - 1}

The batch position comes from a counter in the ``hat`` variable collection
(``hat/count``, incremented by every training call; ``hat/steps`` = B):
the HAT strategy resets both before each experience and keeps its own copy
of the counter for the regulariser (:mod:`jaxcl.strategies.hat`).

Heads: ``num_tasks * num_classes`` outputs, the example's task picks its
``num_classes`` (multi-head, as in the paper).

References:
  Serra et al., `Overcoming Catastrophic Forgetting with Hard Attention to
  the Task <https://arxiv.org/abs/1801.01423>`_, 2018.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl.models.masked import hat_gate


def anneal(count: jax.Array, steps: jax.Array, s_max: float) -> jax.Array:
  """HAT's ``s`` at training step ``count`` of epochs of ``steps`` batches."""
  b = jnp.mod(count, jnp.maximum(steps, 1)).astype(jnp.float32)
  frac = b / jnp.maximum(steps - 1, 1).astype(jnp.float32)
  return 1.0 / s_max + (s_max - 1.0 / s_max) * frac


class HATMLP(nn.Module):
  """See the module docstring."""
  num_classes: int
  num_tasks: int
  widths: Sequence[int] = (400, 400)
  s_max: float = 400.0

  @nn.compact
  def __call__(self, x: jax.Array, task: jax.Array | None = None,
               train: bool = False, features: bool = False) -> jax.Array:
    b = x.shape[0]
    if task is None:
      task = jnp.zeros((b,), jnp.int32)
    task = jnp.clip(task.astype(jnp.int32), 0, self.num_tasks - 1)
    count = self.variable("hat", "count", lambda: jnp.zeros((), jnp.int32))
    steps = self.variable("hat", "steps", lambda: jnp.ones((), jnp.int32))
    if train:
      s = anneal(count.value, steps.value, self.s_max)
      if self.is_mutable_collection("hat") and not self.is_initializing():
        count.value = count.value + 1
    else:
      s = jnp.asarray(self.s_max, jnp.float32)
    h = x.reshape(b, -1)
    for i, w in enumerate(self.widths):
      h = nn.relu(nn.Dense(w, name=f"Dense_{i}")(h))
      e = self.param(f"embedding_{i}", nn.initializers.normal(1.0),
                     (self.num_tasks, w))
      h = h * hat_gate(e[task], s)
    if features:
      return h
    logits = nn.Dense(self.num_tasks * self.num_classes, name="head")(h)
    if self.num_tasks == 1:
      return logits
    logits = logits.reshape(b, self.num_tasks, self.num_classes)
    return jnp.take_along_axis(logits, task[:, None, None], axis=1)[:, 0]


def build(num_classes: int, num_heads: int = 1, *,
          widths: Sequence[int] = (400, 400), num_tasks: int = 0,
          s_max: float = 400.0) -> HATMLP:
  """Builds a :class:`HATMLP`.

  Args:
    num_classes: outputs per task head.
    num_heads: used as ``num_tasks`` when that is 0.
    widths: hidden widths (each layer gated).
    num_tasks: embedding rows and heads.
    s_max: the gates' scale at test time (and the end of each epoch);
      must equal the HAT strategy's ``s_max``.
  """
  tasks = num_tasks or num_heads
  if tasks < 1:
    raise ValueError(f"num_tasks must be >= 1, got {tasks}")
  if not widths:
    raise ValueError("widths must name at least one hidden layer")
  if not s_max >= 1.0:
    raise ValueError(f"s_max must be >= 1, got {s_max}")
  return HATMLP(num_classes=num_classes, num_tasks=tasks,
                widths=tuple(int(w) for w in widths), s_max=float(s_max))
