"""RPC: replay with a pre-allocated fixed classifier (a regular d-simplex).

Pernici et al. (2021) replace the growing, trained output layer of
class-incremental learning by a *fixed* one whose class directions are
allocated before the stream starts: the ``C`` vertices of a regular simplex
in ``d = C - 1`` dimensions, unit vectors with equal pairwise angles
(cosine ``-1/(C-1)``, the largest separation ``C`` unit vectors can have).
Classes not seen yet already take part in the softmax from the first step,
so when they arrive the features of old classes need not move to make room,
and no output is biased towards the last classes by its trained weights.
With ``z(x) ∈ R^{C-1}`` the network's features and ``W`` the fixed
``(C-1) × C`` simplex matrix (column ``c`` = class ``c``'s vertex):

.. math::
   h(x) = W^\\top z(x), \\qquad
   \\mathcal{L}(\\theta) = \\frac{1}{|B| + |M_B|}
     \\sum_{(x, y) \\in B \\cup M_B} \\ell\\big(h(x), y\\big),
   \\qquad W_{:,c}^\\top W_{:,c'} = \\begin{cases} 1 & c = c' \\\\
     -\\tfrac{1}{C-1} & c \\ne c' \\end{cases}

trained with experience replay (``M_B``: ``batch_size`` rows drawn uniformly
from the memory, appended to each incoming batch).

As Mammoth's ``models/rpc.py`` (read for this module) implements it:

* **Head.** ``z(x)`` is the model's first ``C - 1`` outputs; the last output
  is dropped (Mammoth: ``self.net(x)[:, :-1] @ self.rpchead``). With the
  standard MLP 784-100-100-10 the output layer is therefore a trained
  ``100 → 9`` map followed by the fixed ``9 → 10`` simplex; the tenth
  output unit exists but gets no gradient from the task loss. ``W`` is
  Mammoth's ``dsimplex`` construction (:func:`dsimplex`): ``[I | a·1]`` with
  ``a = (1 - √C)/(C-1)``, centred, columns scaled to unit norm.
* **Memory** (Mammoth's ``end_task``), filled only when an experience ends,
  so the first experience trains without replay. With ``K`` = ``mem_size``
  and ``S`` the classes seen so far (the ending experience's included):
  each *old* class keeps ``min(n_c, ⌊K/|S|⌋)`` of its entries (a uniform
  random subset; Mammoth keeps the first ones in insertion order, which
  came from a shuffled loader); the ``R = K -`` (kept) free slots go to the
  new classes, ``⌊R/|N|⌋`` each and one more to ``R mod |N|`` of them
  chosen at random, filled with a uniform random subset of each class's
  training examples (fewer if a class has fewer). E.g. Split MNIST,
  ``K = 200``: 100 per class after the first experience, then 50, 34 (old
  classes 33), 25, 20.
* Loss: the mean cross-entropy over incoming and replayed rows together
  (Mammoth's ``losses.mean()``); replayed rows are drawn uniformly without
  replacement, ``batch_size`` per step (Mammoth's ``minibatch_size``).

Deviations, on purpose:

* Mammoth's ``observe`` computes the loss on ``self.net(inputs)``, the raw
  ``C`` outputs, and uses the simplex only in ``forward`` (evaluation): the
  head it evaluates with is never the one it trains. Here the loss, like the
  prediction, goes through the simplex, as in the paper (eq. 1 there: the
  fixed classifier is trained through) and as this task asks. Building
  ``rpc(...)._replace(task_loss=None)`` gives Mammoth's literal behaviour
  (plain cross-entropy on the raw outputs, simplex at prediction).
* Mammoth sizes the simplex from ``N_CLASSES_PER_TASK * N_TASKS``; here it
  is the stream's ``num_classes``; and Mammoth indexes the new classes'
  quotas by ``label % classes_per_task``, which assumes each experience
  holds a contiguous block of labels: here quotas are per class, in any
  order.
* Mammoth lists RPC as task-incremental too (masking the simplex logits
  to the task). Here the engine masks the *raw* outputs of a
  task-incremental stream before any hook sees them, which would corrupt
  the projection, so only class-incremental streams are accepted.

What other members of a :func:`jaxcl.chain` see: the batch with RPC's
replayed rows appended; in ``loss`` hooks and in ``StepInfo.logits`` (DER's
stored logits) the model's **raw** outputs (``C`` of them, the last unused
by RPC), not the simplex logits; at evaluation, RPC's ``predict`` (the
simplex logits). RPC defines ``task_loss`` and ``predict``, so it cannot be
chained with another member defining either (iCaRL, ER-ACE, LUCIR, NCM
methods): :func:`jaxcl.chain` refuses.

State: :class:`RPCState`, fixed shapes; the simplex is a constant of the
compiled step, not a parameter or state leaf, so no optimiser can move it.

References:
  Pernici, Bruni, Baecchi, Turchini & Del Bimbo, `Class-incremental
  learning with pre-allocated fixed classifiers
  <https://arxiv.org/abs/2010.08657>`_, ICPR 2020 (2021).
  Buzzega et al., `Dark experience for general continual learning: a
  strong, simple baseline <https://arxiv.org/abs/2004.07211>`_, 2020
  (Mammoth).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._class_incremental import (append_exemplars,
                                                 exemplar_sizer,
                                                 mark_new_classes,
                                                 require_class_stream)
from jaxcl.strategies.icarl import exemplar_hook, require_per_class
from jaxcl.strategy import Strategy

__all__ = ["rpc", "RPCState", "dsimplex", "simplex_logits", "balanced_add"]

_BIG = jnp.iinfo(jnp.int32).max  # group id of rows outside every class


class RPCState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  seen: jax.Array         # (num_classes,) bool: classes of finished
                          # experiences
  current: jax.Array      # (num_classes,) bool: this experience's classes
  key: jax.Array          # PRNG key; the end of experience e folds in e


@functools.lru_cache(maxsize=None)
def dsimplex(num_classes: int) -> np.ndarray:
  """The ``(num_classes - 1, num_classes)`` regular-simplex matrix: column
  ``c`` is class ``c``'s unit vertex; any two columns have cosine
  ``-1/(num_classes - 1)`` (Mammoth's ``dsimplex``, vectorised).

  Raises:
    ValueError: for fewer than 2 classes (a simplex needs two vertices).
  """
  if not checks.is_whole(num_classes) or num_classes < 2:
    raise ValueError(f"rpc: a d-simplex needs num_classes >= 2 (an int), "
                     f"got {num_classes!r}")
  m = num_classes - 1
  x = np.zeros((m, num_classes))
  x[:, :m] = np.eye(m)
  # The last vertex, a·1, makes the m + 1 points equidistant.
  x[:, m] = (1.0 - np.sqrt(num_classes)) / m
  x -= x.mean(axis=1, keepdims=True)      # centroid at the origin
  x /= np.linalg.norm(x[:, 0])            # all columns share this norm
  x.setflags(write=False)                 # cached: shared by every caller
  return x


def simplex_logits(outputs: jax.Array, num_classes: int) -> jax.Array:
  """``W^T z``: the first ``num_classes - 1`` of ``outputs`` (``(..., O)``,
  ``O >= num_classes - 1``) through the fixed simplex, ``(..., C)``.

  Raises:
    ValueError: (when tracing) if the model has too few outputs.
  """
  w = dsimplex(num_classes)
  d = w.shape[0]
  if outputs.shape[-1] < d:
    raise ValueError(f"rpc needs at least num_classes - 1 = {d} model "
                     f"outputs for its {num_classes}-class simplex; the "
                     f"model has {outputs.shape[-1]}")
  z = outputs[..., :d].astype(jnp.float32)
  return z @ jnp.asarray(w, jnp.float32)


def balanced_add(mem: buffers.Memory, key: jax.Array, x: jax.Array,
                 y: jax.Array, task: jax.Array, experience: jax.Array,
                 mask: jax.Array, old: jax.Array, new: jax.Array
                 ) -> buffers.Memory:
  """Mammoth RPC's end-of-experience memory update (jit-able).

  Old classes (``old``, bool ``(C,)``) shrink to ``⌊K / |old ∪ new|⌋``
  entries each (uniformly at random); the slots left, ``R``, go to the new
  classes (``new``): ``⌊R / |new|⌋`` each, plus one for ``R mod |new|`` of
  them chosen at random, each filled with a uniform random subset of its
  rows among ``x`` (rows with ``mask`` False are padding). Entries of other
  classes are dropped.

  Args:
    mem: the memory (capacity ``K``).
    key: PRNG key.
    x: ``(N, *example_shape)`` the experience's examples; y, task: ``(N,)``.
    experience: the experience id the new entries are tagged with.
    mask: ``(N,)`` bool, the real rows.
    old, new: ``(C,)`` bool, disjoint.
  """
  k = buffers.capacity_of(mem)
  n = y.shape[0]
  k_keep, k_extra, k_rows = jax.random.split(key, 3)
  # Old classes: a random ⌊K/|S|⌋ of each.
  quota_old = k // jnp.maximum(jnp.sum(old | new, dtype=jnp.int32), 1)
  group = jnp.where(mem.valid & old[mem.y], mem.y, _BIG)
  rank = buffers.rank_within_groups(group, jax.random.uniform(k_keep, (k,)))
  keep = (group != _BIG) & (rank < quota_old)
  # New classes: split what is left, the remainder one each to random ones.
  left = k - jnp.sum(keep, dtype=jnp.int32)
  n_new = jnp.maximum(jnp.sum(new, dtype=jnp.int32), 1)
  per = left // n_new
  c = new.shape[0]
  order = buffers.rank_within_groups(jnp.where(new, 0, 1).astype(jnp.int32),
                                     jax.random.uniform(k_extra, (c,)))
  quota = jnp.where(new, per + (order < left - per * n_new), 0)
  # Rows: a random order within each new class; the first quota[y] go in.
  ok = mask & new[y]
  row_group = jnp.where(ok, y, _BIG)
  row_rank = buffers.rank_within_groups(row_group,
                                        jax.random.uniform(k_rows, (n,)))
  chosen = ok & (row_rank < quota[y])
  # At most `left` rows are chosen, and exactly `left` slots are free:
  # the i-th chosen row takes the i-th free slot.
  free = jnp.argsort(keep, stable=True)
  pos = jnp.clip(jnp.cumsum(chosen) - 1, 0, k - 1)
  slots = jnp.where(chosen, free[pos], k)
  mem = mem._replace(valid=keep)
  tags = jnp.broadcast_to(jnp.asarray(experience, jnp.int32), (n,))
  mem = buffers.put_rows(mem, slots, x, y, task, tags)
  return mem._replace(seen=mem.seen + jnp.sum(mask, dtype=jnp.int32))


def rpc(mem_size: int = 200, batch_size: int = 0) -> Strategy:
  """RPC: experience replay through a fixed d-simplex classifier.

  Args:
    mem_size: memory capacity ``K`` in examples, class-balanced at each
      experience's end (Mammoth's ``buffer_size``).
    batch_size: replayed examples per step; 0 means the training batch size
      (Mammoth's ``minibatch_size``; 10 + 10 in Buzzega et al.'s protocol).

  Raises:
    ValueError: a non-positive ``mem_size``, a negative ``batch_size`` or
      one larger than ``mem_size``; at ``init``, a stream that is not
      class-incremental, ``mem_size`` below the number of classes or a
      default batch size larger than it; when an experience starts, classes
      that came in an earlier one; when tracing, a model with fewer than
      ``num_classes - 1`` outputs.
  """
  replay_size = exemplar_sizer("rpc", mem_size, batch_size)

  def init(ctx, key, params):
    del params
    info = ctx.info
    require_class_stream("rpc", info, "pre-allocates a fixed simplex vertex "
                         "to each class and balances the memory over the "
                         "classes")
    require_per_class("rpc", mem_size, info.num_classes)
    dsimplex(info.num_classes)
    replay_size(ctx)
    c = info.num_classes
    return RPCState(buffers.init(mem_size, info.input_shape),
                    jnp.zeros((c,), bool), jnp.zeros((c,), bool), key)

  def task_loss(ctx, sstate, logits, batch):
    del sstate
    return cross_entropy(simplex_logits(logits, ctx.info.num_classes),
                         batch["y"], batch["mask"])

  @functools.partial(jax.jit, static_argnums=0)
  def update_memory(ctx, ss, params, model_state, x, y, task, n_valid,
                    experience):
    del params, model_state
    mask = jnp.arange(x.shape[0]) < n_valid
    mem = balanced_add(ss.memory, jax.random.fold_in(ss.key, experience),
                       x, y, task, experience, mask, ss.seen, ss.current)
    return ss._replace(memory=mem, seen=ss.seen | ss.current,
                       current=jnp.zeros_like(ss.current))

  def predict(ctx, sstate, params, model_state, x, task):
    del sstate
    return simplex_logits(ctx.logits(params, model_state, x, task),
                          ctx.info.num_classes)

  return Strategy(init=init, before_experience=mark_new_classes("rpc"),
                  prepare_batch=append_exemplars(replay_size),
                  task_loss=task_loss,
                  after_experience=exemplar_hook(update_memory),
                  predict=predict, name="rpc")
