"""Experience replay (rehearsal) with a fixed-size memory.

Every training mini-batch is the incoming batch plus ``batch_size`` examples
drawn uniformly without replacement from the memory; the loss is the mean
cross-entropy over the concatenation (Chaudhry et al. 2019's ER, Buzzega et
al. 2020's ER baseline):

.. math::
   \\mathcal{L}(\\theta) = \\frac{1}{|B| + |M_B|}
     \\sum_{(x, y) \\in B \\cup M_B} \\ell(f_\\theta(x), y),
   \\qquad M_B \\sim \\mathcal{U}(M),\\ |M_B| = \\texttt{batch\\_size}.

While the memory holds fewer than ``batch_size`` entries the missing rows
have mask 0, so the batch shape never changes. How the memory ``M`` (of
``mem_size`` slots) is filled depends on ``policy``:

* ``'reservoir'`` (default): in ``after_step``, the incoming examples of
  every step are offered to a reservoir (Vitter's algorithm R), so every
  example of the stream so far is in memory with the same probability. This
  is the streaming / online variant (batch 1-10, one pass) of Buzzega et
  al. 2020 and Chaudhry et al. 2019; it does not need experience boundaries.
* ``'experience'``: in ``after_experience``, the memory becomes
  experience-balanced: after ``i`` experiences each keeps ``mem_size // i``
  uniformly chosen examples (random replay as usually taught). Replay
  during experience ``i`` then draws only from experiences ``< i``.

State: :class:`ReplayState` (the :class:`jaxcl.buffers.Memory`, the current
experience index, a key). Its shapes are fixed at ``init`` so nothing
recompiles between experiences, and it checkpoints and vmaps like any state.

References:
  Chaudhry et al., `On tiny episodic memories in continual learning
  <https://arxiv.org/abs/1902.10486>`_, 2019.
  Buzzega et al., `Dark experience for general continual learning: a strong,
  simple baseline <https://arxiv.org/abs/2004.07211>`_, 2020.
  Rolnick et al., `Experience replay for continual learning
  <https://arxiv.org/abs/1811.11682>`_, 2019.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers
from jaxcl.strategy import Strategy, mark_experience
from jaxcl.train import device_experience

__all__ = ["replay", "ReplayState", "POLICIES", "append_rows",
           "after_grads", "class_balanced_step", "incoming_rows"]

POLICIES = ("reservoir", "experience")


class ReplayState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def append_rows(batch: dict, rows: dict) -> dict:
  """Concatenates replayed ``rows`` (x, y, task, mask) after ``batch``.

  Other keys of ``batch`` (set by other strategies) are kept unchanged.
  """
  out = dict(batch)
  for f in ("x", "y", "task", "mask"):
    out[f] = jnp.concatenate([batch[f], rows[f].astype(batch[f].dtype)], 0)
  return out


def incoming_rows(ctx, batch: dict) -> dict:
  """The stream's own rows of a prepared batch: appended rows come after
  the first ``ctx.info.batch_size`` ones."""
  b = ctx.info.batch_size
  return {f: batch[f][:b] for f in ("x", "y", "task", "mask")}


def reservoir_step(ctx, sstate, info, after: jax.Array | None = None
                   ) -> buffers.Memory:
  """``sstate.memory`` after offering the step's incoming rows to the
  reservoir (``sstate`` has ``memory``, ``key`` and ``experience``).

  ``after`` (default: the step's loss) is a value the writes must follow:
  whatever read the replayed rows, so the memory is updated in place
  (:func:`jaxcl.buffers.reservoir_add`).
  """
  rows = incoming_rows(ctx, info.batch)
  key = jax.random.fold_in(sstate.key, sstate.memory.seen)
  return buffers.reservoir_add(sstate.memory, key, rows["x"], rows["y"],
                               rows["task"], sstate.experience, rows["mask"],
                               after=info.loss if after is None else after)


def after_grads(info) -> jax.Array:
  """A value of the step's final gradient, as :func:`reservoir_step`'s
  ``after`` for a strategy that reads memory rows in ``update_grads``
  (MIR's retrieval, RAR's attack, STAR's perturbation): the memory's
  writes then follow those reads, so XLA updates it in place."""
  return jax.tree.leaves(info.grads)[0].ravel()[0]


def class_balanced_step(ctx, sstate, info) -> buffers.Memory:
  """``sstate.memory`` after offering the step's incoming rows to GDumb's
  greedy class-balanced memory (:func:`jaxcl.buffers.class_balanced_add`;
  ``sstate`` has ``memory``, ``key`` and ``experience``)."""
  rows = incoming_rows(ctx, info.batch)
  key = jax.random.fold_in(sstate.key, sstate.memory.seen)
  return buffers.class_balanced_add(
      sstate.memory, key, rows["x"], rows["y"], rows["task"],
      sstate.experience, rows["mask"], num_classes=ctx.info.num_classes)


def _check_sizes(mem_size: int, batch_size: int) -> None:
  if batch_size > mem_size:
    raise ValueError(
        f"replay batch_size={batch_size} is larger than the memory capacity "
        f"mem_size={mem_size}; use batch_size <= {mem_size}")


def replay(mem_size: int = 200, batch_size: int = 0,
           policy: str = "reservoir") -> Strategy:
  """Experience replay.

  Args:
    mem_size: memory capacity in examples.
    batch_size: replayed examples per step; 0 means the training batch size
      (as in Buzzega et al. 2020: 10 + 10 on Split MNIST).
    policy: ``'reservoir'`` (filled in ``after_step``) or ``'experience'``
      (experience-balanced, filled in ``after_experience``).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size``, an unknown ``policy``; at ``init``, a
      default batch size larger than the memory, or (``'experience'``) fewer
      slots than experiences.
  """
  buffers.check_capacity(mem_size, "mem_size")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or \
      batch_size < 0:
    raise ValueError(f"replay batch_size must be an int >= 0 (0: the "
                     f"training batch size), got {batch_size!r}")
  _check_sizes(mem_size, batch_size)
  if policy not in POLICIES:
    raise ValueError(f"unknown replay policy {policy!r}; valid: "
                     f"{list(POLICIES)}")

  def replay_size(ctx) -> int:
    return batch_size or ctx.info.batch_size

  def init(ctx, key, params):
    del params
    _check_sizes(mem_size, replay_size(ctx))
    if policy == "experience" and mem_size < ctx.info.num_experiences:
      raise ValueError(
          f"experience-balanced replay needs mem_size >= the number of "
          f"experiences ({ctx.info.num_experiences}); got {mem_size}")
    return ReplayState(buffers.init(mem_size, ctx.info.input_shape),
                       jnp.zeros((), jnp.int32), key)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def after_step(ctx, sstate, info):
    if policy != "reservoir":
      return sstate
    return sstate._replace(memory=reservoir_step(ctx, sstate, info))

  add_experience = jax.jit(buffers.experience_balanced_add)

  def after_experience(ctx, state, experience):
    if policy != "experience":
      return state
    ss = state.strategy
    data = device_experience(experience, ctx.info.train_size)
    mask = jnp.arange(ctx.info.train_size) < experience.num_train
    key = jax.random.fold_in(ss.key, experience.index)
    mem = add_experience(ss.memory, key, data["x"], data["y"], data["task"],
                         jnp.asarray(experience.index, jnp.int32), mask)
    return state.replace(strategy=ss._replace(memory=mem))

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, after_step=after_step,
                  after_experience=after_experience, name="replay")
