"""Hooks shared by exemplar-based class-incremental strategies (LUCIR, IL2M,
EEIL).

Their states have ``memory`` (a :class:`jaxcl.buffers.Memory` of
exemplars), ``seen`` (bool per class: classes of finished experiences)
and ``current`` (bool per class: the current experience's classes). One
head covers all classes; the classes not seen yet are left out of the
cross-entropy and the prediction, as FACIL's growing heads leave them out.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy_over
from jaxcl.strategies.icarl import (backbone_features, features,
                                    select_exemplars)
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import new_classes

NEG = -1e9


def check_memory_args(name: str, mem_size: int, batch_size: int) -> None:
  """Validates an exemplar memory's ``mem_size`` and the ``batch_size`` of
  exemplars appended to each training batch (0: the training batch's)."""
  buffers.check_capacity(mem_size, f"{name}: mem_size")
  checks.whole(f"{name}: batch_size", batch_size,
               note=" (0: the training batch size)")
  if batch_size > mem_size:
    raise ValueError(f"{name}: batch_size={batch_size} is larger than "
                     f"mem_size={mem_size}; use at most {mem_size}")


def require_class_stream(name: str, info: Any, why: str) -> None:
  """Raises unless the stream is class-incremental (at ``init``): ``why``
  says what strategy ``name`` does to such a stream's classes."""
  if info.kind != "class":
    raise ValueError(f"{name} {why} of a class-incremental stream "
                     f"(scenario.kind='class'), got kind={info.kind!r}")


def require_per_class(name: str, mem_size: int, num_classes: int,
                      unit: str = "exemplars") -> None:
  """Raises unless a memory of ``mem_size`` holds one entry per class."""
  if mem_size < num_classes:
    raise ValueError(f"{name}: mem_size={mem_size} gives 0 {unit} per "
                     f"class for {num_classes} classes; use mem_size >= "
                     f"{num_classes}")


def mark_new_classes(name: str) -> Callable[..., Any]:
  """A ``before_experience`` that sets ``current`` to the experience's
  classes, refusing classes that came in an earlier one."""

  def before_experience(ctx, state, experience):
    ss = state.strategy
    cur = np.zeros((ctx.info.num_classes,), bool)
    cur[new_classes(name, np.asarray(ss.seen), experience)] = True
    return state.replace(strategy=ss._replace(current=jnp.asarray(cur)))

  return before_experience


def append_exemplars(replay_size: Callable[[Any], int]
                     ) -> Callable[..., Any]:
  """A ``prepare_batch`` that appends ``replay_size(ctx)`` exemplars drawn
  uniformly from the memory (masked out while it is empty)."""

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  return prepare_batch


def seen_cross_entropy(ctx, sstate, logits: jax.Array,
                       batch: dict) -> jax.Array:
  """A ``task_loss``: the cross-entropy over the classes seen so far (the
  finished experiences' and the current one's)."""
  del ctx
  return cross_entropy_over(logits, batch["y"], batch["mask"],
                            sstate.seen | sstate.current)


def mask_inactive(logits: jax.Array, active: jax.Array) -> jax.Array:
  """``logits`` with the classes outside ``active`` (bool ``(C,)``) at
  ``NEG``; none masked while no class is active (before the first
  experience)."""
  return jnp.where(active[None, :] | ~jnp.any(active), logits, NEG)


def mask_unseen(logits: jax.Array, sstate) -> jax.Array:
  """``logits`` with the classes not seen yet at ``NEG``."""
  return mask_inactive(logits, sstate.seen | sstate.current)


def herding_update(mem_size: int) -> Callable[..., Any]:
  """A jitted ``update_memory`` for :func:`jaxcl.strategies.icarl.
  exemplar_hook`: herding picks ``mem_size // |seen|`` exemplars per class
  (iCaRL's Algorithm 4, on the backbone's features), the experience's
  classes join ``seen``, and the model becomes the teacher. The state has
  ``memory``, ``rank``, ``seen``, ``current``, ``teacher`` and
  ``teacher_model_state``."""

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    valid = jnp.arange(x.shape[0]) < n_valid
    feats = features(backbone_features(ctx), params, model_state, x, task)
    seen = ss.seen | ss.current
    m = mem_size // jnp.maximum(jnp.sum(seen), 1)
    mem, rank = select_exemplars(feats, ss.memory, ss.rank, x, y, task,
                                 valid, experience, m, ctx.info.num_classes)
    return ss._replace(memory=mem, rank=rank, seen=seen,
                       current=jnp.zeros_like(ss.current),
                       teacher=params, teacher_model_state=model_state)

  return update_memory
