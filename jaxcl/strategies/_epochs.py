"""Epochs over a fixed set of rows, inside ``jit``.

Strategies that train something of their own when an experience ends
(GDumb's model from scratch, BiC's bias layer, EEIL's balanced
fine-tuning) loop over a fixed-capacity set of rows of which only some are
valid: a memory, or logits computed from one. Each epoch visits the valid
rows in a fresh random order, ``batch_size`` at a time, and a step whose
batch holds no valid row is skipped (``lax.cond``), so the padding costs
no update and the program's shapes never depend on how full the set is.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = ["shuffled_batches", "over_epochs"]


def shuffled_batches(key: jax.Array, valid: jax.Array, batch_size: int
                     ) -> tuple[jax.Array, jax.Array]:
  """One epoch's batches: ``(idx, ok)``, each ``(steps, batch_size)`` with
  ``steps = ceil(capacity / batch_size)``.

  The valid rows come first, in a random order drawn from ``key``; ``ok``
  says which positions hold one (the rest point at row 0).
  """
  cap = valid.shape[0]
  steps = math.ceil(cap / batch_size)
  score = jnp.where(valid, jax.random.uniform(key, (cap,)), 2.0)
  order = jnp.argsort(score)  # valid rows first, in random order
  pad = steps * batch_size - cap
  order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
  ok = jnp.concatenate([valid[order[:cap]], jnp.zeros((pad,), bool)])
  return order.reshape(steps, batch_size), ok.reshape(steps, batch_size)


def over_epochs(key: jax.Array, valid: jax.Array, carry: Any, *,
                epochs: int, batch_size: int,
                step: Callable[..., Any]) -> Any:
  """``carry`` after ``epochs`` passes over the ``valid`` rows.

  ``step(carry, idx, ok, key, epoch, j) -> carry`` runs on each batch with
  a valid row: ``idx``/``ok`` from :func:`shuffled_batches`, a key of its
  own (e.g. for augmentation), and the epoch and step indices (for a
  learning-rate schedule that does not count skipped steps).
  """
  steps = math.ceil(valid.shape[0] / batch_size)

  def one(c, rows):
    idx, ok, k, e, j = rows
    return jax.lax.cond(jnp.any(ok),
                        lambda c: step(c, idx, ok, k, e, j),
                        lambda c: c, c), None

  def epoch(c, ek):
    e, k = ek
    idx, ok = shuffled_batches(k, valid, batch_size)
    rows = (idx, ok, jax.random.split(jax.random.fold_in(k, 1), steps),
            jnp.full((steps,), e), jnp.arange(steps))
    return jax.lax.scan(one, c, rows)[0], None

  return jax.lax.scan(epoch, carry, (jnp.arange(epochs),
                                     jax.random.split(key, epochs)))[0]
