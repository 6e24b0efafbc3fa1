"""Hooks shared by exemplar-based class-incremental strategies (LUCIR, IL2M,
EEIL, SS-IL; BiC and RPC use some).

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

from jaxcl import buffers
from jaxcl.state import cross_entropy_over
from jaxcl.strategies._replay_memory import replay_sizer
from jaxcl.strategies.icarl import (backbone_features, check_memory_fits,
                                    exemplars_per_class, features,
                                    select_exemplars)
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import new_classes
from jaxcl.train import init_variables

NEG = -1e9
_BIG = np.iinfo(np.int32).max  # herding rank of an empty slot


def exemplar_sizer(name: str, mem_size: int, batch_size: int
                   ) -> Callable[[Any], int]:
  """Validates an exemplar memory's ``mem_size`` and the ``batch_size`` of
  exemplars appended to each training batch (0: the training batch's),
  and returns ``replay_size(ctx)``, the rows appended per step
  (:func:`jaxcl.strategies._replay_memory.replay_sizer`'s).

  Raises:
    ValueError: naming strategy ``name``: a non-positive ``mem_size``, a
      negative ``batch_size`` or one larger than ``mem_size`` (here, when
      the strategy is built); ``replay_size`` raises when the training
      batch size (``batch_size`` 0) is larger than ``mem_size``.
  """
  replay_size = replay_sizer(name, mem_size, batch_size)
  if batch_size > mem_size:
    raise ValueError(f"{name}: batch_size={batch_size} is larger than "
                     f"mem_size={mem_size}; use at most {mem_size}")
  return replay_size


def require_class_stream(name: str, info: Any, why: str) -> None:
  """Raises unless the stream is class-incremental (at ``init``): ``why``
  says what strategy ``name`` does to such a stream's classes."""
  if info.kind != "class":
    raise ValueError(f"{name} {why} of a class-incremental stream "
                     f"(scenario.kind='class'), got kind={info.kind!r}")


def mark_new_classes(name: str) -> Callable[..., Any]:
  """A ``before_experience`` that sets ``current`` to the experience's
  classes, refusing classes that came in an earlier one."""

  def before_experience(ctx, state, experience):
    ss = state.strategy
    cur = np.zeros((ctx.info.num_classes,), bool)
    cur[new_classes(name, np.asarray(ss.seen), experience)] = True
    return state.replace(strategy=ss._replace(current=jnp.asarray(cur)))

  return before_experience


def mark_class_experience(name: str) -> Callable[..., Any]:
  """A ``before_experience`` for states that also keep ``class_exp`` (int32
  ``(C,)``: each class's experience, -1 unseen) and ``experience`` (int32
  scalar): :func:`mark_new_classes`, then the new classes' ``class_exp``
  and ``experience`` set to the experience's index. EEIL and SS-IL use
  both to distil each old experience's classes as a group
  (:func:`jaxcl.strategies.eeil.group_distillation`)."""
  mark = mark_new_classes(name)

  def before_experience(ctx, state, experience):
    state = mark(ctx, state, experience)
    ss = state.strategy
    e = experience.index
    return state.replace(strategy=ss._replace(
        class_exp=jnp.where(ss.current, e, ss.class_exp),
        experience=jnp.asarray(e, jnp.int32)))

  return before_experience


def init_teacher_exemplars(name: str, why: str, ctx, key: jax.Array,
                           params: Any, mem_size: int,
                           replay_size: Callable[[Any], int],
                           per_class: int = 0) -> dict[str, Any]:
  """The initial fields of a state that :func:`herding_update` and
  :func:`mark_class_experience` keep (EEIL's and SS-IL's): an empty
  memory of ``mem_size`` exemplars, no class seen, and the model as
  it starts as the teacher (``key`` draws its initial model state).

  Checks first (at ``init``) that the stream is class-incremental (``why``
  says what strategy ``name`` does to its classes), that the memory holds
  one exemplar per class (``per_class`` of each, when it grows) and that
  ``replay_size(ctx)`` fits the memory.
  """
  info = ctx.info
  require_class_stream(name, info, why)
  check_memory_fits(name, mem_size, per_class, info.num_classes)
  replay_size(ctx)
  _, variables = init_variables(ctx, key)
  c = info.num_classes
  return dict(memory=buffers.init(mem_size, info.input_shape),
              rank=jnp.full((mem_size,), _BIG, jnp.int32),
              class_exp=jnp.full((c,), -1, jnp.int32),
              experience=jnp.zeros((), jnp.int32),
              seen=jnp.zeros((c,), bool), current=jnp.zeros((c,), bool),
              teacher=jax.tree.map(jnp.copy, params),
              teacher_model_state=variables)


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


def predict_seen(ctx, sstate, params, model_state, x: jax.Array,
                 task: jax.Array) -> jax.Array:
  """A ``predict``: the network's own logits over the classes seen so far
  (EEIL, SS-IL, LUCIR, DMC: no nearest-mean classifier; IL2M rectifies
  them)."""
  return mask_unseen(ctx.logits(params, model_state, x, task), sstate)


def herding_update(mem_size: int, per_class: int = 0) -> Callable[..., Any]:
  """A jitted ``update_memory`` for :func:`jaxcl.strategies.icarl.
  exemplar_hook`: herding picks ``m`` exemplars per class
  (:func:`exemplars_per_class`; iCaRL's Algorithm 4, on the backbone's
  features), the experience's classes join ``seen``, and the model becomes
  the teacher. The state has ``memory``, ``rank``, ``seen``, ``current``,
  ``teacher`` and ``teacher_model_state``."""

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    valid = jnp.arange(x.shape[0]) < n_valid
    feats = features(backbone_features(ctx), params, model_state, x, task)
    seen = ss.seen | ss.current
    m = exemplars_per_class(mem_size, per_class, seen)
    mem, rank = select_exemplars(feats, ss.memory, ss.rank, x, y, task,
                                 valid, experience, m, ctx.info.num_classes)
    return ss._replace(memory=mem, rank=rank, seen=seen,
                       current=jnp.zeros_like(ss.current),
                       teacher=params, teacher_model_state=model_state)

  return update_memory
