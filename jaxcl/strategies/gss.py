"""GSS-greedy: gradient-based sample selection for the replay memory.

Aljundi et al. (2019) fill the memory so that its examples' gradients point
in diverse directions, without task boundaries. Each stored example keeps a
score :math:`C_i`. For incoming data with gradient :math:`g`, ``n`` stored
examples are drawn at random and their gradients :math:`G_1..G_n` taken;
the data's score is

.. math::
   c = \\max_{k} \\frac{\\langle g, G_k \\rangle}{\\lVert g \\rVert\\,
                                                \\lVert G_k \\rVert} + 1
   \\quad \\in [0, 2]

(high: redundant with the memory). While the memory has room the example
is stored with its score. When it is full and :math:`c < 1` (the gradient
opposes every sampled one), a stored example :math:`i` is drawn with
probability :math:`C_i / \\sum_j C_j` and replaced with probability
:math:`C_i / (C_i + c)`, taking score :math:`c` (the paper's Algorithm 2).
Training is Replay's: each step adds ``batch_size`` uniformly drawn memory
rows to the incoming batch (:mod:`jaxcl.strategies.replay`).

As in Mammoth's ``gss.py`` / ``utils/gss_buffer.py`` (Buzzega et al.
2020's GSS rows), which this follows: the memory is updated after the
optimiser step, with the updated parameters; the scores are cosines of
gradients of the cross-entropy with respect to all parameters; the test
``c < 1`` uses the score of the whole incoming batch (its mean loss's
gradient) and the replacement probability each example's own score, both
against the same ``n`` drawn entries; an example stored while the memory
fills takes the batch's score (0.1 for the very first batch, when the
memory is empty); the examples of a batch are offered in order. The
authors' gradients are taken in evaluation mode, and so are they here,
with the model state (batch-norm statistics) as the experience started.

Mechanics: the gradients' inner products come from one Gram matrix over
the incoming and drawn rows. For models made only of dense layers they
are computed from each layer's inputs and output gradients
(:mod:`jaxcl.dense_grams`) without forming any gradient; otherwise from
per-example gradients (``vmap`` of ``grad``). The offers are a
``lax.scan`` over the batch's rows carrying only the scores and the
counter; the rows are then written in one scatter.

State: :class:`GSSState` (the :class:`jaxcl.buffers.Memory` and the
scores), fixed shapes, so nothing recompiles between experiences.

References:
  Aljundi, Lin, Goujaud & Bengio, `Gradient based sample selection for
  online continual learning <https://arxiv.org/abs/1903.08671>`_, NeurIPS
  2019.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcl import buffers, checks, dense_grams
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.gem import factored_calls
from jaxcl.strategies.replay import append_rows, incoming_rows
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["gss", "GSSState", "cosine_scores", "offer_slots"]

_FIRST_SCORE = 0.1  # Mammoth's score for the batch that meets an empty memory


class GSSState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of input-shaped examples
  scores: jax.Array       # (mem_size,) float32: C_i of each stored example
  model_state: Any        # model state as the experience started (BN stats)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def row_loss_sum(ctx, params, model_state, x, y, task, weight) -> jax.Array:
  """``Σ_a weight_a ℓ_a``: each row's cross-entropy, weighted, with the
  model in evaluation mode (as the authors score)."""
  logits = ctx.logits(params, model_state, x, task, train=False)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y)
  return jnp.sum(ce * weight)


def gradient_gram(ctx, params, model_state, x, y, task,
                  groups: jax.Array) -> jax.Array:
  """``(K, K)`` Gram matrix of the gradients of ``K`` weighted groups of
  rows (``groups`` ``(N, K)``: row ``a``'s weight in group ``k``)."""
  n = x.shape[0]
  calls = factored_calls(ctx, params, model_state, n)
  num_params = sum(a.size for a in jax.tree.leaves(params))
  if calls is not None and dense_grams.cheaper(calls, n, groups.shape[1],
                                               num_params):
    f = dense_grams.dense_factors(
        lambda p: row_loss_sum(ctx, p, model_state, x, y, task,
                               jnp.ones((n,))), params, calls, n)
    return dense_grams.group_gram(f, groups)

  def one(xa, ya, ta):
    g = jax.grad(lambda p: row_loss_sum(ctx, p, model_state, xa[None],
                                        ya[None], ta[None], jnp.ones(1)))(
                                            params)
    return jnp.concatenate([a.reshape(-1).astype(jnp.float32)
                            for a in jax.tree.leaves(g)])

  per_row = jax.vmap(one)(x, y, task)   # (N, P)
  group_grads = groups.T @ per_row       # (K, P)
  return group_grads @ group_grads.T


def cosine_scores(gram: jax.Array, b: int, drawn_ok: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """``(c_batch, c_rows)`` from the Gram matrix of the groups ``[row_1 ..
  row_b, drawn_1 .. drawn_n, batch]``: each incoming row's and the batch's
  maximum cosine with the valid drawn rows, plus 1; ``_FIRST_SCORE`` when
  none is valid."""
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  cos = gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-8)
  n = drawn_ok.shape[0]
  against = cos[:, b:b + n]                 # every group vs the drawn rows
  best = jnp.max(jnp.where(drawn_ok[None, :], against, -jnp.inf), axis=1)
  best = jnp.where(jnp.any(drawn_ok), best + 1.0, _FIRST_SCORE)
  return best[-1], best[:b]


def offer_slots(key: jax.Array, scores: jax.Array, seen: jax.Array,
                mask: jax.Array, c_batch: jax.Array, c_rows: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Offers a batch's rows in order: ``(slots, scores, seen)`` after it.

  ``slots`` is int32 ``(B,)``, the capacity ``K`` for a row not stored (not
  offered, not accepted, or replaced by a later row of the same batch).
  """
  k = scores.shape[0]

  def offer(carry, inp):
    scores, seen = carry
    key_i, ok, c_i = inp
    k_pick, k_take = jax.random.split(key_i)
    total = jnp.sum(scores)
    p = jnp.where(total > 0, scores / jnp.maximum(total, 1e-30), 1.0 / k)
    j = jax.random.choice(k_pick, k, p=p)
    s_j = scores[j]
    take = jax.random.uniform(k_take) < s_j / jnp.maximum(s_j + c_i, 1e-30)
    fill = seen < k
    slot = jnp.where(fill, seen,
                     jnp.where((c_batch < 1.0) & take, j, k))
    slot = jnp.where(ok, slot, k)
    score = jnp.where(fill, c_batch, c_i)
    scores = scores.at[slot].set(score, mode="drop")
    return (scores, seen + ok.astype(jnp.int32)), slot

  keys = jax.random.split(key, mask.shape[0])
  (scores, seen), slots = jax.lax.scan(offer, (scores, seen),
                                       (keys, mask > 0, c_rows))
  # A later row replacing the same slot wins: drop the earlier writes so
  # the scatter has no duplicate targets.
  order = jnp.arange(slots.shape[0])
  overwritten = jnp.any((slots[None, :] == slots[:, None]) &
                        (order[None, :] > order[:, None]), axis=1)
  return jnp.where(overwritten, k, slots), scores, seen


def gss(mem_size: int = 200, batch_size: int = 0,
        score_size: int = 10) -> Strategy:
  """GSS-greedy.

  Args:
    mem_size: memory capacity in examples.
    batch_size: replayed examples per step; 0 means the training batch size.
    score_size: stored examples drawn to score each batch against
      (Mammoth's ``gss_minibatch_size``; the paper's ``n``).

  Raises:
    ValueError: a non-positive ``mem_size`` or ``score_size``, a negative
      ``batch_size``, a replayed or scored batch larger than ``mem_size``
      (at ``init`` for the default).
  """
  replay_size = replay_sizer("gss", mem_size, batch_size)
  checks.whole("gss: score_size", score_size, 1)
  if score_size > mem_size:
    raise ValueError(f"gss: score_size={score_size} is larger than the "
                     f"memory capacity mem_size={mem_size}; use score_size "
                     f"<= {mem_size}")

  def init(ctx, key, params):
    del params
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    return GSSState(memory, jnp.zeros((mem_size,), jnp.float32), model_state,
                    jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    idx, ok = buffers.sample(sstate.memory, key, replay_size(ctx))
    return append_rows(batch, buffers.gather(sstate.memory, idx, ok))

  def after_step(ctx, sstate, info):
    rows = incoming_rows(ctx, info.batch)
    b = rows["mask"].shape[0]
    mem = sstate.memory
    key = jax.random.fold_in(sstate.key, mem.seen)
    k_draw, k_offer = jax.random.split(key)
    idx, drawn_ok = buffers.sample(mem, k_draw, score_size)
    x = jnp.concatenate([rows["x"], mem.x[idx].astype(rows["x"].dtype)])
    y = jnp.concatenate([rows["y"], mem.y[idx]])
    task = jnp.concatenate([rows["task"], mem.task[idx]])
    # Groups: each incoming row, each drawn row, and the batch (the mean
    # loss of the valid incoming rows).
    m = rows["mask"].astype(jnp.float32)
    batch_w = jnp.concatenate([m / jnp.maximum(jnp.sum(m), 1.0),
                               jnp.zeros((score_size,))])
    groups = jnp.concatenate([jnp.eye(b + score_size), batch_w[:, None]], 1)
    gram = gradient_gram(ctx, info.params_after, sstate.model_state, x, y,
                         task, groups)
    c_batch, c_rows = cosine_scores(gram, b, drawn_ok)
    slots, scores, seen = offer_slots(k_offer, sstate.scores, mem.seen,
                                      rows["mask"], c_batch, c_rows)
    # after=loss, as buffers.reservoir_add: the loss read the replayed rows,
    # so the writes follow the reads and the memory is updated in place.
    slots = jnp.where(jnp.isnan(info.loss), mem_size, slots)
    mem = buffers.put_rows(mem, slots, rows["x"], rows["y"], rows["task"],
                           jnp.full((b,), sstate.experience, jnp.int32))
    return sstate._replace(memory=mem._replace(seen=seen), scores=scores)

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, after_step=after_step,
                  name="gss")
