"""GSA: gradient self-adaptation for online class-incremental learning
(Guo, Liu & Zhao 2023; Avalanche's ``GSA``).

In a class-incremental stream the new classes' logits get large positive
gradients from the incoming rows while the old classes' get mostly
negative ones, so the model learns to discriminate within a task but not
across tasks. GSA splits the loss in two. The incoming rows ``B`` and
``B_cur`` (a draw from memory of the current experience's rows) learn the
current experience's classes ``C_t`` among themselves only:

.. math::
   \\mathcal{L}_p = \\frac{1}{|B \\cup B_{cur}|}
     \\sum_{(x, y)} -\\log \\frac{e^{h(x)_y}}{\\sum_{c \\in C_t} e^{h(x)_c}},

and a mixed batch ``M`` (``⌊64 (1 - r)⌋`` rows of earlier experiences from
memory and the first ``⌊64 r⌋`` of ``B ∪ B_cur``, ``r = |C_t| / |C_seen|``)
learns every seen class with each row weighted by its class's gradient
ratio:

.. math::
   \\mathcal{L}_n = \\frac{1}{|M|} \\sum_{(x, y) \\in M}
     -w_y \\log \\frac{e^{h(x)_y}}{\\sum_{c \\in C_{seen}} e^{h(x)_c}},
   \\qquad w_c = \\frac{2}{1 + e^{1 - ANT_c}},
   \\qquad ANT_c = \\frac{\\sum_{y_i = c} (1 - p_{ic})}
                       {\\sum_{y_i \\neq c} p_{ic}},

``p`` the mixed rows' softmax over the seen classes (no gradient),
summed over every mixed row of the stream so far, this step's included:
the positive gradient a class's logit has received over the negative one.
``w_c > 1`` lifts a class whose logit is pushed down more than up. For
the first ``warmup_steps`` steps of each experience ``ANT = 1`` (``w = 1``).
The loss is ``L_p + 2 L_n``; on the stream's first step, with an empty
memory, ``L_p`` alone. Every row of ``B``, ``B_cur`` and ``M`` is also
used mirrored left-right (the authors' ``RandomFlip``, ``flip=True``),
and the incoming rows join a reservoir memory after each step, tagged
with their experience. Prediction is over the classes seen so far (the
authors' head grows with them).

Where the two reference codes differ, this module follows the authors'
(``gydpku/GSA``, ``test_cifar100.py``): one softmax before the
logarithm (Avalanche's ``forward_with_buffer`` softmaxes the
probabilities a second time, which flattens ``L_n``), no ``1e-5`` inside
the logarithm, and the earlier experiences' rows drawn by the memory's
experience tags (Avalanche draws them by task label, all 0 in a
class-incremental benchmark, so its ``L_n`` never sees an old row).
As in Avalanche, ``C_t`` is the experience's classes (the authors' grows
as the classes first appear in the stream) and the warm-up counts steps
(Avalanche: sub-experiences of one batch each). The authors' random
resized crop and grayscale are not part of the method here: set them
for every row with ``train.augment``.

GSA is an online method: one pass over each experience (``train.epochs
= 1``); with more epochs the reservoir is offered the same rows again.
Class-incremental streams only, each class in one experience.

Mechanics: ``prepare_batch`` appends ``B_cur`` and the earlier
experiences' draw after the incoming rows, then the mirrored copy of
all of them; ``task_loss`` reads that block (rows a member chained after
GSA appends count in the mixed term); ``after_step`` adds the step's
mixed rows to the statistics and offers the incoming rows to the
reservoir. State: :class:`GSAState`, fixed shapes (nothing recompiles
between experiences; it checkpoints, vmaps and shards like any state).

References:
  Guo, Liu & Zhao, `Dealing with cross-task class discrimination in online
  continual learning <https://arxiv.org/abs/2305.14657>`_, CVPR 2023; the
  authors' code ``gydpku/GSA``; Avalanche's
  ``avalanche/training/supervised/gsa.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.augment import in_pixels
from jaxcl.state import allow_extra_outputs
from jaxcl.strategies._class_incremental import (mark_new_classes,
                                                 predict_seen,
                                                 require_class_stream)
from jaxcl.strategies.replay import append_rows, reservoir_step
from jaxcl.strategy import Strategy

__all__ = ["gsa", "GSAState", "ant", "target_weights", "mixed_selection"]

_NEG = -1e9  # logit of a masked class (finite: keeps gradients finite)


class GSAState(NamedTuple):
  memory: buffers.Memory  # reservoir; entries tagged with their experience
  seen: jax.Array         # bool (C,): classes of the finished experiences
  current: jax.Array      # bool (C,): the current experience's classes
  experience: jax.Array   # int32 scalar: index of the current experience
  step: jax.Array         # int32 scalar: steps taken in this experience
  count: jax.Array        # float32 (C,): mixed rows of each class so far
  pos: jax.Array          # float32 (C,): sum of p_y over rows of class y
  neg: jax.Array          # float32 (C,): sum of p_c over rows not of c
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def ant(count: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  """``ANT_c = (count_c - pos_c) / neg_c``: the positive gradient class
  ``c``'s logit received over the negative one; 1 (no reweighting) for a
  class that has received no negative gradient yet."""
  ok = neg > 0
  return jnp.where(ok, (count - pos) / jnp.where(ok, neg, 1.0), 1.0)


def target_weights(ant_y: jax.Array) -> jax.Array:
  """``w = 2 / (1 + exp(1 - ANT))`` (``2 sigmoid(ANT - 1)``, in (0, 2);
  1 at ``ANT = 1``)."""
  return 2.0 * jax.nn.sigmoid(ant_y - 1.0)


def mixed_selection(mask: jax.Array, n_incoming: int, n_cur: int,
                    n_old: int, reps: int, n_from_current: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Which rows of a prepared batch are GSA's current rows and which are
  its mixed rows: bools ``(N,)`` ``(current, mixed)``.

  The batch holds ``reps`` copies of ``[incoming | B_cur | old draw]``
  (``n_incoming + n_cur + n_old`` rows each; ``mask`` already 0 on the
  old rows past the mixed batch's share), then any rows another member
  appended. The mixed rows are the valid old rows, the first
  ``n_from_current`` valid rows of ``incoming | B_cur`` in each copy,
  and the appended rows.
  """
  block = n_incoming + n_cur + n_old
  n = mask.shape[0]
  valid = mask > 0
  cur0 = valid[:n_incoming + n_cur]
  rank = jnp.cumsum(cur0) - 1
  take0 = cur0 & (rank < n_from_current)
  part = jnp.concatenate([take0, valid[n_incoming + n_cur:block]])
  current = jnp.concatenate([
      jnp.tile(jnp.concatenate([cur0, jnp.zeros((n_old,), bool)]), reps),
      jnp.zeros((n - reps * block,), bool)])
  mixed = jnp.concatenate([jnp.tile(part, reps), valid[reps * block:]])
  return current, mixed


def gsa(mem_size: int = 200, batch_size_mem: int = 64,
        batch_size_mem_cur: int = 22, flip: bool = True,
        warmup_steps: int = 5) -> Strategy:
  """GSA.

  Args:
    mem_size: reservoir capacity in examples (Avalanche's default 200; the
      authors' CIFAR-100 runs 1000).
    batch_size_mem: the mixed batch's rows before mirroring (64 in both
      codes); a smaller memory gives what it holds.
    batch_size_mem_cur: rows of the current experience drawn from memory
      for ``L_p`` (22 in both codes; at most ``mem_size``).
    flip: add each row mirrored left-right (the authors' ``RandomFlip``);
      needs image inputs (height, width, channels).
    warmup_steps: steps of each experience with ``ANT = 1`` (5).

  Raises:
    ValueError: a non-positive ``mem_size``, ``batch_size_mem`` or
      ``batch_size_mem_cur``; a negative ``warmup_steps``; at ``init``, a
      stream that is not class-incremental, or ``flip`` with inputs that
      are not images.
  """
  buffers.check_capacity(mem_size, "gsa: mem_size")
  checks.whole("gsa: batch_size_mem", batch_size_mem, 1)
  checks.whole("gsa: batch_size_mem_cur", batch_size_mem_cur, 1)
  # Draws are without replacement: a memory smaller than a draw gives all
  # it holds (the authors' sampling), so the slots drawn are at most
  # mem_size; the mixed batch's shares still count batch_size_mem rows.
  n_old_draw = min(batch_size_mem, mem_size)
  n_cur_draw = min(batch_size_mem_cur, mem_size)
  checks.flag("gsa: flip", flip)
  checks.whole("gsa: warmup_steps", warmup_steps, 0)
  reps = 2 if flip else 1
  mark = mark_new_classes("gsa")

  def init(ctx, key, params):
    del params
    require_class_stream("gsa", ctx.info, "learns the classes of each "
                         "experience apart from the earlier ones")
    shape = tuple(ctx.info.input_shape)
    if flip and len(shape) != 3:
      raise ValueError(f"gsa: flip=True mirrors images (height, width, "
                       f"channels), but the inputs are shaped {shape}; "
                       f"use flip=False")
    c = ctx.info.num_classes
    zeros = jnp.zeros((c,), jnp.float32)
    return GSAState(buffers.init(mem_size, shape), jnp.zeros((c,), bool),
                    jnp.zeros((c,), bool), jnp.zeros((), jnp.int32),
                    jnp.zeros((), jnp.int32), zeros, zeros, zeros, key)

  def before_experience(ctx, state, experience):
    state = mark(ctx, state, experience)
    return state.replace(strategy=state.strategy._replace(
        experience=jnp.asarray(experience.index, jnp.int32),
        step=jnp.zeros((), jnp.int32)))

  def shares(ss) -> tuple[jax.Array, jax.Array]:
    """``(⌊64 (1 - r)⌋, ⌊64 r⌋)``: the mixed batch's old rows and its rows
    of the current experience (the authors' ``int`` truncation; the two
    may sum to one less than 64)."""
    n_new = jnp.sum(ss.current, dtype=jnp.int32)
    n_all = jnp.maximum(jnp.sum(ss.seen | ss.current, dtype=jnp.int32), 1)
    return ((batch_size_mem * (n_all - n_new)) // n_all,
            (batch_size_mem * n_new) // n_all)

  def mirror(ctx):
    return in_pixels(lambda key, x: x[:, :, ::-1, :], ctx.normalize,
                     ctx.info.input_shape, "gsa")

  def prepare_batch(ctx, ss, batch, key):
    b = ctx.info.batch_size
    if batch["x"].shape[0] != b:
      raise ValueError(
          f"gsa: its prepare_batch got {batch['x'].shape[0]} rows, not the "
          f"training batch's {b}: a member before it in the chain appended "
          f"rows; put gsa first")
    k_cur, k_old = jax.random.split(key)
    mem = ss.memory
    i_cur, ok_cur = buffers.sample(mem, k_cur, n_cur_draw,
                                   where=mem.experience == ss.experience)
    i_old, ok_old = buffers.sample(mem, k_old, n_old_draw,
                                   where=mem.experience < ss.experience)
    n_old, _ = shares(ss)
    ok_old = ok_old & (jnp.arange(n_old_draw) < n_old)
    out = append_rows(batch, buffers.gather(mem, i_cur, ok_cur))
    out = append_rows(out, buffers.gather(mem, i_old, ok_old))
    if flip:
      rows = {f: out[f] for f in ("x", "y", "task", "mask")}
      rows["x"] = mirror(ctx)(None, rows["x"])
      out = append_rows(out, rows)
    return out

  def mixed_terms(ctx, ss, logits, batch):
    """What ``task_loss`` weighs and ``after_step`` adds to the statistics,
    from one step's logits: GSA's current rows (bool), its mixed rows (a
    float mask, 0 while the memory is empty: no mixed term on the stream's
    first step), the log-probabilities over the seen classes, and the
    mixed rows' increments to ``count``, ``pos`` and ``neg`` (no
    gradient)."""
    _, n_cur = shares(ss)
    current, mixed = mixed_selection(batch["mask"], ctx.info.batch_size,
                                     n_cur_draw, n_old_draw, reps, n_cur)
    m = mixed.astype(jnp.float32) * (buffers.size(ss.memory) > 0)
    allowed = allow_extra_outputs(ss.seen | ss.current, logits.shape[-1])
    logp = jax.nn.log_softmax(
        jnp.where(allowed, logits.astype(jnp.float32), _NEG))
    c = ss.count.shape[0]
    p = jax.lax.stop_gradient(jnp.exp(logp[:, :c]))
    onehot = jax.nn.one_hot(batch["y"], c) * m[:, None]
    deltas = (jnp.sum(onehot, 0), jnp.sum(onehot * p, 0),
              jnp.sum((m[:, None] - onehot) * p, 0))
    return current, m, logp, deltas

  def task_loss(ctx, ss, logits, batch):
    y = batch["y"]
    current, m, logp, (dc, dp, dn) = mixed_terms(ctx, ss, logits, batch)
    cur_ok = allow_extra_outputs(ss.current, logits.shape[-1])
    cur_logits = jnp.where(cur_ok, logits.astype(jnp.float32), _NEG)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(cur_logits), y[:, None],
                              1)[:, 0]
    w_cur = current.astype(jnp.float32)
    loss_p = jnp.sum(ce * w_cur) / jnp.maximum(jnp.sum(w_cur), 1.0)
    # The mixed term, with this step's rows in the statistics.
    a = jnp.where(ss.step < warmup_steps, 1.0,
                  ant(ss.count + dc, ss.pos + dp, ss.neg + dn))
    w = target_weights(a[jnp.clip(y, 0, a.shape[0] - 1)])
    nll = -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]
    loss_n = jnp.sum(w * nll * m) / jnp.maximum(jnp.sum(m), 1.0)
    return loss_p + 2.0 * loss_n

  def after_step(ctx, ss, info):
    # The step's own logits (before the update): the statistics task_loss
    # counted this step in.
    _, _, _, (dc, dp, dn) = mixed_terms(ctx, ss, info.logits, info.batch)
    mem = reservoir_step(ctx, ss, info)
    return ss._replace(memory=mem, count=ss.count + dc, pos=ss.pos + dp,
                       neg=ss.neg + dn, step=ss.step + 1)

  def after_experience(ctx, state, experience):
    del ctx, experience
    ss = state.strategy
    return state.replace(strategy=ss._replace(seen=ss.seen | ss.current))

  return Strategy(init=init, before_experience=before_experience,
                  prepare_batch=prepare_batch, task_loss=task_loss,
                  after_step=after_step, after_experience=after_experience,
                  predict=predict_seen, name="gsa")
