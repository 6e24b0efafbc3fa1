"""Dark Experience Replay (DER); DER++ (:mod:`derpp`) is ``beta > 0``.

Buzzega et al. (2020) keep, with every example of a reservoir memory
``M``, the logits :math:`z = h_{\\theta_t}(x)` the network gave it when it
was seen, and replay those logits rather than (DER) or besides (DER++) its
label. With :math:`\\ell` the cross-entropy and :math:`h_\\theta` the
network's pre-softmax outputs, each step minimises

.. math::
   \\mathcal{L}(\\theta) =
     \\mathbb{E}_{(x, y) \\sim B}\\big[\\ell(y, h_\\theta(x))\\big]
   + \\alpha\\, \\mathbb{E}_{(x', z') \\sim M}
       \\big[\\lVert z' - h_\\theta(x') \\rVert_2^2\\big]
   + \\beta\\, \\mathbb{E}_{(x'', y'') \\sim M}
       \\big[\\ell(y'', h_\\theta(x''))\\big],

the first two terms being DER's objective and the third DER++'s addition
(:math:`\\beta = 0` is DER). The two memory batches are drawn
independently, ``batch_size`` entries each, uniformly without replacement.
As in the authors' code (Mammoth's ``der.py`` / ``derpp.py``) the squared
error is averaged over the replayed entries *and* the logits (PyTorch's
``F.mse_loss``), both replay terms are 0 while the memory is empty, and the
memory is a reservoir fed every step with the incoming examples and the
logits of that step's forward pass (before the update), so DER needs no
experience boundaries and works online.

Mechanics: ``prepare_batch`` draws the memory rows into extra batch keys
(prefixed with the strategy's name) and leaves the training rows alone;
``loss`` runs the network on them in a forward pass of its own (the
authors' code does too; DER++'s two memory batches share one pass, so
with batch norm they are normalised together, where the authors' code
normalises each alone) in training mode, with the model state as the
experience started (batch norm then uses the batch's own statistics);
``after_step`` writes the incoming rows and ``StepInfo.logits`` at the
reservoir's slots (:func:`jaxcl.buffers.reservoir_slots`). Since the
training rows are untouched, DER composes with strategies that append
rows (``chain(replay(...), der(...))``).

State: :class:`DERState`, fixed shapes (``mem_size`` examples and
``mem_size`` logit vectors), so nothing recompiles between experiences and
it checkpoints and vmaps like any state.

References:
  Buzzega, Boschini, Porrello, Abati & Calderara, `Dark experience for
  general continual learning: a strong, simple baseline
  <https://arxiv.org/abs/2004.07211>`_, NeurIPS 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import buffers, checks
from jaxcl.state import cross_entropy
from jaxcl.strategies._replay_memory import init_memory, replay_sizer
from jaxcl.strategies.replay import incoming_rows
from jaxcl.strategy import Strategy, mark_experience_start

__all__ = ["der", "dark_experience_replay", "DERState", "logit_width",
           "logit_mse", "store_with_logits", "draw_with_logits", "store_step"]


class DERState(NamedTuple):
  memory: buffers.Memory  # mem_size slots of examples, labels, task ids
  logits: jax.Array       # (mem_size, outputs): logits when each was stored
  model_state: Any        # model state as the experience started (BN stats)
  experience: jax.Array   # int32 scalar: index of the current experience
  key: jax.Array          # PRNG key; per-step keys fold in memory.seen


def logit_width(ctx, params, model_state) -> int:
  """Width of the model's training-mode output (SupSup's superfluous
  neurons included), without running it."""
  x = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  out = jax.eval_shape(
      lambda p, ms: ctx.logits(p, ms, x, t, train=True), params, model_state)
  return out.shape[-1]


def logit_mse(out: jax.Array, stored: jax.Array, ok: jax.Array) -> jax.Array:
  """DER's logit term: the squared error averaged over the valid entries
  (``ok``, float) and the logits (PyTorch's ``F.mse_loss``)."""
  sq = jnp.sum(ok[:, None] * (out - stored) ** 2)
  return sq / jnp.maximum(jnp.sum(ok) * out.shape[-1], 1.0)


def draw_with_logits(name: str, memory: buffers.Memory, logits: jax.Array,
                     key: jax.Array, n: int, labels: bool = False
                     ) -> dict[str, jax.Array]:
  """``n`` memory entries drawn uniformly without replacement, with their
  stored logits, as the batch keys ``{name}_x``, ``_task``, ``_z`` and
  ``_ok`` (float: 0 where fewer than ``n`` entries exist); with
  ``labels``, their labels too (``{name}_y``)."""
  idx, ok = buffers.sample(memory, key, n)
  out = {f"{name}_x": memory.x[idx], f"{name}_task": memory.task[idx],
         f"{name}_z": logits[idx], f"{name}_ok": ok.astype(jnp.float32)}
  if labels:
    out[f"{name}_y"] = memory.y[idx]
  return out


def store_with_logits(ctx, memory: buffers.Memory, logits: jax.Array,
                      key: jax.Array, info, experience: jax.Array,
                      mask: jax.Array) -> tuple[buffers.Memory, jax.Array]:
  """The step's incoming rows (those with ``mask``) offered to the
  reservoir ``memory``, each stored with the step's training-mode logits
  at its slot in ``logits``: ``(memory, logits)`` after the step."""
  rows = incoming_rows(ctx, info.batch)
  b = mask.shape[0]
  # after=loss: the loss read the memory, so the writes follow the reads
  # and both arrays are updated in place (see buffers.reservoir_add).
  slots, seen = buffers.reservoir_slots(memory, key, mask, after=info.loss)
  mem = buffers.put_rows(memory, slots, rows["x"], rows["y"], rows["task"],
                         jnp.full((b,), experience, jnp.int32))
  logits = logits.at[slots].set(info.logits[:b].astype(jnp.float32),
                                mode="drop")
  return mem._replace(seen=seen), logits


def der(mem_size: int = 200, alpha: float = 0.3,
        batch_size: int = 0) -> Strategy:
  """Dark Experience Replay.

  Args:
    mem_size: memory capacity in examples (each with its logits).
    alpha: weight of the logit-matching (squared error) term.
    batch_size: memory entries replayed per step; 0 means the training
      batch size.

  The default ``alpha`` is Mammoth's best DER setting on Split CIFAR-10;
  ``experiments/split_mnist_replay.py`` uses its Split MNIST ones.

  Raises:
    ValueError: see :func:`dark_experience_replay`.
  """
  return dark_experience_replay(mem_size, alpha, 0.0, batch_size, "der")


def dark_experience_replay(mem_size: int, alpha: float, beta: float,
                           batch_size: int, name: str) -> Strategy:
  """DER (``beta == 0``) or DER++ (``beta > 0``), named ``name``.

  Raises:
    ValueError: a non-positive ``mem_size``, a negative or non-finite
      ``alpha`` / ``beta``, a negative ``batch_size`` or one larger than
      ``mem_size`` (at ``init`` for the default).
  """
  replay_size = replay_sizer(name, mem_size, batch_size)
  checks.nonnegative(f"{name}: alpha", alpha)
  checks.nonnegative(f"{name}: beta", beta)

  def init(ctx, key, params):
    memory, model_state, k_mem = init_memory(ctx, key, mem_size, replay_size)
    width = logit_width(ctx, params, model_state)
    return DERState(memory, jnp.zeros((mem_size, width), jnp.float32),
                    model_state, jnp.zeros((), jnp.int32), k_mem)

  def prepare_batch(ctx, sstate, batch, key):
    r = replay_size(ctx)
    k_der, k_ce = jax.random.split(key)
    mem = sstate.memory
    out = dict(batch)
    out.update(draw_with_logits(name, mem, sstate.logits, k_der, r))
    if beta:
      idx2, ok2 = buffers.sample(mem, k_ce, r)
      out[f"{name}_x2"] = mem.x[idx2]
      out[f"{name}_task2"] = mem.task[idx2]
      out[f"{name}_y2"] = mem.y[idx2]
      out[f"{name}_ok2"] = ok2.astype(jnp.float32)
    return out

  def loss(ctx, sstate, params, batch, logits):
    del logits
    r = replay_size(ctx)
    x, task = batch[f"{name}_x"], batch[f"{name}_task"]
    ok = batch[f"{name}_ok"]
    if beta:  # one forward pass for both memory batches
      x = jnp.concatenate([x, batch[f"{name}_x2"]])
      task = jnp.concatenate([task, batch[f"{name}_task2"]])
      ok = jnp.concatenate([ok, batch[f"{name}_ok2"]])
    out = ctx.logits(params, sstate.model_state, x, task, train=True,
                     mask=ok).astype(jnp.float32)
    total = alpha * logit_mse(out[:r], batch[f"{name}_z"],
                              batch[f"{name}_ok"])
    if beta:
      total = total + beta * cross_entropy(out[r:], batch[f"{name}_y2"],
                                           batch[f"{name}_ok2"])
    return total

  return Strategy(init=init, before_experience=mark_experience_start,
                  prepare_batch=prepare_batch, loss=loss,
                  after_step=store_step, name=name)


def store_step(ctx, sstate, info):
  """DER's ``after_step`` (SER's too): the step's incoming rows offered to
  the reservoir with their logits (:func:`store_with_logits`), for a state
  with the fields ``memory``, ``logits``, ``key`` and ``experience``; the
  reservoir's key folds in the rows seen so far."""
  key = jax.random.fold_in(sstate.key, sstate.memory.seen)
  mem, logits = store_with_logits(
      ctx, sstate.memory, sstate.logits, key, info, sstate.experience,
      incoming_rows(ctx, info.batch)["mask"])
  return sstate._replace(memory=mem, logits=logits)
